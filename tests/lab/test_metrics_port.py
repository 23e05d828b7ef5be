"""Metrics on a port of their own: `/metrics` off the port the clients reach.

`chunkwatch serve --metrics-port` and, under gunicorn, `CHUNKWATCH_METRICS_PORT` (served
by the master, summing every worker's multiprocess files). Real processes on loopback.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from chunkwatch_lab.client import chat
from chunkwatch_lab.threaded import Running, start_in_thread
from chunkwatch_lab.upstream import Upstream

from .processes import clean_env, stop_group


@pytest.fixture(scope="module")
def model() -> Iterator[Running[Upstream]]:
    with start_in_thread(Upstream(tokens=4, token_delay=0.001)) as up:
        yield up


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _env(**extra: str) -> dict[str, str]:
    return clean_env(CHUNKWATCH_GUARD="0", **extra)


def _stop(proc: subprocess.Popen[str]) -> None:
    stop_group(proc, signal.SIGTERM)


def _counted_on(metrics_url: str) -> str:
    deadline = time.monotonic() + 10
    while True:
        status, text = _get(metrics_url)
        if status == 200 and re.search(r'^chunkwatch_requests_total\{.*outcome="ok"', text, re.M):
            return text
        assert time.monotonic() < deadline, f"no request counted on {metrics_url}: {text[:300]}"
        time.sleep(0.1)


def test_serve_with_a_metrics_port_keeps_metrics_off_the_app_port(
    model: Running[Upstream],
) -> None:
    """`chunkwatch serve --metrics-port`: the app's /metrics is a JSON 404, the metrics
    port serves the request just made."""
    cmd = [sys.executable, "-m", "chunkwatch", "serve", "--llm-url", model.url]
    proc = subprocess.Popen(
        [*cmd, "--port", "0", "--metrics-port", "0"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        app_url = proc.stdout.readline().split()[-1]
        line = proc.stdout.readline().strip()
        assert line.startswith("chunkwatch serve metrics on http://127.0.0.1:"), line
        metrics_url = line.split()[-1]
        assert chat(app_url, "hello").last_event == "done"
        status, body = _get(app_url + "/metrics")
        assert status == 404 and json.loads(body)["error"]["type"] == "not_found"
        _counted_on(metrics_url)
    finally:
        _stop(proc)


def test_gunicorn_serves_the_summed_metrics_from_the_master_on_its_own_port(
    model: Running[Upstream], tmp_path: Path
) -> None:
    """`CHUNKWATCH_METRICS_PORT` under gunicorn (2 workers): the master serves every
    worker's counts there; the app's port has no /metrics."""
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    metrics_port = _free_port()
    env = _env(
        CHUNKWATCH_LLM_URL=model.url,
        CHUNKWATCH_METRICS_PORT=str(metrics_port),
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    cmd = [sys.executable, "-m", "gunicorn", "-c", "python:chunkwatch_lab.wsgi"]
    cmd += ["-w", "2", "-b", "127.0.0.1:0", "--no-control-socket"]
    log = tmp_path / "gunicorn.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 20
        while not (m := re.search(r"Listening at: (http://127\.0\.0\.1:\d+)", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        app_url = m[1]
        deadline = time.monotonic() + 20
        while log.read_text().count("app ready in worker") < 2:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        for _ in range(4):
            assert chat(app_url, "hello").last_event == "done"
        assert _get(app_url + "/metrics")[0] == 404
        text = _counted_on(f"http://127.0.0.1:{metrics_port}/metrics")
        ok = re.search(r'^chunkwatch_requests_total\{.*outcome="ok".*\} (\S+)', text, re.M)
        assert ok is not None and float(ok[1]) == 4.0
    finally:
        _stop(proc)


def test_gunicorn_refuses_a_metrics_port_without_the_multiprocess_directory(
    model: Running[Upstream], tmp_path: Path
) -> None:
    """Without PROMETHEUS_MULTIPROC_DIR the master has no worker metrics to serve: gunicorn
    stops at start with a message that says what to set."""
    env = _env(CHUNKWATCH_LLM_URL=model.url, CHUNKWATCH_METRICS_PORT=str(_free_port()))
    cmd = [sys.executable, "-m", "gunicorn", "-c", "python:chunkwatch_lab.wsgi"]
    done = subprocess.run(
        [*cmd, "-b", "127.0.0.1:0", "--no-control-socket"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert "CHUNKWATCH_METRICS_PORT needs PROMETHEUS_MULTIPROC_DIR" in done.stdout + done.stderr
