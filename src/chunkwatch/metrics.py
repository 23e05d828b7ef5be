"""Every Prometheus metric chunkwatch writes, in one place, on an injected registry.

Names and labels are the contract for dashboards, alert rules and external
checks (see ``docs/metrics.md``). Labels are low-cardinality by construction:
``layer`` and ``outcome`` come from closed sets, ``upstream`` is a configured
name (:func:`upstream_name`), never a URL path or user input.

Metrics are written once per stream (:meth:`Metrics.stream_finished`) and once
per request (:meth:`Metrics.request_finished`); the per-chunk path never touches
them. The labelled children of the per-stream metrics are looked up once per
label set and kept (``labels()`` costs a lock and a validation each call, and a
request finishes half a dozen streams); the label sets are bounded, so is the cache.
Histograms and outcome counters carry a ``trace_id`` exemplar when a trace is
sampled (exemplars show in the OpenMetrics exposition, which ``/metrics`` serves
to scrapers that ask for it).

Under gunicorn with several workers, set ``PROMETHEUS_MULTIPROC_DIR``: the
metrics are then aggregated across workers by prometheus_client's
multiprocess mode. That mode drops exemplars and keeps gauges per process
(``chunkwatch_streams_open`` is summed live across workers).
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from chunkwatch import semconv as sc
from chunkwatch.naming import redact_url, upstream_name  # re-exported: they lived here

if TYPE_CHECKING:
    from chunkwatch.ledger import Tally
    from chunkwatch.verdict import Verdict

__all__ = ["LATENCY_BUCKETS", "Metrics", "redact_url", "upstream_name"]

# 10 ms .. 60 s: first tokens of LLMs arrive in 100 ms .. 10 s; stalls run to minutes.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
# client left -> model stream stopped: a cancel takes effect within a token interval or two
ORPHAN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
GAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DEPTH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

_lock = threading.Lock()
_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, Metrics] = weakref.WeakKeyDictionary()


class Metrics:
    """The chunkwatch metrics on ``registry`` (the default registry if none is given).

    Use :meth:`on`: a registry holds each name once, so the metrics of a registry are
    created once and shared by every runtime that uses it (instrument, uninstrument,
    instrument again).
    """

    @classmethod
    def on(cls, registry: CollectorRegistry | None = None) -> Metrics:
        reg = REGISTRY if registry is None else registry
        with _lock:
            metrics = _by_registry.get(reg)
            if metrics is None:
                metrics = _by_registry[reg] = cls(reg)
            return metrics

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = REGISTRY if registry is None else registry
        self.registry = reg
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        lu = (sc.L_LAYER, sc.L_UPSTREAM)
        self.requests = Counter(
            sc.REQUESTS,
            "Requests by verdict: outcome and the lowest layer where data stopped (none when ok).",
            (sc.L_OUTCOME, sc.L_LAYER, sc.L_UPSTREAM),
            registry=reg,
        )
        self.streams = Counter(
            sc.STREAMS,
            "Streams by layer and outcome, counted once each at its end (a stall when detected).",
            (sc.L_LAYER, sc.L_OUTCOME, sc.L_UPSTREAM),
            registry=reg,
        )
        self.chunks = Counter(sc.CHUNKS, "Units each layer passed on.", lu, registry=reg)
        self.ttfc = Histogram(
            sc.TIME_TO_FIRST_CHUNK,
            "Time from the start of a stream to its first unit, per layer.",
            lu,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.duration = Histogram(
            sc.STREAM_DURATION,
            "Stream duration per layer, start to end.",
            lu,
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self.gap_max = Histogram(
            sc.CHUNK_GAP_MAX,
            "Each stream's longest gap between two units, per layer.",
            lu,
            buckets=GAP_BUCKETS,
            registry=reg,
        )
        self.open = Gauge(
            sc.STREAMS_OPEN,
            "Streams open now, per layer.",
            (sc.L_LAYER,),
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.queue_wait = Histogram(
            sc.QUEUE_WAIT,
            "Time items waited in the agent-to-WSGI queue.",
            buckets=GAP_BUCKETS,
            registry=reg,
        )
        self.queue_depth_max = Histogram(
            sc.QUEUE_DEPTH_MAX,
            "Each request's queue depth high-water mark.",
            buckets=DEPTH_BUCKETS,
            registry=reg,
        )
        self.sse_disconnects = Counter(
            sc.SSE_DISCONNECTS,
            "Clients that went away before the end of their SSE stream.",
            (sc.L_UPSTREAM,),
            registry=reg,
        )
        self.instrumentation_errors = Counter(
            sc.INSTRUMENTATION_ERRORS,
            "Errors inside chunkwatch's own bookkeeping (swallowed; the host is unaffected).",
            (sc.L_LAYER, sc.L_STAGE),
            registry=reg,
        )
        self.stalls = Counter(
            sc.STALLS,
            "Stalls detected by the watchdog while the stream was open, by kind.",
            (sc.L_LAYER, sc.L_KIND, sc.L_UPSTREAM),
            registry=reg,
        )
        self.unlinked = Counter(
            sc.UNLINKED_STREAMS,
            "Streams no inbound request could be tied to: counted in chunkwatch_streams_total, "
            "missing from every request verdict.",
            (sc.L_LAYER,),
            registry=reg,
        )
        self.orphaned_chunks = Counter(
            sc.ORPHANED_CHUNKS,
            "Units model streams received after their request's client had left (nobody "
            "read them).",
            (sc.L_UPSTREAM,),
            registry=reg,
        )
        self.orphaned_seconds = Histogram(
            sc.ORPHANED_STREAM_SECONDS,
            "Per model stream open when its request's client left: the time until it stopped.",
            (sc.L_UPSTREAM,),
            buckets=ORPHAN_BUCKETS,
            registry=reg,
        )
        self.genai_duration = Histogram(
            sc.GENAI_OPERATION_DURATION,
            "GenAI client operation duration (OpenTelemetry GenAI semantic conventions).",
            ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "error_type"),
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self.genai_ttfc = Histogram(
            sc.GENAI_TIME_TO_FIRST_CHUNK,
            "GenAI client time to first chunk (OpenTelemetry GenAI semantic conventions).",
            ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"),
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )

        self.fallbacks = Counter(
            sc.FALLBACKS,
            "Model calls the guard re-issued without streaming, by reason (outcome@layer).",
            (sc.L_UPSTREAM, sc.L_REASON),
            registry=reg,
        )
        self.stream_mode = Gauge(
            sc.STREAM_MODE,
            "Mode new requests to the upstream start in: 1 = tokens, 0 = updates (breaker open).",
            (sc.L_UPSTREAM,),
            registry=reg,
            multiprocess_mode="liveall",
        )
        self.breaker_transitions = Counter(
            sc.BREAKER_TRANSITIONS,
            "Guard breaker transitions per upstream, by the state moved to.",
            (sc.L_UPSTREAM, sc.L_TO),
            registry=reg,
        )

        # labelled children, by label values (see the module docstring)
        self._open: dict[str, Any] = {}
        self._layer: dict[tuple[str, str], tuple[Any, Any, Any, Any]] = {}
        self._streams: dict[tuple[str, str, str], Any] = {}

    def exemplar(self, trace_id: str | None) -> dict[str, str] | None:
        return {sc.EXEMPLAR_TRACE_ID: trace_id} if trace_id and not self.multiprocess else None

    def open_gauge(self, layer: str) -> Any:
        """``chunkwatch_streams_open{layer}``."""
        child = self._open.get(layer)
        if child is None:
            child = self._open[layer] = self.open.labels(layer)
        return child

    def _layer_children(self, layer: str, upstream: str) -> tuple[Any, Any, Any, Any]:
        """The chunks, time-to-first-chunk, duration and gap children of one layer."""
        key = (layer, upstream)
        children = self._layer.get(key)
        if children is None:
            children = self._layer[key] = (
                self.chunks.labels(layer, upstream),
                self.ttfc.labels(layer, upstream),
                self.duration.labels(layer, upstream),
                self.gap_max.labels(layer, upstream),
            )
        return children

    def _streams_child(self, layer: str, outcome: str, upstream: str) -> Any:
        key = (layer, outcome, upstream)
        child = self._streams.get(key)
        if child is None:
            child = self._streams[key] = self.streams.labels(layer, outcome, upstream)
        return child

    def stream_opened(self, layer: str) -> None:
        self.open_gauge(layer).inc()

    def stream_finished(
        self, t: Tally, trace_id: str | None = None, *, counted: bool = False
    ) -> None:
        """Write one finished stream. ``counted``: its outcome was already counted (a stall)."""
        ex = self.exemplar(trace_id)
        layer, upstream = t.layer, t.upstream
        chunks, ttfc, duration, gap_max = self._layer_children(layer, upstream)
        self.open_gauge(layer).dec()
        if not counted:
            self._streams_child(layer, str(t.outcome), upstream).inc(exemplar=ex)
        if t.units:
            chunks.inc(t.units)
        start = t.t_start  # Tally.time_to_first and .duration, without two calls a stream
        if t.t_first is not None:
            ttfc.observe((t.t_first - start) / 1e9, exemplar=ex)
        if t.t_end is not None:
            duration.observe((t.t_end - start) / 1e9, exemplar=ex)
        else:
            duration.observe(t.duration, exemplar=ex)
        if t.units > 1:
            gap_max.observe(t.max_gap_ns / 1e9, exemplar=ex)

    def stall(self, t: Tally, kind: str, trace_id: str | None = None) -> None:
        """A stall, counted when detected (the stream is still open)."""
        self.stalls.labels(t.layer, kind, t.upstream).inc()
        self._streams_child(t.layer, "stalled", t.upstream).inc(exemplar=self.exemplar(trace_id))

    def request_finished(
        self, verdict: Verdict, upstream: str, trace_id: str | None = None
    ) -> None:
        self.requests.labels(str(verdict.outcome), verdict.layer, upstream).inc(
            exemplar=self.exemplar(trace_id)
        )

    def orphaned(self, upstream: str, units: int, ran_on: float, trace_id: str | None) -> None:
        """One model stream of a departed client, stopped ``ran_on`` s after it left."""
        self.orphaned_chunks.labels(upstream).inc(units)  # 0 too: the series exists
        self.orphaned_seconds.labels(upstream).observe(ran_on, exemplar=self.exemplar(trace_id))

    def instrumentation_error(self, layer: str, stage: str) -> None:
        try:
            self.instrumentation_errors.labels(layer, stage).inc()
        except Exception:  # the counter of errors must not become one
            pass
