"""The per-request ledger and the per-stream tallies the probes record into.

A :class:`Ledger` is created for each inbound request and travels with it
*explicitly*: the HTTP probe puts it on the WSGI environ, the service hands it to
the agent task, and :func:`bind` makes it the current ledger inside that task
(contextvars flow from there into LangGraph's child tasks, but not across the
thread and queue hand-off, which is why the hand-off is explicit).

Each probe opens a :class:`Tally` per stream it sees. The hot path is
:meth:`Tally.unit`: one ``perf_counter_ns()`` and a few integer operations.
Everything else — outcome, detail, metrics, span attributes — happens once, in
:meth:`Tally.finish`, which runs exactly once whatever ends the stream.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context

from chunkwatch.outcomes import End, Evidence, Outcome, classify, end_for_exception
from chunkwatch.probes import layer_order

if TYPE_CHECKING:
    from chunkwatch.orphans import Orphans

__all__ = ["Ledger", "Tally", "bind", "current_ledger"]

log = logging.getLogger("chunkwatch")

_now = time.perf_counter_ns


@dataclass(slots=True, eq=False)
class Tally(Evidence):
    """One stream at one layer: the evidence, plus what finalization needs.

    Whatever one module sets and another reads is a typed field here: the verdict's
    words (``unit_name``, ``upstream_said``, ``malformed_why``, ``deadline``,
    ``silent_for``), the watchdog's abort (``abort``, ``task``, ``aborted``), the
    orphans that follow it, and how :meth:`Runtime._finish
    <chunkwatch.runtime.Runtime._finish>` treats it (``keep_span``, ``stream_metrics``).

    ``facts`` holds only what one probe notes for its own span attributes and reads
    back itself: ``t_first_byte`` (gateway, sse), ``span_attributes`` (gateway),
    ``usage`` and ``response`` (sdk), ``waits`` (doctor).
    """

    upstream: str = "none"
    t_headers: int | None = None
    max_gap_ns: int = 0
    content_units: int = 0
    bytes: int = 0
    comments: int = 0
    content_length: int | None = None
    content_encoding: str | None = None
    finish_reasons: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # one probe's own span facts
    outcome: Outcome | None = None
    on_finish: Callable[[Tally], None] | None = None
    ledger: Ledger | None = None
    span: Any = None
    # -- read by the verdict's words -------------------------------------------------------
    unit_kind: str | None = None  # langgraph: "token" (token events) or a stream mode
    unit_name: str | None = None  # the units in words, where the layer's default is wrong
    upstream_said: str | None = None  # what the upstream said in-band (an error event)
    malformed_why: str | None = None  # why the bytes are not an event stream of chunks
    deadline: float | None = None  # the deadline it stalled at, in seconds
    silent_for: float | None = None  # open and silent that long when its request ended
    genai: tuple[str, str] | None = None  # sdk: (provider, model), the GenAI metric labels
    # -- stalls: the watchdog and the request's end abort it -------------------------------
    abort: Callable[[], None] | None = None  # cancels the read waiting on it (abort=True)
    task: Any = None  # the asyncio task waiting on its next read
    aborted: tuple[str, float] | None = None  # (stall kind, after seconds) once aborted
    orphans: Orphans | None = None  # its client left: followed until it stops
    # -- how Runtime._finish treats it ------------------------------------------------------
    keep_span: bool = False  # its span is ended by its owner (the request's, after the verdict)
    watched: bool = False  # the watchdog checks its deadlines (it forgets it at the end)
    stream_metrics: bool = True  # False: a span but no stream metrics (a plain http response)

    def unit(self, n: int = 1) -> None:
        """``n`` units passed on. The whole per-chunk cost of a probe.

        The per-chunk loops of the probes (gateway body, sdk ``see``, langgraph
        ``_watch``, the queue's ``_get``, the sse body) inline these lines, marked
        "Tally.unit, inlined": the call itself would cost a large share of the body
        (measured by ``bench/probe_instructions.py``; figures in ``bench/RESULTS.md``).
        Change them together."""
        now = _now()
        last = self.t_last
        if last is None:
            self.t_first = now
        elif now - last > self.max_gap_ns:
            self.max_gap_ns = now - last
        self.t_last = now
        self.units += n

    def abort_stalled(self, kind: str, after: float) -> None:
        """Abort the stream, stalled (``kind``) after ``after`` seconds: ``abort`` cancels
        the read waiting on it, and its probe raises ``StreamStalledError``."""
        self.aborted = (kind, after)
        if self.abort is not None:
            self.abort()

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def fail(self, exc: BaseException) -> None:
        """Finish because ``exc`` ended the stream."""
        self.exc_type = type(exc).__name__
        self.finish(end_for_exception(exc))

    def finish(self, end: End = End.CLEAN) -> Outcome:
        """Classify and report, once. Later calls return the first outcome."""
        if self.outcome is not None:
            return self.outcome
        self.end = end
        self.t_end = _now()
        self.outcome = classify(self)
        if self.on_finish is not None:
            try:
                self.on_finish(self)
            except Exception:  # telemetry never breaks the host
                log.debug("chunkwatch: finishing a %s stream failed", self.layer, exc_info=True)
        return self.outcome

    # -- derived facts, in seconds ------------------------------------------------------------

    def seconds(self, t: int | None) -> float | None:
        return None if t is None else (t - self.t_start) / 1e9

    @property
    def duration(self) -> float:
        end = self.t_end if self.t_end is not None else _now()
        return (end - self.t_start) / 1e9

    @property
    def time_to_first(self) -> float | None:
        return self.seconds(self.t_first)


def _tally_maker() -> Callable[..., Tally]:
    """``Tally(layer=, t_start=, upstream=, on_finish=, ledger=)``, positionally, without
    the dataclass ``__init__``: its 49 keyword parameters made a tally cost ~10 k
    instructions, six a request (bench/RESULTS.md, "Per-request fixed cost, after").
    Generated from the dataclass's own fields, as ``__init__`` is, so the two cannot
    drift: every field is set, to its default unless given."""
    given = ("layer", "t_start", "upstream", "on_finish", "ledger")
    if hasattr(Tally, "__post_init__"):  # its __init__ does more than set the fields
        return lambda *values: Tally(**dict(zip(given, values, strict=True)))
    literal: dict[Any, str] = {list: "[]", dict: "{}"}
    env: dict[str, Any] = {"_new": object.__new__, "Tally": Tally}
    lines = [f"def new_tally({', '.join(given)}):", "    t = _new(Tally)"]
    for f in fields(Tally):
        if f.name in given:
            value = f.name
        elif f.default_factory is not MISSING:
            factory: Any = f.default_factory
            value = literal.get(factory) or f"_factory_{f.name}()"
            env[f"_factory_{f.name}"] = factory
        elif f.default is None or type(f.default) in (bool, int, str):
            value = repr(f.default)  # a constant of the code
        else:
            value = f"_default_{f.name}"
            env[value] = f.default
        lines.append(f"    t.{f.name} = {value}")
    lines.append("    return t")
    exec("\n".join(lines), env)  # our own field names: as dataclasses writes __init__
    maker: Callable[..., Tally] = env["new_tally"]
    return maker


_new_tally = _tally_maker()


class Ledger:
    """Everything one request's layers saw (:func:`chunkwatch.verdict.judge` draws its verdict)."""

    def __init__(self, *, request_id: str | None = None) -> None:
        self.request_id = request_id
        self.tallies: list[Tally] = []
        self.t_start = _now()
        self.parent_context: Any = None  # OTel context new work of this request parents to
        self.upstream: str | None = None
        self.attributes: dict[str, Any] = {}  # app-level facts (mode, fallback, ...)
        self.closed = False  # the request's verdict is drawn: new streams are not its own
        self.unlinked = False  # a stream's own ledger: no request could be found for it
        self.orphans: Orphans | None = None  # the client left: model streams still followed
        self.route: str | None = None  # the matched route (Flask's url_rule), when known
        self.trace_id: str | None = None  # its sampled trace id, for exemplars ...
        self.trace_known = False  # ... once a span of it was asked (Runtime.trace_id)
        self._funnel: dict[str, int] | None = None  # kept once the request ended (funnel)

    def open(
        self,
        layer: str,
        *,
        upstream: str | None = None,
        on_finish: Callable[[Tally], None] | None = None,
        **fields: Any,
    ) -> Tally:
        """Start a tally for one stream at ``layer``, with the ``fields`` known now."""
        tally = self.add(layer, upstream, on_finish)
        if fields:
            for key, value in fields.items():
                setattr(tally, key, value)
        return tally

    def add(
        self, layer: str, upstream: str | None, on_finish: Callable[[Tally], None] | None
    ) -> Tally:
        """:meth:`open` without fields, its arguments positional: the runtime's, once a
        stream (a keyword call with ``**fields`` costs about as much as the tally)."""
        name = upstream or self.upstream or "none"
        if upstream and self.upstream is None:
            self.upstream = upstream
        tally = _new_tally(layer, _now(), name, on_finish, self)
        self.tallies.append(tally)
        return tally

    def layer(self, name: str) -> list[Tally]:
        return [t for t in self.tallies if t.layer == name]

    def units(self, layer: str) -> int:
        return sum(t.units for t in self.tallies if t.layer == layer)

    def funnel(self) -> dict[str, int]:
        """Units each layer passed on, bottom to top, for the layers that saw this request.
        (A new dict each call: the caller may keep or change it.) Once the request ended
        with no stream left running for a departed client, it is the funnel its verdict
        was drawn from: the verdict, its span and the browser's record read it once."""
        kept = self._funnel
        if kept is not None:
            return dict(kept)
        seen: dict[str, int] = {}
        for t in self.tallies:
            layer = t.layer
            seen[layer] = seen.get(layer, 0) + t.units
        out = {layer: seen[layer] for layer in layer_order() if layer in seen}
        if len(out) < len(seen):  # layers not in the table, above all
            out.update(seen)
        if self.closed and self.orphans is None:
            self._funnel = dict(out)
        return out


_current: contextvars.ContextVar[Ledger | None] = contextvars.ContextVar(
    "chunkwatch_ledger", default=None
)


def current_ledger() -> Ledger | None:
    """The ledger bound in this context (``None`` outside an instrumented request)."""
    return _current.get()


class bind:  # lower case: a function to its callers, ``with bind(ledger):``
    """Make ``ledger`` current for the block: call it where the request crosses a thread.

    Inside the block, the probes record into ``ledger`` and new spans are children
    of the request's trace (its OpenTelemetry context is attached too), so one
    request is one trace across the thread and queue hand-off.

    A class, not a ``@contextmanager`` generator: every hand-off of every request enters
    one, and the generator machinery cost twice its work (``bench/RESULTS.md``, "fourth
    pass").
    """

    __slots__ = ("_ledger", "_otel_token", "_token")

    def __init__(self, ledger: Ledger | None) -> None:
        self._ledger = ledger
        self._token: contextvars.Token[Ledger | None] | None = None
        self._otel_token: object = None

    def __enter__(self) -> Ledger | None:
        ledger = self._ledger
        self._token = _current.set(ledger)
        if ledger is not None and ledger.parent_context is not None:
            self._otel_token = otel_context.attach(ledger.parent_context)
        return ledger

    def __exit__(self, *exc: object) -> None:
        otel_token, self._otel_token = self._otel_token, None
        if otel_token is not None:
            otel_context.detach(otel_token)  # type: ignore[arg-type]
        token, self._token = self._token, None
        if token is not None:
            _current.reset(token)
