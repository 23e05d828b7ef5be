"""The ``queue`` probe: the hand-off between the agent's event loop and the WSGI thread.

Seam: the application's own thread-safe queue. :class:`WatchedQueue` is a
``queue.Queue``; use it where the service used one: the producer (the agent
task) calls ``put``, the consumer (the response generator) calls ``get``; each
side says when it is done.

Counted: items put (``units_in``) and got (``units``), the depth high-water mark,
the longest wait of an item, items dropped (put after the consumer left). The
tally finishes when the consumer is done: ``ok`` when everything put was got,
``lost`` when items were left behind although the consumer read to the end,
``disconnected`` when the consumer left early.

Spans: ``send`` (producer side, in the agent's trace context) and ``receive``
(consumer side; messaging conventions: ``{messaging.operation.name}``, the queue has no
destination name), the receive span linked to the publish span,
both children of the request's trace. One pair per request, not per item.
"""

from __future__ import annotations

import queue
import time
from typing import Any, TypeVar

from opentelemetry.trace import Link, SpanKind

from chunkwatch import semconv as sc
from chunkwatch.ledger import Ledger, Tally
from chunkwatch.outcomes import End
from chunkwatch.runtime import Runtime, active
from chunkwatch.spans import tracing

__all__ = ["WatchedQueue"]

# Enum members as module globals, read per stream (why: chunkwatch.outcomes).
_CLEAN, _CLOSED = End.CLEAN, End.CLOSED

T = TypeVar("T")
_now = time.perf_counter_ns
_SEND = {  # the spans' attributes: the same for every request (start_span copies them)
    sc.MESSAGING_SYSTEM: "queue.Queue",
    sc.MESSAGING_OPERATION_NAME: "send",
    sc.MESSAGING_OPERATION_TYPE: "send",
}
_RECEIVE = {**_SEND, sc.MESSAGING_OPERATION_NAME: "receive", sc.MESSAGING_OPERATION_TYPE: "receive"}


class WatchedQueue(queue.Queue[T]):
    """A ``queue.Queue`` with a ledger tally. Without an active runtime it only queues.

    The bookkeeping runs inside ``Queue``'s own ``_put`` / ``_get`` hooks (under its
    lock, where the depth is exact), so ``put`` and ``get`` cost what they cost on a
    plain ``queue.Queue`` plus a few attribute updates: no extra call per item.
    ``put`` and ``get`` are ``queue.Queue``'s, blocking arguments included.
    """

    def __init__(self, ledger: Ledger | None, maxsize: int = 0, runtime: Runtime | None = None):
        super().__init__(maxsize)
        self._rt = runtime or active()
        self._ledger = ledger
        self._tally: Tally | None = None
        self._publish: Any = None
        self._links: list[Link] = []  # the receive span's link to the publish span
        self._depth_max = 0
        self._wait_max = 0
        self._dropped = 0
        self._consumer_done = False
        self._producer_done = False
        # The hooks are a small state machine, so the per-item path tests no flags:
        # first put (starts the publish span) -> put; first get (starts the receive
        # span) -> get; once the consumer is done, puts are dropped.
        if self._rt is None:  # nothing to note: the plain queue's hooks
            self._put = self.queue.append  # type: ignore[method-assign]
            self._get = self.queue.popleft  # type: ignore[method-assign]
        else:
            self._put = self._first_put  # type: ignore[method-assign]
            self._get = self._first_get  # type: ignore[method-assign]

    # -- producer side (any thread) ---------------------------------------------------------

    def _put(self, item: T) -> None:  # Queue.put calls this under its lock
        q = self.queue
        q.append((_now(), item))
        if len(q) > self._depth_max:
            self._depth_max = len(q)

    def _first_put(self, item: T) -> None:
        del self._put  # the class's own hook from here on
        self._start_publish()
        self._put(item)

    def _drop(self, item: T) -> None:  # after consumer_done: nobody will read it
        self._dropped += 1

    def _put_count(self) -> int:
        """Items queued so far: got, plus still queued (call under ``self.mutex``)."""
        return (self._tally.units if self._tally is not None else 0) + len(self.queue)

    def producer_done(self) -> None:
        """The producer put its last item."""
        self._producer_done = True
        span, self._publish = self._publish, None
        if span is not None:
            if not span.is_recording():
                span.end()
                return
            with self.mutex:
                put = self._put_count()
            span.set_attributes(
                {
                    sc.MESSAGING_BATCH_COUNT: put,
                    sc.A_CHUNKS: put,
                    sc.A_OUTCOME: "ok",  # the producer handed everything over
                }
            )
            span.end()

    # -- consumer side (the response thread) ------------------------------------------------

    def _get(self) -> T:  # Queue.get calls this under its lock
        t_put, item = self.queue.popleft()
        try:
            tally: Tally = self._tally  # type: ignore[assignment]
            now = _now()  # Tally.unit, inlined (bench/probe_instructions.py: the call costs)
            last = tally.t_last
            if last is None:
                tally.t_first = now
            elif now - last > tally.max_gap_ns:
                tally.max_gap_ns = now - last
            tally.t_last = now
            tally.units += 1
            if now - t_put > self._wait_max:
                self._wait_max = now - t_put
        except Exception:
            self._rt.bookkeeping_error(sc.QUEUE, "get")  # type: ignore[union-attr]
        return item  # type: ignore[no-any-return]

    def _first_get(self) -> T:
        del self._get  # the class's own hook from here on
        if self._tally is None:
            try:
                self._start_receive()
            except Exception:  # no tally to count into: hand the items over, uncounted
                self._rt.bookkeeping_error(sc.QUEUE, "get")  # type: ignore[union-attr]
                self._get = self._get_uncounted  # type: ignore[method-assign]
        return self._get()

    def _get_uncounted(self) -> T:
        return self.queue.popleft()[1]  # type: ignore[no-any-return]

    def consumer_done(self, *, complete: bool) -> None:
        """The consumer stops: ``complete`` if it read to the end, False if it left early."""
        if self._consumer_done:
            return
        self._consumer_done = True
        rt, tally = self._rt, self._tally
        if rt is None:
            return
        mutex = self.mutex  # acquire/release, not a with block (bench/RESULTS.md, "fourth pass")
        mutex.acquire()
        try:  # from here on, nothing more is queued
            self._put = self._drop  # type: ignore[method-assign]
            put = self._put_count()
        finally:
            mutex.release()
        if tally is None:
            try:
                tally = self._start_receive()
            except Exception:
                rt.bookkeeping_error(sc.QUEUE, "finish")
                return
        try:
            tally.units_in = put
            trace_id = rt.trace_id(tally)  # the request's, found once
            rt.metrics.queue_finished(self._wait_max / 1e9, self._depth_max, trace_id)
            if tally.span is not None and tally.span.is_recording():
                tally.span.set_attributes(
                    {
                        sc.A_QUEUE_DEPTH_MAX: self._depth_max,
                        sc.A_QUEUE_WAIT: self._wait_max / 1e9,
                        "chunkwatch.queue.put": put,
                        "chunkwatch.queue.dropped": self._dropped,
                    }
                )
        except Exception:
            rt.bookkeeping_error(sc.QUEUE, "finish")
        tally.finish(_CLEAN if complete else _CLOSED)

    # -- spans ------------------------------------------------------------------------------

    def _start_publish(self) -> None:
        rt = self._rt
        assert rt is not None
        if not tracing(rt):  # the no-op tracer: no span (see Runtime.trace_id)
            return
        self._publish = rt.start_span(
            sc.SPAN_QUEUE_PUBLISH,
            sc.QUEUE,
            kind=SpanKind.PRODUCER,
            attributes=_SEND,
        )
        # kept for the receive span, even if publishing ended
        if self._publish is not None:
            self._links = [Link(self._publish.get_span_context())]

    def _start_receive(self) -> Tally:
        rt = self._rt
        assert rt is not None
        links = self._links
        ledger = self._ledger
        parent = ledger.parent_context if ledger is not None else None
        span = None
        if tracing(rt):  # else no span (see Runtime.trace_id)
            span = rt.start_span(
                sc.SPAN_QUEUE_RECEIVE,
                sc.QUEUE,
                kind=SpanKind.CONSUMER,
                context=parent,
                attributes=_RECEIVE,
                links=links,
            )
        self._tally = rt.open(sc.QUEUE, ledger=ledger, span=span, watch=False)
        return self._tally

    @property
    def tally(self) -> Tally | None:
        return self._tally
