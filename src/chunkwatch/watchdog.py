"""Deadlines checked while a stream is still open.

A stream that never sends its first chunk, or goes silent, is counted as
stalled *when the deadline passes*, not when (if ever) the stream ends. One
daemon thread watches every open stream; the per-chunk path does nothing for it
(it reads the tally's ``t_last``, which the probe updates anyway).

Defaults (see ``docs/configuration.md``): 30 s to the first chunk and 30 s
between chunks, for the ``gateway`` and ``sdk`` layers (the ``watched`` rows of
:data:`chunkwatch.probes.PROBES`); the layers above see
tool runs and are not watched unless configured. Only streams are watched: a
non-streaming call's single response takes the whole generation time. With ``abort=True`` a stalled
upstream request is aborted with :class:`chunkwatch.StreamStalledError` — the
reference service turns this on, because ``AzureChatOpenAI`` has no HTTP
timeouts by default.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chunkwatch.probes import watched_layers

if TYPE_CHECKING:
    from chunkwatch.ledger import Tally

__all__ = ["Deadlines", "Plan", "Watchdog", "env_flag"]

log = logging.getLogger("chunkwatch")


def _env_float(
    name: str, default: float | None, env: Mapping[str, str] | None = None
) -> float | None:
    raw = (os.environ if env is None else env).get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number of seconds (0 = off)") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name}={raw!r}: expected a finite number of seconds (0 = off)")
    return value if value > 0 else None


def env_flag(name: str, default: bool, env: Mapping[str, str] | None = None) -> bool:
    """A 1/0 (true/false, yes/no, on/off) variable; unset or empty: ``default``."""
    raw = (os.environ if env is None else env).get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r}: expected 1 or 0")


@dataclass(frozen=True)
class Deadlines:
    """First-chunk and idle deadlines in seconds (``None``: not watched).

    ``layers`` maps a layer to ``(first_chunk, idle)`` and overrides the defaults
    for that layer; ``watched`` names the layers the defaults apply to (by default the
    ``watched`` rows of :data:`chunkwatch.probes.PROBES`: gateway and sdk).
    ``silent_at_end``: a stream below the response that is still open, and has been
    silent at least this long, when its request ends (the app gave up waiting, the
    client left) is judged ``stalled`` then, with the time it was silent.
    """

    first_chunk: float | None = 30.0
    idle: float | None = 30.0
    abort: bool = False
    watched: frozenset[str] = field(default_factory=watched_layers)
    silent_at_end: float | None = 2.0
    layers: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Deadlines:
        """``CHUNKWATCH_FIRST_CHUNK_TIMEOUT``, ``CHUNKWATCH_IDLE_TIMEOUT``,
        ``CHUNKWATCH_SILENT_AT_END`` (seconds, 0 = off), ``CHUNKWATCH_ABORT_STALLED`` (1/0).
        A value that is not a number is an error that names the variable."""
        env = os.environ if environ is None else environ
        kwargs: dict[str, object] = {
            "first_chunk": _env_float("CHUNKWATCH_FIRST_CHUNK_TIMEOUT", cls.first_chunk, env),
            "idle": _env_float("CHUNKWATCH_IDLE_TIMEOUT", cls.idle, env),
            "silent_at_end": _env_float("CHUNKWATCH_SILENT_AT_END", cls.silent_at_end, env),
            "abort": env_flag("CHUNKWATCH_ABORT_STALLED", False, env),
        }
        kwargs.update(overrides)
        return cls(**kwargs)  # type: ignore[arg-type]

    def for_layer(self, layer: str) -> tuple[float | None, float | None]:
        if layer in self.layers:
            return self.layers[layer]
        if layer in self.watched:
            return self.first_chunk, self.idle
        return None, None


def _after_fork(ref: weakref.ref[Watchdog]) -> None:
    watchdog = ref()
    if watchdog is not None:
        watchdog._forked()


# (first-chunk deadline ns, idle deadline ns, tick s): Watchdog.plan's answer
Plan = tuple[int | None, int | None, float]

MAX_TICK = 0.5  # seconds between passes when every deadline is long
MIN_TICK = 0.01


class Watchdog:
    """Checks open tallies against their deadlines from one daemon thread.

    It wakes every tenth of the shortest deadline it has been given (between 10 ms
    and 0.5 s; ``tick`` fixes it): a stall is counted at most 10 % late, and with
    the 30 s defaults the thread wakes twice a second, not fifty times (each wake
    takes the GIL from the streams it watches).
    """

    def __init__(
        self, on_stall: Callable[[Tally, str, float], None], *, tick: float | None = None
    ) -> None:
        self._on_stall = on_stall
        self._fixed_tick = tick is not None
        self._tick = MAX_TICK if tick is None else tick
        self._watched: dict[int, tuple[Tally, int | None, int | None]] = {}
        self._timers: list[tuple[int, Callable[[], None]]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None  # started by the first watch
        self._plans: dict[tuple[float | None, float | None], Plan] = {}
        if hasattr(os, "register_at_fork"):  # threads do not survive a fork (gunicorn's)
            ref = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: _after_fork(ref))

    def plan(self, first_chunk: float | None, idle: float | None) -> Plan | None:
        """What :meth:`watch` needs for a pair of deadlines (None: no deadline at all):
        their nanoseconds and the tick they ask for, computed once per pair."""
        if first_chunk is None and idle is None:
            return None
        plan = self._plans.get((first_chunk, idle))
        if plan is None:
            shortest = min(d for d in (first_chunk, idle) if d is not None)
            plan = self._plans[(first_chunk, idle)] = (
                None if first_chunk is None else int(first_chunk * 1e9),
                None if idle is None else int(idle * 1e9),
                max(MIN_TICK, min(MAX_TICK, shortest / 10)),
            )
        return plan

    def watch(self, tally: Tally, plan: Plan) -> None:
        """Check ``tally`` against ``plan`` (:meth:`plan`) until :meth:`forget`. A dict
        write is atomic, and :meth:`check` copies the dict in one call: no lock per stream."""
        first_ns, idle_ns, tick = plan
        self._watched[id(tally)] = (tally, first_ns, idle_ns)
        if self._thread is None or (tick < self._tick and not self._fixed_tick):
            with self._lock:
                if tick < self._tick and not self._fixed_tick:
                    self._tick = tick
                    self._wake.set()  # the thread may be asleep for the longer tick
                if self._thread is None:
                    self._ensure_thread()

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Call ``fn`` from the watchdog's thread about ``delay`` seconds from now (within
        a tick): for deadlines that are not a stream's (orphaned streams)."""
        with self._lock:
            self._timers.append((time.perf_counter_ns() + int(delay * 1e9), fn))
            if self._thread is None:
                self._ensure_thread()

    def _ensure_thread(self) -> None:
        if self._thread is None and not self._stopped:
            self._thread = threading.Thread(
                target=self._run, name="chunkwatch-watchdog", daemon=True
            )
            self._thread.start()

    def _forked(self) -> None:
        """In a child after fork: the thread did not come along; the next watch starts one."""
        self._lock = threading.Lock()  # it may have been held by a thread that is gone
        self._thread = None

    def forget(self, tally: Tally) -> None:
        self._watched.pop(id(tally), None)  # atomic, as the write in watch()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(2)

    def check(self, now: int | None = None) -> None:
        """One pass over the open streams (the thread calls this every tick)."""
        now = time.perf_counter_ns() if now is None else now
        items = list(self._watched.values())  # one C call: atomic (watch() takes no lock)
        with self._lock:
            due = [fn for when, fn in self._timers if when <= now]
            if due:
                self._timers = [(when, fn) for when, fn in self._timers if when > now]
        for fn in due:
            try:
                fn()
            except Exception:
                log.debug("chunkwatch: a watchdog timer failed", exc_info=True)
        for tally, first_ns, idle_ns in items:
            if tally.stalled or tally.t_end is not None:
                continue
            last = tally.t_last
            if last is None:
                if first_ns is not None and now - tally.t_start >= first_ns:
                    self._fire(tally, "first_chunk", first_ns)
            elif idle_ns is not None and now - last >= idle_ns:
                self._fire(tally, "idle", idle_ns)

    def _fire(self, tally: Tally, kind: str, deadline_ns: int) -> None:
        tally.stalled = kind
        try:
            self._on_stall(tally, kind, deadline_ns / 1e9)
        except Exception:
            log.debug("chunkwatch: stall handling failed", exc_info=True)

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(self._tick)
            self._wake.clear()
            if self._stopped:
                return
            try:
                self.check()
            except Exception:
                log.debug("chunkwatch: watchdog pass failed", exc_info=True)
