"""The ``queue`` probe: the hand-off between the agent's event loop and the WSGI thread.

Seam: the application's own thread-safe queue, wrapped. Use
:class:`WatchedQueue` where the service used ``queue.Queue``: the producer (the
agent task) calls :meth:`~WatchedQueue.put`, the consumer (the response
generator) calls :meth:`~WatchedQueue.get`; each side says when it is done.

Counted: items put (``units_in``) and got (``units``), the depth high-water mark,
the longest wait of an item, items dropped (put after the consumer left). The
tally finishes when the consumer is done: ``ok`` when everything put was got,
``lost`` when items were left behind although the consumer read to the end,
``disconnected`` when the consumer left early.

Spans: ``queue publish`` (producer side, in the agent's trace context) and
``queue receive`` (consumer side), the receive span linked to the publish span,
both children of the request's trace. One pair per request, not per item.
"""

from __future__ import annotations

import queue
import time
from typing import Any, Generic, TypeVar

from opentelemetry.trace import Link, SpanKind

from chunkwatch import semconv as sc
from chunkwatch.ledger import Ledger, Tally
from chunkwatch.outcomes import End
from chunkwatch.runtime import Runtime, active, trace_id_of

__all__ = ["WatchedQueue"]

T = TypeVar("T")
_now = time.perf_counter_ns


class WatchedQueue(Generic[T]):
    """A ``queue.Queue`` with a ledger tally. Without an active runtime it only queues."""

    def __init__(self, ledger: Ledger | None, maxsize: int = 0, runtime: Runtime | None = None):
        self._q: queue.Queue[tuple[int, T]] = queue.Queue(maxsize)
        self._rt = runtime or active()
        self._ledger = ledger
        self._tally: Tally | None = None
        self._publish: Any = None
        self._receive: Any = None
        self._put = 0
        self._depth_max = 0
        self._wait_max = 0
        self._dropped = 0
        self._consumer_done = False
        self._producer_done = False

    # -- producer side (any thread) ---------------------------------------------------------

    def put(self, item: T) -> None:
        if self._consumer_done:
            self._dropped += 1
            return
        if self._publish is None and self._rt is not None:
            self._start_publish()
        self._put += 1
        self._q.put_nowait((_now(), item))
        depth = self._q.qsize()
        if depth > self._depth_max:
            self._depth_max = depth

    put_nowait = put

    def producer_done(self) -> None:
        """The producer put its last item."""
        self._producer_done = True
        span, self._publish = self._publish, None
        if span is not None:
            span.set_attributes(
                {
                    sc.MESSAGING_BATCH_COUNT: self._put,
                    sc.A_CHUNKS: self._put,
                    sc.A_OUTCOME: "ok",  # the producer handed everything over
                }
            )
            span.end()

    # -- consumer side (the response thread) ------------------------------------------------

    def get(self, timeout: float | None = None) -> T:
        """Like ``queue.Queue.get``: raises ``queue.Empty`` after ``timeout``."""
        t_put, item = self._q.get(timeout=timeout)
        tally = self._tally
        if tally is None and self._rt is not None:
            tally = self._start_receive()
        if tally is not None:
            tally.unit()
            wait = (tally.t_last or _now()) - t_put
            if wait > self._wait_max:
                self._wait_max = wait
        return item

    def consumer_done(self, *, complete: bool) -> None:
        """The consumer stops: ``complete`` if it read to the end, False if it left early."""
        if self._consumer_done:
            return
        self._consumer_done = True
        rt, tally = self._rt, self._tally
        if rt is None:
            return
        if tally is None:
            tally = self._start_receive()
        try:
            tally.units_in = self._put
            tally.facts["dropped"] = self._dropped
            ex = rt.metrics.exemplar(trace_id_of(tally.span))
            rt.metrics.queue_wait.observe(self._wait_max / 1e9, exemplar=ex)
            rt.metrics.queue_depth_max.observe(self._depth_max, exemplar=ex)
            if tally.span is not None:
                tally.span.set_attributes(
                    {
                        sc.A_QUEUE_DEPTH_MAX: self._depth_max,
                        sc.A_QUEUE_WAIT: self._wait_max / 1e9,
                        "chunkwatch.queue.put": self._put,
                        "chunkwatch.queue.dropped": self._dropped,
                    }
                )
        except Exception:
            rt.bookkeeping_error(sc.QUEUE, "finish")
        tally.finish(End.CLEAN if complete else End.CLOSED)

    # -- spans ------------------------------------------------------------------------------

    def _start_publish(self) -> None:
        rt = self._rt
        assert rt is not None
        self._publish = rt.start_span(
            sc.SPAN_QUEUE_PUBLISH,
            sc.QUEUE,
            kind=SpanKind.PRODUCER,
            attributes={sc.MESSAGING_SYSTEM: "queue.Queue", sc.MESSAGING_OPERATION_TYPE: "send"},
        )

    def _start_receive(self) -> Tally:
        rt = self._rt
        assert rt is not None
        links = []
        if self._publish is not None:
            links.append(Link(self._publish.get_span_context()))
        ledger = self._ledger
        parent = ledger.parent_context if ledger is not None else None
        span = rt.start_span(
            sc.SPAN_QUEUE_RECEIVE,
            sc.QUEUE,
            kind=SpanKind.CONSUMER,
            context=parent,
            attributes={sc.MESSAGING_SYSTEM: "queue.Queue", sc.MESSAGING_OPERATION_TYPE: "receive"},
            links=links,
        )
        self._tally = rt.open(sc.QUEUE, ledger=ledger, span=span, watch=False)
        return self._tally

    @property
    def tally(self) -> Tally | None:
        return self._tally
