"""Test helpers: an instrumented reference system with its own registry and span exporter
(a :func:`chunkwatch.testing.capture`)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from chunkwatch import semconv as sc
from chunkwatch.guard import BreakerConfig
from chunkwatch.testing import Capture, capture
from chunkwatch.watchdog import Deadlines
from chunkwatch_lab.agent import LLMConfig
from chunkwatch_lab.client import ChatResult, chat
from chunkwatch_lab.fault_gateway import Gateway
from chunkwatch_lab.service import ServiceConfig, create_app
from chunkwatch_lab.serving import ServiceThread
from chunkwatch_lab.threaded import Running, start_in_thread
from chunkwatch_lab.upstream import Upstream

API_KEY = "sk-test-NEVER-IN-TELEMETRY"


@dataclass
class System:
    upstream: Running[Upstream]
    gateway: Running[Gateway]
    service: ServiceThread
    capture: Capture  # the verdicts too: capture.wait_for_verdicts, capture.last_verdict

    @property
    def registry(self) -> CollectorRegistry:
        return self.capture.registry

    @property
    def exporter(self) -> InMemorySpanExporter:
        return self.capture.exporter

    def sample(self, name: str, **labels: str) -> float:
        return self.capture.sample(name, **labels)

    def ask(self, message: str, fault: str = "pass", **params: Any) -> ChatResult:
        self.gateway.server.set_fault(fault, **params)
        self.exporter.clear()
        return chat(self.service.url, message, timeout=30)

    def root(self, timeout: float = 5.0) -> ReadableSpan:
        """The finished server span of the last request (waits for the body to close)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for span in self.exporter.get_finished_spans():
                if span.attributes and span.attributes.get(sc.A_LAYER) == sc.HTTP:
                    return span
            time.sleep(0.01)
        raise AssertionError("the request's server span never ended")

    def spans(self) -> list[ReadableSpan]:
        root = self.root()
        return [
            s
            for s in self.exporter.get_finished_spans()
            if s.context.trace_id == root.context.trace_id
        ]

    def by_layer(self) -> dict[str, list[ReadableSpan]]:
        out: dict[str, list[ReadableSpan]] = {}
        for span in self.spans():
            out.setdefault(str((span.attributes or {}).get(sc.A_LAYER)), []).append(span)
        return out


@contextmanager
def instrumented_system(
    *,
    tokens: int = 12,
    token_delay: float = 0.03,
    mode: str = "tokens",
    deadlines: Deadlines | None = None,
    tracer_provider: TracerProvider | None = None,
    exporter: InMemorySpanExporter | None = None,
    guard: bool = False,
    breaker: BreakerConfig | None = None,
) -> Iterator[System]:
    """Upstream, gateway and the instrumented service. The guard is off unless asked for:
    most tests pin what chunkwatch *detects*, which the guard would heal."""
    with start_in_thread(Upstream(tokens=tokens, token_delay=token_delay)) as up:
        with (
            start_in_thread(Gateway(up.url)) as gw,
            capture(exporter=exporter, tracer_provider=tracer_provider) as cap,
        ):
            config = ServiceConfig(
                llm=LLMConfig(url=gw.url, api_key=API_KEY),
                mode=mode,
                registry=cap.registry,  # create_app's instrument() reuses the capture's
                tracer_provider=cap.tracer_provider,
                deadlines=deadlines or Deadlines(first_chunk=1.0, idle=1.0, abort=True),
                upstreams={f"127.0.0.1:{gw.port}": "test-gw"},
                guard=guard,
                breaker=breaker,
            )
            service = ServiceThread(create_app(config))
            try:
                yield System(up, gw, service, cap)
            finally:
                service.stop()


def open_chat(url: str, message: str) -> socket.socket:
    """POST /chat on a raw socket (so a test can read part of the stream and hang up)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=10)
    body = json.dumps({"message": message}).encode()
    sock.sendall(
        b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def read_until(sock: socket.socket, marker: bytes, count: int = 1) -> bytes:
    """Read until ``marker`` was seen ``count`` times; fails if the stream ends first."""
    got = b""
    while got.count(marker) < count:
        chunk = sock.recv(4096)
        assert chunk, f"the stream ended before {count} x {marker!r}"
        got += chunk
    return got


@contextmanager
def downstream_system(
    *, tokens: int, token_delay: float
) -> Iterator[tuple[Running[Upstream], ServiceThread, Running[Gateway], Capture]]:
    """Model endpoint -> instrumented service (guard off) -> a gateway in front of it
    (``side="downstream"``: the proxies' faults between the service and its clients)."""
    with (
        start_in_thread(Upstream(tokens=tokens, token_delay=token_delay)) as up,
        capture() as cap,
    ):
        config = ServiceConfig(
            llm=LLMConfig(url=up.url, api_key="sk-test"),
            registry=cap.registry,
            tracer_provider=cap.tracer_provider,
            deadlines=Deadlines(first_chunk=5.0, idle=5.0, abort=True),
            guard=False,
        )
        service = ServiceThread(create_app(config))
        try:
            with start_in_thread(Gateway(service.url, side="downstream")) as gw:
                yield up, service, gw, cap
        finally:
            service.stop()
