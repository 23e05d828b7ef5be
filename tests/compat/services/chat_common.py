"""What the compat services share — the parts a user's project keeps in its own modules.

Tracing set-up as users write it, the LangGraph graph (one node calling
``AzureChatOpenAI``), the agent that feeds a plain ``queue.Queue``, the SSE generator
that drains it with ``get(timeout=...)``, and serving with werkzeug.

Environment:

* ``COMPAT_SETUP`` — ``alone`` (only ``chunkwatch.instrument(app)``), ``otel_first``
  (OpenTelemetry's httpx2 instrumentation, then chunkwatch), ``chunkwatch_first`` (the
  reverse), ``auto`` (launched as ``opentelemetry-instrument python svc.py``, which
  configures the SDK; the app adds only ``chunkwatch.instrument(app)``).
* ``COMPAT_LLM_URL`` — the Azure OpenAI endpoint (the gateway); ``AZURE_OPENAI_API_KEY``.
* ``COMPAT_CONSUMER_TIMEOUT`` — seconds the SSE generator waits for the next item (3).
* ``OTEL_*`` — the exporter's endpoint, service name, batch delay.
* ``CHUNKWATCH_*`` — chunkwatch's configuration; the services pass it no option.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
from collections.abc import Callable, Iterator
from typing import Any

from langchain_openai import AzureChatOpenAI
from langgraph.graph import END, START, MessagesState, StateGraph

import chunkwatch

SETUP = os.environ.get("COMPAT_SETUP", "alone")
CONSUMER_TIMEOUT = float(os.environ.get("COMPAT_CONSUMER_TIMEOUT", "3"))
DONE = object()  # the agent's last item: the answer is complete

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def setup_tracing() -> None:
    """The SDK set-up users write (``auto``: opentelemetry-instrument did it already;
    ``untraced``: none at all, the one line users try first)."""
    if SETUP in ("auto", "untraced"):
        return
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create())  # OTEL_SERVICE_NAME
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # OTEL_EXPORTER_OTLP_*
    trace.set_tracer_provider(provider)


def _otel_httpx() -> None:
    from opentelemetry.instrumentation.httpx import HTTPX2ClientInstrumentor

    HTTPX2ClientInstrumentor().instrument()


def instrument(app: Any) -> None:
    """Tracing, then chunkwatch's one line, before or after OTel's httpx2 instrumentation."""
    setup_tracing()
    if SETUP == "otel_first":
        _otel_httpx()
    chunkwatch.instrument(app)
    if SETUP == "chunkwatch_first":
        _otel_httpx()


def make_llm(**options: Any) -> AzureChatOpenAI:
    return AzureChatOpenAI(
        azure_endpoint=os.environ["COMPAT_LLM_URL"],
        azure_deployment="gpt-4o-mini",
        api_version="2024-10-21",
        api_key=os.environ["AZURE_OPENAI_API_KEY"],
        streaming=True,
        max_retries=0,
        **options,
    )


def build_graph(node: Callable[..., Any]) -> Any:
    """START -> model -> END; ``node`` calls the model (sync or async)."""
    builder = StateGraph(MessagesState)
    builder.add_node("model", node)
    builder.add_edge(START, "model")
    builder.add_edge("model", END)
    return builder.compile()


def sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def agent(graph: Any, message: str, items: queue.Queue[Any]) -> None:
    """Run the graph, put each token on ``items``, then DONE or the exception."""
    try:
        inputs = {"messages": [("user", message)]}
        async for ev in graph.astream_events(inputs, version="v2"):
            if ev["event"] == "on_chat_model_stream" and ev["data"]["chunk"].content:
                items.put(ev["data"]["chunk"].content)
        items.put(DONE)
    except Exception as exc:
        items.put(exc)


async def agent_on_a_new_loop(message: str, items: queue.Queue[Any]) -> None:
    """The agent for a service that runs ``asyncio.run`` per request, with an HTTP client
    of the request's own: each ``asyncio.run()`` is a new event loop, and the async client
    langchain-openai shares by default keeps connections bound to the first one
    ("RuntimeError: Event loop is closed" on every other request)."""
    import httpx2

    async with httpx2.AsyncClient() as http:
        llm = make_llm(http_async_client=http)

        async def call_model(state: dict[str, Any]) -> dict[str, Any]:
            return {"messages": [await llm.ainvoke(state["messages"])]}

        await agent(build_graph(call_model), message, items)


def drain(items: queue.Queue[Any], last: str) -> Iterator[str]:
    """The response body: tokens as they come, ``last`` at the end, errors as
    ``event: error``; gives up after CONSUMER_TIMEOUT seconds without an item."""
    while True:
        try:
            item = items.get(timeout=CONSUMER_TIMEOUT)
        except queue.Empty:
            yield sse({"error": f"no answer from the model in {CONSUMER_TIMEOUT:g} s"}, "error")
            return
        if item is DONE:
            yield last
            return
        if isinstance(item, Exception):
            yield sse({"error": str(item)}, "error")
            return
        yield sse({"token": item})


def serve(app: Any) -> None:
    """Serve on 127.0.0.1 (``--port``, default any free one) and print ``PORT <n>``."""
    from werkzeug.serving import make_server

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    server = make_server("127.0.0.1", parser.parse_args().port, app, threaded=True)
    print("PORT", server.server_port, flush=True)
    server.serve_forever()
