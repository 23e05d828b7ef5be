"""The per-request families (verdicts, the queue's histograms): the in-process writer and
prometheus_client's objects (multiprocess mode) expose the same series."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from chunkwatch.outcomes import Outcome
from chunkwatch.request_series import (
    FAMILIES,
    ClientRequests,
    InProcessRequests,
    RequestSeries,
)

from .registry import assert_plain_openmetrics, family_types, registry_samples

TRACE = "0af7651916cd43dd8448eb211c80319c"


def write(series: RequestSeries) -> None:
    series.verdict(Outcome.OK, "none", "azure", TRACE)
    series.verdict(Outcome.OK, "none", "azure", None)
    series.verdict(Outcome.EMPTY, "gateway", "azure", None)
    series.queue(0.003, 4, TRACE)
    series.queue(45.0, 2000, None)  # beyond the last bounds: +Inf


def test_both_writers_expose_the_same_series_values_and_exemplars() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    write(InProcessRequests(ours))
    write(ClientRequests(theirs, exemplars=True))
    mine = registry_samples(ours)
    assert mine == registry_samples(theirs)
    ok = (
        "chunkwatch_requests_total",
        (("layer", "none"), ("outcome", "ok"), ("upstream", "azure")),
    )
    assert mine[ok] == (2, ({"trace_id": TRACE}, 1))
    assert mine[("chunkwatch_queue_depth_max_bucket", (("le", "5.0"),))] == (
        1,
        ({"trace_id": TRACE}, 4),
    )
    assert mine[("chunkwatch_queue_wait_seconds_bucket", (("le", "+Inf"),))] == (2, None)
    assert mine[("chunkwatch_queue_wait_seconds_sum", ())] == (45.003, None)


def test_the_in_process_writer_has_no_created_series_and_valid_openmetrics() -> None:
    registry = CollectorRegistry()
    write(InProcessRequests(registry))
    assert_plain_openmetrics(registry, TRACE)


def test_the_families_table_names_what_is_exposed() -> None:
    registry = CollectorRegistry()
    InProcessRequests(registry)
    assert family_types(registry) == {n: k for n, (k, _) in FAMILIES.items()}
