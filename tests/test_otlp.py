"""OTLP on the wire: the instrumented reference service exports its traces with the OTLP/HTTP
exporter (BatchSpanProcessor, as chunkwatch_lab.telemetry sets it up) to an in-test receiver
that decodes `ExportTraceServiceRequest` with opentelemetry-proto — what a collector or
Jaeger receives. One healthy request and one through the `zero` gateway.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from chunkwatch import semconv as sc
from chunkwatch_lab.client import chat

from .helpers import instrumented_system
from .otlp_receiver import OTLPReceiver, WireSpan
from .test_collector import config as collector_config
from .test_collector import matched_attributes

PROMPT = "Which layer dropped the data?"
SERVICE = "chunkwatch-otlp-test"


@dataclass
class Wire:
    traces: dict[str, list[WireSpan]]  # trace id -> spans
    paths: list[str]

    def root(self, trace: list[WireSpan]) -> WireSpan:
        (root,) = [s for s in trace if not s.span.parent_span_id]
        return root

    def by_verdict(self, verdict: str) -> list[WireSpan]:
        (trace,) = [t for t in self.traces.values() if self.root(t).attrs[sc.A_VERDICT] == verdict]
        return trace


def _roots_done(receiver: OTLPReceiver) -> int:
    spans = receiver.spans()
    return sum(1 for s in spans if not s.span.parent_span_id and s.layer == sc.HTTP)


@pytest.fixture(scope="module")
def wire() -> Iterator[Wire]:
    receiver = OTLPReceiver().start()
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE}))
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=receiver.url), schedule_delay_millis=100)
    )
    try:
        with instrumented_system(tracer_provider=provider) as system:
            system.gateway.server.set_fault("pass")
            assert chat(system.service.url, PROMPT, timeout=30).done
            system.gateway.server.set_fault("zero")
            assert chat(system.service.url, PROMPT, timeout=30).error is not None
            deadline = time.monotonic() + 15
            while _roots_done(receiver) < 2 and time.monotonic() < deadline:
                provider.force_flush(1000)
                time.sleep(0.05)
        provider.force_flush(5000)
        spans = receiver.spans()
        with receiver.lock:
            paths = list(receiver.paths)
    finally:
        provider.shutdown()
        receiver.stop()
    traces: dict[str, list[WireSpan]] = {}
    for s in spans:
        traces.setdefault(s.trace_id, []).append(s)
    yield Wire(traces, paths)


def test_spans_arrive_as_otlp_http_protobuf(wire: Wire) -> None:
    """The exporter POSTs protobuf to /v1/traces, and the resource names the service."""
    assert wire.paths and all(p == "/v1/traces application/x-protobuf" for p in wire.paths)
    for trace in wire.traces.values():
        assert {s.resource.get("service.name") for s in trace} == {SERVICE}


def test_each_request_is_one_complete_trace(wire: Wire) -> None:
    """Two requests, two trace ids; each trace has every layer's spans, one root (the server
    span) and no span whose parent is missing."""
    assert len(wire.traces) == 2
    for trace in wire.traces.values():
        # every layer in the service: the browser's span comes later, with its beacon
        assert {s.layer for s in trace} == set(sc.LAYERS) - {sc.BROWSER}
        root = wire.root(trace)
        assert root.layer == sc.HTTP and root.span.kind == Span.SPAN_KIND_SERVER
        ids = {s.span.span_id for s in trace}
        assert all(s.span.parent_span_id in ids for s in trace if s is not root)


def test_healthy_trace_carries_what_jaeger_users_filter_on(wire: Wire) -> None:
    """Healthy: verdict ok on the root, outcome ok on every stream, GenAI attributes on the chat
    span, HTTP status on the server and the gateway spans."""
    trace = wire.by_verdict("ok")
    root = wire.root(trace)
    assert root.attrs[sc.A_VERDICT_LAYER] == sc.NO_LAYER
    assert root.attrs[sc.A_UPSTREAM] == "test-gw"
    assert root.attrs[sc.HTTP_RESPONSE_STATUS_CODE] == 200
    for s in trace:
        assert sc.A_LAYER in s.attrs and sc.A_OUTCOME in s.attrs, s.span.name
        if s.span.name != sc.SPAN_QUEUE_PUBLISH:
            assert s.attrs[sc.A_OUTCOME] == "ok", s.span.name
        assert s.span.status.code != Status.STATUS_CODE_ERROR, s.span.name
    (chat_span,) = [s for s in trace if s.layer == sc.SDK]
    assert chat_span.attrs[sc.GEN_AI_OPERATION_NAME] == "chat"
    assert chat_span.attrs[sc.GEN_AI_PROVIDER_NAME] == sc.GEN_AI_PROVIDER_AZURE
    assert chat_span.attrs[sc.GEN_AI_REQUEST_MODEL] == "gpt-4o-mini"
    assert chat_span.attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == 12
    assert chat_span.attrs[sc.GEN_AI_RESPONSE_FINISH_REASONS] == ("stop",)
    (gateway,) = [s for s in trace if s.layer == sc.GATEWAY]
    assert gateway.attrs[sc.HTTP_RESPONSE_STATUS_CODE] == 200
    assert gateway.span.kind == Span.SPAN_KIND_CLIENT


def test_zero_trace_names_the_gateway(wire: Wire) -> None:
    """`zero`: the root says empty@gateway; the gateway span — HTTP 200, zero chunks — has
    outcome empty, error.type empty and status ERROR, as a Jaeger search needs."""
    trace = wire.by_verdict("empty@gateway")
    root = wire.root(trace)
    assert root.attrs[sc.A_VERDICT_LAYER] == sc.GATEWAY
    assert root.attrs[sc.A_VERDICT_OUTCOME] == "empty"
    assert root.attrs[sc.A_VERDICT_DETAIL].startswith("gateway: HTTP 200 text/event-stream")
    assert root.attrs[sc.A_FUNNEL_PREFIX + sc.GATEWAY] == 0
    (gateway,) = [s for s in trace if s.layer == sc.GATEWAY]
    assert gateway.attrs[sc.A_OUTCOME] == "empty"
    assert gateway.attrs[sc.ERROR_TYPE] == "empty"
    assert gateway.attrs[sc.A_CHUNKS] == 0
    assert gateway.attrs[sc.HTTP_RESPONSE_STATUS_CODE] == 200
    assert gateway.span.status.code == Status.STATUS_CODE_ERROR
    (chat_span,) = [s for s in trace if s.layer == sc.SDK]
    assert chat_span.attrs[sc.GEN_AI_REQUEST_MODEL] == "gpt-4o-mini"


_CLAUSE = re.compile(r'attributes\["([^"]+)"\]\s*(==|!=)\s*(nil|"[^"]*")')


def _ottl_matches(condition: str, attrs: dict[str, Any]) -> bool:
    """The `attributes["k"] ==/!= nil|"v"` clauses joined by `and` — the OTTL subset
    otel-collector.yaml uses; anything else fails the test, to extend this evaluator."""
    result = True
    for clause in condition.split(" and "):
        m = _CLAUSE.fullmatch(clause.strip())
        assert m, f"OTTL this test cannot evaluate: {clause!r}"
        key, op, raw = m.groups()
        want = None if raw == "nil" else raw.strip('"')
        result &= (attrs.get(key) == want) == (op == "==")
    return result


def _kept_by(trace: list[WireSpan]) -> set[str]:
    """The collector's tail-sampling policies (other than the probabilistic share) that keep
    this trace."""
    kept = set()
    for p in collector_config()["processors"]["tail_sampling"]["policies"]:
        if p["type"] == "ottl_condition":
            if any(_ottl_matches(c, s.attrs) for c in p["ottl_condition"]["span"] for s in trace):
                kept.add(p["name"])
        elif p["type"] == "status_code":
            codes = {getattr(Status, f"STATUS_CODE_{c}") for c in p["status_code"]["status_codes"]}
            if any(s.span.status.code in codes for s in trace):
                kept.add(p["name"])
        else:
            assert p["type"] == "probabilistic", p
    return kept


def test_the_collector_keeps_the_failed_trace_and_samples_the_healthy_one(wire: Wire) -> None:
    """Applied to what arrived on the wire, otel-collector.yaml's policies keep the `zero` trace
    (outcome not ok, status ERROR) and leave the healthy one to the probabilistic share; every
    attribute the config matches on or aggregates by is on the wire."""
    assert _kept_by(wire.by_verdict("empty@gateway")) == {"failed-streams", "errors"}
    assert _kept_by(wire.by_verdict("ok")) == set()
    on_wire = {k for trace in wire.traces.values() for s in trace for k in s.attrs}
    assert matched_attributes() <= on_wire, matched_attributes() - on_wire
