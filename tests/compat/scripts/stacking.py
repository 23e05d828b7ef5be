"""OpenTelemetry's httpx2 instrumentation and chunkwatch in one process, put on and taken
off in a given order; after each step, streamed openai SDK calls (one sync, one async)
to a model endpoint and what each tool recorded of them, as one JSON line a step.

    python stacking.py toggle URL --instrument otel,chunkwatch --remove chunkwatch,otel
    python stacking.py reconfigure URL     # CHUNKWATCH_UPSTREAMS=host:port=from-env

``toggle`` steps: ``both`` (instrumented in the given order), ``without <first removed>``,
``neither``, ``both again`` (instrumented again, same order). ``reconfigure``: a plain
``chunkwatch.instrument()``, then ``chunkwatch.instrument(registry=R,
upstreams={host:port: "second"})``, then one call. Any exception ends the script with
a traceback and a non-zero status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any
from urllib.parse import urlsplit

import openai
from opentelemetry import trace
from opentelemetry.instrumentation.httpx import HTTPX2ClientInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY, CollectorRegistry

import chunkwatch

MESSAGES: Any = [{"role": "user", "content": "Which layer dropped the data?"}]
EXPORTER = InMemorySpanExporter()
PROVIDER = TracerProvider()
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))
trace.set_tracer_provider(PROVIDER)


def calls(url: str) -> list[int]:
    """One streamed call with the sync client and one with the async client: their chunks."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=10)
    with client.chat.completions.create(model="m", messages=MESSAGES, stream=True) as stream:
        sync_chunks = sum(1 for _ in stream)

    async def run() -> int:
        aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=10)
        async with aclient:
            stream = await aclient.chat.completions.create(
                model="m", messages=MESSAGES, stream=True
            )
            return sum([1 async for _ in stream])

    return [sync_chunks, asyncio.run(run())]


def gateway_streams(registry: CollectorRegistry, upstream: str) -> float:
    labels = {"layer": "gateway", "outcome": "ok", "upstream": upstream}
    return registry.get_sample_value("chunkwatch_streams_total", labels) or 0.0


def step(name: str, url: str, registry: CollectorRegistry) -> None:
    EXPORTER.clear()
    before = gateway_streams(registry, "up")
    chunks = calls(url)
    spans = EXPORTER.get_finished_spans()
    http_clients = [  # a GenAI chat span is a CLIENT span too, without an HTTP method
        s
        for s in spans
        if s.kind is trace.SpanKind.CLIENT
        and {"http.request.method", "http.method"} & set(s.attributes or {})
    ]
    otel = [s for s in http_clients if "chunkwatch.layer" not in (s.attributes or {})]
    record = {
        "step": name,
        "chunks": chunks,
        "http_client_spans": len(http_clients),
        "otel_client_spans": len(otel),
        "chunkwatch_gateway_streams": gateway_streams(registry, "up") - before,
    }
    print(json.dumps(record), flush=True)


def toggle(url: str, instrument: list[str], remove: list[str]) -> None:
    registry = CollectorRegistry()
    host = urlsplit(url).netloc
    on = {
        "otel": lambda: HTTPX2ClientInstrumentor().instrument(),
        "chunkwatch": lambda: chunkwatch.instrument(registry=registry, upstreams={host: "up"}),
    }
    off = {
        "otel": lambda: HTTPX2ClientInstrumentor().uninstrument(),
        "chunkwatch": lambda: chunkwatch.uninstrument(),
    }
    for tool in instrument:
        on[tool]()
    step("both", url, registry)
    off[remove[0]]()
    step(f"without {remove[0]}", url, registry)
    off[remove[1]]()
    step("neither", url, registry)
    for tool in instrument:
        on[tool]()
    step("both again", url, registry)


def reconfigure(url: str) -> None:
    registry = CollectorRegistry()
    host = urlsplit(url).netloc
    chunkwatch.instrument()
    chunkwatch.instrument(registry=registry, upstreams={host: "second"})
    calls(url)
    out = {
        name: {label: gateway_streams(reg, label) for label in ("second", "from-env", "none", host)}
        for name, reg in (("R", registry), ("global", REGISTRY))
    }
    print(json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=("toggle", "reconfigure"))
    parser.add_argument("url")
    parser.add_argument("--instrument", default="otel,chunkwatch")
    parser.add_argument("--remove", default="otel,chunkwatch")
    args = parser.parse_args()
    if args.command == "toggle":
        toggle(args.url, args.instrument.split(","), args.remove.split(","))
    else:
        reconfigure(args.url)


if __name__ == "__main__":
    main()
