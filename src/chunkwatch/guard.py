"""The guard: fall back from token streaming to state streaming by itself.

The seed incident's fix was manual: turn token streaming off at the model
(``streaming=False``) and stream LangGraph state updates instead. The guard does
that automatically, per model call and per upstream, while the metrics and the
alert still tell on-call what is broken.

**Per call.** :meth:`Guard.wrap` wraps a chat model (or a model with tools bound).
When a streamed call fails as ``empty``, ``wrong_content_type``, ``stalled``
before its first chunk, or ``http_error`` with a status that only a request's
shape explains (400, 405, 406, 415, 422, 501 — e.g. ``stream_options`` rejected)
**and no content of that call was received** (so none can have reached the
client), the guard re-issues that one call without streaming. Nothing else is
repeated: a tool that already ran does not run again. Any other failure
(``truncated`` after tokens, 401/403/429/5xx, ...) propagates unchanged.

**Per request.** Inside :meth:`Guard.scope` the request switches to state-update
mode at the first fallback: ``scope.mode`` becomes ``"updates"``, later model
calls of the request go out without streaming, and ``on_switch(reason)`` is
called once (the reference service sends ``event: mode`` then).

**Per upstream: a breaker.** After ``failures`` fallbacks within ``window``
seconds the upstream's breaker opens: requests start in updates mode for
``cooldown`` seconds; then one request probes token streaming (half-open);
success closes the breaker, failure re-opens it.

Configuration (code, or environment via :meth:`BreakerConfig.from_env`):

=================================  ========  =========================================
variable                           default   meaning
=================================  ========  =========================================
``CHUNKWATCH_BREAKER_FAILURES``    3         fallbacks that open the breaker (N)
``CHUNKWATCH_BREAKER_WINDOW``      60        seconds they must fall within (W)
``CHUNKWATCH_BREAKER_COOLDOWN``    30        seconds the breaker stays open (T)
``CHUNKWATCH_GUARD``               1         ``0`` turns the reference service's guard off
=================================  ========  =========================================

Telemetry: ``chunkwatch_fallbacks_total{upstream,reason}``,
``chunkwatch_stream_mode{upstream,mode}`` (a state set: ``mode="updates"`` is 1),
``chunkwatch_breaker_transitions_total{upstream,to}``; the fallback call's
``chat`` span carries ``chunkwatch.fallback.reason`` and is a sibling of the
failed attempt's span; the current span gets a ``chunkwatch.fallback`` event.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from opentelemetry import trace

from chunkwatch import semconv as sc
from chunkwatch.errors import NO_GENERATIONS, StreamEmptyError
from chunkwatch.ledger import Ledger, bind, current_ledger
from chunkwatch.outcomes import FAULT_OUTCOMES, Outcome
from chunkwatch.probes import layer_order
from chunkwatch.runtime import Runtime, active, span_attributes

__all__ = ["BreakerConfig", "BreakerState", "Guard", "GuardScope"]

log = logging.getLogger("chunkwatch")

# HTTP statuses a request's shape explains: worth one try without streaming.
STREAM_SHAPE_STATUSES = frozenset({400, 405, 406, 415, 422, 501})
# Error codes (OpenAI / Azure OpenAI) that refuse the prompt itself: the same prompt
# fails without streaming too, and one user's prompt says nothing about the upstream.
PROMPT_ERROR_CODES = frozenset(
    {
        "content_filter",
        "content_policy_violation",
        "context_length_exceeded",
        "string_above_max_length",
        "invalid_prompt",
        "ResponsibleAIPolicyViolation",
    }
)


def about_the_prompt(exc: BaseException) -> bool:
    """True when ``exc`` (an openai ``APIStatusError``) refuses the prompt, not the stream:
    a prompt error code, or an error about ``messages`` / ``prompt`` rather than
    ``stream`` / ``stream_options``."""
    code = getattr(exc, "code", None)
    param = getattr(exc, "param", None)
    body = getattr(exc, "body", None)
    inner = body.get("innererror") if isinstance(body, dict) else None
    inner_code = inner.get("code") if isinstance(inner, dict) else None
    if code in PROMPT_ERROR_CODES or inner_code in PROMPT_ERROR_CODES:
        return True
    if isinstance(param, str) and param.startswith("stream"):
        return False
    return param in ("messages", "prompt", "input")


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerConfig:
    failures: int = 3
    window: float = 60.0
    cooldown: float = 30.0

    @classmethod
    def from_env(cls) -> BreakerConfig:
        env = os.environ
        return cls(
            failures=int(env.get("CHUNKWATCH_BREAKER_FAILURES", cls.failures)),
            window=float(env.get("CHUNKWATCH_BREAKER_WINDOW", cls.window)),
            cooldown=float(env.get("CHUNKWATCH_BREAKER_COOLDOWN", cls.cooldown)),
        )


@dataclass
class _Breaker:
    """One upstream's breaker. All methods are called under the guard's lock."""

    config: BreakerConfig
    state: BreakerState = BreakerState.CLOSED
    failures: deque[float] = field(default_factory=deque)
    opened_at: float = 0.0
    probing: bool = False
    reason: str = ""


class GuardScope:
    """One request under the guard: its mode and what to do when it switches."""

    def __init__(self, upstream: str, mode: str, on_switch: Callable[[str], None] | None) -> None:
        self.upstream = upstream
        self.mode = mode  # "tokens" or "updates"
        self.reason: str | None = None
        self._on_switch = on_switch
        self.probe = False  # this request probes a half-open breaker

    def switch(self, reason: str) -> None:
        if self.mode == "updates":
            return
        self.mode, self.reason = "updates", reason
        if self._on_switch is not None:
            self._on_switch(reason)


_scope: contextvars.ContextVar[GuardScope | None] = contextvars.ContextVar(
    "chunkwatch_guard_scope", default=None
)


class Guard:
    """Fallback decisions and one breaker per upstream. Thread-safe."""

    def __init__(
        self,
        config: BreakerConfig | None = None,
        *,
        runtime: Runtime | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or BreakerConfig()
        self._runtime = runtime
        self._clock = clock
        self._lock = threading.Lock()
        self._breakers: dict[str, _Breaker] = {}

    @property
    def runtime(self) -> Runtime | None:
        return self._runtime or active()

    # -- the breaker ------------------------------------------------------------------------

    def state(self, upstream: str) -> BreakerState:
        with self._lock:
            return self._breaker(upstream).state

    def _breaker(self, upstream: str) -> _Breaker:
        breaker = self._breakers.get(upstream)
        if breaker is None:
            breaker = self._breakers[upstream] = _Breaker(self.config)
            rt = self.runtime  # the mode series exists from the first request on
            if rt is not None:
                try:
                    rt.metrics.set_stream_mode(upstream, "tokens")
                except Exception:
                    rt.bookkeeping_error(sc.SDK, "guard")
        return breaker

    def _move(self, upstream: str, breaker: _Breaker, to: BreakerState) -> None:
        if breaker.state is to:
            return
        log.warning(
            "chunkwatch guard: breaker for %s %s -> %s (%s)",
            upstream,
            breaker.state,
            to,
            breaker.reason or "-",
        )
        breaker.state = to
        rt = self.runtime
        if rt is None:
            return
        try:
            rt.metrics.breaker_transitions.labels(upstream, str(to)).inc()
            rt.metrics.set_stream_mode(
                upstream, "tokens" if to is BreakerState.CLOSED else "updates"
            )
        except Exception:
            rt.bookkeeping_error(sc.SDK, "guard")

    def start(self, upstream: str) -> tuple[str, bool]:
        """The mode a new request to ``upstream`` starts in, and whether it is the probe."""
        with self._lock:
            b = self._breaker(upstream)
            if b.state is BreakerState.OPEN and self._clock() - b.opened_at >= b.config.cooldown:
                self._move(upstream, b, BreakerState.HALF_OPEN)
            if b.state is BreakerState.CLOSED:
                return "tokens", False
            if b.state is BreakerState.HALF_OPEN and not b.probing:
                b.probing = True
                return "tokens", True
            return "updates", False

    def succeeded(self, upstream: str) -> None:
        """A streamed model call went through."""
        with self._lock:
            b = self._breaker(upstream)
            if b.state is BreakerState.HALF_OPEN:
                b.probing = False
                b.failures.clear()
                self._move(upstream, b, BreakerState.CLOSED)

    def failed(self, upstream: str, reason: str) -> None:
        """A streamed model call failed in a way the guard fell back from."""
        with self._lock:
            b = self._breaker(upstream)
            now = self._clock()
            b.reason = reason
            if b.state is BreakerState.HALF_OPEN:
                b.probing = False
                b.opened_at = now
                self._move(upstream, b, BreakerState.OPEN)
                return
            b.failures.append(now)
            while b.failures and now - b.failures[0] > b.config.window:
                b.failures.popleft()
            if b.state is BreakerState.CLOSED and len(b.failures) >= b.config.failures:
                b.opened_at = now
                self._move(upstream, b, BreakerState.OPEN)

    def last_reason(self, upstream: str) -> str:
        with self._lock:
            return self._breaker(upstream).reason

    # -- requests ---------------------------------------------------------------------------

    @contextmanager
    def scope(
        self, upstream: str, on_switch: Callable[[str], None] | None = None
    ) -> Iterator[GuardScope]:
        """One request: starts in the mode the breaker allows; switches on fallback."""
        mode, probe = self.start(upstream)
        scope = GuardScope(upstream, mode, on_switch)
        scope.probe = probe
        if mode == "updates":
            scope.reason = f"breaker_open ({self.last_reason(upstream) or 'streaming failed'})"
        token = _scope.set(scope)
        try:
            yield scope
        finally:
            _scope.reset(token)
            if probe:  # a probe that made no model call must not block the next one
                with self._lock:
                    self._breaker(upstream).probing = False

    def wrap(self, model: Any, *, upstream: str | None = None) -> Any:
        """``model`` (a chat model, or one with tools bound) with fallback on broken streams."""
        from chunkwatch._guarded import GuardedModel

        return GuardedModel(guard=self, inner=model, upstream=upstream)

    # -- the decision -----------------------------------------------------------------------

    def fallback_reason(self, exc: BaseException, ledger: Ledger | None, since: int) -> str | None:
        """Why the failed call may be re-issued without streaming, or None if it may not."""
        tallies = ledger.tallies[since:] if ledger is not None else []
        sdk = [t for t in tallies if t.layer == sc.SDK]
        if any(t.content_units for t in sdk):
            return None  # content of this call was received: it may have reached the client
        order = layer_order()
        faults = sorted(
            (t for t in tallies if t.outcome in FAULT_OUTCOMES),
            key=lambda t: order.get(t.layer, len(order)),
        )
        if faults:
            t = faults[0]
            eligible = (
                t.outcome in (Outcome.EMPTY, Outcome.WRONG_CONTENT_TYPE)
                or (
                    t.outcome is Outcome.STALLED
                    and (t.stalled in (None, "first_chunk"))
                    and not t.units
                )
                or (
                    t.outcome is Outcome.HTTP_ERROR
                    and t.status in STREAM_SHAPE_STATUSES
                    and not about_the_prompt(exc)
                )
            )
            return f"{t.outcome}@{t.layer}" if eligible else None
        # Not instrumented (or no tally): only the unmistakable empty stream qualifies.
        if isinstance(exc, StreamEmptyError) or (
            type(exc) is ValueError and NO_GENERATIONS in str(exc)
        ):
            return "empty@sdk"
        return None

    def record_fallback(self, upstream: str, reason: str) -> None:
        """Count a fallback (the breaker counts it only once the fallback worked:
        :meth:`failed`, called by the guarded model)."""
        rt = self.runtime
        if rt is not None:
            try:
                rt.metrics.fallbacks.labels(upstream, reason).inc()
            except Exception:
                rt.bookkeeping_error(sc.SDK, "guard")
        span = trace.get_current_span()
        span.add_event(sc.EVENT_FALLBACK, {sc.A_FALLBACK_REASON: reason, sc.A_UPSTREAM: upstream})
        log.warning(
            "chunkwatch guard: %s on %s, re-issuing the call without streaming", reason, upstream
        )


def current_scope() -> GuardScope | None:
    return _scope.get()


def own_ledger() -> Any:
    """A ledger for a guarded call outside any request (so the probes' tallies are seen)."""
    return bind(Ledger()) if current_ledger() is None else _noop()


@contextmanager
def _noop() -> Iterator[None]:
    yield


def fallback_attributes(reason: str) -> Any:
    """Span attributes for the calls made while re-issuing (the sdk probe adds them)."""
    return span_attributes({sc.A_FALLBACK_REASON: reason})
