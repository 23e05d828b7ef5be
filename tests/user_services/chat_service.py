"""A chat service written the way users write them — not chunkwatch's reference service.

Flask, one LangGraph node calling ``AzureChatOpenAI`` (``streaming=True``, the default
``timeout=None``), a plain ``queue.Queue`` between the agent and the SSE generator with
the app's own ``get(timeout=...)``, exceptions forwarded as ``event: error``. The only
chunkwatch line is ``chunkwatch.instrument(app)``; its configuration comes from the
environment (``CHUNKWATCH_UPSTREAMS``, ``CHUNKWATCH_SILENT_AT_END`` ...).

    SHAPE=shared_loop|thread|executor|sync  SETUP=alone|otel_first|chunkwatch_first|auto
    LLM_URL=http://127.0.0.1:PORT  CONSUMER_TIMEOUT=3  python chat_service.py
    (SETUP=auto: run under ``opentelemetry-instrument``)

Prints ``PORT <n>`` once it listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flask import Flask, Response, request
from langchain_openai import AzureChatOpenAI
from langgraph.graph import END, START, MessagesState, StateGraph

import chunkwatch

SHAPE = os.environ["SHAPE"]
SETUP = os.environ["SETUP"]
TIMEOUT = float(os.environ.get("CONSUMER_TIMEOUT", "3"))


def _otel_httpx() -> None:
    from opentelemetry.instrumentation.httpx import HTTPX2ClientInstrumentor

    HTTPX2ClientInstrumentor().instrument()


if SETUP != "auto":  # as users set up the SDK themselves
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=100))
    trace.set_tracer_provider(provider)
if SETUP == "otel_first":
    _otel_httpx()

app = Flask(__name__)
chunkwatch.instrument(app)

if SETUP == "chunkwatch_first":
    _otel_httpx()

llm = AzureChatOpenAI(
    azure_endpoint=os.environ["LLM_URL"],
    azure_deployment="gpt-4o-mini",
    api_version="2024-10-21",
    api_key="sk-user-service",
    streaming=True,
    max_retries=0,
)


def call_model(state: MessagesState) -> dict[str, Any]:
    return {"messages": [llm.invoke(state["messages"])]}


builder = StateGraph(MessagesState)
builder.add_node("model", call_model)
builder.add_edge(START, "model")
builder.add_edge("model", END)
graph = builder.compile()

LOOP = asyncio.new_event_loop()
threading.Thread(target=LOOP.run_forever, name="agent-loop", daemon=True).start()
EXECUTOR = ThreadPoolExecutor(4)


def event(name: str, data: Any) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def agent(message: str, items: queue.Queue[tuple[str, Any]]) -> None:
    try:
        inputs = {"messages": [("user", message)]}
        async for ev in graph.astream_events(inputs, version="v2"):
            if ev["event"] == "on_chat_model_stream":
                items.put(("token", ev["data"]["chunk"].content))
        items.put(("done", None))
    except Exception as exc:
        items.put(("error", f"{type(exc).__name__}: {exc}"))


@app.post("/chat")
def chat() -> Response:
    message = request.get_json()["message"]
    if SHAPE == "sync":

        def streamed() -> Iterator[str]:
            try:
                inputs = {"messages": [("user", message)]}
                for chunk, _meta in graph.stream(inputs, stream_mode="messages"):
                    yield event("token", chunk.content)
                yield event("done", None)
            except Exception as exc:
                yield event("error", f"{type(exc).__name__}: {exc}")

        return Response(streamed(), mimetype="text/event-stream")

    items: queue.Queue[tuple[str, Any]] = queue.Queue()
    if SHAPE == "shared_loop":
        asyncio.run_coroutine_threadsafe(agent(message, items), LOOP)
    elif SHAPE == "thread":
        threading.Thread(target=lambda: asyncio.run(agent(message, items))).start()
    elif SHAPE == "executor":
        EXECUTOR.submit(lambda: asyncio.run(agent(message, items)))

    def body() -> Iterator[str]:
        while True:
            try:
                kind, value = items.get(timeout=TIMEOUT)
            except queue.Empty:
                yield event("error", "the model did not answer in time")
                return
            yield event(kind, value)
            if kind != "token":
                return

    return Response(body(), mimetype="text/event-stream")


if __name__ == "__main__":
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    print("PORT", server.server_port, flush=True)
    server.serve_forever()
