"""The ``sse`` probe: what the service actually wrote to the client.

Seam: the WSGI response body of a ``text/event-stream`` response (the ``http``
probe wraps it; usable alone as :class:`SSEBody`). The outgoing bytes are read
with the shared strict SSE parser in counting mode: the unit is an event
written (comments — the open comment, heartbeats — are noted, not counted).
A chunk that is a :class:`~chunkwatch.sse.WholeEvent` (what
:func:`chunkwatch.sse.format_event` returns) is one event by construction and is
counted without being parsed again, unless it continues an event that other
bytes left half-written.

The span ``sse stream`` is a child of the request span and the parent of the
agent's spans (the ledger's ``parent_context`` points at it while it is open).
It ends when the body ends (``clean``) or is closed early — the client went
away — which is ``disconnected`` and counted in
``chunkwatch_sse_disconnects_total``. Werkzeug notices a disconnect only at the
next write; heartbeats bound that delay.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

from opentelemetry import trace

from chunkwatch import semconv as sc
from chunkwatch.ledger import Ledger
from chunkwatch.ledger import _current as _current_ledger
from chunkwatch.outcomes import End
from chunkwatch.probes.lifecycle import Ending, closing
from chunkwatch.runtime import Runtime
from chunkwatch.spans import tracing
from chunkwatch.sse import SSEParser, WholeEvent

__all__ = ["SSEBody"]

# Enum members as module globals, read per stream (why: chunkwatch.outcomes).
_CLOSED = End.CLOSED

_now = time.perf_counter_ns


class SSEBody(Ending):
    """A WSGI body that counts the events it passes on and finalizes once
    (:class:`~chunkwatch.probes.lifecycle.Ending`: any exception ends it as ``error``).

    ``on_end(end)`` runs after the sse tally finished (the http probe ends the
    request there).
    """

    rt: Runtime

    def __init__(
        self,
        body: Iterable[bytes],
        rt: Runtime,
        ledger: Ledger,
        *,
        on_end: Callable[[End], None] | None = None,
    ) -> None:
        self._body = body
        self._ledger = ledger
        self._on_end = on_end
        self._parser: SSEParser | None = None  # see _iterate
        self._outer_context = ledger.parent_context  # the request's, again once this ends
        span = None  # the no-op tracer's would be the request's: none (see Runtime.trace_id)
        if tracing(rt):
            span = rt.start_span(sc.SPAN_SSE, sc.SSE, context=ledger.parent_context)
            if span is not None:
                ledger.parent_context = trace.set_span_in_context(span)
        super().__init__(rt.open(sc.SSE, ledger=ledger, span=span, watch=False), rt)
        self._gen: Generator[bytes, None, None] | None = None
        self.last_chunk: bytes = b""  # the last chunk passed on, once the body ended
        self._token: Any = None

    def __iter__(self) -> Iterator[bytes]:
        self._gen = self._iterate()
        return self._gen

    def _iterate(self) -> Generator[bytes, None, None]:
        tally, unit = self.tally, self.tally.unit
        parser: Any = self._parser  # made at the first chunk that is not a WholeEvent
        count = None if parser is None else parser.count  # bound once: a call per chunk
        # The request's ledger is current while the body runs (a generator calling the
        # model in the server's thread finds it); undone in end.
        self._token = _current_ledger.set(self._ledger)
        # Not lifecycle.relay: its callback would be a call per event, a large share of
        # this probe's cost (bench/RESULTS.md, "Tally.unit is inlined"); the counter is
        # inlined, the end is the shared Ending's.
        chunk = b""
        with self:
            try:
                for chunk in self._body:
                    try:
                        if not tally.bytes:
                            tally.facts["t_first_byte"] = time.perf_counter_ns()
                        tally.bytes += len(chunk)
                        if type(chunk) is WholeEvent and (parser is None or parser.idle):
                            # format_event's: one event, and the parser between two events
                            now = _now()  # Tally.unit, inlined (bench/probe_instructions.py)
                            last = tally.t_last
                            if last is None:
                                tally.t_first = now
                            elif now - last > tally.max_gap_ns:
                                tally.max_gap_ns = now - last
                            tally.t_last = now
                            tally.units += 1
                        else:
                            if count is None:
                                parser = self._parser = SSEParser()
                                count = parser.count
                            before = parser.events
                            count(chunk)  # [DONE] is an event here: count what was dispatched
                            if parser.events != before:
                                unit(parser.events - before)
                    except Exception:
                        self.bookkeeping_error("feed")
                    yield chunk
            finally:
                # The loop's own variable, read once at the end (no work per event): the
                # beacon endpoint's record says whether the last event written was terminal.
                self.last_chunk = chunk

    def close(self) -> None:
        """Called by the WSGI server when it is done (or when the client went away)."""
        closing(self, self._close)

    def _close(self) -> None:
        if self._gen is not None:
            self._gen.close()
        close = getattr(self._body, "close", None)
        if close is not None:
            close()

    def end(self, end: End, exc: BaseException | None = None) -> None:
        token, self._token = self._token, None
        if token is not None:
            try:
                _current_ledger.reset(token)
            except (ValueError, RuntimeError):  # ended from another context (e.g. by the GC)
                pass
        super().end(end, exc)

    def fail(self, exc: BaseException) -> None:
        self.end(End.ERROR, exc)  # whatever the body raised: the service's own error

    def _facts(self, end: End, exc: BaseException | None) -> None:
        tally = self.tally
        try:
            tally.comments = self._parser.comments if self._parser is not None else 0
            if tally.span is not None and tally.span.is_recording():
                attrs: dict[str, Any] = {sc.A_BYTES: tally.bytes, sc.A_COMMENTS: tally.comments}
                first_byte = tally.facts.get("t_first_byte")
                if first_byte is not None:
                    attrs["chunkwatch.time_to_first_byte"] = (first_byte - tally.t_start) / 1e9
                if end is _CLOSED:
                    attrs[sc.A_DISCONNECTED] = True
                tally.span.set_attributes(attrs)
        except Exception:
            self.bookkeeping_error("finish")
        # The ledger's parent for new work is the request again, not a finished span.
        self._ledger.parent_context = self._outer_context

    def _ended(self, end: End) -> None:
        rt = self.rt
        if end is _CLOSED:
            try:
                rt.metrics.sse_disconnects.labels(self._ledger.upstream or "none").inc()
            except Exception:
                rt.bookkeeping_error(sc.SSE, "metrics")
        if self._on_end is not None:
            self._on_end(end)
