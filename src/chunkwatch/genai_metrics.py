"""The OpenTelemetry GenAI client metrics, as OpenTelemetry's Prometheus exporter writes them.

Semantic conventions v1.41 (GenAI: Development): ``gen_ai.client.operation.duration`` and
``gen_ai.client.operation.time_to_first_chunk`` (seconds) and ``gen_ai.client.token.usage``
(``{token}``), with the advisory bucket boundaries the conventions give and their
attributes as labels (``gen_ai.operation.name`` -> ``gen_ai_operation_name``, ...;
``error.type`` only on a failed call). A query that sums these with the series of
OpenTelemetry's own GenAI instrumentations therefore adds like buckets to like.

One model call is recorded once, at its end (:meth:`GenAIMetrics.record`). In one process
the values are kept by chunkwatch and collected at scrape (:mod:`chunkwatch.collected`:
no ``error_type`` label on successes, as OpenTelemetry's exporter writes it). Under
``PROMETHEUS_MULTIPROC_DIR`` they are prometheus_client histograms, whose label names are
fixed: a success has ``error_type=""``, which Prometheus stores as no label at all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import HistogramMetricFamily, Metric

from chunkwatch import collected
from chunkwatch import semconv as sc

__all__ = ["DURATION_BUCKETS", "TOKEN_BUCKETS", "GenAIMetrics"]

# the conventions' advisory boundaries (gen-ai-metrics.md, ExplicitBucketBoundaries)
DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip

OPERATION = "gen_ai_operation_name"
PROVIDER = "gen_ai_provider_name"
MODEL = "gen_ai_request_model"
ERROR = "error_type"
TOKEN_TYPE = "gen_ai_token_type"

_HELP = {
    sc.GENAI_OPERATION_DURATION: "GenAI operation duration.",
    sc.GENAI_TIME_TO_FIRST_CHUNK: "Time to receive the first chunk, from the request to the "
    "first chunk of the response stream.",
    sc.GENAI_TOKEN_USAGE: "Number of input and output tokens used.",
}
# name -> label names a series may carry (error_type: failed calls only)
FAMILIES: dict[str, tuple[str, ...]] = {
    sc.GENAI_OPERATION_DURATION: (OPERATION, PROVIDER, MODEL, ERROR),
    sc.GENAI_TIME_TO_FIRST_CHUNK: (OPERATION, PROVIDER, MODEL),
    sc.GENAI_TOKEN_USAGE: (OPERATION, PROVIDER, MODEL, TOKEN_TYPE),
}


class GenAIMetrics:
    """The three families on ``registry`` (see the module doc)."""

    def __init__(self, registry: CollectorRegistry, *, multiprocess: bool) -> None:
        self._lock = threading.Lock()
        self._client = _Client(registry) if multiprocess else None
        self._calls: dict[tuple[str, str, str], _Calls] = {}  # by (operation, provider, model)
        if self._client is None:
            registry.register(self)

    def record(
        self,
        key: tuple[str, str, str],
        error: str | None,
        duration: float,
        first_chunk: float | None,
        tokens: tuple[int | None, int | None],
        trace_id: str | None,
    ) -> None:
        """One call ``key`` = (operation, provider, model) that took ``duration`` s (its
        first chunk after ``first_chunk`` s, for a stream), failed as ``error`` (None: it
        did not), and used ``tokens`` = (input, output) as the response reported them."""
        if self._client is not None:
            self._client.record(key, error, duration, first_chunk, tokens)
            return
        now = None if trace_id is None else time.time()
        n_in, n_out = tokens
        lock = self._lock  # acquire/release, not a with block (bench/RESULTS.md, "fourth pass")
        lock.acquire()
        try:  # one lookup a call
            calls = self._calls.get(key)
            if calls is None:
                calls = self._calls[key] = _Calls()
            spent = calls.duration.get(error)
            if spent is None:
                spent = calls.duration[error] = collected.Histogram(DURATION_BUCKETS)
            collected.observe(
                (
                    (spent, duration),
                    (calls.first, first_chunk),
                    (calls.input, n_in),
                    (calls.output, n_out),
                ),
                trace_id,
                now,
            )
        finally:
            lock.release()

    def describe(self) -> Iterator[Metric]:
        for name in FAMILIES:
            yield HistogramMetricFamily(name, _HELP[name], labels=())

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            calls = [(key, c.snapshot()) for key, c in self._calls.items()]
        duration, first = (
            HistogramMetricFamily(name, _HELP[name], labels=())
            for name in (sc.GENAI_OPERATION_DURATION, sc.GENAI_TIME_TO_FIRST_CHUNK)
        )
        usage = HistogramMetricFamily(
            sc.GENAI_TOKEN_USAGE, _HELP[sc.GENAI_TOKEN_USAGE], labels=(), unit=""
        )
        for (operation, provider, model), (durations, f, used) in calls:
            labels = {OPERATION: operation, PROVIDER: provider, MODEL: model}
            for error, d in durations:  # error_type on failed calls only
                with_error = labels if error is None else {**labels, ERROR: error}
                duration.samples.extend(collected.samples(duration.name, with_error, d))
            if sum(f[1]):  # streams only; one series whatever their calls' errors
                first.samples.extend(collected.samples(first.name, labels, f))
            for token_type, snapshot in used:
                if sum(snapshot[1]):  # a response that reported its usage
                    with_type = {**labels, TOKEN_TYPE: token_type}
                    usage.samples.extend(collected.samples(usage.name, with_type, snapshot))
        yield duration
        yield first
        yield usage


class _Calls:
    """The histograms of one (operation, provider, model): the duration by error (None:
    a success), the time to first chunk, the input and output tokens."""

    __slots__ = ("duration", "first", "input", "output")

    def __init__(self) -> None:
        self.duration: dict[str | None, collected.Histogram] = {}
        self.first = collected.Histogram(DURATION_BUCKETS)
        self.input = collected.Histogram(TOKEN_BUCKETS)
        self.output = collected.Histogram(TOKEN_BUCKETS)

    def snapshot(self) -> tuple[list[tuple[str | None, Any]], Any, list[tuple[str, Any]]]:
        return (
            [(error, h.snapshot()) for error, h in self.duration.items()],
            self.first.snapshot(),
            [("input", self.input.snapshot()), ("output", self.output.snapshot())],
        )


class _Client:
    """prometheus_client's histograms, for its multiprocess mode (module doc)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.families = {
            name: Histogram(
                name,
                _HELP[name],
                labels,
                buckets=TOKEN_BUCKETS if name == sc.GENAI_TOKEN_USAGE else DURATION_BUCKETS,
                registry=registry,
            )
            for name, labels in FAMILIES.items()
        }

    def record(
        self,
        key: tuple[str, str, str],
        error: str | None,
        duration: float,
        first_chunk: float | None,
        tokens: tuple[int | None, int | None],
    ) -> None:
        f: Any = self.families
        f[sc.GENAI_OPERATION_DURATION].labels(*key, error or "").observe(duration)
        if first_chunk is not None:
            f[sc.GENAI_TIME_TO_FIRST_CHUNK].labels(*key).observe(first_chunk)
        for token_type, n in zip(("input", "output"), tokens, strict=True):
            if n is not None:
                f[sc.GENAI_TOKEN_USAGE].labels(*key, token_type).observe(n)
