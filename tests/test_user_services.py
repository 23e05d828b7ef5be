"""The one line users try first, in services we did not write, beside OpenTelemetry.

Each case runs ``tests/user_services/chat_service.py`` — a Flask + LangGraph service
written the way users write it, instrumented with only ``chunkwatch.instrument(app)``
and configured from the environment — as its own process, in one hand-off shape and
one instrumentation set-up, against the real fault gateway and upstream on loopback,
with spans exported over OTLP to an in-test receiver.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from chunkwatch import semconv as sc
from chunkwatch.reference.gateway import Gateway
from chunkwatch.reference.threaded import Running, start_in_thread
from chunkwatch.reference.upstream import Upstream
from tests.test_otlp import Receiver, WireSpan, _spans

SERVICE = Path(__file__).parent / "user_services" / "chat_service.py"
SHAPES = ("shared_loop", "thread", "executor", "sync")
SETUPS = ("alone", "otel_first", "chunkwatch_first", "auto")
FAULTS = {  # gateway fault -> (parameters, the request verdict)
    "pass": ({}, "ok"),
    "zero": ({}, "empty@gateway"),
    "json": ({}, "wrong_content_type@gateway"),
    "truncate": ({}, "truncated@gateway"),
    "stall": ({"limit": 3.0}, "stalled@gateway"),
}
_REQUESTS = re.compile(r"^chunkwatch_requests_total\{([^}]*)\} (\S+)$", re.M)


class Backend:
    def __init__(self, upstream: Running[Upstream], gateway: Running[Gateway], otlp: Receiver):
        self.upstream, self.gateway, self.otlp = upstream, gateway, otlp


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    receiver = Receiver()
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    try:
        with start_in_thread(Upstream(tokens=5, token_delay=0.01)) as up:
            with start_in_thread(Gateway(up.url)) as gw:
                yield Backend(up, gw, receiver)
    finally:
        receiver.shutdown()


def _start(backend: Backend, shape: str, setup: str) -> tuple[subprocess.Popen[str], int]:
    env = {
        **os.environ,
        "SHAPE": shape,
        "SETUP": setup,
        "LLM_URL": backend.gateway.url,
        "CONSUMER_TIMEOUT": "2",
        "CHUNKWATCH_UPSTREAMS": f"127.0.0.1:{backend.gateway.port}=test-gw",
        "CHUNKWATCH_FIRST_CHUNK_TIMEOUT": "1",
        "CHUNKWATCH_SILENT_AT_END": "1",
        "OTEL_SERVICE_NAME": f"user-{shape}-{setup}",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": backend.otlp.url,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    cmd = [sys.executable, str(SERVICE)]
    if setup == "auto":
        cmd = [str(Path(sys.executable).with_name("opentelemetry-instrument")), *cmd]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise AssertionError(f"the service did not start: {line!r}")
    return proc, int(line.split()[1])


def _verdicts(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for labels, value in _REQUESTS.findall(text):
        d = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        verdict = "ok" if d["outcome"] == "ok" else f"{d['outcome']}@{d['layer']}"
        out[f"{verdict} {d['upstream']}"] = float(value)
    return out


def _chat(port: int) -> str:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/chat",
        data=json.dumps({"message": "hello"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return str(resp.read().decode())


def _trace_of(backend: Backend, verdict: str, service: str) -> list[WireSpan]:
    """The spans of the one request of ``service`` whose root says ``verdict``."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with backend.otlp.lock:
            spans = [
                s
                for s in _spans(list(backend.otlp.requests))
                if s.resource.get("service.name") == service
            ]
        roots = [s for s in spans if s.attrs.get(sc.A_VERDICT) == verdict]
        if roots:
            trace = [s for s in spans if s.trace_id == roots[0].trace_id]
            if any(s.layer == sc.GATEWAY for s in trace):
                return trace
        time.sleep(0.1)
    raise AssertionError(f"no complete trace with verdict {verdict} from {service}")


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("shape", SHAPES)
def test_the_request_verdict_names_the_layer(backend: Backend, shape: str, setup: str) -> None:
    """With only chunkwatch.instrument(app) and the environment, each gateway fault gives
    the right request verdict, in every hand-off shape and beside OpenTelemetry's httpx
    instrumentation in either order or under opentelemetry-instrument; each model call
    has one HTTP CLIENT span, in the request's trace, whose context reached the model."""
    proc, port = _start(backend, shape, setup)
    try:
        got = {}
        for fault, (params, _) in FAULTS.items():
            backend.gateway.server.set_fault(fault, **params)
            before = _verdicts(port)
            body = _chat(port)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                after = _verdicts(port)
                new = [k for k in after if after[k] > before.get(k, 0)]
                if new:
                    break
                time.sleep(0.05)
            got[fault] = (new, body)
            if fault == "pass":
                traceparent = backend.upstream.server.traceparents[-1]
        assert {f: v[0] for f, v in got.items()} == {
            f: [f"{verdict} test-gw"] for f, (_, verdict) in FAULTS.items()
        }
        assert "event: done" in got["pass"][1]
        for fault in ("zero", "json", "truncate", "stall"):
            assert "event: error" in got[fault][1], fault

        trace = _trace_of(backend, "ok", f"user-{shape}-{setup}")
        http_clients = [
            s
            for s in trace
            if s.span.kind == s.span.SPAN_KIND_CLIENT
            and (sc.HTTP_REQUEST_METHOD in s.attrs or "http.method" in s.attrs)
        ]
        assert len(http_clients) == 1, [(s.span.name, s.span.kind) for s in trace]
        (client,) = http_clients
        (gateway,) = [s for s in trace if s.layer == sc.GATEWAY]
        if setup == "alone":
            assert gateway is client
        else:  # OpenTelemetry's httpx instrumentation owns the CLIENT span
            assert gateway.span.kind == gateway.span.SPAN_KIND_INTERNAL
            assert gateway.span.parent_span_id == client.span.span_id
        assert traceparent is not None
        _, trace_id, span_id, _ = traceparent.split("-")
        assert (trace_id, span_id) == (client.trace_id, client.span.span_id.hex())
    finally:
        proc.kill()
        proc.wait(10)
