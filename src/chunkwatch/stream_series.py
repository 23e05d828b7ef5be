"""The per-stream metric families, written once per stream under one lock.

Every stream that finishes writes six series: ``chunkwatch_streams_total{layer,outcome,
upstream}``, ``chunkwatch_chunks_total``, the time-to-first-chunk, duration and longest-gap
histograms (``{layer,upstream}``) and ``chunkwatch_streams_open{layer}``. A request
finishes half a dozen streams, so these writes are most of the per-request metrics work.

Two writers with one interface (``opened``, ``closed``, ``finished``, ``counted``):

* :class:`InProcessSeries` (one process, the default): plain integers and bucket lists
  behind one lock taken once per stream, exposed by a custom collector at scrape time;
  the open streams are a dict the gauge is counted from at scrape (no lock to open one).
  prometheus_client's own metric objects take a lock and validate the value for every
  ``inc``/``observe`` (about eight a stream); this costs one. No ``*_created`` series:
  nothing reads them, and each would be one more series per label set.
* :class:`ClientSeries` (``PROMETHEUS_MULTIPROC_DIR`` set): prometheus_client's metric
  objects, whose values its multiprocess mode aggregates across worker processes (a
  custom collector lives in one process only). That mode drops exemplars anyway.

Both expose the same names, labels, buckets and ``trace_id`` exemplars
(``docs/metrics.md``); ``tests/test_stream_series.py`` checks that they agree.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from chunkwatch import semconv as sc
from chunkwatch.collected import Histogram as Kept
from chunkwatch.collected import add_one, buckets, counter

if TYPE_CHECKING:
    from chunkwatch.ledger import Tally

__all__ = ["FAMILIES", "ClientSeries", "InProcessSeries", "StreamSeries"]

# 10 ms .. 60 s: first tokens of LLMs arrive in 100 ms .. 10 s; stalls run to minutes.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
GAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_HELP = {
    sc.STREAMS: "Streams by layer and outcome, counted once each at its end (a stall when "
    "detected).",
    sc.CHUNKS: "Units each layer passed on.",
    sc.TIME_TO_FIRST_CHUNK: "Time from the start of a stream to its first unit, per layer.",
    sc.STREAM_DURATION: "Stream duration per layer, start to end.",
    sc.CHUNK_GAP_MAX: "Each stream's longest gap between two units, per layer.",
    sc.STREAMS_OPEN: "Streams open now, per layer.",
}
_LU = (sc.L_LAYER, sc.L_UPSTREAM)
_LOU = (sc.L_LAYER, sc.L_OUTCOME, sc.L_UPSTREAM)
_HISTOGRAMS: tuple[tuple[str, tuple[float, ...]], ...] = (
    (sc.TIME_TO_FIRST_CHUNK, LATENCY_BUCKETS),
    (sc.STREAM_DURATION, DURATION_BUCKETS),
    (sc.CHUNK_GAP_MAX, GAP_BUCKETS),
)

# name -> (type, label names): what tests and docs read (the exposition's own names)
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    sc.STREAMS: ("counter", _LOU),
    sc.CHUNKS: ("counter", _LU),
    **{name: ("histogram", _LU) for name, _ in _HISTOGRAMS},
    sc.STREAMS_OPEN: ("gauge", _LU),
}


class StreamSeries:
    """What :class:`~chunkwatch.runtime.Runtime` writes per stream (see the module doc)."""

    def opened(self, t: Tally) -> None:
        """``t`` opened (counted open under its layer and its upstream now)."""
        raise NotImplementedError

    def closed(self, t: Tally, opened_as: str) -> None:
        """A stream that writes no stream metrics ended (a plain http response)."""
        raise NotImplementedError

    def finished(self, t: Tally, trace_id: str | None, counted: bool, opened_as: str) -> None:
        """``t`` ended; ``counted``: its outcome was counted already (a stall);
        ``opened_as``: its upstream when it opened (the open gauge's label)."""
        raise NotImplementedError

    def counted(self, layer: str, outcome: str, upstream: str, trace_id: str | None) -> None:
        """One stream's outcome, counted before its end (a stall, when detected)."""
        raise NotImplementedError


class _Layer:
    __slots__ = ("chunks", "duration", "gap", "ttfc")

    def __init__(self) -> None:
        self.chunks = 0
        self.ttfc = Kept(LATENCY_BUCKETS)
        self.duration = Kept(DURATION_BUCKETS)
        self.gap = Kept(GAP_BUCKETS)


class InProcessSeries(StreamSeries):
    """The per-stream families of one process, collected at scrape time."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._lock = threading.Lock()
        # The open streams, each with its (layer, upstream) as it opened: a dict write and
        # a pop a stream, atomic without the lock; the gauge is counted from it at scrape.
        self._live: dict[int, tuple[str, str]] = {}  # by id(tally)
        # every key a stream opened under, once it ended or a scrape saw it: 0, not absent
        self._opened: set[tuple[str, str]] = set()
        self._streams: dict[tuple[str, str, str], list[Any]] = {}  # -> [count, example]
        self._layers: dict[tuple[str, str], _Layer] = {}
        registry.register(self)

    def opened(self, t: Tally) -> None:
        self._live[id(t)] = (t.layer, t.upstream)

    def closed(self, t: Tally, opened_as: str) -> None:
        key = self._live.pop(id(t), None)
        if key is not None and key not in self._opened:
            self._opened.add(key)  # (a set add is atomic too)

    def counted(self, layer: str, outcome: str, upstream: str, trace_id: str | None) -> None:
        example = None if trace_id is None else (trace_id, 1.0, time.time())
        with self._lock:
            add_one(self._streams, (layer, outcome, upstream), example)

    def finished(self, t: Tally, trace_id: str | None, counted: bool, opened_as: str) -> None:
        # Every stream of every request ends here: observe() is inlined, three times (a call
        # is a large share of one observation; bench/RESULTS.md).
        layer, upstream, units, start, first = t.layer, t.upstream, t.units, t.t_start, t.t_first
        end = t.t_end if t.t_end is not None else time.perf_counter_ns()
        duration = (end - start) / 1e9
        ttfc = None if first is None else (first - start) / 1e9
        gap = t.max_gap_ns / 1e9 if units > 1 else None
        key = (layer, upstream)
        opened = self._live.pop(id(t), None)  # (layer, upstream) as it opened
        if opened is not None and opened not in self._opened:
            self._opened.add(opened)
        lock = self._lock  # acquire/release, not a with block (bench/RESULTS.md, "fourth pass")
        lock.acquire()
        try:
            if not counted:
                outcome_key = (layer, t.outcome, upstream)  # an Outcome is its str as a key
                count = self._streams.get(outcome_key)  # type: ignore[arg-type]
                if count is None:
                    count = self._streams[outcome_key] = [0, None]  # type: ignore[index]
                count[0] += 1
            else:
                count = None
            series = self._layers.get(key)
            if series is None:
                series = self._layers[key] = _Layer()
            series.chunks += units
            h = series.duration
            i = bisect_left(h.bounds, duration)
            h.counts[i] += 1
            h.sum += duration
            if ttfc is not None:
                h = series.ttfc
                j = bisect_left(h.bounds, ttfc)
                h.counts[j] += 1
                h.sum += ttfc
            if gap is not None:
                h = series.gap
                k = bisect_left(h.bounds, gap)
                h.counts[k] += 1
                h.sum += gap
            if trace_id is not None:  # sampled: the stream's exemplars
                now = time.time()
                if count is not None:
                    count[1] = (trace_id, 1.0, now)
                series.duration.examples[i] = (trace_id, duration, now)
                if ttfc is not None:
                    series.ttfc.examples[j] = (trace_id, ttfc, now)
                if gap is not None:
                    series.gap.examples[k] = (trace_id, gap, now)
        finally:
            lock.release()

    # -- exposition ----------------------------------------------------------------------------

    def describe(self) -> Iterator[Metric]:
        """The names only: the registry checks them against its others without a collect."""
        yield CounterMetricFamily(sc.STREAMS, _HELP[sc.STREAMS], labels=_LOU)
        yield CounterMetricFamily(sc.CHUNKS, _HELP[sc.CHUNKS], labels=_LU)
        for name, _ in _HISTOGRAMS:
            yield HistogramMetricFamily(name, _HELP[name], labels=_LU)
        yield GaugeMetricFamily(sc.STREAMS_OPEN, _HELP[sc.STREAMS_OPEN], labels=_LU)

    def collect(self) -> Iterator[Metric]:
        live = list(self._live.values())  # one C call: atomic, as the writes
        open_now = dict.fromkeys(self._opened, 0)
        for key in live:
            open_now[key] = open_now.get(key, 0) + 1
        self._opened.update(open_now)
        with self._lock:  # a consistent snapshot; the families are built outside the lock
            streams = [((lay, str(o), up), s[0], s[1]) for (lay, o, up), s in self._streams.items()]
            layers = [
                (key, s.chunks, [h.snapshot() for h in (s.ttfc, s.duration, s.gap)])
                for key, s in self._layers.items()
            ]
        yield counter(sc.STREAMS, _HELP[sc.STREAMS], _LOU, streams)
        chunks = CounterMetricFamily(sc.CHUNKS, _HELP[sc.CHUNKS], labels=_LU)
        for key, n, _ in layers:
            chunks.add_metric(key, n)
        yield chunks
        for index, (name, _) in enumerate(_HISTOGRAMS):
            hist = HistogramMetricFamily(name, _HELP[name], labels=_LU)
            for key, _, snapshots in layers:
                snapshot = snapshots[index]
                hist.add_metric(key, buckets(snapshot), snapshot[2])
            yield hist
        gauge = GaugeMetricFamily(sc.STREAMS_OPEN, _HELP[sc.STREAMS_OPEN], labels=_LU)
        for open_key, n in open_now.items():
            gauge.add_metric(open_key, n)
        yield gauge


class ClientSeries(StreamSeries):
    """The same families as prometheus_client metric objects, for its multiprocess mode.
    Their labelled children are looked up once per label set and kept (``labels()``
    costs a lock and a validation each call); the label sets are bounded."""

    def __init__(self, registry: CollectorRegistry, exemplars: bool) -> None:
        self.exemplars = exemplars
        self.streams = Counter(sc.STREAMS, _HELP[sc.STREAMS], _LOU, registry=registry)
        self.chunks = Counter(sc.CHUNKS, _HELP[sc.CHUNKS], _LU, registry=registry)
        self.histograms = [
            Histogram(name, _HELP[name], _LU, buckets=bounds, registry=registry)
            for name, bounds in _HISTOGRAMS
        ]
        self.open = Gauge(
            sc.STREAMS_OPEN,
            _HELP[sc.STREAMS_OPEN],
            _LU,
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._open: dict[tuple[str, str], Any] = {}
        self._layer: dict[tuple[str, str], tuple[Any, ...]] = {}
        self._streams: dict[tuple[str, str, str], Any] = {}

    def _gauge(self, layer: str, upstream: str) -> Any:
        child = self._open.get((layer, upstream))
        if child is None:
            child = self._open[(layer, upstream)] = self.open.labels(layer, upstream)
        return child

    def _streams_child(self, layer: str, outcome: str, upstream: str) -> Any:
        key = (layer, outcome, upstream)
        child = self._streams.get(key)
        if child is None:
            child = self._streams[key] = self.streams.labels(*key)
        return child

    def opened(self, t: Tally) -> None:
        self._gauge(t.layer, t.upstream).inc()

    def closed(self, t: Tally, opened_as: str) -> None:
        self._gauge(t.layer, opened_as).dec()

    def counted(self, layer: str, outcome: str, upstream: str, trace_id: str | None) -> None:
        self._streams_child(layer, outcome, upstream).inc(exemplar=self._exemplar(trace_id))

    def _exemplar(self, trace_id: str | None) -> dict[str, str] | None:
        return {sc.EXEMPLAR_TRACE_ID: trace_id} if trace_id and self.exemplars else None

    def finished(self, t: Tally, trace_id: str | None, counted: bool, opened_as: str) -> None:
        ex = self._exemplar(trace_id)
        layer, upstream = t.layer, t.upstream
        children = self._layer.get((layer, upstream))
        if children is None:
            children = self._layer[(layer, upstream)] = (
                self.chunks.labels(layer, upstream),
                *(h.labels(layer, upstream) for h in self.histograms),
            )
        chunks, ttfc, duration, gap_max = children
        self._gauge(layer, opened_as).dec()
        if not counted:
            self._streams_child(layer, str(t.outcome), upstream).inc(exemplar=ex)
        if t.units:
            chunks.inc(t.units)
        if t.t_first is not None:
            ttfc.observe((t.t_first - t.t_start) / 1e9, exemplar=ex)
        duration.observe(t.duration, exemplar=ex)
        if t.units > 1:
            gap_max.observe(t.max_gap_ns / 1e9, exemplar=ex)
