"""``chunkwatch.testing``: what a user's test sees of chunkwatch's conclusions.

A small Flask service written as a user would (the openai SDK streaming straight into
an SSE response), served on loopback, calling the lab's fault gateway in front of the
local model. No Prometheus, collector or log parsing: the capture's private registry,
its in-memory spans and the verdicts it collected.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from flask import Flask, Response, request
from opentelemetry import trace
from prometheus_client import REGISTRY, CollectorRegistry

import chunkwatch
import chunkwatch.testing
from chunkwatch import semconv as sc
from chunkwatch.runtime import active
from chunkwatch_lab.client import ChatResult, chat
from chunkwatch_lab.fault_gateway import Gateway
from chunkwatch_lab.serving import ServiceThread
from chunkwatch_lab.threaded import Running

PROMPT = "What did the gateway drop?"


def make_app(llm_url: str) -> Flask:
    """The user's service: POST /chat streams the model's tokens as SSE."""
    app = Flask("users_service")
    client = openai.OpenAI(base_url=llm_url + "/v1", api_key="sk-test", max_retries=0)

    @app.post("/chat")
    def chat_view() -> Response:
        message = request.get_json()["message"]

        def body() -> Iterator[str]:
            try:
                stream = client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": message}],
                    stream=True,
                )
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        text = json.dumps({"text": chunk.choices[0].delta.content})
                        yield f"event: token\ndata: {text}\n\n"
                yield "event: done\ndata: {}\n\n"
            except Exception as exc:
                yield f"event: error\ndata: {json.dumps({'message': str(exc)})}\n\n"

        return Response(body(), mimetype="text/event-stream")

    return app


@pytest.fixture
def served(gateway: Running[Gateway]) -> Iterator[tuple[Flask, ServiceThread]]:
    app = make_app(gateway.url)
    service = ServiceThread(app)
    try:
        yield app, service
    finally:
        service.stop()


def ask(service: ServiceThread, gateway: Running[Gateway], fault: str) -> ChatResult:
    gateway.server.set_fault(fault)
    return chat(service.url, PROMPT, timeout=15)


def names(gateway: Running[Gateway]) -> dict[str, Any]:
    return {"upstreams": {f"127.0.0.1:{gateway.port}": "test-gw"}}


def test_a_passing_stream_is_ok_with_its_funnel_streams_and_sample(
    served: tuple[Flask, ServiceThread], gateway: Running[Gateway]
) -> None:
    """Through a clean gateway the request's verdict is ``ok``; its funnel has the 12
    tokens at the sdk layer; each layer's stream is ``ok``; the private registry
    counted the request under the configured upstream name."""
    app, service = served
    with chunkwatch.testing.capture(app, **names(gateway)) as cap:
        result = ask(service, gateway, "pass")
        assert result.done
        (v,) = cap.wait_for_verdicts(1)
        assert str(v) == "ok" and v.ok and v.layer == "none"
        assert cap.last_verdict is v and cap.last_ledger is v.ledger
        assert v.funnel[sc.SDK] >= 12 and v.funnel[sc.GATEWAY] >= v.funnel[sc.SDK]
        assert v.funnel[sc.SSE] == len(result.events)
        for layer in (sc.GATEWAY, sc.SDK, sc.SSE, sc.HTTP):
            assert [str(s.outcome) for s in v.streams[layer]] == ["ok"], layer
        assert v.streams[sc.GATEWAY][0].upstream == "test-gw"
        assert cap.streams(sc.GATEWAY) == {"ok": 1.0}
        assert (
            cap.sample(sc.REQUESTS + "_total", outcome="ok", layer="none", upstream="test-gw") == 1
        )


def test_a_dropped_stream_is_empty_at_the_gateway(
    served: tuple[Flask, ServiceThread], gateway: Running[Gateway]
) -> None:
    """The gateway answering 200 with no data event is ``empty@gateway``, with a detail a
    person can act on, and the request counter says so in the private registry."""
    app, service = served
    with chunkwatch.testing.capture(app, **names(gateway)) as cap:
        assert ask(service, gateway, "zero").error is not None
        (v,) = cap.wait_for_verdicts(1)
        assert str(v) == "empty@gateway"
        assert "0 data events" in v.detail
        assert v.funnel[sc.GATEWAY] == 0 and v.funnel[sc.SDK] == 0
        assert cap.streams(sc.GATEWAY) == {"empty": 1.0}
        labels = {"outcome": "empty", "layer": "gateway", "upstream": "test-gw"}
        assert cap.sample(sc.REQUESTS + "_total", **labels) == 1


def test_the_spans_of_one_request_form_one_trace(
    served: tuple[Flask, ServiceThread], gateway: Running[Gateway]
) -> None:
    """Each request is one trace: the root (layer ``http``) carries the verdict and its
    funnel, and the gateway, sdk and sse spans are in the same trace."""
    app, service = served
    with chunkwatch.testing.capture(app, **names(gateway)) as cap:
        ask(service, gateway, "pass")
        ask(service, gateway, "zero")
        first, second = cap.wait_for_verdicts(2)
        assert first.trace_id and second.trace_id and first.trace_id != second.trace_id
        root = cap.root_span()  # the last verdict's
        attrs = root.attributes or {}
        assert attrs[sc.A_VERDICT] == "empty@gateway"
        assert attrs[sc.A_FUNNEL_PREFIX + sc.GATEWAY] == 0
        assert cap.root_span(first.trace_id).attributes[sc.A_VERDICT] == "ok"  # type: ignore[index]
        layers = {(s.attributes or {}).get(sc.A_LAYER) for s in cap.spans_of(second.trace_id)}
        assert {sc.GATEWAY, sc.SDK, sc.SSE, sc.HTTP} <= layers
        assert len(cap.spans) > len(cap.spans_of(second.trace_id))


def test_nothing_reaches_the_global_registry_or_tracer_provider(
    served: tuple[Flask, ServiceThread], gateway: Running[Gateway]
) -> None:
    """The process's registry and tracer provider are untouched: a capture writes to its
    own only."""
    app, service = served
    before = REGISTRY.get_sample_value(
        sc.REQUESTS + "_total", {"outcome": "ok", "layer": "none", "upstream": "test-gw"}
    )
    provider = trace.get_tracer_provider()
    with chunkwatch.testing.capture(app, **names(gateway)) as cap:
        ask(service, gateway, "pass")
        cap.wait_for_verdicts(1)
        assert trace.get_tracer_provider() is provider
    after = REGISTRY.get_sample_value(
        sc.REQUESTS + "_total", {"outcome": "ok", "layer": "none", "upstream": "test-gw"}
    )
    assert after == before
    assert trace.get_tracer_provider() is provider


def test_the_state_is_restored_and_a_second_capture_sees_only_its_own(
    served: tuple[Flask, ServiceThread], gateway: Running[Gateway]
) -> None:
    """After the block nothing is instrumented and requests are not collected; a second
    capture starts empty and collects its own request."""
    app, service = served
    with chunkwatch.testing.capture(app) as first:
        ask(service, gateway, "pass")
        first.wait_for_verdicts(1)
    assert active() is None
    assert ask(service, gateway, "pass").done  # served, unobserved
    assert len(first.verdicts) == 1
    with chunkwatch.testing.capture(app) as second:
        assert second.verdicts == [] and second.spans == []
        ask(service, gateway, "zero")
        assert [str(v) for v in second.wait_for_verdicts(1)] == ["empty@gateway"]
    assert active() is None
    assert len(first.verdicts) == 1


def test_a_running_instrumentation_is_borrowed_and_put_back(
    served: tuple[Flask, ServiceThread], gateway: Running[Gateway]
) -> None:
    """When the app was instrumented already (at import, say), the capture points that
    instrumentation at its own registry for the block, then back at the app's."""
    app, service = served
    apps_registry = CollectorRegistry()
    rt = chunkwatch.instrument(app, registry=apps_registry)
    try:
        with chunkwatch.testing.capture(app) as cap:
            assert cap.runtime is rt
            ask(service, gateway, "zero")
            assert str(cap.wait_for_verdicts(1)[0]) == "empty@gateway"
        assert active() is rt and rt.registry is apps_registry
        assert "finish_request" not in vars(rt)
        ask(service, gateway, "pass")
        labels = {"outcome": "ok", "layer": "none", "upstream": f"127.0.0.1:{gateway.port}"}
        deadline = time.monotonic() + 5  # drawn as the body closes, on the server's thread
        while not apps_registry.get_sample_value(sc.REQUESTS + "_total", labels):
            assert time.monotonic() < deadline, "the app's registry never counted the request"
            time.sleep(0.01)
        assert cap.sample(sc.REQUESTS + "_total", **labels) == 0
        assert len(cap.verdicts) == 1
    finally:
        chunkwatch.uninstrument(app)


def test_waiting_for_a_verdict_that_never_comes_says_so() -> None:
    """``wait_for_verdicts`` gives up after its timeout, saying how many were drawn."""
    with chunkwatch.testing.capture() as cap:
        with pytest.raises(TimeoutError, match=r"1 request verdict\(s\) expected.*0 drawn"):
            cap.wait_for_verdicts(1, timeout=0.05)
        with pytest.raises(LookupError):
            cap.root_span()
    assert active() is None


def test_without_the_sdk_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """The OpenTelemetry SDK is the application's: ``chunkwatch.testing`` imports without
    it, and ``capture`` then says what is missing and instruments nothing."""
    blocked = "import sys; sys.modules['opentelemetry.sdk'] = None; import chunkwatch.testing"
    subprocess.run([sys.executable, "-c", blocked], check=True)
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(ImportError, match="opentelemetry-sdk"):
        with chunkwatch.testing.capture():
            pass
    assert active() is None


def test_the_public_api() -> None:
    """What ``chunkwatch.testing`` exports."""
    assert sorted(chunkwatch.testing.__all__) == ["Capture", "RequestVerdict", "Stream", "capture"]
