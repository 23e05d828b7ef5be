"""Without a tracer that records (the API's no-op one: no SDK), the probes build no span
attributes and make no span current again, and a request's trace still goes through: the
no-op tracer's spans are the ones it was given, so what a client sent is what the view
and the model call carry on."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NoOpTracerProvider
from prometheus_client import CollectorRegistry

from chunkwatch.probes.http_in import ChunkwatchMiddleware
from chunkwatch.runtime import Runtime
from chunkwatch.spans import tracing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def test_tracing_is_false_for_the_no_op_tracer_only() -> None:
    """The no-op tracer drops attributes; an SDK tracer keeps them (its spans get every one)."""
    assert not tracing(Runtime(registry=CollectorRegistry(), tracer_provider=NoOpTracerProvider()))
    assert tracing(Runtime(registry=CollectorRegistry(), tracer_provider=TracerProvider()))


def _serve(rt: Runtime, environ: dict[str, Any]) -> list[str]:
    seen: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        ctx = trace.get_current_span().get_span_context()
        seen.append(format(ctx.trace_id, "032x") if ctx.is_valid else "")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    body = ChunkwatchMiddleware(app, rt)(environ, lambda *a: None)
    assert list(body) == [b"ok"]
    body.close()
    return seen


def test_an_incoming_trace_is_current_in_the_view_without_an_sdk() -> None:
    """No SDK: the client's ``traceparent`` is still the view's current trace (so a model
    call made there carries it on); without one, the view has no trace."""
    rt = Runtime(registry=CollectorRegistry(), tracer_provider=NoOpTracerProvider())
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/chat", "HTTP_TRACEPARENT": TRACEPARENT}
    assert _serve(rt, environ) == [TRACE_ID]
    assert _serve(rt, {"REQUEST_METHOD": "POST", "PATH_INFO": "/chat"}) == [""]


def test_streams_without_spans_carry_the_incoming_trace_as_their_exemplar() -> None:
    """No SDK: the queue and sse probes start no span at all, yet each stream's exemplar is
    the client's sampled trace (its request's), as a span of the request would have said."""
    from chunkwatch.probes.queue import WatchedQueue

    registry = CollectorRegistry()
    rt = Runtime(registry=registry, tracer_provider=NoOpTracerProvider())

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        q: WatchedQueue[bytes] = WatchedQueue(environ["chunkwatch.ledger"], runtime=rt)
        for item in (b'data: {"a": 1}\n\n', b"data: [DONE]\n\n"):
            q.put(item)
        q.producer_done()
        start_response("200 OK", [("Content-Type", "text/event-stream")])

        def body() -> Any:
            yield q.get()
            yield q.get()
            q.consumer_done(complete=True)

        return body()

    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/chat", "HTTP_TRACEPARENT": TRACEPARENT}
    body = ChunkwatchMiddleware(app, rt)(environ, lambda *a: None)
    assert len(list(body)) == 2
    body.close()
    exemplars = {
        s.labels["layer"]: s.exemplar.labels["trace_id"]
        for family in registry.collect()
        for s in family.samples
        if s.name == "chunkwatch_streams_total" and s.exemplar is not None
    }
    assert exemplars == {"queue": TRACE_ID, "sse": TRACE_ID, "http": TRACE_ID}
