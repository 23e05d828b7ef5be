"""The beacon endpoint on a real instrumented Flask app (Werkzeug's test client: the WSGI
app as a server calls it): SSE responses carry a stream token, one beacon per stream is
recorded as the browser layer, and every hostile beacon is refused with its status and its
counter, never a 500 and never a label value of the client's choosing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, Response
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from werkzeug.test import Client, TestResponse

from chunkwatch import semconv as sc
from chunkwatch.browser import STREAM_HEADER, Beacons
from chunkwatch.browser_token import RateLimit
from chunkwatch.integrations.flask import instrument_app, uninstrument_app
from chunkwatch.ledger import Ledger
from chunkwatch.runtime import Runtime
from chunkwatch.sse import format_event

PATH = "/chunkwatch/beacon"
HOST = "svc.test"


class Service:
    def __init__(self, rt: Runtime, client: Client, app: Flask, exporter: InMemorySpanExporter):
        self.rt, self.client, self.app, self.exporter = rt, client, app, exporter

    @property
    def beacons(self) -> Beacons:
        beacons = self.app.extensions["chunkwatch.middleware"].beacons
        assert isinstance(beacons, Beacons)
        return beacons

    def stream(self, n: int = 3) -> str:
        """GET /chat from a browser: n token events and `done`; the stream token it carried."""
        resp = self.client.get(f"/chat?n={n}", headers={"Host": HOST, "Sec-Fetch-Mode": "cors"})
        assert resp.status_code == 200 and resp.get_data().count(b"event: token") == n
        token = resp.headers.get(STREAM_HEADER)
        assert token is not None
        resp.close()
        return token

    def post(self, body: Any, **headers: str) -> TestResponse:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers.setdefault("Host", HOST)
        headers.setdefault("Content-Type", "text/plain;charset=utf-8")
        return self.client.post(PATH, data=data, headers=headers)

    def refused(self, reason: str) -> float:
        value = self.rt.metrics.registry.get_sample_value(
            "chunkwatch_beacons_refused_total", {"reason": reason}
        )
        return value or 0.0

    def streams(self, outcome: str) -> float:
        value = self.rt.metrics.registry.get_sample_value(
            "chunkwatch_streams_total", {"layer": "browser", "outcome": outcome, "upstream": "none"}
        )
        return value or 0.0


def beacon(token: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": 1,
        "token": token,
        "events": 4,
        "first_byte_ms": 3.1,
        "first_event_ms": 41.2,
        "gap_max_ms": 12.5,
        "terminal": True,
        "end": "clean",
        "duration_ms": 90.4,
    }
    body.update(fields)
    return body


@pytest.fixture
def service() -> Iterator[Service]:
    app = Flask(__name__)

    @app.get("/chat")
    def chat() -> Response:
        from flask import request

        n = int(request.args.get("n", "3"))

        def body() -> Iterator[bytes]:
            for i in range(n):
                yield format_event(json.dumps({"text": str(i)}), event="token")
            yield format_event("{}", event="done")

        return Response(body(), content_type="text/event-stream")

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    rt = Runtime(registry=CollectorRegistry(), tracer_provider=provider)
    instrument_app(app, rt, metrics_path=None, beacon_path=PATH)
    try:
        yield Service(rt, Client(app), app, exporter)
    finally:
        uninstrument_app(app)
        rt.close()


def test_an_accepted_beacon_is_the_browser_layer(service: Service) -> None:
    """Same count as sse, terminal, clean: 204, browser `ok`, its chunks counted, a
    `browser stream` span in the request's trace; the GET shows the funnel with it."""
    token = service.stream(3)
    resp = service.post(beacon(token))
    assert resp.status_code == 204
    assert service.streams("ok") == 1
    chunks = service.rt.metrics.registry.get_sample_value(
        "chunkwatch_chunks_total", {"layer": "browser", "upstream": "none"}
    )
    assert chunks == 4
    spans = {s.name: s for s in service.exporter.get_finished_spans()}
    span = spans[sc.SPAN_BROWSER]
    root = next(s for s in spans.values() if s.parent is None)
    assert span.context.trace_id == root.context.trace_id
    assert span.attributes is not None
    assert span.attributes[sc.A_OUTCOME] == "ok" and span.attributes[sc.A_BROWSER_WRITTEN] == 4
    report = service.client.get(f"{PATH}/{token}", headers={"Host": HOST})
    assert report.status_code == 200 and report.headers["Cache-Control"] == "no-store"
    got = report.get_json()
    assert got["funnel"]["sse"] == 4 and got["funnel"]["browser"] == 4
    assert got["verdict"]["outcome"] == "ok" and got["browser"]["outcome"] == "ok"
    assert got["sse"] == {"events": 4, "terminal": True}


def test_refusals_have_their_status_and_counter(service: Service) -> None:
    """Each hostile beacon: its 4xx, `{"error": reason}`, and its counter; never a 500."""
    token = service.stream()
    other = service.stream()
    v, ident, expiry, mac = token.split(".")
    cases: list[tuple[str, int, TestResponse]] = [
        ("too_large", 413, service.post(b"{" + b" " * 2000 + b"}")),
        ("malformed", 400, service.post(b"not json")),
        ("malformed", 400, service.post([1, 2])),
        ("malformed", 400, service.post(beacon(token, extra=1))),
        ("malformed", 400, service.post({k: v for k, v in beacon(token).items() if k != "end"})),
        ("malformed", 400, service.post(beacon(token, events=-1))),
        ("malformed", 400, service.post(beacon(token, events=True))),
        ("malformed", 400, service.post(beacon(token, events=10**8))),
        ("malformed", 400, service.post(beacon(token, duration_ms=3_600_001))),
        ("malformed", 400, service.post(b'{"v":1,"duration_ms":Infinity}')),
        ("malformed", 400, service.post(beacon(token, end="exploded"))),
        ("malformed", 400, service.post(beacon(token, v=2))),
        ("forged", 403, service.post(beacon(f"{v}.{ident}.{expiry}.{mac[::-1]}"))),
        ("forged", 403, service.post(beacon("v1.x.1.y"))),
        ("origin", 403, service.post(beacon(token), Origin="https://evil.example")),
    ]
    assert service.post(beacon(token)).status_code == 204
    cases.append(("replayed", 409, service.post(beacon(token))))
    # A valid token of the same secret that this process never served a stream for.
    unknown = service.beacons.tokens.issue()[0]
    cases.append(("unknown_stream", 404, service.post(beacon(unknown))))
    for reason, status, resp in cases:
        assert resp.status_code == status, (reason, resp.get_data())
        assert resp.get_json()["error"] == reason
    for reason in ("too_large", "malformed", "forged", "origin", "replayed", "unknown_stream"):
        assert service.refused(reason) == sum(1 for r, _, _ in cases if r == reason), reason
    # The other stream is still accepted: refusals consume nothing.
    assert service.post(beacon(other), Origin=f"http://{HOST}").status_code == 204


def test_an_expired_token_is_refused(service: Service) -> None:
    """A token past its lifetime: 403 `expired`, POST and GET alike."""
    token = service.stream()
    service.beacons.tokens._clock = lambda: 4e9
    assert service.post(beacon(token)).status_code == 403
    assert service.client.get(f"{PATH}/{token}", headers={"Host": HOST}).status_code == 403
    assert service.refused("expired") == 2


def test_the_rate_limit_refuses_beyond_the_burst(service: Service) -> None:
    """Past the process-wide bucket: 429 `rate_limited`, before anything else is read."""
    service.beacons.rate = RateLimit(0.0, 2)
    token = service.stream()
    assert service.post(beacon(token)).status_code == 204
    assert service.post(beacon(token)).status_code == 409
    resp = service.post(beacon(token))
    assert resp.status_code == 429 and resp.get_json()["error"] == "rate_limited"
    assert service.refused("rate_limited") == 1


def test_a_client_cannot_create_a_label_value(service: Service) -> None:
    """Whatever a client sends (odd fields, methods, paths, origins), the refusal counter
    has only the closed set of reasons, and the browser streams only closed outcomes."""
    token = service.stream()
    service.post({"reason": "pwned", "v": 1}, Origin="pwned")
    service.post(beacon(token, end="pwned"))
    service.client.put(PATH, data=b"pwned", headers={"Host": HOST})
    service.client.get(f"{PATH}/pwned", headers={"Host": HOST})
    service.client.get(f"{PATH}/pwned/../x", headers={"Host": HOST})
    labels = {
        s.labels["reason"]
        for m in service.rt.metrics.registry.collect()
        if m.name == "chunkwatch_beacons_refused"
        for s in m.samples
    }
    assert labels == set(sc.BEACON_REFUSALS)
    text = "".join(str(m) for m in service.rt.metrics.registry.collect())
    assert "pwned" not in text


def test_cors_only_for_configured_origins(service: Service) -> None:
    """With an allowed origin: its beacons are accepted with CORS headers, and SSE
    responses expose the stream header; a same-origin service exposes nothing."""
    token = service.stream()
    browser = {"Host": HOST, "Origin": "https://app.example", "Sec-Fetch-Mode": "cors"}
    resp = service.client.get("/chat?n=1", headers=browser)
    assert "Access-Control-Expose-Headers" not in resp.headers
    resp.close()
    service.beacons.origins = frozenset({"https://app.example"})
    resp = service.client.get("/chat?n=1", headers=browser)
    assert resp.headers["Access-Control-Expose-Headers"] == STREAM_HEADER
    resp.close()
    ok = service.post(beacon(token), Origin="https://app.example")
    assert ok.status_code == 204
    assert ok.headers["Access-Control-Allow-Origin"] == "https://app.example"


def test_no_beacon_path_no_token(service: Service) -> None:
    """beacon_path=None: SSE responses carry no token and the path is the app's (404)."""
    instrument_app(service.app, service.rt, metrics_path=None, beacon_path=None)
    resp = service.client.get("/chat?n=1", headers={"Host": HOST, "Sec-Fetch-Mode": "cors"})
    assert STREAM_HEADER not in resp.headers
    resp.close()
    assert service.client.post(PATH, data=b"{}").status_code == 404


@pytest.mark.parametrize(
    ("headers", "token"),
    [
        ({}, False),  # an API client, curl, another service: nobody will send a beacon
        ({"Sec-Fetch-Mode": "cors"}, True),  # every browser's fetch
        ({"Origin": f"http://{HOST}"}, True),  # a browser's POST (before Sec-Fetch-*)
        ({"X-Chunkwatch-Beacon": "1"}, True),  # a client that keeps the contract, asking
    ],
)
def test_only_clients_that_can_beacon_get_a_token(
    service: Service, headers: dict[str, str], token: bool
) -> None:
    """A stream token (and the record kept for it) only for a browser, or a client that asks:
    for any other client the browser layer does no work at all."""
    before = len(service.beacons.streams)
    resp = service.client.get("/chat?n=1", headers={"Host": HOST, **headers})
    assert resp.get_data().count(b"event: token") == 1
    assert (STREAM_HEADER in resp.headers) is token
    resp.close()
    assert len(service.beacons.streams) - before == (1 if token else 0)


def test_a_verdict_drawn_later_reaches_the_record() -> None:
    """A request whose verdict waits (its departed client left model streams running) ends
    its sse stream with no verdict yet: the record gets it when it is drawn, from a verdict
    listener added then."""
    rt = Runtime(registry=CollectorRegistry())
    try:
        beacons = Beacons(PATH)
        token = beacons.stream_headers([])
        ledger = Ledger()
        sse = ledger.open(sc.SSE)
        sse.unit(3)
        sse.finish()
        beacons.stream_ended(rt, token, ledger, None, terminal=True)
        ident = token.split(".")[1]
        record = beacons.streams.get(ident)
        assert record is not None and record.verdict is None and record.events == 3
        verdict = rt.finish_request(ledger, None)
        assert verdict is not None
        assert record.verdict == verdict.as_dict() and record.verdict_name == str(verdict)
    finally:
        rt.close()


def test_behind_a_proxy_that_rewrites_host_x_forwarded_host_is_the_origin(
    service: Service,
) -> None:
    """A proxy rewrote Host (nginx's default) and said the browser's host in
    X-Forwarded-Host: the page's beacon is same-origin; without it, refused."""
    token = service.stream()
    page = "http://chat.example"
    assert service.post(beacon(token), Origin=page).status_code == 403
    resp = service.post(beacon(token), Origin=page, **{"X-Forwarded-Host": "chat.example"})
    assert resp.status_code == 204 and "Access-Control-Allow-Origin" not in resp.headers
