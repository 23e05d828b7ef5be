"""The reference service under gunicorn with two workers.

Real processes on loopback: the local upstream, the fault gateway and a tiny
OTLP/HTTP receiver run in this process's threads; gunicorn (a master and two
``gthread`` workers, ``-c python:chunkwatch_lab.wsgi``) is a child
process with ``PROMETHEUS_MULTIPROC_DIR`` set. Which worker served a request is
read from gunicorn's own access log (``%(p)s`` is the worker's pid).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from chunkwatch import semconv as sc
from chunkwatch.metrics import upstream_name
from chunkwatch_lab.client import ChatResult, chat
from chunkwatch_lab.fault_gateway import Gateway
from chunkwatch_lab.threaded import Running, start_in_thread
from chunkwatch_lab.upstream import Upstream

from .processes import clean_env, stop_group

SERVICE_NAME = "chunkwatch-multiprocess-test"
BATCH = 12  # concurrent requests per batch: more than one worker's 8 threads
MAX_BATCHES = 6
T = TypeVar("T")


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 10.0) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


# -- an OTLP/HTTP receiver ---------------------------------------------------------------------


class _OTLPHandler(BaseHTTPRequestHandler):
    server: OTLPReceiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        with self.server.lock:
            self.server.requests.append((self.path, request))
        payload = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class OTLPReceiver(ThreadingHTTPServer):
    """Collects every ``ExportTraceServiceRequest`` posted to it."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _OTLPHandler)
        self.lock = threading.Lock()
        self.requests: list[tuple[str, ExportTraceServiceRequest]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """(resource attributes, span) for every span received."""
        out: list[tuple[dict[str, Any], Any]] = []
        with self.lock:
            requests = list(self.requests)
        for _, req in requests:
            for rs in req.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    out.extend((resource, span) for span in ss.spans)
        return out


# -- the gunicorn cluster -----------------------------------------------------------------------


@dataclass
class Cluster:
    proc: subprocess.Popen[bytes]
    url: str
    metrics_dir: Path
    access_log: Path
    error_log: Path
    gateway: Running[Gateway]
    upstream_label: str
    chats_sent: int = 0

    def access(self) -> list[tuple[int, str, str]]:
        """(worker pid, method, path) of every request gunicorn logged."""
        out = []
        for line in self.access_log.read_text().splitlines():
            m = re.match(r"<(\d+)> (\S+) (\S+) (\d+)", line)
            if m:
                out.append((int(m[1]), m[2], m[3]))
        return out

    def workers(self) -> set[int]:
        """Pids of the workers that finished building the app (the wsgi post_worker_init hook)."""
        text = self.error_log.read_text()
        booted = {int(p) for p in re.findall(r"chunkwatch: app ready in worker (\d+)", text)}
        exited = {int(p) for p in re.findall(r"Worker exiting \(pid: (\d+)\)", text)}
        return booted - exited

    def chat_batches(self, message: str, want_workers: int = 2) -> int:
        """Send batches of concurrent chats until ``want_workers`` workers served some.

        Returns how many chats were sent; every one must end with ``done`` or ``error``.
        """
        start = len(self.access())
        sent = 0
        for _ in range(MAX_BATCHES):
            with ThreadPoolExecutor(BATCH) as pool:
                results: list[ChatResult] = list(
                    pool.map(lambda _: chat(self.url, message, timeout=20), range(BATCH))
                )
            sent += len(results)
            self.chats_sent += len(results)
            for r in results:
                assert r.status == 200 and r.complete and r.last_event in ("done", "error"), r

            def served(n: int = sent) -> list[tuple[int, str, str]] | None:
                chats = [a for a in self.access()[start:] if a[2] == "/chat"]
                return chats if len(chats) == n else None

            pids = {pid for pid, _, _ in wait_for(served, "the access log of the chats")}
            if len(pids) >= want_workers:
                return sent
        raise AssertionError(f"{sent} chats in {MAX_BATCHES} batches reached only one worker")

    def scrape(self, accept: str | None = None) -> tuple[str, str]:
        """GET /metrics: (content type, body)."""
        conn = HTTPConnection("127.0.0.1", int(self.url.rsplit(":", 1)[1]), timeout=10)
        try:
            conn.request("GET", "/metrics", headers={"Accept": accept} if accept else {})
            resp = conn.getresponse()
            body = resp.read().decode()
            assert resp.status == 200, body
            return resp.getheader("Content-Type", ""), body
        finally:
            conn.close()


def samples(text: str, name: str, **labels: str) -> list[Sample]:
    return [
        s
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def total(text: str, name: str, **labels: str) -> float:
    return sum(s.value for s in samples(text, name, **labels))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM gunicorn's process group (master and workers); SIGKILL it if it lingers."""
    stop_group(proc, signal.SIGTERM)


gunicorn_env = clean_env


@pytest.fixture(scope="module")
def otlp() -> Iterator[OTLPReceiver]:
    receiver = OTLPReceiver()
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.shutdown()
        receiver.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, otlp: OTLPReceiver) -> Iterator[Cluster]:
    """gunicorn -w 2 --worker-class gthread --threads 8 in front of the fault gateway."""
    tmp = tmp_path_factory.mktemp("gunicorn")
    metrics_dir = tmp / "prometheus"
    metrics_dir.mkdir()
    access_log, error_log = tmp / "access.log", tmp / "error.log"
    access_log.touch()
    with start_in_thread(Upstream(tokens=12, token_delay=0.01)) as up:
        with start_in_thread(Gateway(up.url)) as gw:
            env = gunicorn_env(
                CHUNKWATCH_LLM_URL=gw.url,
                CHUNKWATCH_GUARD="0",  # pin what chunkwatch detects; the guard would heal it
                PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
                OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url,
                OTEL_SERVICE_NAME=SERVICE_NAME,
                OTEL_BSP_SCHEDULE_DELAY="100",
            )
            cmd = [
                sys.executable, "-m", "gunicorn",
                "-c", "python:chunkwatch_lab.wsgi",
                "-w", "2", "--worker-class", "gthread", "--threads", "8",
                "-b", "127.0.0.1:0",
                "--graceful-timeout", "5",
                "--no-control-socket",
                "--access-logfile", str(access_log),
                "--access-logformat", "%(p)s %(m)s %(U)s %(s)s",
                "--error-logfile", str(error_log),
                "--log-level", "info",
            ]  # fmt: skip
            with open(tmp / "stdout.log", "wb") as out:
                proc = subprocess.Popen(
                    cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            try:

                def log() -> str:
                    if proc.poll() is not None:
                        raise AssertionError("gunicorn exited:\n" + error_log.read_text())
                    return error_log.read_text() if error_log.exists() else ""

                def listening() -> str | None:
                    m = re.search(r"Listening at: (http://127\.0\.0\.1:\d+)", log())
                    return m[1] if m else None

                url = wait_for(listening, "gunicorn to listen", 20)
                c = Cluster(
                    proc, url, metrics_dir, access_log, error_log, gw, upstream_name(gw.url)
                )
                wait_for(lambda: log() and len(c.workers()) == 2, "two workers ready", 20)
                yield c
            finally:
                _stop(proc)


def test_requests_total_is_summed_across_workers_whichever_answers_the_scrape(
    cluster: Cluster,
) -> None:
    """Chats served by both workers are all counted in ``chunkwatch_requests_total``, and
    a scrape answered by either worker shows the same sum; afterwards no stream is open."""
    sent = cluster.chat_batches("Which worker answers?")

    def counted() -> str | None:
        _, text = cluster.scrape()
        return text if total(text, "chunkwatch_requests_total") == cluster.chats_sent else None

    text = wait_for(counted, f"chunkwatch_requests_total == {cluster.chats_sent}", 10)
    ok = total(text, "chunkwatch_requests_total", outcome="ok", layer=sc.NO_LAYER)
    assert ok == sent == cluster.chats_sent

    # scrapes answered by each worker: every one sees the sum of both workers' files
    scrapes_before = len(cluster.access())
    for _ in range(MAX_BATCHES):
        with ThreadPoolExecutor(BATCH) as pool:
            bodies = [body for _, body in pool.map(lambda _: cluster.scrape(), range(BATCH))]
        assert {total(b, "chunkwatch_requests_total") for b in bodies} == {cluster.chats_sent}
        scrapers = {pid for pid, _, path in cluster.access()[scrapes_before:] if path == "/metrics"}
        if scrapers >= cluster.workers():
            break
    else:
        raise AssertionError("every scrape was answered by the same worker")

    # the live gauge: nothing open (a scrape is not observed, so not even itself)
    _, text = cluster.scrape()
    open_ = open_by_layer(text)
    assert set(open_) >= {sc.GATEWAY, sc.SDK, sc.LANGGRAPH, sc.QUEUE, sc.SSE, sc.HTTP}
    assert all(v == 0 for v in open_.values()), open_


def test_an_empty_stream_is_counted_at_the_gateway_across_workers(cluster: Cluster) -> None:
    """``zero`` fault (HTTP 200, no data events): every chat, whichever worker ran it, is one
    ``chunkwatch_requests_total{outcome="empty",layer="gateway"}`` in the aggregated scrape;
    each worker's own file holds its share."""
    labels = {"outcome": "empty", "layer": sc.GATEWAY, "upstream": cluster.upstream_label}
    _, text = cluster.scrape()
    before = total(text, "chunkwatch_requests_total", **labels)
    cluster.gateway.server.set_fault("zero")
    try:
        sent = cluster.chat_batches("Is anybody there?")
    finally:
        cluster.gateway.server.set_fault("pass")

    def counted() -> str | None:
        _, text = cluster.scrape()
        return text if total(text, "chunkwatch_requests_total", **labels) == before + sent else None

    text = wait_for(counted, f"{sent} empty@gateway requests", 10)
    for s in samples(text, "chunkwatch_requests_total"):
        assert "/" not in s.labels[sc.L_UPSTREAM] and "?" not in s.labels[sc.L_UPSTREAM]

    per_worker = {}
    for pid in cluster.workers():
        (metric,) = [
            m
            for m in MultiProcessCollector.merge(  # type: ignore[no-untyped-call]
                [str(cluster.metrics_dir / f"counter_{pid}.db")]
            )
            if m.name == sc.REQUESTS
        ]
        per_worker[pid] = sum(
            s.value
            for s in metric.samples
            if s.name == "chunkwatch_requests_total"
            and all(s.labels.get(k) == v for k, v in labels.items())
        )
    assert all(n > 0 for n in per_worker.values()), per_worker
    assert sum(per_worker.values()) == before + sent


def test_multiprocess_exposition_has_no_exemplars(cluster: Cluster) -> None:
    """What multiprocess mode loses: an OpenMetrics scrape carries no ``trace_id`` exemplar
    (and no ``_created`` series), though the same requests were traced."""
    content_type, text = cluster.scrape("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    assert total(text, "chunkwatch_requests_total") == cluster.chats_sent
    assert "trace_id" not in text
    assert "_created" not in text


def test_every_chat_is_one_trace_exported_over_otlp_from_both_workers(
    cluster: Cluster, otlp: OTLPReceiver
) -> None:
    """``setup_tracing`` in each worker: OTLP/HTTP to ``OTEL_EXPORTER_OTLP_ENDPOINT``/v1/traces,
    ``service.name`` from ``OTEL_SERVICE_NAME``; one server span per chat, each its own trace,
    from two distinct service instances (a provider per worker, built after the fork)."""

    def chat_roots() -> list[tuple[dict[str, Any], Any]] | None:
        roots = [(res, s) for res, s in otlp.spans() if s.name == "POST /chat"]
        return roots if len(roots) >= cluster.chats_sent else None

    roots = wait_for(chat_roots, f"{cluster.chats_sent} chat server spans", 10)
    assert len(roots) == cluster.chats_sent
    assert {path for path, _ in otlp.requests} == {"/v1/traces"}
    assert {res["service.name"] for res, _ in roots} == {SERVICE_NAME}
    assert len({s.trace_id for _, s in roots}) == cluster.chats_sent
    assert all(len(s.parent_span_id) == 0 for _, s in roots)
    assert len({res["service.instance.id"] for res, _ in roots}) == 2


def test_a_dead_workers_counts_stay_and_its_live_gauges_go(cluster: Cluster) -> None:
    """A worker that exits: the master's ``child_exit`` hook (``mark_process_dead``) removes its
    ``streams_open`` file; its counters stay in the sum; gunicorn replaces it."""
    victim = min(cluster.workers())
    live = cluster.metrics_dir / f"gauge_livesum_{victim}.db"
    assert live.exists()
    os.kill(victim, signal.SIGTERM)
    wait_for(lambda: not live.exists(), "the dead worker's live gauge file to go")
    wait_for(lambda: len(cluster.workers()) == 2 and victim not in cluster.workers(), "a new one")
    assert (cluster.metrics_dir / f"counter_{victim}.db").exists()

    _, text = cluster.scrape()
    assert total(text, "chunkwatch_requests_total") == cluster.chats_sent
    open_ = open_by_layer(text)
    assert all(v == 0 for layer, v in open_.items() if layer != sc.HTTP), open_


def open_by_layer(text: str) -> dict[str, float]:
    """``chunkwatch_streams_open`` summed over upstreams, per layer."""
    out: dict[str, float] = {}
    for s in samples(text, "chunkwatch_streams_open"):
        out[s.labels[sc.L_LAYER]] = out.get(s.labels[sc.L_LAYER], 0.0) + s.value
    return out


def test_importing_the_entry_point_starts_no_thread_and_a_prefork_app_is_refused() -> None:
    """gunicorn imports ``chunkwatch_lab.wsgi`` in the master (``-c python:...``,
    ``--preload``): the import must start no thread. An app built before a fork has an
    agent loop thread that does not exist in the child: the child refuses to use it."""
    script = """
import os, threading
import chunkwatch_lab.wsgi as w
assert threading.active_count() == 1, [t.name for t in threading.enumerate()]
w.app.load()
pid = os.fork()
if pid == 0:
    try:
        w.app.load()
    except RuntimeError as err:
        os._exit(0 if "forked from it" in str(err) else 2)
    os._exit(1)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""
    env = gunicorn_env(CHUNKWATCH_LLM_URL="http://127.0.0.1:9", CHUNKWATCH_INSTRUMENT="0")
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "child 0"
