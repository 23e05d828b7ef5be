"""The per-request families, written once per request under one lock.

``chunkwatch_requests_total{outcome,layer,upstream}`` (the verdict) and the queue's two
histograms, ``chunkwatch_queue_wait_seconds`` and ``chunkwatch_queue_depth_max``: every
request writes them once. As for the per-stream families (:mod:`chunkwatch.stream_series`)
there are two writers with one interface (``verdict``, ``queue``):

* :class:`InProcessRequests` (one process, the default): plain counts behind one lock,
  exposed by a custom collector at scrape time — a prometheus_client ``observe`` takes a
  lock per bucket series and walks the bounds in Python (≈9 k instructions each here).
* :class:`ClientRequests` (``PROMETHEUS_MULTIPROC_DIR`` set): prometheus_client's metric
  objects, which its multiprocess mode adds up across workers.

Both expose the same names, labels, buckets and ``trace_id`` exemplars
(``tests/test_request_series.py``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric

from chunkwatch import semconv as sc
from chunkwatch.collected import Example, add_one, buckets, counter, observe
from chunkwatch.collected import Histogram as Kept
from chunkwatch.stream_series import GAP_BUCKETS

__all__ = ["DEPTH_BUCKETS", "FAMILIES", "ClientRequests", "InProcessRequests", "RequestSeries"]

DEPTH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

_HELP = {
    sc.REQUESTS: "Requests by verdict: outcome and the lowest layer where data stopped (none "
    "when ok).",
    sc.QUEUE_WAIT: "Time items waited in the agent-to-WSGI queue.",
    sc.QUEUE_DEPTH_MAX: "Each request's queue depth high-water mark.",
}
_OLU = (sc.L_OUTCOME, sc.L_LAYER, sc.L_UPSTREAM)

# name -> (type, label names): what tests and docs read
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    sc.REQUESTS: ("counter", _OLU),
    sc.QUEUE_WAIT: ("histogram", ()),
    sc.QUEUE_DEPTH_MAX: ("histogram", ()),
}


class RequestSeries:
    """What the runtime and the queue probe write once per request (see the module doc)."""

    def verdict(self, outcome: str, layer: str, upstream: str, trace_id: str | None) -> None:
        """One request's verdict (``outcome`` is an :class:`~chunkwatch.outcomes.Outcome`)."""
        raise NotImplementedError

    def queue(self, wait: float, depth: int, trace_id: str | None) -> None:
        """One request's queue: its longest wait (seconds) and its deepest depth."""
        raise NotImplementedError


class InProcessRequests(RequestSeries):
    """The per-request families of one process, collected at scrape time."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._lock = threading.Lock()
        self._verdicts: dict[tuple[str, str, str], list[Any]] = {}  # -> [count, example]
        self._wait = Kept(GAP_BUCKETS)
        self._depth = Kept(tuple(float(b) for b in DEPTH_BUCKETS))
        registry.register(self)

    def verdict(self, outcome: str, layer: str, upstream: str, trace_id: str | None) -> None:
        key = (outcome, layer, upstream)  # an Outcome is its str as a key
        example = None if trace_id is None else (trace_id, 1.0, time.time())
        lock = self._lock  # acquire/release, not a with block (bench/RESULTS.md, "fourth pass")
        lock.acquire()
        try:
            add_one(self._verdicts, key, example)
        finally:
            lock.release()

    def queue(self, wait: float, depth: int, trace_id: str | None) -> None:
        now = None if trace_id is None else time.time()
        lock = self._lock  # (as in verdict)
        lock.acquire()
        try:
            observe(((self._wait, wait), (self._depth, float(depth))), trace_id, now)
        finally:
            lock.release()

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(sc.REQUESTS, _HELP[sc.REQUESTS], labels=_OLU)
        yield HistogramMetricFamily(sc.QUEUE_WAIT, _HELP[sc.QUEUE_WAIT], labels=())
        yield HistogramMetricFamily(sc.QUEUE_DEPTH_MAX, _HELP[sc.QUEUE_DEPTH_MAX], labels=())

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            verdicts: list[tuple[tuple[str, str, str], int, Example | None]] = [
                ((str(o), lay, up), c[0], c[1]) for (o, lay, up), c in self._verdicts.items()
            ]
            histograms = [(sc.QUEUE_WAIT, self._wait.snapshot())]
            histograms.append((sc.QUEUE_DEPTH_MAX, self._depth.snapshot()))
        yield counter(sc.REQUESTS, _HELP[sc.REQUESTS], _OLU, verdicts)
        for name, snapshot in histograms:
            hist = HistogramMetricFamily(name, _HELP[name], labels=())
            hist.add_metric((), buckets(snapshot), snapshot[2])
            yield hist


class ClientRequests(RequestSeries):
    """The same families as prometheus_client metric objects, for its multiprocess mode."""

    def __init__(self, registry: CollectorRegistry, exemplars: bool) -> None:
        self.exemplars = exemplars
        self.requests = Counter(sc.REQUESTS, _HELP[sc.REQUESTS], _OLU, registry=registry)
        self._children: dict[tuple[str, str, str], Any] = {}  # labels() once a key
        self.wait = Histogram(
            sc.QUEUE_WAIT, _HELP[sc.QUEUE_WAIT], buckets=GAP_BUCKETS, registry=registry
        )
        self.depth = Histogram(
            sc.QUEUE_DEPTH_MAX, _HELP[sc.QUEUE_DEPTH_MAX], buckets=DEPTH_BUCKETS, registry=registry
        )

    def _exemplar(self, trace_id: str | None) -> dict[str, str] | None:
        return {sc.EXEMPLAR_TRACE_ID: trace_id} if trace_id and self.exemplars else None

    def verdict(self, outcome: str, layer: str, upstream: str, trace_id: str | None) -> None:
        key = (outcome, layer, upstream)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(str(outcome), layer, upstream)
        child.inc(exemplar=self._exemplar(trace_id))

    def queue(self, wait: float, depth: int, trace_id: str | None) -> None:
        ex = self._exemplar(trace_id)
        self.wait.observe(wait, exemplar=ex)
        self.depth.observe(depth, exemplar=ex)
