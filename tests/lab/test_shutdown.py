"""Shutdown is bounded whatever the OTLP endpoint does.

Real processes on loopback: ``chunkwatch serve`` and gunicorn (``-c
python:chunkwatch_lab.wsgi``) run as children, with
``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at an endpoint that never answers (a
TCP server in this process that accepts and then says nothing) or at a closed
port. One chat leaves spans batched (a long ``OTEL_BSP_SCHEDULE_DELAY``), then
the process gets the signal an operator or gunicorn's arbiter sends. The
documented flush budget is 5 s; the process must be gone a little after that.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chunkwatch_lab import telemetry
from chunkwatch_lab.client import chat
from chunkwatch_lab.threaded import Running, start_in_thread
from chunkwatch_lab.upstream import Upstream

from .processes import child, clean_env

EXIT_WITHIN = 7.0  # seconds: the 5 s flush budget plus the rest of the way out
# gunicorn adds its own: a gthread worker polls for the stop flag once a second, the arbiter
# then reaps it and exits. Before the bound, this took 11 s (and up to 44 s in stress runs).
GUNICORN_EXIT_WITHIN = EXIT_WITHIN + 1.5


class BlackHole:
    """A TCP server on loopback that accepts every connection and never sends a byte."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._held.append(conn)

    def close(self) -> None:
        self._sock.close()
        for conn in self._held:
            conn.close()


def closed_port_url() -> str:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def upstream() -> Iterator[Running[Upstream]]:
    running = start_in_thread(Upstream(tokens=4, token_delay=0.001))
    yield running
    running.stop()


@pytest.fixture(params=["black-hole", "closed-port"])
def endpoint(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "closed-port":
        yield closed_port_url()
        return
    hole = BlackHole()
    try:
        yield hole.url
    finally:
        hole.close()


def child_env(**extra: str) -> dict[str, str]:
    return clean_env(OTEL_BSP_SCHEDULE_DELAY="60000", **extra)  # the chat's spans stay batched


def wait_for_line(path: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        m = re.search(pattern, text)
        if m:
            return m[1]
        if proc.poll() is not None:
            raise AssertionError(f"exited before {pattern!r}:\n{text}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {pattern!r}")


def time_to_exit(proc: subprocess.Popen[bytes], sig: int, group: bool = False) -> float:
    """Send ``sig``; seconds until the process is gone (15 at most: then :func:`child` kills it)."""
    start = time.monotonic()
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        pass
    return time.monotonic() - start


def test_shutdown_gives_up_at_its_deadline_and_says_spans_were_lost(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """:func:`telemetry.shutdown` returns False at its deadline while the export to a
    black hole is still waiting, and warns once that batched spans are lost."""
    hole = BlackHole()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", hole.url)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")
        provider = telemetry.setup_tracing("shutdown-test")
        assert provider is not None
        provider.get_tracer("test").start_span("pending").end()
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="chunkwatch"):
            assert telemetry.shutdown(timeout_millis=300) is False
        took = time.monotonic() - start
        assert telemetry.shutdown(timeout_millis=300) is True  # nothing left: a no-op
    finally:
        hole.close()
    assert 0.25 < took < 1.0
    lost = [r for r in caplog.records if "spans still batched are lost" in r.getMessage()]
    assert len(lost) == 1 and hole.url in lost[0].getMessage()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_exits_promptly_on_sigint_when_the_otlp_endpoint_never_answers(
    upstream: Running[Upstream], endpoint: str, tmp_path: Path, sig: signal.Signals
) -> None:
    """``chunkwatch serve`` with spans batched for an endpoint that never answers (or a
    closed port) exits within about 5 s of SIGINT or SIGTERM (docker stop), having tried
    the flush, and says that spans were lost."""
    log = tmp_path / "serve.log"
    cmd = [
        sys.executable, "-m", "chunkwatch", "serve",
        "--llm-url", upstream.url, "--port", "0", "--no-guard",
    ]  # fmt: skip
    env = child_env(OTEL_EXPORTER_OTLP_ENDPOINT=endpoint)
    with child(cmd, env, log, stop=signal.SIGKILL) as proc:
        url = wait_for_line(log, r"listening on (http://\S+)", proc, 20)
        chat(url, "spans, please", timeout=10)
        took = time_to_exit(proc, sig)
    print(f"serve, {endpoint}: exit {took:.2f} s after {sig.name}")
    assert took < EXIT_WITHIN, f"took {took:.1f} s to exit:\n{log.read_text()}"
    assert proc.returncode == 0, log.read_text()
    assert "spans still batched are lost" in log.read_text()


def test_gunicorn_worker_exits_promptly_on_sigterm_when_the_otlp_endpoint_never_answers(
    upstream: Running[Upstream], tmp_path: Path
) -> None:
    """gunicorn (one gthread worker) with spans batched for a black-hole endpoint: after
    SIGTERM the ``worker_exit`` flush gives up after about 5 s and the whole server is gone
    before gunicorn's graceful timeout would have killed the worker."""
    hole = BlackHole()
    log = tmp_path / "gunicorn.log"
    cmd = [
        sys.executable, "-m", "gunicorn",
        "-c", "python:chunkwatch_lab.wsgi",
        "-w", "1", "--threads", "2", "-b", "127.0.0.1:0",
        "--graceful-timeout", "30", "--no-control-socket",
        "--error-logfile", "-", "--log-level", "info",
    ]  # fmt: skip
    env = child_env(
        OTEL_EXPORTER_OTLP_ENDPOINT=hole.url, CHUNKWATCH_LLM_URL=upstream.url, CHUNKWATCH_GUARD="0"
    )
    try:
        with child(cmd, env, log, stop=signal.SIGKILL) as proc:
            url = wait_for_line(log, r"Listening at: (http://127\.0\.0\.1:\d+)", proc, 20)
            wait_for_line(log, r"(app ready in worker)", proc, 20)
            chat(url, "spans, please", timeout=10)
            took = time_to_exit(proc, signal.SIGTERM, group=True)
    finally:
        hole.close()
    print(f"gunicorn, black hole: exit {took:.2f} s after SIGTERM")
    assert took < GUNICORN_EXIT_WITHIN, f"took {took:.1f} s to exit:\n{log.read_text()}"
    assert "spans still batched are lost" in log.read_text()


def test_serve_stops_on_sigint_even_when_started_with_sigint_ignored(
    upstream: Running[Upstream], tmp_path: Path
) -> None:
    """A background job of a non-interactive shell inherits SIGINT ignored; ``chunkwatch
    serve`` still stops on it (as gunicorn does), with the flush."""
    log = tmp_path / "serve.log"
    launcher = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "sys.argv = sys.argv[1:]; runpy.run_module('chunkwatch', run_name='__main__')"
    )
    cmd = [
        sys.executable, "-c", launcher, "chunkwatch", "serve",
        "--llm-url", upstream.url, "--port", "0", "--no-guard",
    ]  # fmt: skip
    with child(cmd, child_env(), log, stop=signal.SIGKILL) as proc:
        wait_for_line(log, r"listening on (http://\S+)", proc, 20)
        took = time_to_exit(proc, signal.SIGINT)
    assert took < EXIT_WITHIN and proc.returncode == 0, log.read_text()
