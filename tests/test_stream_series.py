"""The per-stream metric families: the in-process writer (one lock a stream, collected at
scrape) and prometheus_client's objects (multiprocess mode) expose the same thing."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry

from chunkwatch import semconv as sc
from chunkwatch.ledger import Tally
from chunkwatch.outcomes import Outcome
from chunkwatch.stream_series import FAMILIES, ClientSeries, InProcessSeries, StreamSeries

from .registry import assert_plain_openmetrics, family_types, registry_samples

TRACE = "0af7651916cd43dd8448eb211c80319c"


def tally(layer: str, outcome: Outcome, units: int, first_ms: float | None, end_ms: float) -> Tally:
    t = Tally(layer=layer, t_start=1_000_000_000, upstream="azure")
    t.units = units
    t.t_first = None if first_ms is None else t.t_start + int(first_ms * 1e6)
    t.t_end = t.t_start + int(end_ms * 1e6)
    t.max_gap_ns = int(7e6)
    t.outcome = outcome
    return t


STREAMS = [
    tally(sc.GATEWAY, Outcome.OK, 12, 40, 900),
    tally(sc.GATEWAY, Outcome.EMPTY, 0, None, 3),
    tally(sc.SDK, Outcome.OK, 1, 41, 0.2),  # one unit: no gap observed
    tally(sc.SSE, Outcome.BUFFERED, 30, 2500, 2600),
    tally(sc.GATEWAY, Outcome.OK, 5, 61_000, 400_000),  # beyond the last bounds: +Inf
]


def write(series: StreamSeries) -> None:
    for i, t in enumerate(STREAMS):
        t.upstream = "none"  # opened before the request reached a model
        series.opened(t)
        t.upstream = "azure"
        series.finished(t, TRACE if i % 2 == 0 else None, counted=False, opened_as="none")
    pages = [Tally(layer=sc.HTTP, upstream="none") for _ in range(2)]
    for page in pages:
        series.opened(page)
    series.closed(pages[1], "none")  # a plain response: no stream metrics
    series.opened(Tally(layer=sc.SDK, upstream="azure"))  # still open
    series.counted(sc.SDK, "stalled", "azure", TRACE)  # a stall, found while open


def test_both_writers_expose_the_same_series_values_and_exemplars() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    write(InProcessSeries(ours))
    write(ClientSeries(theirs, exemplars=True))
    mine = registry_samples(ours)
    assert mine == registry_samples(theirs)
    labels = (("layer", "gateway"), ("outcome", "ok"), ("upstream", "azure"))
    ok = ("chunkwatch_streams_total", labels)
    assert mine[ok] == (2, ({"trace_id": TRACE}, 1))
    assert mine[("chunkwatch_streams_open", (("layer", "http"), ("upstream", "none")))] == (1, None)
    assert mine[("chunkwatch_streams_open", (("layer", "sdk"), ("upstream", "azure")))] == (1, None)
    # each stream is counted open under the upstream it opened with, closed under the same
    assert mine[("chunkwatch_streams_open", (("layer", "gateway"), ("upstream", "none")))] == (
        0,
        None,
    )
    inf = ("chunkwatch_stream_duration_seconds_bucket",
           (("layer", "gateway"), ("le", "+Inf"), ("upstream", "azure")))  # fmt: skip
    assert mine[inf] == (3, ({"trace_id": TRACE}, 400.0))


def test_the_in_process_writer_has_no_created_series_and_valid_openmetrics() -> None:
    registry = CollectorRegistry()
    write(InProcessSeries(registry))
    assert_plain_openmetrics(registry, TRACE)


def test_the_families_table_names_what_is_exposed() -> None:
    registry = CollectorRegistry()
    InProcessSeries(registry)
    assert family_types(registry) == {n: k for n, (k, _) in FAMILIES.items()}


def test_a_registry_refuses_the_names_twice() -> None:
    registry = CollectorRegistry()
    InProcessSeries(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        InProcessSeries(registry)


def test_concurrent_writers_lose_no_count() -> None:
    registry = CollectorRegistry()
    series = InProcessSeries(registry)

    def work() -> None:
        for _ in range(2000):
            t = tally(sc.GATEWAY, Outcome.OK, 12, 40, 900)
            series.opened(t)
            registry.collect()  # a scrape meanwhile
            series.finished(t, None, counted=False, opened_as=t.upstream)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    labels = {"layer": "gateway", "upstream": "azure"}
    assert registry.get_sample_value("chunkwatch_chunks_total", labels) == 16000 * 12
    assert registry.get_sample_value("chunkwatch_stream_duration_seconds_count", labels) == 16000
    assert registry.get_sample_value("chunkwatch_streams_open", labels) == 0
