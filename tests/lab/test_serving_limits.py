"""Slow and oversized requests cannot take the reference service down; its errors are JSON.

Real servers on loopback, driven with raw sockets: ``chunkwatch serve`` and gunicorn
with the shipped config (``-c python:chunkwatch_lab.wsgi``, 2 workers x 8
threads) run as children; the model endpoint (:class:`Upstream`) runs in this
process. Slow clients are slowloris clients: they send part of a request, then
nothing. The budgets are small here (8 threads, 24 pending connections, 2 s to
send a request; 1 s for a body under gunicorn) so that tests exceed them quickly.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from chunkwatch_lab.client import ChatResult, chat
from chunkwatch_lab.threaded import Running, start_in_thread
from chunkwatch_lab.upstream import Upstream

from .processes import child, clean_env

THREADS, PENDING, READ_TIMEOUT = 8, 24, 2.0
BODY_TIMEOUT = 1.0  # gunicorn: CHUNKWATCH_BODY_TIMEOUT
STREAM_TOKENS, TOKEN_DELAY = 25, 0.12  # a 3 s answer: longer than the read timeout


@pytest.fixture(scope="module")
def upstream() -> Iterator[Running[Upstream]]:
    running = start_in_thread(Upstream(tokens=STREAM_TOKENS, token_delay=TOKEN_DELAY))
    yield running
    running.stop()


def wait_for_text(log: Path, pattern: str, proc: subprocess.Popen[bytes], count: int = 1) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = re.findall(pattern, log.read_text(errors="replace"))
        if len(found) >= count:
            return str(found[0])
        if proc.poll() is not None:
            raise AssertionError(f"exited before {pattern!r}:\n{log.read_text()}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {pattern!r}:\n{log.read_text()}")


@pytest.fixture(scope="module")
def serve(
    upstream: Running[Upstream], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """``chunkwatch serve`` with small budgets: (port, process)."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [
        sys.executable, "-m", "chunkwatch", "serve", "--llm-url", upstream.url, "--port", "0",
        "--no-guard", "--threads", str(THREADS), "--max-pending", str(PENDING),
        "--read-timeout", str(READ_TIMEOUT),
    ]  # fmt: skip
    with child(cmd, clean_env(), log) as proc:
        url = wait_for_text(log, r"listening on (http://\S+)", proc)
        yield int(url.rsplit(":", 1)[1]), proc


@pytest.fixture(scope="module")
def gunicorn(upstream: Running[Upstream], tmp_path_factory: pytest.TempPathFactory) -> int:
    """gunicorn with the shipped config, 2 workers x 8 threads: its port."""
    log = tmp_path_factory.mktemp("gunicorn") / "gunicorn.log"
    cmd = [
        sys.executable, "-m", "gunicorn", "-c", "python:chunkwatch_lab.wsgi",
        "-w", "2", "--threads", "8", "-b", "127.0.0.1:0", "--no-control-socket",
        "--graceful-timeout", "1", "--error-logfile", "-", "--log-level", "info",
    ]  # fmt: skip
    env = clean_env(
        CHUNKWATCH_LLM_URL=upstream.url,
        CHUNKWATCH_GUARD="0",
        CHUNKWATCH_BODY_TIMEOUT=str(BODY_TIMEOUT),
    )
    with child(cmd, env, log) as proc:
        url = wait_for_text(log, r"Listening at: (http://127\.0\.0\.1:\d+)", proc)
        wait_for_text(log, r"app ready in worker \d+", proc, count=2)
        yield int(url.rsplit(":", 1)[1])


# -- raw HTTP ------------------------------------------------------------------------------------


def slow_client(port: int, sent: bytes) -> socket.socket:
    """A connection that has sent ``sent`` and will send nothing more."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(sent)
    return sock


def read_response(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of the response on ``sock``, within ``timeout`` seconds."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            raise ConnectionError(f"closed after {data!r}")
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "-1"))
    while len(body) < length or length < 0:
        part = sock.recv(65536)
        if not part:
            break
        body += part
    return int(lines[0].split()[1]), headers, body


def request(port: int, raw: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        return read_response(sock, timeout)


def healthz(port: int, timeout: float = 10.0) -> tuple[int, float]:
    """(status, seconds) of ``GET /healthz``."""
    start = time.monotonic()
    status, _, _ = request(port, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n", timeout)
    return status, time.monotonic() - start


def json_error(headers: dict[str, str], body: bytes) -> dict[str, str]:
    assert headers.get("content-type") == "application/json", (headers, body)
    error: dict[str, str] = json.loads(body)["error"]
    assert error["type"] and error["message"], body
    return error


def thread_count(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Threads:\s+(\d+)", status, re.M)[1])  # type: ignore[index]


SLOW_HEAD = b"POST /chat HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"


def slow_body(n: int = 100) -> bytes:
    return SLOW_HEAD + f"Content-Length: {n}\r\n\r\n".encode() + b'{"message": "'


# -- chunkwatch serve --------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="counts threads in /proc")
def test_serve_answers_healthz_under_more_slow_clients_than_its_budget_without_a_thread_each(
    serve: tuple[int, subprocess.Popen[bytes]],
) -> None:
    """60 connections that send half a request head or half a body (more than the 8
    request threads and the 24 pending connections) start no thread each, and do not
    keep ``/healthz`` waiting: it answers in well under a second. The slow ones are
    answered JSON 408 (the oldest, to make room, or at the 2 s read timeout). Werkzeug's
    threaded server started one thread per connection."""
    port, proc = serve
    before = thread_count(proc.pid)
    with ExitStack() as stack:
        slow = [
            stack.enter_context(slow_client(port, SLOW_HEAD if i % 2 else slow_body()))
            for i in range(60)
        ]
        time.sleep(0.3)
        during = thread_count(proc.pid)
        took = [healthz(port) for _ in range(5)]
        answers = []
        for sock in slow:
            status, headers, body = read_response(sock, READ_TIMEOUT + 2)
            answers.append((status, json_error(headers, body)["type"]))
    print(f"serve: threads {before} -> {during} with 60 slow clients; healthz {took}")
    assert during <= before + 1, f"{during - before} threads for 60 slow clients"
    assert all(status == 200 and t < 1.0 for status, t in took), took
    assert set(answers) == {(408, "request_timeout")}


def test_serve_answers_a_slow_body_with_json_408_at_its_read_timeout(
    serve: tuple[int, subprocess.Popen[bytes]],
) -> None:
    """A request whose body stops halfway is answered JSON 408 at ``--read-timeout``
    (2 s here), naming the limit; it is not left waiting for ever."""
    port, _ = serve
    start = time.monotonic()
    with slow_client(port, slow_body()) as sock:
        status, headers, body = read_response(sock, READ_TIMEOUT + 3)
    took = time.monotonic() - start
    error = json_error(headers, body)
    assert (status, error["type"]) == (408, "request_timeout")
    assert "2 s" in error["message"] and READ_TIMEOUT - 0.2 < took < READ_TIMEOUT + 1.5


def test_serve_answers_a_chunked_body_that_stalls_with_json_408(
    serve: tuple[int, subprocess.Popen[bytes]],
) -> None:
    """A chunked body (its length unknown, so read in a request thread) that stalls is
    cut at the read timeout with a JSON 408, and frees its thread."""
    port, _ = serve
    head = SLOW_HEAD + b'Transfer-Encoding: chunked\r\n\r\n4\r\n{"me\r\n'
    start = time.monotonic()
    with slow_client(port, head) as sock:
        status, headers, body = read_response(sock, READ_TIMEOUT + 3)
    assert (status, json_error(headers, body)["type"]) == (408, "request_timeout")
    assert time.monotonic() - start < READ_TIMEOUT + 1.5


@pytest.mark.parametrize(
    ("raw", "status", "kind"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414, "uri_too_long"),
        (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"b" * 40000 + b"\r\n\r\n", 431,
         "header_fields_too_large"),
        (b"GET /healthz HTTP/1.1\r\n" + b"X-F: 1\r\n" * 101 + b"\r\n", 431,
         "header_fields_too_large"),
        (SLOW_HEAD + b"Content-Length: 70000\r\n\r\n", 413, "payload_too_large"),
        (SLOW_HEAD + b"Content-Length: 12, 13\r\n\r\n", 400, "bad_request"),
        (b"GET /healthz HTTP/9.9\r\n\r\n", 505, "http_version_not_supported"),
        (b"NONSENSE\r\n\r\n", 400, "bad_request"),
    ],
    ids=["414-line", "431-bytes", "431-fields", "413-body", "400-length", "505", "400-line"],
)  # fmt: skip
def test_serve_answers_every_error_of_its_own_in_json(
    serve: tuple[int, subprocess.Popen[bytes]], raw: bytes, status: int, kind: str
) -> None:
    """414, 431, 413, 400 and 505 from the server itself (before the app) are JSON
    ``{"error": {"type", "message"}}``, not http.server's HTML page."""
    port, _ = serve
    got, headers, body = request(port, raw)
    assert (got, json_error(headers, body)["type"]) == (status, kind)
    assert headers.get("connection") == "close"


def test_serve_answers_json_503_when_every_request_thread_is_busy(
    serve: tuple[int, subprocess.Popen[bytes]],
) -> None:
    """With all 8 request threads holding a 3 s stream, a 9th request gets a fast JSON
    503 with ``Retry-After``; once the streams end, ``/healthz`` answers again."""
    port, _ = serve
    url = f"http://127.0.0.1:{port}"
    results: list[ChatResult] = []
    chats = [
        threading.Thread(target=lambda: results.append(chat(url, "hold a thread", timeout=20)))
        for _ in range(THREADS)
    ]
    for t in chats:
        t.start()
    time.sleep(1.0)  # every stream has started (the answer takes 3 s)
    start = time.monotonic()
    status, headers, body = request(port, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    took = time.monotonic() - start
    for t in chats:
        t.join(20)
    assert (status, json_error(headers, body)["type"]) == (503, "overloaded")
    assert headers.get("retry-after") == "1" and took < 0.5
    assert [r.last_event for r in results] == ["done"] * THREADS
    assert healthz(port)[0] == 200


def test_serve_does_not_cut_a_stream_longer_than_its_read_timeout(
    serve: tuple[int, subprocess.Popen[bytes]],
) -> None:
    """An SSE answer of 3 s (a slow model) outlasts the 2 s read timeout and arrives
    whole: the timeout is for reading the request, not for the answer."""
    port, _ = serve
    result = chat(f"http://127.0.0.1:{port}", "take your time", timeout=20)
    tokens = [e for e in result.events if e.event == "token"]
    assert result.status == 200 and result.complete and result.last_event == "done", result
    assert len(tokens) == STREAM_TOKENS and result.elapsed > READ_TIMEOUT + 0.5


# -- gunicorn ----------------------------------------------------------------------------------


def test_gunicorn_answers_slow_bodies_with_json_408_and_healthz_again_after_the_deadline(
    gunicorn: int,
) -> None:
    """32 slow bodies (twice the 2 x 8 threads of the shipped config) each get a JSON
    408 after ``CHUNKWATCH_BODY_TIMEOUT`` (1 s here), and ``/healthz``, queued behind
    them, answers within a few deadlines. Each slow body holds a gunicorn thread until
    its deadline — the documented limit, which a buffering proxy removes; before the
    deadline existed, the threads were held for ever and ``/healthz`` never answered."""
    port = gunicorn
    with ExitStack() as stack:
        slow = [stack.enter_context(slow_client(port, slow_body())) for _ in range(32)]
        time.sleep(0.2)
        status, took = healthz(port, timeout=10)
        answers = []
        for sock in slow:
            got, headers, body = read_response(sock, 10)
            answers.append((got, json_error(headers, body)["type"]))
    print(f"gunicorn: healthz {took:.2f} s behind 32 slow bodies")
    assert status == 200 and took < 4 * BODY_TIMEOUT + 1.5, took
    assert set(answers) == {(408, "request_timeout")}


def test_gunicorn_refuses_a_body_over_the_limit_unread_and_frees_the_connection(
    gunicorn: int,
) -> None:
    """A body announced over 64 KiB gets a JSON 413 before a byte of it is sent, and the
    connection ends at once: gunicorn does not hold the thread draining (for up to 5 s)
    a body that will never come."""
    with slow_client(gunicorn, SLOW_HEAD + b"Content-Length: 70000\r\n\r\n") as sock:
        status, headers, body = read_response(sock, 5)
        start = time.monotonic()
        sock.settimeout(10)
        rest = sock.recv(1024)
        closed_after = time.monotonic() - start
    assert (status, json_error(headers, body)["type"]) == (413, "payload_too_large")
    assert rest == b"" and closed_after < 1.0, closed_after


# -- the nginx example of docs/deployment.md ---------------------------------------------------

DOCS = Path(__file__).parents[2] / "docs" / "deployment.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def nginx(gunicorn: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """nginx with the docs' configuration, in front of gunicorn: its port."""
    binary = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    assert binary is not None, "nginx is not installed (scripts/bootstrap --test installs it)"
    tmp = tmp_path_factory.mktemp("nginx")
    block = re.search(r"```nginx\n(.*?)```", DOCS.read_text(), re.S)
    assert block, "docs/deployment.md has no nginx block"
    port = free_port()
    site = block[1].replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{gunicorn};")
    site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
    (tmp / "site.conf").write_text(site)
    (tmp / "nginx.conf").write_text(
        f"daemon off; pid {tmp}/nginx.pid; error_log {tmp}/error.log info;\n"
        "worker_processes 1; events { worker_connections 1024; }\n"
        f"http {{ access_log {tmp}/access.log; client_body_temp_path {tmp}/body;\n"
        f"proxy_temp_path {tmp}/proxy; include {tmp}/site.conf; }}\n"
    )
    cmd = [binary, "-c", str(tmp / "nginx.conf"), "-p", str(tmp), "-e", str(tmp / "error.log")]
    with child(cmd, clean_env(), tmp / "nginx.log") as proc:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (
                    tmp / "nginx.log"
                ).read_text() + (tmp / "error.log").read_text()
                time.sleep(0.05)
        yield port


def test_the_docs_nginx_example_holds_slow_clients_and_streams_unbuffered(nginx: int) -> None:
    """The nginx block of docs/deployment.md in front of gunicorn (2 x 8 threads): 40
    slow clients are held by nginx, not gunicorn threads, so ``/healthz`` answers at
    once; a 3 s answer streams through token by token (not buffered to the end)."""
    with ExitStack() as stack:
        for i in range(40):
            stack.enter_context(slow_client(nginx, slow_body() if i % 2 else SLOW_HEAD))
        time.sleep(0.3)
        status, took = healthz(nginx)
        result = chat(f"http://127.0.0.1:{nginx}", "through the proxy", timeout=20)
    assert status == 200 and took < 0.5, took
    assert result.status == 200 and result.last_event == "done", result
    first = result.first_content_after
    assert first is not None and first < 1.0 and result.elapsed > READ_TIMEOUT, result


@pytest.mark.parametrize(
    ("raw", "status", "kind"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414, "uri_too_long"),
        (b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 400,
         "bad_request"),
        (SLOW_HEAD + b"Content-Length: 70000\r\n\r\n", 413, "payload_too_large"),
        (b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n", 404, "not_found"),
    ],
    ids=["414", "400-header", "413", "metrics-404"],
)  # fmt: skip
def test_the_docs_nginx_example_answers_its_own_errors_in_json(
    nginx: int, raw: bytes, status: int, kind: str
) -> None:
    """The proxy's own errors keep their status and have the service's JSON shape."""
    got, headers, body = request(nginx, raw)
    assert (got, json_error(headers, body)["type"]) == (status, kind)
