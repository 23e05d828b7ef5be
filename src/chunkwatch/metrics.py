"""Every Prometheus metric chunkwatch writes, in one place, on an injected registry.

Names and labels are the contract for dashboards, alert rules and external
checks (see ``docs/metrics.md``). Labels are low-cardinality by construction:
``layer`` and ``outcome`` come from closed sets, ``upstream`` is a configured
name (:func:`upstream_name`), never a URL path or user input.

Metrics are written once per stream (:attr:`Metrics.series`, the per-stream families:
:mod:`chunkwatch.stream_series`) and once per request (:meth:`Metrics.request_finished`);
the per-chunk path never touches them. Histograms and outcome counters carry a
``trace_id`` exemplar when a trace is sampled (exemplars show in the OpenMetrics
exposition, which ``/metrics`` serves to scrapers that ask for it).

Under gunicorn with several workers, set ``PROMETHEUS_MULTIPROC_DIR``: the
metrics are then aggregated across workers by prometheus_client's
multiprocess mode. That mode drops exemplars and keeps gauges per process
(``chunkwatch_streams_open`` is summed live across workers).
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from chunkwatch import semconv as sc
from chunkwatch.genai_metrics import GenAIMetrics
from chunkwatch.naming import redact_url, upstream_name  # re-exported: they lived here
from chunkwatch.request_series import ClientRequests, InProcessRequests, RequestSeries
from chunkwatch.stream_series import (
    LATENCY_BUCKETS,
    ClientSeries,
    InProcessSeries,
    StreamSeries,
)

if TYPE_CHECKING:
    from chunkwatch.ledger import Tally
    from chunkwatch.verdict import Verdict

__all__ = ["LATENCY_BUCKETS", "Metrics", "redact_url", "upstream_name"]

# client left -> model stream stopped: a cancel takes effect within a token interval or two
ORPHAN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

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
        # the per-request families (requests_total, the queue's histograms), written once
        # a request: kept by chunkwatch in one process (chunkwatch.request_series)
        self.per_request: RequestSeries = (
            ClientRequests(reg, exemplars=False) if self.multiprocess else InProcessRequests(reg)
        )
        self.series: StreamSeries = (
            ClientSeries(reg, exemplars=False) if self.multiprocess else InProcessSeries(reg)
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
        self.genai = GenAIMetrics(reg, multiprocess=self.multiprocess)

        self.fallbacks = Counter(
            sc.FALLBACKS,
            "Model calls the guard re-issued without streaming, by reason (outcome@layer).",
            (sc.L_UPSTREAM, sc.L_REASON),
            registry=reg,
        )
        self.stream_mode = Gauge(  # a state set: 1 for the mode in force, 0 for the other
            sc.STREAM_MODE,
            "Mode new requests to the upstream start in (a state set): tokens, or updates "
            "when the guard's breaker is open.",
            (sc.L_UPSTREAM, sc.L_MODE),
            registry=reg,
            multiprocess_mode="liveall",
        )
        self.beacons_refused = Counter(
            sc.BEACONS_REFUSED,
            "Browser beacons the endpoint refused, by reason (a closed set).",
            (sc.L_REASON,),
            registry=reg,
        )
        for reason in sc.BEACON_REFUSALS:  # every series exists from the start (rate())
            self.beacons_refused.labels(reason)
        self.breaker_transitions = Counter(
            sc.BREAKER_TRANSITIONS,
            "Guard breaker transitions per upstream, by the state moved to.",
            (sc.L_UPSTREAM, sc.L_TO),
            registry=reg,
        )

    def exemplar(self, trace_id: str | None) -> dict[str, str] | None:
        return {sc.EXEMPLAR_TRACE_ID: trace_id} if trace_id and not self.multiprocess else None

    def stall(self, t: Tally, kind: str, trace_id: str | None = None) -> None:
        """A stall, counted when detected (the stream is still open)."""
        self.stalls.labels(t.layer, kind, t.upstream).inc()
        self.series.counted(t.layer, "stalled", t.upstream, trace_id)

    def request_finished(
        self, verdict: Verdict, upstream: str, trace_id: str | None = None
    ) -> None:
        self.per_request.verdict(verdict.outcome, verdict.layer, upstream, trace_id)

    def queue_finished(self, wait: float, depth: int, trace_id: str | None = None) -> None:
        """One request's queue: its longest wait in seconds and its deepest depth."""
        self.per_request.queue(wait, depth, trace_id)

    def set_stream_mode(self, upstream: str, mode: str) -> None:
        """``chunkwatch_stream_mode{upstream,mode}``: 1 for ``mode``, 0 for the others."""
        for state in sc.STREAM_MODES:
            self.stream_mode.labels(upstream, state).set(1 if state == mode else 0)

    def orphaned(self, upstream: str, units: int, ran_on: float, trace_id: str | None) -> None:
        """One model stream of a departed client, stopped ``ran_on`` s after it left."""
        self.orphaned_chunks.labels(upstream).inc(units)  # 0 too: the series exists
        self.orphaned_seconds.labels(upstream).observe(ran_on, exemplar=self.exemplar(trace_id))

    def instrumentation_error(self, layer: str, stage: str) -> None:
        try:
            self.instrumentation_errors.labels(layer, stage).inc()
        except Exception:  # the counter of errors must not become one
            pass
