"""Runs the compat services against the fault gateway and records what every party saw.

One *run* is one service script (a hand-off shape) in one instrumentation set-up, as its
own process, with its own in-process upstream and fault gateway (so runs can overlap
and the upstream's traceparents are that service's only). The run sends one
``POST /chat`` per gateway fault, in order, and keeps for each: the response body, the
new samples of the service's ``chunkwatch_requests_total``, the traceparents the
upstream received, and the time window of the exchange; then it waits until the
exchanges' spans have reached the OTLP receiver (bounded) and kills the service.

Everything is bounded: the service's start (``START_TIMEOUT``), each request
(``REQUEST_TIMEOUT``), the metric and span waits.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from chunkwatch import semconv as sc
from chunkwatch_lab.fault_gateway import Gateway
from chunkwatch_lab.threaded import start_in_thread
from chunkwatch_lab.upstream import Upstream

from ..otlp_receiver import OTLPReceiver, WireSpan

SERVICES = Path(__file__).parent / "services"
SHAPES = ("shared_loop", "thread_per_request", "executor", "sync_stream")
SETUPS = ("alone", "otel_first", "chunkwatch_first", "auto")
OTEL_HTTPX_SETUPS = ("otel_first", "chunkwatch_first", "auto")  # OTel owns the CLIENT span
UPSTREAM_NAME = "test-gw"
STALL_LIMIT = 10.0
CONSUMER_TIMEOUT = 3.0
SILENT_AT_END = 1.0
# The sync shape has no consumer timeout: its request lasts until the gateway drops the
# silent stream (STALL_LIMIT). A first-chunk deadline under that limit names the stall
# while the stream is open; the queue shapes' consumer gives up first (silent at end).
FIRST_CHUNK_TIMEOUT = 5.0
# gateway fault -> (its parameters, the request verdict chunkwatch must give)
FAULTS: dict[str, tuple[dict[str, float], str]] = {
    "pass": ({}, "ok"),
    "zero": ({}, "empty@gateway"),
    "json": ({}, "wrong_content_type@gateway"),
    "truncate": ({}, "truncated@gateway"),
    "stall": ({"limit": STALL_LIMIT}, "stalled@gateway"),
}
UPSTREAM_CALLED = ("pass", "json", "truncate")  # the faults the gateway forwards to the model
END_MARKERS = ("data: [DONE]", "event: end")  # how the services end a complete answer
START_TIMEOUT = 60.0
REQUEST_TIMEOUT = STALL_LIMIT + 20
PARALLEL = int(os.environ.get("COMPAT_PARALLEL", "4"))
MESSAGE = "Which layer dropped the data?"
_OURS = (
    "CHUNKWATCH_UPSTREAMS",
    "CHUNKWATCH_SILENT_AT_END",
    "CHUNKWATCH_FIRST_CHUNK_TIMEOUT",
)  # the services' configuration
VERDICT_LINE = re.compile(
    r"chunkwatch verdict=(?P<verdict>\S+) upstream=(?P<upstream>\S+) "
    r"trace_id=(?P<trace_id>\S+)"
)


@dataclass
class Exchange:
    """One request to the service under one gateway fault, and what every party saw."""

    fault: str
    started_ns: int
    ended_ns: int = 0
    body: str = ""
    verdicts: list[str] = field(default_factory=list)  # "outcome@layer upstream" (or "ok ...")
    traceparents: list[str | None] = field(default_factory=list)  # received by the upstream
    spans: list[WireSpan] = field(default_factory=list)  # the service's, started in the window
    log_lines: list[str] = field(default_factory=list)  # the service's verdict lines, all

    @property
    def root(self) -> WireSpan | None:
        """The request's root: chunkwatch's http span, else a parentless SERVER span."""
        ours = [s for s in self.spans if s.layer == sc.HTTP]
        servers = [s for s in self.spans if s.kind == "SERVER" and not s.parent_id]
        return (ours or servers or [None])[0]

    @property
    def trace(self) -> list[WireSpan]:
        """The spans in the root's trace."""
        root = self.root
        return [s for s in self.spans if root is not None and s.trace_id == root.trace_id]

    @property
    def logged_verdicts(self) -> list[str]:
        """``"verdict upstream"`` of each verdict log line naming the root's trace id."""
        root = self.root
        return [
            f"{m['verdict']} {m['upstream']}"
            for m in map(VERDICT_LINE.search, self.log_lines)
            if m and root is not None and m["trace_id"] == root.trace_id
        ]

    @property
    def chunkwatch_spans(self) -> list[WireSpan]:
        return [s for s in self.spans if sc.A_LAYER in s.attrs]

    @property
    def http_clients(self) -> list[WireSpan]:
        """HTTP CLIENT spans (a GenAI ``chat`` span is a CLIENT span too, without a method)."""
        return [
            s
            for s in self.spans
            if s.kind == "CLIENT"
            and (sc.HTTP_REQUEST_METHOD in s.attrs or "http.method" in s.attrs)
        ]

    def describe(self) -> str:
        """For assertion messages: the verdicts, the body's end and the spans."""
        spans = "\n  ".join(
            f"{s.trace_id[:8]} {s.describe()} parent={s.parent_id}" for s in self.spans
        )
        return f"verdicts={self.verdicts} body=...{self.body[-160:]!r}\n  {spans}"


@dataclass
class Run:
    """One service (shape x setup) through every fault."""

    shape: str
    setup: str
    exchanges: dict[str, Exchange] = field(default_factory=dict)
    error: str = ""  # why the run stopped early
    log: str = ""  # the service's stderr, its end
    seconds: float = 0.0

    @property
    def service_name(self) -> str:
        return f"compat-{self.shape}-{self.setup}"

    def exchange(self, fault: str) -> Exchange:
        if fault not in self.exchanges:
            raise AssertionError(
                f"{self.service_name}: no exchange under {fault!r}: {self.error}\n{self.log}"
            )
        return self.exchanges[fault]


# -- the service process -------------------------------------------------------------------


@contextmanager
def service_process(
    shape: str, setup: str, gateway_url: str, gateway_port: int, receiver: OTLPReceiver
) -> Iterator[tuple[int, Path]]:
    """Start ``services/<shape>.py`` in ``setup``; yield its port and its log file. The
    process is killed on exit, whatever happened."""
    env = {
        **os.environ,
        "COMPAT_SETUP": setup,
        "COMPAT_LLM_URL": gateway_url,
        "COMPAT_CONSUMER_TIMEOUT": str(CONSUMER_TIMEOUT),
        "AZURE_OPENAI_API_KEY": "sk-compat-NEVER-IN-TELEMETRY",
        "CHUNKWATCH_UPSTREAMS": f"127.0.0.1:{gateway_port}={UPSTREAM_NAME}",
        "CHUNKWATCH_SILENT_AT_END": str(SILENT_AT_END),
        "CHUNKWATCH_FIRST_CHUNK_TIMEOUT": str(FIRST_CHUNK_TIMEOUT),
        "OTEL_SERVICE_NAME": f"compat-{shape}-{setup}",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "PYTHONUNBUFFERED": "1",
    }
    for name in [k for k in env if k.startswith("CHUNKWATCH_") and k not in _OURS]:
        del env[name]  # the test runner's own settings are not the service's
    cmd = [sys.executable, str(SERVICES / f"{shape}.py")]
    if setup == "auto":
        cmd = [str(Path(sys.executable).with_name("opentelemetry-instrument")), *cmd]
    with ExitStack() as stack:
        log_file = stack.enter_context(
            tempfile.NamedTemporaryFile("w+", prefix=f"compat-{shape}-{setup}-", suffix=".log")
        )
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,  # in our process group: a ^C in the terminal stops the services too
        )
        stack.callback(_kill, proc)
        yield _read_port(proc, Path(log_file.name)), Path(log_file.name)


def _read_port(proc: subprocess.Popen[str], log: Path) -> int:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if sel.select(START_TIMEOUT):
            line = proc.stdout.readline()
            if line.startswith("PORT "):
                return int(line.split()[1])
    raise AssertionError(
        f"the service did not print its port in {START_TIMEOUT:g} s"
        f" (exit status {proc.poll()}):\n{_tail(log)}"
    )


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()  # opentelemetry-instrument exec()s the script: this is the service itself
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(_read(path).splitlines()[-lines:])


# -- HTTP, with the standard library (no probe of any tool in this process touches it) ------


def _get(url: str, method: str = "GET") -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as resp:
        return bytes(resp.read())


def _chat(port: int, headers: dict[str, str] | None = None) -> str:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/chat",
        data=json.dumps({"message": MESSAGE}).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as resp:
        return str(resp.read().decode())


def _request_counts(port: int) -> dict[str, float]:
    """``chunkwatch_requests_total`` of the service: ``"outcome@layer upstream"`` -> count
    (``"ok upstream"`` for the healthy verdict)."""
    text = _get(f"http://127.0.0.1:{port}/metrics").decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "chunkwatch_requests_total":
                verdict = (
                    "ok" if s.labels["outcome"] == "ok" else "{outcome}@{layer}".format(**s.labels)
                )
                out[f"{verdict} {s.labels.get('upstream')}"] = s.value
    return out


def _new_verdicts(
    port: int, before: dict[str, float], timeout: float = 5.0, at_least: int = 1
) -> list[str]:
    """The samples that grew since ``before`` (each once per increment), once ``at_least``
    increments did (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        after = _request_counts(port)
        grown = [k for k, v in after.items() for _ in range(int(v - before.get(k, 0.0)))]
        if len(grown) >= at_least or time.monotonic() > deadline:
            return sorted(grown)
        time.sleep(0.05)


# -- one run -------------------------------------------------------------------------------


def run_service(shape: str, setup: str, receiver: OTLPReceiver) -> Run:
    """Start the service, send one request per fault, collect the spans, stop it."""
    run = Run(shape, setup)
    began = time.monotonic()
    try:
        up = start_in_thread(Upstream(tokens=12, token_delay=0.01))
        with up, start_in_thread(Gateway(up.url)) as gw:
            with service_process(shape, setup, gw.url, gw.port, receiver) as (port, log):
                try:
                    for fault, (params, _) in FAULTS.items():
                        gw.server.set_fault(fault, **params)
                        _get(up.url + "/_stats", "DELETE")
                        before = _request_counts(port)
                        ex = run.exchanges[fault] = Exchange(fault, time.time_ns())
                        ex.body = _chat(port)
                        ex.ended_ns = time.time_ns()
                        ex.verdicts = _new_verdicts(port, before)
                        ex.traceparents = json.loads(_get(up.url + "/_stats"))["traceparents"]
                    _collect_spans(run, receiver)
                finally:
                    run.log = _tail(log)
                    verdict_lines = [x for x in _read(log).splitlines() if VERDICT_LINE.search(x)]
                    for ex in run.exchanges.values():
                        ex.log_lines = verdict_lines
    except Exception as exc:  # reported by every test of this run
        run.error = f"{type(exc).__name__}: {exc}"
    run.seconds = time.monotonic() - began
    return run


def _collect_spans(run: Run, receiver: OTLPReceiver) -> None:
    """Give each exchange the service's spans that started in its window; wait until each
    has a root, a gateway span and an HTTP CLIENT span (a stalled call's may end only when
    the gateway gives up), then a little longer for stragglers."""
    deadline = time.monotonic() + 5.0
    if "stall" in run.exchanges:
        stall_end = run.exchanges["stall"].started_ns / 1e9 + STALL_LIMIT + 5.0
        deadline = time.monotonic() + max(5.0, stall_end - time.time())
    while True:
        _assign(run, receiver.spans())
        missing = [
            f
            for f, ex in run.exchanges.items()
            if ex.root is None
            or not any(s.layer == sc.GATEWAY for s in ex.spans)
            or not ex.http_clients
        ]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    time.sleep(0.3)
    _assign(run, receiver.spans())


def _assign(run: Run, spans: Iterable[WireSpan]) -> None:
    mine = [s for s in spans if s.resource.get("service.name") == run.service_name]
    for ex in run.exchanges.values():
        ex.spans = [s for s in mine if ex.started_ns <= s.span.start_time_unix_nano <= ex.ended_ns]


def run_all(cases: Iterable[tuple[str, str]], receiver: OTLPReceiver) -> dict[tuple[str, str], Run]:
    """Every (shape, setup) run, ``PARALLEL`` at a time; the slow sync stall runs first."""
    ordered = sorted(cases, key=lambda c: (c[0] != "sync_stream", SHAPES.index(c[0]), c[1]))
    with ThreadPoolExecutor(max(1, PARALLEL), thread_name_prefix="compat-run") as pool:
        runs = list(pool.map(lambda c: run_service(*c, receiver), ordered))
    return {(r.shape, r.setup): r for r in runs}
