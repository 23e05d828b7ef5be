"""The reference service: real Flask on loopback, real LangGraph, the real openai SDK."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from chunkwatch_lab.agent import LLMConfig
from chunkwatch_lab.client import chat
from chunkwatch_lab.service import ServiceConfig, create_app
from chunkwatch_lab.serving import ServiceThread
from chunkwatch_lab.threaded import Running, start_in_thread
from chunkwatch_lab.upstream import Upstream, answer_tokens

from ..helpers import open_chat, read_until


@pytest.fixture(scope="module")
def upstream() -> Iterator[Running[Upstream]]:
    running = start_in_thread(Upstream(tokens=8, token_delay=0.005))
    yield running
    running.stop()


def serve(url: str, **kw: Any) -> ServiceThread:
    kw.setdefault("instrument", False)
    return ServiceThread(create_app(ServiceConfig(llm=LLMConfig(url=url), **kw)))


@pytest.fixture(scope="module")
def tokens_service(upstream: Running[Upstream]) -> Iterator[ServiceThread]:
    svc = serve(upstream.url, mode="tokens")
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def updates_service(upstream: Running[Upstream]) -> Iterator[ServiceThread]:
    svc = serve(upstream.url, mode="updates")
    yield svc
    svc.stop()


def expected(prompt: str, n: int = 8) -> str:
    return "".join(answer_tokens(prompt, n))


def test_tokens_mode_streams_every_token_then_done(tokens_service: ServiceThread) -> None:
    """--mode tokens: one `token` event per model token, the full answer, then `done`."""
    r = chat(tokens_service.url, "hello there")
    assert r.status == 200 and r.content_type.startswith("text/event-stream")
    assert r.text == expected("hello there")
    assert [e.event for e in r.events] == ["token"] * 8 + ["done"]
    [done] = r.named("done")
    assert done["mode"] == "tokens" and len(done["thread_id"]) >= 32  # issued by the service
    assert r.complete and r.comments >= 1  # the `: open` comment came first


def test_updates_mode_streams_state_updates_then_done(updates_service: ServiceThread) -> None:
    """--mode updates: the model node's state update carries the whole answer, then `done`."""
    r = chat(updates_service.url, "hello there")
    assert [e.event for e in r.events] == ["update", "done"]
    update = r.named("update")[0]
    assert update["node"] == "model"
    assert update["messages"] == [{"role": "assistant", "content": expected("hello there")}]


@pytest.mark.parametrize("service", ["tokens_service", "updates_service"])
def test_model_tool_model_round_trip(service: str, request: pytest.FixtureRequest) -> None:
    """A message asking for the tool runs model -> tools -> model in both modes."""
    svc: ServiceThread = request.getfixturevalue(service)
    r = chat(svc.url, "please [[tool]] look this up")
    assert r.done and r.error is None
    if service == "tokens_service":
        assert [t["name"] for t in r.named("tool")] == ["lookup"]
    else:
        assert [u["node"] for u in r.named("update")] == ["model", "tools", "model"]
        assert r.named("update")[0]["messages"][0]["tool_calls"][0]["name"] == "lookup"
    assert r.text.strip()


def post_raw(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, Any]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/chat", body=body, headers={"Content-Type": content_type})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    assert resp.getheader("Content-Type", "").startswith("application/json")
    return resp.status, json.loads(data)


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b"{}", 400, "invalid_message"),
        (b'{"message": 42}', 400, "invalid_message"),
        (b'{"message": "   "}', 400, "invalid_message"),
        (b'{"message": "hi", "thread_id": 7}', 400, "invalid_thread_id"),
        (json.dumps({"message": "x" * 70_000}).encode(), 413, "payload_too_large"),
        (b"[" * 10_000 + b"]" * 10_000, 400, "invalid_json"),
        (b'{"message": "\\ud800 hi"}', 400, "invalid_message"),
        (b'{"message": "hi", "thread_id": "\\udfff"}', 400, "invalid_thread_id"),
        (b'{"message": "\xff\xfe"}', 400, "invalid_json"),
    ],
)
def test_bad_input_gets_a_json_error(
    tokens_service: ServiceThread, body: bytes, status: int, kind: str
) -> None:
    """Invalid JSON (also nested too deep to parse, or not UTF-8), a missing, non-string or
    unencodable (lone surrogate) message or thread id, a body over 64 KiB: a JSON 400/413,
    never a 500 or a stream that fails later."""
    got_status, payload = post_raw(tokens_service.url, body)
    assert got_status == status
    assert payload["error"]["type"] == kind and payload["error"]["message"]


def test_wrong_method_and_unknown_path_are_json(tokens_service: ServiceThread) -> None:
    """GET /chat is a JSON 405, an unknown path a JSON 404, never an HTML page."""
    host, port = tokens_service.url.removeprefix("http://").split(":")
    for method, path, status in [("GET", "/chat", 405), ("GET", "/nope", 404)]:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request(method, path)
        resp = conn.getresponse()
        assert resp.status == status
        assert json.loads(resp.read())["error"]["type"]
        conn.close()


def test_healthz(tokens_service: ServiceThread) -> None:
    """GET /healthz answers 200 JSON."""
    host, port = tokens_service.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/healthz")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"


def test_first_bytes_are_flushed_before_the_first_token() -> None:
    """Headers and the `: open` comment arrive at once, long before a slow first token."""
    slow = start_in_thread(Upstream(tokens=2, token_delay=1.0))
    svc = serve(slow.url)
    try:
        t0 = time.perf_counter()
        sock = open_chat(svc.url, "slow")
        first = b""
        while b": open" not in first and len(first) < 65536:
            first += sock.recv(4096)
        waited = time.perf_counter() - t0
        assert first.startswith(b"HTTP/1.1 200") and b": open" in first
        assert waited < 0.5, f"first bytes took {waited:.2f}s; the first token takes 1 s"
        sock.close()
    finally:
        svc.stop()
        slow.stop()


def test_client_disconnect_stops_the_run_and_closes_the_upstream_request() -> None:
    """A client that goes away mid-stream: the upstream stream is closed within a second.

    Werkzeug notices the disconnect at the next write, so the lag is about one
    token interval plus the cancellation; the measured lag is printed.
    """
    up = start_in_thread(Upstream(tokens=400, token_delay=0.025))  # a 10 s answer
    svc = serve(up.url)
    try:
        sock = open_chat(svc.url, "a long answer")
        read_until(sock, b"event: token", 3)
        assert up.server.stats["active_streams"] == 1
        sock.close()
        t_close = time.perf_counter()
        while up.server.stats["active_streams"] and time.perf_counter() - t_close < 5:
            time.sleep(0.01)
        lag = time.perf_counter() - t_close
        print(f"disconnect -> upstream closed: {lag * 1000:.0f} ms")
        assert up.server.stats["active_streams"] == 0
        assert up.server.stats["aborted_streams"] == 1
        assert lag < 1.0
    finally:
        svc.stop()
        up.stop()


def test_request_deadline_ends_the_stream_with_an_error_event() -> None:
    """A run past --request-timeout ends with `event: error` type timeout and a proper end."""
    slow = start_in_thread(Upstream(tokens=50, token_delay=0.1))
    svc = serve(slow.url, request_timeout=0.5)
    try:
        r = chat(svc.url, "slow answer")
        assert r.complete and r.last_event == "error"
        assert r.error is not None and r.error["type"] == "timeout"
    finally:
        svc.stop()
        slow.stop()


def test_the_client_is_told_the_verdict_and_trace_not_internal_addresses(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A model endpoint that refuses connections: the client's error event carries the
    layer, outcome, a message chunkwatch words, and the trace id to quote — no host, port
    or exception text; the log keeps the details with the same trace id."""
    import socket

    from opentelemetry.sdk.trace import TracerProvider
    from prometheus_client import CollectorRegistry

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    service = ServiceThread(
        create_app(
            ServiceConfig(
                llm=LLMConfig(url=f"http://127.0.0.1:{closed}"),
                registry=CollectorRegistry(),
                tracer_provider=TracerProvider(),
                guard=False,
            )
        )
    )
    try:
        with caplog.at_level("WARNING", logger="chunkwatch"):
            r = chat(service.url, "hello", timeout=30)
    finally:
        service.stop()
    assert r.error is not None and r.last_event == "error"
    raw = json.dumps(r.error)
    assert "127.0.0.1" not in raw and str(closed) not in raw, raw
    assert r.error["layer"] == "gateway" and r.error["outcome"] == "error"
    assert "could not be reached" in r.error["message"]
    trace_id = r.error["trace_id"]
    assert len(trace_id) == 32
    logged = [rec.getMessage() for rec in caplog.records if trace_id in rec.getMessage()]
    assert any("Connection" in line for line in logged), logged


def test_upstream_names_come_from_the_environment_unless_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``chunkwatch serve`` has no flag for upstream names: ``CHUNKWATCH_UPSTREAMS`` names
    them (an explicit ``ServiceConfig.upstreams`` still wins)."""
    from prometheus_client import CollectorRegistry

    import chunkwatch

    url = "http://127.0.0.1:1/v1"
    monkeypatch.setenv("CHUNKWATCH_UPSTREAMS", "127.0.0.1:1=azure-gw")
    for given, expected in ((None, "azure-gw"), ({"127.0.0.1:1": "mine"}, "mine")):
        chunkwatch.uninstrument()
        config = ServiceConfig(
            llm=LLMConfig(url=url), registry=CollectorRegistry(), upstreams=given
        )
        create_app(config)
        try:
            rt = chunkwatch.runtime.active()
            assert rt is not None and rt.upstream_for(url) == expected
        finally:
            chunkwatch.uninstrument()
