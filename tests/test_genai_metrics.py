"""The GenAI client metrics as OpenTelemetry's Prometheus exporter writes them: its names,
its advisory buckets, its attributes as labels, ``error_type`` only on failed calls."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from chunkwatch.genai_metrics import GenAIMetrics

DURATION = "gen_ai_client_operation_duration_seconds"
FIRST = "gen_ai_client_operation_time_to_first_chunk_seconds"
TOKENS = "gen_ai_client_token_usage"
KEY = ("chat", "azure.ai.openai", "gpt-4o")
LABELS = {
    "gen_ai_operation_name": "chat",
    "gen_ai_provider_name": "azure.ai.openai",
    "gen_ai_request_model": "gpt-4o",
}


def record(metrics: GenAIMetrics) -> None:
    metrics.record(KEY, None, 1.5, 0.3, (12, 40), "0af7651916cd43dd8448eb211c80319c")
    metrics.record(KEY, None, 0.05, None, (12, 2), None)  # not streamed: no first chunk
    metrics.record(KEY, "empty", 0.2, None, (None, None), None)  # failed, no usage


def test_successes_carry_no_error_type_and_failures_their_outcome() -> None:
    registry = CollectorRegistry()
    record(GenAIMetrics(registry, multiprocess=False))
    value = registry.get_sample_value
    assert value(f"{DURATION}_count", LABELS) == 2
    assert value(f"{DURATION}_count", {**LABELS, "error_type": "empty"}) == 1
    assert value(f"{DURATION}_bucket", {**LABELS, "le": "0.08"}) == 1  # OTel's 0.08 bound
    assert value(f"{FIRST}_count", LABELS) == 1
    assert value(f"{FIRST}_sum", LABELS) == 0.3
    names = {s.name for f in registry.collect() for s in f.samples}
    assert not {n for n in names if n.endswith("_created")}


def test_token_usage_by_type_in_the_advisory_buckets() -> None:
    registry = CollectorRegistry()
    record(GenAIMetrics(registry, multiprocess=False))
    value = registry.get_sample_value
    inp, out = {**LABELS, "gen_ai_token_type": "input"}, {**LABELS, "gen_ai_token_type": "output"}
    assert (value(f"{TOKENS}_count", inp), value(f"{TOKENS}_sum", inp)) == (2, 24)
    assert (value(f"{TOKENS}_count", out), value(f"{TOKENS}_sum", out)) == (2, 42)
    assert value(f"{TOKENS}_bucket", {**out, "le": "4.0"}) == 1  # 2 tokens
    assert value(f"{TOKENS}_bucket", {**out, "le": "64.0"}) == 2  # and 40


def test_prometheus_client_objects_count_the_same_with_an_empty_error_type() -> None:
    """Multiprocess mode's objects: the same counts; a success has ``error_type=""``
    (Prometheus stores an empty label as no label)."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    record(GenAIMetrics(ours, multiprocess=False))
    record(GenAIMetrics(theirs, multiprocess=True))
    for name, labels, mine in (
        (f"{DURATION}_count", LABELS, {**LABELS, "error_type": ""}),
        (f"{DURATION}_sum", {**LABELS, "error_type": "empty"}, None),
        (f"{FIRST}_bucket", {**LABELS, "le": "0.32"}, None),
        (f"{TOKENS}_sum", {**LABELS, "gen_ai_token_type": "output"}, None),
    ):
        expected = ours.get_sample_value(name, labels)
        assert expected is not None
        assert theirs.get_sample_value(name, mine or labels) == expected, name


def test_one_first_chunk_series_for_calls_that_succeeded_and_failed() -> None:
    """A model's streams that failed after their first chunk (truncated) are timed in the
    same time-to-first-chunk series as its successes: one series, as the multiprocess
    objects keep it (two series with the same labels would break the scrape)."""
    from prometheus_client import generate_latest

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    for registry, multiprocess in ((ours, False), (theirs, True)):
        metrics = GenAIMetrics(registry, multiprocess=multiprocess)
        metrics.record(KEY, None, 1.0, 0.1, (3, 4), None)
        metrics.record(KEY, "truncated", 1.0, 0.2, (None, None), None)
    counts = [
        line
        for line in generate_latest(ours).decode().splitlines()
        if line.startswith(f"{FIRST}_count")
    ]
    assert len(counts) == 1
    assert ours.get_sample_value(f"{FIRST}_count", LABELS) == 2
    assert theirs.get_sample_value(f"{FIRST}_count", LABELS) == 2
