"""``/metrics`` on the instrumented reference service, as a scraper sees it.

Plain Prometheus text by default; OpenMetrics with ``trace_id`` exemplars when
asked for; every documented metric family with its documented label names; the
bucket layout of the latency histograms; bounded label values. Real parts:
upstream, gateway, Flask, LangGraph, openai SDK, a prometheus_client registry
and an OpenTelemetry SDK tracer provider (``tests/helpers.py``).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from urllib.parse import urlsplit

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from chunkwatch import semconv as sc
from chunkwatch.outcomes import Outcome
from chunkwatch.runtime import active

from .helpers import System, instrumented_system, open_chat, read_until

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
PROMPT = "What does the scraper see?"

# family -> its label names (histograms: without `le`), as docs/metrics.md documents them
GENAI = {"gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"}
FAMILIES: dict[str, set[str]] = {
    "chunkwatch_requests_total": {"outcome", "layer", "upstream"},
    "chunkwatch_streams_total": {"layer", "outcome", "upstream"},
    "chunkwatch_chunks_total": {"layer", "upstream"},
    "chunkwatch_time_to_first_chunk_seconds": {"layer", "upstream"},
    "chunkwatch_stream_duration_seconds": {"layer", "upstream"},
    "chunkwatch_chunk_gap_max_seconds": {"layer", "upstream"},
    "chunkwatch_streams_open": {"layer", "upstream"},
    "chunkwatch_queue_wait_seconds": set(),
    "chunkwatch_queue_depth_max": set(),
    "chunkwatch_sse_disconnects_total": {"upstream"},
    "chunkwatch_instrumentation_errors_total": {"layer", "stage"},
    "gen_ai_client_operation_duration_seconds": GENAI,  # error_type: a failed call only
    "gen_ai_client_operation_time_to_first_chunk_seconds": GENAI,
    "gen_ai_client_token_usage": GENAI | {"gen_ai_token_type"},
}
OPTIONAL = {"gen_ai_client_operation_duration_seconds": {"error_type"}}
HISTOGRAMS = {n for n in FAMILIES if n.endswith(("_seconds", "_max", "_token_usage"))}
TTFC = (
    "chunkwatch_time_to_first_chunk_seconds",
    "gen_ai_client_operation_time_to_first_chunk_seconds",
)


@pytest.fixture(scope="module")
def system() -> Iterator[System]:
    with instrumented_system() as sys_:
        yield sys_


def scrape(system: System, accept: str | None = None) -> tuple[str, str]:
    """GET /metrics: (content type, body)."""
    url = urlsplit(system.service.url)
    conn = HTTPConnection(url.hostname or "127.0.0.1", url.port or 80, timeout=10)
    try:
        conn.request("GET", "/metrics", headers={"Accept": accept} if accept else {})
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200, body
        return resp.getheader("Content-Type", ""), body
    finally:
        conn.close()


def all_samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def family_of(sample: str) -> str | None:
    for name in FAMILIES:
        series = (f"{name}_bucket", f"{name}_sum", f"{name}_count") if name in HISTOGRAMS else ()
        if sample == name or sample in series:
            return name
    return None


def disconnect_midstream(system: System) -> None:
    """A client that reads two tokens and goes away (a real ``sse`` disconnect)."""
    with open_chat(system.service.url, PROMPT) as sock:
        read_until(sock, b"event: token", 2)


def test_plain_prometheus_text_by_default(system: System) -> None:
    """Without an Accept header (and for ``text/plain``), /metrics is the Prometheus text
    format 0.0.4: no ``# EOF``, no exemplars — what a default Prometheus scrape parses."""
    assert system.ask(PROMPT).done
    system.root()
    for accept in (None, "text/plain"):
        content_type, text = scrape(system, accept)
        assert content_type.startswith("text/plain; version=0.0.4"), content_type
        assert "# EOF" not in text
        assert " # {" not in text
        assert any(s.name == "chunkwatch_requests_total" for s in all_samples(text))


def test_openmetrics_exemplars_carry_the_requests_trace_id(system: System) -> None:
    """Asked for OpenMetrics, /metrics shows ``# {trace_id="<32 hex>"}`` exemplars on
    ``chunkwatch_requests_total`` and on the time-to-first-chunk buckets; the trace id is the
    one of the request's root (server) span, so a dashboard jumps from a bucket to the trace."""
    assert system.ask(PROMPT).done
    trace_id = format(system.root().context.trace_id, "032x")

    content_type, text = scrape(system, OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0"), content_type
    assert text.rstrip().endswith("# EOF")

    line = next(
        ln
        for ln in text.splitlines()
        if ln.startswith("chunkwatch_requests_total{") and 'outcome="ok"' in ln
    )
    m = re.search(r' # \{trace_id="([0-9a-f]{32})"\} ', line)
    assert m is not None, line
    assert m[1] == trace_id

    buckets = [
        s
        for family in openmetrics_families(text)  # type: ignore[no-untyped-call]
        for s in family.samples
        if s.name == "chunkwatch_time_to_first_chunk_seconds_bucket" and s.exemplar is not None
    ]
    assert buckets
    assert all(re.fullmatch(r"[0-9a-f]{32}", s.exemplar.labels["trace_id"]) for s in buckets)
    # each layer's first chunk of this request landed in one bucket, whose exemplar it now is
    layers = {s.labels["layer"] for s in buckets if s.exemplar.labels["trace_id"] == trace_id}
    assert {sc.GATEWAY, sc.SDK, sc.LANGGRAPH, sc.SSE} <= layers


def test_every_documented_family_has_its_label_names(system: System) -> None:
    """Each metric family named in the issue is exposed with exactly its documented label
    names (a healthy chat, a client disconnect and one bookkeeping error give every labelled
    family a sample)."""
    assert system.ask(PROMPT).done
    system.root()
    disconnect_midstream(system)
    # the counter of chunkwatch's own errors has no sample until its bookkeeping fails once
    rt = active()
    assert rt is not None
    rt.metrics.instrumentation_error(sc.HTTP, "exposition_test")

    def exposed() -> dict[str, list[set[str]]]:
        out: dict[str, list[set[str]]] = {}
        for s in all_samples(scrape(system)[1]):
            name = family_of(s.name)
            if name is not None:
                out.setdefault(name, []).append(set(s.labels) - {"le"})
        return out

    deadline = time.monotonic() + 5  # the server notices the disconnect at its next write
    while "chunkwatch_sse_disconnects_total" not in (seen := exposed()):
        assert time.monotonic() < deadline, "the disconnect was never counted"
        time.sleep(0.05)
    assert set(seen) == set(FAMILIES)
    for name, label_sets in seen.items():
        allowed = (FAMILIES[name], FAMILIES[name] | OPTIONAL.get(name, set()))
        assert all(labels in allowed for labels in label_sets), (name, label_sets)


def test_time_to_first_chunk_buckets_span_10ms_to_60s(system: System) -> None:
    """chunkwatch's time-to-first-chunk histogram has buckets from 10 ms to 60 s (and +Inf):
    first tokens arrive in 0.1-10 s, stalls run to a minute, and a 5 ms answer is still
    resolved. The GenAI histograms have exactly the conventions' advisory boundaries, so
    that they add up with OpenTelemetry's own GenAI instrumentations' series."""
    assert system.ask(PROMPT).done
    system.root()
    text = scrape(system)[1]

    def bounds_of(name: str) -> list[float]:
        bounds = {float(s.labels["le"]) for s in all_samples(text) if s.name == f"{name}_bucket"}
        assert bounds and math.isinf(max(bounds)), name
        return sorted(b for b in bounds if not math.isinf(b))

    finite = bounds_of("chunkwatch_time_to_first_chunk_seconds")
    assert finite[0] == 0.01 and finite[-1] == 60.0 and len(finite) >= 10, finite
    advisory = [0.01 * 2**i for i in range(14)]  # 0.01, 0.02, 0.04 ... 81.92 (semconv v1.41)
    for name in (*TTFC[1:], "gen_ai_client_operation_duration_seconds"):
        assert bounds_of(name) == pytest.approx(advisory), name
    assert bounds_of("gen_ai_client_token_usage") == [4.0**i for i in range(14)]  # 1 .. 4**13


def test_label_values_are_bounded(system: System) -> None:
    """Label values come from closed sets or configured names: ``upstream`` never carries a
    path or query (the model URL has both), ``layer`` and ``outcome`` are known values."""
    assert system.ask(PROMPT).done
    system.ask(PROMPT, "zero")
    system.root()
    text = scrape(system)[1]
    upstreams = set()
    for s in all_samples(text):
        if "upstream" in s.labels:
            value = s.labels["upstream"]
            upstreams.add(value)
            assert re.fullmatch(r"[a-z0-9_.-]{1,64}", value), (s.name, value)
            assert "/" not in value and "?" not in value
        if "layer" in s.labels and s.name.startswith("chunkwatch_"):
            assert s.labels["layer"] in (*sc.LAYERS, sc.NO_LAYER), (s.name, s.labels)
    assert "test-gw" in upstreams
    outcomes = {s.labels["outcome"] for s in all_samples(text) if "outcome" in s.labels}
    assert {"ok", "empty"} <= outcomes <= {str(o) for o in Outcome}
