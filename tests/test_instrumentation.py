"""Every gateway fault, through the instrumented reference service: outcomes per layer,
the verdict, metric samples, the span tree and the client's `event: error` payload.

Real parts only: local upstream, fault gateway, Flask, LangGraph, openai SDK, a
prometheus_client registry and an OpenTelemetry SDK tracer provider per module.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from chunkwatch import semconv as sc
from chunkwatch_lab.fault_gateway import FAULT_MODES
from chunkwatch_lab.upstream import answer_tokens

from .helpers import API_KEY, System, instrumented_system, open_chat, read_until

PROMPT = "Which layer dropped the data?"

# mode -> (gateway params, verdict "outcome@layer" or "ok", client sees: answer|partial|error)
EXPECTED: dict[str, tuple[dict[str, Any], str, str]] = {
    "pass": ({}, "ok", "answer"),
    "zero": ({}, "empty@gateway", "error"),
    "zero-abrupt": ({}, "empty@gateway", "error"),
    "done-only": ({}, "empty@gateway", "error"),
    "json": ({}, "wrong_content_type@gateway", "error"),
    "html": ({}, "wrong_content_type@gateway", "error"),
    "buffer": ({}, "buffered@gateway", "answer"),
    "buffer-late": ({}, "buffered@gateway", "answer"),
    # the bare stack shows a cut answer as complete; chunkwatch raises StreamTruncatedError
    "truncate": ({"events": 4}, "truncated@gateway", "error"),
    "truncate-abrupt": ({"events": 4}, "truncated@gateway", "error"),
    "stall": ({"limit": 5.0}, "stalled@gateway", "error"),
    "stall-headers": ({"limit": 5.0}, "stalled@gateway", "error"),
    "keepalive-only": ({"interval": 0.2, "limit": 5.0}, "stalled@gateway", "error"),
    "trickle": ({"bytes": 400, "delay": 0.02}, "ok", "answer"),
    "status": ({"status": 429}, "http_error@gateway", "error"),
    "reject-stream-options": ({}, "http_error@gateway", "error"),
    "malformed": ({}, "malformed@gateway", "error"),
    "no-blank-lines": ({}, "malformed@gateway", "error"),
    "error-event": ({"events": 4}, "error_event@gateway", "error"),
    "gzip-stripped": ({}, "malformed@gateway", "error"),
    # only Azure's prompt-filter results, then [DONE]: the model produced nothing
    "filter-only": ({}, "empty@gateway", "error"),
    # tokens, then {"message": ...} and a clean end: chunkwatch raises StreamTruncatedError
    "inband-error": ({"events": 4}, "error_event@gateway", "error"),
}


@pytest.fixture(scope="module")
def system() -> Iterator[System]:
    with instrumented_system() as sys_:
        yield sys_


def test_every_fault_mode_has_an_expectation() -> None:
    """The table covers exactly the gateway's fault modes."""
    assert set(EXPECTED) == set(FAULT_MODES)


@pytest.mark.parametrize("fault", FAULT_MODES)
def test_fault_is_named_at_the_layer_where_data_stopped(system: System, fault: str) -> None:
    """Per fault: verdict on the root span, metrics, gateway outcome, client payload."""
    params, verdict, seen = EXPECTED[fault]
    outcome, _, layer = verdict.partition("@")
    layer = layer or sc.NO_LAYER
    before_req = system.sample(
        "chunkwatch_requests_total", outcome=outcome, layer=layer, upstream="test-gw"
    )
    before_gw = system.sample(
        "chunkwatch_streams_total", layer="gateway", outcome=outcome, upstream="test-gw"
    )
    r = system.ask(PROMPT, fault, **params)
    root = system.root()
    attrs = root.attributes or {}

    # the client
    assert r.status == 200 and r.complete
    answer = "".join(answer_tokens(PROMPT, 12))
    if seen == "answer":
        assert r.done and r.text == answer
    elif seen == "partial":
        assert r.done and r.text and answer.startswith(r.text) and r.text != answer
    else:
        assert r.last_event == "error" and r.error is not None
        assert (r.error["layer"], r.error["outcome"]) == (layer, outcome), r.error
        assert r.error["detail"].startswith(f"{layer}: ")

    # the root span carries the verdict and the funnel
    assert attrs[sc.A_VERDICT] == verdict
    assert attrs[sc.A_VERDICT_LAYER] == layer
    assert attrs[sc.A_VERDICT_OUTCOME] == outcome
    assert attrs[sc.A_FUNNEL_PREFIX + "gateway"] >= 0
    # the gateway span: its own outcome and facts
    gateway_span = system.by_layer()["gateway"][0]
    gw_attrs = gateway_span.attributes or {}
    gw_outcome = outcome if layer == "gateway" else "ok"
    assert gw_attrs[sc.A_OUTCOME] == gw_outcome
    # metrics: one request with this verdict, one gateway stream with its outcome
    assert (
        system.sample("chunkwatch_requests_total", outcome=outcome, layer=layer, upstream="test-gw")
        == before_req + 1
    )
    assert (
        system.sample(
            "chunkwatch_streams_total", layer="gateway", outcome=gw_outcome, upstream="test-gw"
        )
        == before_gw + 1
    )


def test_incident_detail_is_a_sentence_a_person_can_act_on(system: System) -> None:
    """`zero`: the verdict detail says status, content-type, zero events, clean close, meaning."""
    r = system.ask(PROMPT, "zero")
    assert r.error is not None
    assert r.error["type"] == "StreamEmptyError"
    assert r.error["message"].startswith("No generations found in stream.")
    detail = r.error["detail"]
    assert detail.startswith("gateway: HTTP 200 text/event-stream, 0 data events, closed cleanly")
    assert detail.endswith("— the stream was dropped before the model's first token")


def test_healthy_span_tree_is_one_trace_across_threads(system: System) -> None:
    """http -> sse -> invoke_agent -> chat {model} -> POST (gateway), one trace; queue linked."""
    system.ask(PROMPT)
    layers = system.by_layer()
    root = system.root()
    (sse,) = layers["sse"]
    (agent,) = layers["langgraph"]
    (chat_span,) = layers["sdk"]
    (http_client,) = layers["gateway"]
    assert sse.parent is not None and sse.parent.span_id == root.context.span_id
    assert agent.parent is not None and agent.parent.span_id == sse.context.span_id
    # the model node runs inside the agent span (LangGraph's own tasks inherit it)
    assert chat_span.parent is not None and chat_span.parent.span_id == agent.context.span_id
    assert http_client.parent is not None
    assert http_client.parent.span_id == chat_span.context.span_id
    publish = next(s for s in layers["queue"] if s.name == sc.SPAN_QUEUE_PUBLISH)
    receive = next(s for s in layers["queue"] if s.name == sc.SPAN_QUEUE_RECEIVE)
    assert [link.context.span_id for link in receive.links] == [publish.context.span_id]
    for span in system.spans():
        attrs = span.attributes or {}
        assert sc.A_LAYER in attrs and sc.A_CHUNKS in attrs, span.name
        assert attrs[sc.A_OUTCOME] == "ok", span.name
    chat_attrs = chat_span.attributes or {}
    assert chat_span.name == "chat gpt-4o-mini"
    assert chat_attrs[sc.GEN_AI_OPERATION_NAME] == "chat"
    assert chat_attrs[sc.GEN_AI_PROVIDER_NAME] == "azure.ai.openai"
    assert chat_attrs[sc.GEN_AI_REQUEST_MODEL] == "gpt-4o-mini"
    assert chat_attrs[sc.GEN_AI_REQUEST_STREAM] is True
    assert chat_attrs[sc.GEN_AI_RESPONSE_FINISH_REASONS] == ("stop",)
    assert chat_attrs[sc.GEN_AI_RESPONSE_TTFC] > 0
    assert chat_attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == 12
    assert (http_client.attributes or {})[sc.HTTP_RESPONSE_STATUS_CODE] == 200


def test_funnel_counts_match_between_layers(system: System) -> None:
    """Healthy: gateway data events == sdk chunks; queue items == sse events."""
    system.ask(PROMPT)
    attrs = system.root().attributes or {}
    funnel = {
        k.removeprefix(sc.A_FUNNEL_PREFIX): v
        for k, v in attrs.items()
        if k.startswith(sc.A_FUNNEL_PREFIX)
    }
    # role chunk + 12 tokens + finish chunk + usage chunk
    assert funnel["gateway"] == funnel["sdk"] == 15
    assert funnel["langgraph"] >= funnel["sdk"]
    assert funnel["queue"] == funnel["sse"] == 13  # 12 tokens + done


def test_no_content_and_no_secrets_in_telemetry_by_default(system: System) -> None:
    """Without opt-in, no prompt or answer text and never the api-key value on any span."""
    r = system.ask(PROMPT)
    assert r.done
    answer = r.text.strip()
    for span in system.spans():
        for key, value in (span.attributes or {}).items():
            text = str(value)
            assert PROMPT not in text and answer not in text, (span.name, key)
            assert API_KEY not in text, (span.name, key)
            assert key not in (sc.A_PROMPT, sc.A_COMPLETION)


def test_stall_is_counted_while_the_stream_is_still_open(system: System) -> None:
    """A stalled gateway is counted and put on the span when the deadline passes, and the
    request is aborted then — not when the gateway drops the connection 5 s later."""
    before = system.sample(
        "chunkwatch_stalls_total", layer="gateway", kind="first_chunk", upstream="test-gw"
    )
    r = system.ask(PROMPT, "stall", limit=5.0)
    assert r.elapsed < 3.0, f"the stall was aborted after {r.elapsed:.1f}s"
    assert (
        system.sample(
            "chunkwatch_stalls_total", layer="gateway", kind="first_chunk", upstream="test-gw"
        )
        == before + 1
    )
    gateway_span = system.by_layer()["gateway"][0]
    assert [e.name for e in gateway_span.events] == [sc.EVENT_STALL]
    assert r.error is not None and r.error["outcome"] == "stalled"


def test_no_failed_to_detach_warnings_on_disconnect(
    system: System, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that goes away mid-stream: disconnected@sse, and no context-detach errors."""
    system.gateway.server.set_fault("pass")
    system.exporter.clear()
    before = system.sample("chunkwatch_sse_disconnects_total", upstream="test-gw")
    caplog.set_level(logging.WARNING)
    with open_chat(system.service.url, PROMPT) as sock:
        read_until(sock, b"event: token", 2)
    attrs = system.root().attributes or {}
    assert attrs[sc.A_VERDICT] == "disconnected@sse"
    assert system.sample("chunkwatch_sse_disconnects_total", upstream="test-gw") == before + 1
    assert not [r for r in caplog.records if "detach" in r.getMessage().lower()]


@pytest.mark.parametrize(
    ("setting", "why"),
    [
        ({"token_delay": 0.4, "tokens": 5}, "slow tokens, below the 1 s idle deadline"),
        ({"token_delay": 0.0}, "a fast stream, all tokens at once from the model"),
        ({"content_filter": True}, "Azure's prompt-filter first chunk with choices: []"),
        ({"first_token_delay": 0.6}, "a slow first token, below the 1 s first-chunk deadline"),
    ],
)
def test_no_false_positives_on_healthy_streams(
    system: System, setting: dict[str, Any], why: str
) -> None:
    """Healthy streams that look unusual are ok at every layer, with no stall counted."""
    up = system.upstream.server
    saved = {key: getattr(up, key) for key in setting}
    stalls_before = sum(
        system.sample("chunkwatch_stalls_total", layer=layer, kind=kind, upstream="test-gw")
        for layer in ("gateway", "sdk")
        for kind in ("first_chunk", "idle")
    )
    try:
        for key, value in setting.items():
            setattr(up, key, value)
        r = system.ask(PROMPT)
    finally:
        for key, value in saved.items():
            setattr(up, key, value)
    assert r.done, why
    assert (system.root().attributes or {})[sc.A_VERDICT] == "ok", why
    for span in system.spans():
        assert (span.attributes or {}).get(sc.A_OUTCOME, "ok") == "ok", (why, span.name)
    stalls_after = sum(
        system.sample("chunkwatch_stalls_total", layer=layer, kind=kind, upstream="test-gw")
        for layer in ("gateway", "sdk")
        for kind in ("first_chunk", "idle")
    )
    assert stalls_after == stalls_before, why
