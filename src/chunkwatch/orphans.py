"""Orphaned streams: model streams that run on after their client has gone.

When a request ends because its client left (the ``sse`` or ``http`` layer saw the
disconnect), the model streams of that request still open at that moment (``gateway``,
``sdk``) should stop within a token or so: the app cancels its agent. If they keep
receiving, the tokens are paid for and read by nobody — on Python 3.11 a cancel can be
swallowed by ``asyncio.wait_for`` inside langchain-openai (CPython gh-86296), and a service
that never cancels its agent thread leaks every time.

:class:`Orphans` follows those streams (and model streams the same request's agent opens
after the client left) until they stop, then writes

* ``chunkwatch_orphaned_chunks_total{upstream}``: units received after the client left;
* ``chunkwatch_orphaned_stream_seconds{upstream}``: per stream, the time from the client
  leaving until the stream stopped (small when the app cancels, the rest of the answer
  when it does not);
* on the request's root span, ``chunkwatch.orphaned.*``, and the verdict's log line and
  detail, which wait for them (at most :data:`WAIT` seconds).

The model streams are those of the ``model`` rows of :data:`chunkwatch.probes.PROBES`
(``gateway``, ``sdk``). One layer counts, so a model call is counted once: the lowest of
them whose probe is installed — ``gateway`` (the bytes the upstream actually sent), else
``sdk``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from chunkwatch import semconv as sc
from chunkwatch.ledger import Ledger
from chunkwatch.outcomes import End, Outcome

if TYPE_CHECKING:
    from chunkwatch.ledger import Tally
    from chunkwatch.runtime import Runtime
    from chunkwatch.verdict import Verdict

__all__ = ["ORPHANED_AFTER", "WAIT", "Orphans", "client_left"]

# Enum members as module globals, read per stream (why: chunkwatch.outcomes).
_CLOSED, _DISCONNECTED = End.CLOSED, Outcome.DISCONNECTED

# A stream still receiving this long after its client left is *orphaned* (the detail says
# so; the alert counts these): a cancelled stream stops within a token interval or two.
ORPHANED_AFTER = 1.0
# The root span and the verdict's log line wait at most this long for orphans to stop.
WAIT = 60.0

_now = time.perf_counter_ns


def client_left(ledger: Ledger) -> bool:
    """The request ended because its client went away (the response was not finished)."""
    for t in ledger.tallies:
        if t.layer == sc.SSE and t.outcome is _DISCONNECTED:
            return True
        if t.layer == sc.HTTP and t.end is _CLOSED:
            return True
    return False


class Orphans:
    """The model streams of one request that were open when its client left, until they
    stop. Thread-safe: streams end on the agent's loop, in GC finalizers, in the watchdog."""

    def __init__(
        self,
        rt: Runtime,
        ledger: Ledger,
        counting_layer: str,
    ) -> None:
        self.rt = rt
        self.request = ledger
        self.layer = counting_layer
        self.t_left = _now()
        self.trace_id: str | None = None
        self._report: Callable[[Orphans], None] | None = None
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[str, int]] = {}  # id(tally) -> layer, units at leave
        self.settled = False
        self.streams = 0  # counted streams (at self.layer) that were open or opened after
        self.chunks = 0  # their units after the client left
        self.longest = 0.0  # the longest time one of them ran on, in seconds
        self.still_running = 0  # at settling by WAIT: counted streams not stopped yet

    # -- following streams -----------------------------------------------------------------

    def adopt(self, tally: Tally, units_at_leave: int = 0) -> None:
        """Follow ``tally`` (open when the client left, or opened since) until it ends."""
        with self._lock:
            self._pending[id(tally)] = (tally.layer, units_at_leave)
        tally.orphans = self

    def ledger_for_new_stream(self) -> Ledger:
        """The ledger of a model stream the request's agent opens after its client left:
        not unlinked (its request is known), in the request's trace, followed here."""
        own = Ledger(request_id=self.request.request_id)
        own.upstream = self.request.upstream
        own.parent_context = self.request.parent_context
        own.orphans = self
        return own

    def stream_ended(self, tally: Tally) -> None:
        """Called once per adopted tally when it finishes (:meth:`Runtime._finish`)."""
        counted = tally.layer == self.layer
        after, ran_on = 0, 0.0
        with self._lock:
            pending = self._pending.pop(id(tally), None)
            if pending is None:
                return
            if counted:
                after = max(0, tally.units - pending[1])
                ran_on = max(0.0, ((tally.t_end or _now()) - self.t_left) / 1e9)
                self.streams += 1
                self.chunks += after
                self.longest = max(self.longest, ran_on)
            settle = not self._pending and not self.settled
            if settle:
                self.settled = True
        if counted:
            try:
                self.rt.metrics.orphaned(tally.upstream, after, ran_on, self.trace_id)
            except Exception:
                self.rt.bookkeeping_error(tally.layer, "orphans")
        if settle:
            self._settle()

    def following(self) -> bool:
        """Some adopted stream has not stopped yet."""
        with self._lock:
            return bool(self._pending)

    def expire(self) -> None:
        """:data:`WAIT` passed: settle with the streams still running (the watchdog)."""
        with self._lock:
            if self.settled:
                return
            self.settled = True
            left = [layer for layer, _ in self._pending.values()]
            self.still_running = left.count(self.layer)
        self._settle()

    def when_settled(self, report: Callable[[Orphans], None]) -> None:
        """Call ``report`` once, when the streams followed have stopped (at once if they
        have, or if there were none) or :data:`WAIT` has passed."""
        with self._lock:
            if not self._pending:
                self.settled = True
            now = self.settled
            if not now:
                self._report = report
        if now:
            self._call(report)

    def _settle(self) -> None:
        with self._lock:
            report, self._report = self._report, None
        if report is not None:
            self._call(report)

    def _call(self, report: Callable[[Orphans], None]) -> None:
        try:
            report(self)
        except Exception:
            self.rt.bookkeeping_error(sc.HTTP, "orphans")

    # -- reporting -------------------------------------------------------------------------

    @property
    def orphaned(self) -> bool:
        return self.still_running > 0 or (self.chunks > 0 and self.longest >= ORPHANED_AFTER)

    def attributes(self) -> dict[str, Any]:
        return {
            sc.A_ORPHANED: self.orphaned,
            sc.A_ORPHANED_STREAMS: self.streams + self.still_running,
            sc.A_ORPHANED_CHUNKS: self.chunks,
            sc.A_ORPHANED_SECONDS: self.longest,
            sc.A_ORPHANED_STILL_RUNNING: self.still_running,
        }

    def sentence(self) -> str:
        """What the model streams did after the client left, for the verdict's detail."""
        n = self.streams + self.still_running
        streams = "the model stream" if n == 1 else f"{n} model streams"
        if self.still_running:
            return (
                f"{streams} still running {WAIT:g} s after the client left "
                f"({self.chunks} {self.layer} units since) — orphaned: nobody reads them"
            )
        if self.orphaned:
            return (
                f"{streams} ran on for {self.longest:.1f} s after the client left and "
                f"received {self.chunks} {self.layer} units — orphaned: the app did not "
                "stop its model call"
            )
        return f"{streams} stopped {self.longest * 1000:.0f} ms after the client left"

    def verdict(self, verdict: Verdict) -> Verdict:
        if not self.streams and not self.still_running:
            return verdict
        return replace(verdict, detail=f"{verdict.detail}; {self.sentence()}")
