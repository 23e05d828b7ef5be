"""The spans chunkwatch emits follow the OpenTelemetry semantic conventions it targets
(v1.41: HTTP stable; GenAI and messaging development) — docs/tracing.md, "Conventions"."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from chunkwatch import semconv as sc

from .helpers import System, instrumented_system

PROMPT = "Which conventions do you follow?"


@pytest.fixture(scope="module")
def spans() -> Iterator[dict[str, Any]]:
    with instrumented_system(tokens=3, token_delay=0.002) as system:
        assert system.ask(PROMPT).done
        yield {"system": system, "layers": system.by_layer()}


def attributes(spans: dict[str, Any], layer: str) -> dict[str, Any]:
    (span,) = [s for s in spans["layers"][layer] if s.attributes.get(sc.A_LAYER) == layer][:1]
    return dict(span.attributes)


def test_the_tracer_names_its_schema(spans: dict[str, Any]) -> None:
    system: System = spans["system"]
    scopes = {s.instrumentation_scope.name: s.instrumentation_scope for s in system.spans()}
    assert (
        scopes["chunkwatch"].schema_url
        == sc.SCHEMA_URL
        == "https://opentelemetry.io/schemas/1.41.0"
    )


def test_the_server_span_has_the_recommended_http_attributes(spans: dict[str, Any]) -> None:
    system: System = spans["system"]
    system.exporter.clear()
    request = urllib.request.Request(
        system.service.url + "/chat",
        data=json.dumps({"message": PROMPT}).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "conventions-test/1.0"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert b"event: done" in response.read()
    attrs = dict(system.root().attributes or {})
    assert attrs[sc.HTTP_REQUEST_METHOD] == "POST" and attrs[sc.URL_PATH] == "/chat"
    port = int(system.service.url.rsplit(":", 1)[1])
    assert (attrs[sc.SERVER_ADDRESS], attrs[sc.SERVER_PORT]) == ("127.0.0.1", port)
    assert attrs[sc.CLIENT_ADDRESS] == "127.0.0.1"
    assert attrs[sc.USER_AGENT_ORIGINAL] == "conventions-test/1.0"
    assert attrs[sc.NETWORK_PROTOCOL_VERSION] == "1.1"


def test_the_chat_span_names_its_server_and_one_time_to_first_chunk(spans: dict[str, Any]) -> None:
    attrs = attributes(spans, sc.SDK)
    system: System = spans["system"]
    assert attrs[sc.GEN_AI_OPERATION_NAME] == "chat"
    assert (attrs[sc.SERVER_ADDRESS], attrs[sc.SERVER_PORT]) == ("127.0.0.1", system.gateway.port)
    assert attrs[sc.GEN_AI_RESPONSE_TTFC] > 0
    assert sc.A_TTFC not in attrs  # the GenAI attribute says it; no second name for it


def test_the_agent_span_has_its_provider_name_and_conversation(spans: dict[str, Any]) -> None:
    attrs = attributes(spans, sc.LANGGRAPH)
    chat = attributes(spans, sc.SDK)
    assert attrs[sc.GEN_AI_OPERATION_NAME] == "invoke_agent"
    assert attrs[sc.GEN_AI_PROVIDER_NAME] == chat[sc.GEN_AI_PROVIDER_NAME]  # required
    assert attrs[sc.GEN_AI_AGENT_NAME]
    assert attrs[sc.GEN_AI_CONVERSATION_ID]  # the LangGraph thread the service issued


def test_the_queue_spans_name_their_operation(spans: dict[str, Any]) -> None:
    by_name = {s.name: dict(s.attributes) for s in spans["layers"][sc.QUEUE]}
    assert by_name[sc.SPAN_QUEUE_PUBLISH][sc.MESSAGING_OPERATION_NAME] == "send"
    assert by_name[sc.SPAN_QUEUE_PUBLISH][sc.MESSAGING_OPERATION_TYPE] == "send"
    assert by_name[sc.SPAN_QUEUE_RECEIVE][sc.MESSAGING_OPERATION_NAME] == "receive"
