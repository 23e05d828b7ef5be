"""chunkwatch's http/sse probes beside OpenTelemetry's Flask instrumentation, either order."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, Response
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry

import chunkwatch
from chunkwatch import semconv as sc


def _app() -> Flask:
    app = Flask(__name__)

    @app.post("/chat")
    def chat() -> Response:
        def events() -> Iterator[str]:
            for i in range(3):
                yield f"data: {i}\n\n"

        return Response(events(), mimetype="text/event-stream")

    return app


def _post(client: Any) -> bytes:
    """POST /chat, read the whole body and close it, as a WSGI server does."""
    with client.post("/chat") as response:
        assert response.status_code == 200
        return bytes(response.get_data())


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.mark.parametrize("first", ["chunkwatch", "otel"])
def test_one_server_span_and_a_verdict_in_either_order(
    first: str, exporter: InMemorySpanExporter
) -> None:
    """Whichever was installed first, a streamed request has exactly one SERVER span, the
    request verdict is counted, and removing either tool leaves the other working."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = CollectorRegistry()
    app = _app()
    steps = {
        "chunkwatch": lambda: chunkwatch.instrument(
            app, registry=registry, tracer_provider=provider
        ),
        "otel": lambda: FlaskInstrumentor().instrument_app(app, tracer_provider=provider),
    }
    for name in (first, "otel" if first == "chunkwatch" else "chunkwatch"):
        steps[name]()
    try:
        client = app.test_client()
        assert _post(client) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        servers = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
        assert len(servers) == 1, [(s.name, s.kind) for s in exporter.get_finished_spans()]
        ours = [s for s in exporter.get_finished_spans() if (s.attributes or {}).get(sc.A_LAYER)]
        assert {s.context.trace_id for s in ours} == {servers[0].context.trace_id}
        labels = {"outcome": "ok", "layer": "none", "upstream": "none"}
        assert registry.get_sample_value("chunkwatch_requests_total", labels) == 1

        chunkwatch.uninstrument(app)
        exporter.clear()
        assert _post(client)
        names = [s.name for s in exporter.get_finished_spans()]
        assert names and not any(
            (s.attributes or {}).get(sc.A_LAYER) for s in exporter.get_finished_spans()
        ), names  # OTel's span still there, ours gone
        assert registry.get_sample_value("chunkwatch_requests_total", labels) == 1

        chunkwatch.instrument(app, registry=registry, tracer_provider=provider)
        FlaskInstrumentor().uninstrument_app(app)
        exporter.clear()
        assert _post(client)
        assert registry.get_sample_value("chunkwatch_requests_total", labels) == 2
    finally:
        chunkwatch.uninstrument(app)
        FlaskInstrumentor().uninstrument_app(app)


def test_beside_otels_wsgi_middleware_there_is_one_server_span(
    exporter: InMemorySpanExporter,
) -> None:
    """A user's ``app.wsgi_app = OpenTelemetryMiddleware(app.wsgi_app)``, before or after
    chunkwatch: one SERVER span (chunkwatch's; OTel's becomes its child) and a verdict."""
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = CollectorRegistry()
    for wrap_first in (True, False):
        app = _app()
        if wrap_first:
            app.wsgi_app = OpenTelemetryMiddleware(app.wsgi_app, tracer_provider=provider)
        chunkwatch.instrument(app, registry=registry, tracer_provider=provider)
        if not wrap_first:
            app.wsgi_app = OpenTelemetryMiddleware(app.wsgi_app, tracer_provider=provider)
        try:
            exporter.clear()
            assert _post(app.test_client())
            spans = exporter.get_finished_spans()
            servers = [s for s in spans if s.kind is SpanKind.SERVER]
            assert len(servers) == 1, [(s.name, s.kind) for s in spans]
            assert {s.context.trace_id for s in spans} == {servers[0].context.trace_id}
        finally:
            chunkwatch.uninstrument(app)
    labels = {"outcome": "ok", "layer": "none", "upstream": "none"}
    assert registry.get_sample_value("chunkwatch_requests_total", labels) == 2
