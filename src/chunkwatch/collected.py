"""Histograms kept by chunkwatch itself and turned into Prometheus samples at scrape time.

prometheus_client's metric objects take a lock and validate the value on every
``observe``; the families chunkwatch writes once per stream or model call
(:mod:`chunkwatch.stream_series`, :mod:`chunkwatch.genai_metrics`) keep plain counts
instead, updated under their owner's one lock, and a collector on the registry builds
the samples when Prometheus scrapes. The ``le`` values are written as prometheus_client
writes them, so the exposition is the same as its own histograms'.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any, cast

from prometheus_client.metrics_core import CounterMetricFamily
from prometheus_client.samples import Exemplar, Sample
from prometheus_client.utils import floatToGoString as _go_float

from chunkwatch import semconv as sc

__all__ = [
    "Example",
    "Histogram",
    "Snapshot",
    "add_one",
    "buckets",
    "counter",
    "exemplar",
    "observe",
    "samples",
]

Example = tuple[str, float, float]  # (trace id, value, unix time): an exemplar, not yet built
Snapshot = tuple[tuple[float, ...], list[int], float, list[Example | None]]

_to_le = cast(Callable[[float], str], _go_float)
_LE: dict[tuple[float, ...], tuple[str, ...]] = {}


class Histogram:
    """One histogram series: counts per bucket (not cumulative; the last is +Inf), the
    sum, and the latest exemplar of each bucket."""

    __slots__ = ("bounds", "counts", "examples", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.examples: list[Example | None] = [None] * (len(bounds) + 1)
        self.sum = 0.0

    def snapshot(self) -> Snapshot:
        return self.bounds, list(self.counts), self.sum, list(self.examples)


def observe(
    observations: Iterable[tuple[Histogram, float | None]], trace_id: str | None, now: float | None
) -> None:
    """Each ``(histogram, value)`` whose value is not None, in one call (the callers write
    once per request or model call: a call per observation is a share of it). With
    ``now``, each becomes its bucket's exemplar. Call under the owner's lock."""
    for h, value in observations:
        if value is not None:
            i = bisect_left(h.bounds, value)  # le: the first bound >= value, else +Inf
            h.counts[i] += 1
            h.sum += value
            if now is not None:
                h.examples[i] = (trace_id, value, now)  # type: ignore[assignment]


def add_one(table: dict[Any, list[Any]], key: Any, example: Example | None) -> None:
    """Count one in ``table[key]`` (``[count, latest exemplar]``), made on first use.
    Call under the owner's lock."""
    kept = table.get(key)
    if kept is None:
        kept = table[key] = [0, None]
    kept[0] += 1
    if example is not None:
        kept[1] = example


def exemplar(example: Example | None) -> Exemplar | None:
    if example is None:
        return None
    trace_id, value, when = example
    return Exemplar({sc.EXEMPLAR_TRACE_ID: trace_id}, value, when)


def buckets(snapshot: Snapshot) -> list[Any]:
    """Cumulative ``(le, count[, exemplar])`` pairs, +Inf last (HistogramMetricFamily's)."""
    bounds, counts, _, examples = snapshot
    les = _LE.get(bounds)
    if les is None:
        les = _LE[bounds] = tuple(map(_to_le, (*bounds, float("inf"))))
    out: list[Any] = []
    total = 0
    for le, count, example in zip(les, counts, examples, strict=True):
        total += count
        ex = exemplar(example)
        out.append((le, total) if ex is None else (le, total, ex))
    return out


def counter(
    name: str,
    help_text: str,
    label_names: tuple[str, ...],
    rows: Iterable[tuple[tuple[str, ...], int, Example | None]],
) -> CounterMetricFamily:
    """A counter family of ``(label values, count, exemplar)`` rows (``name`` without
    ``_total``), each with its exemplar."""
    family = CounterMetricFamily(name, help_text, labels=label_names)
    for values, count, example in rows:
        labels = dict(zip(label_names, values, strict=True))
        family.samples.append(Sample(name + "_total", labels, count, None, exemplar(example)))
    return family


def samples(name: str, labels: dict[str, str], snapshot: Snapshot) -> list[Sample]:
    """The ``_bucket``, ``_count`` and ``_sum`` samples of one series with its own label
    names (a family whose series differ in label names, as OpenTelemetry's do when an
    attribute is absent)."""
    out = [
        Sample(f"{name}_bucket", {**labels, "le": le}, count, None, ex[0] if ex else None)
        for le, count, *ex in buckets(snapshot)
    ]
    total, labels = out[-1].value, dict(labels)  # a copy: the caller may reuse its dict
    out.append(Sample(f"{name}_count", labels, total, None, None))
    out.append(Sample(f"{name}_sum", labels, snapshot[2], None, None))
    return out
