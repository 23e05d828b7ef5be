"""A bounded Werkzeug server for ``chunkwatch serve``: requests are read without a thread.

Werkzeug's threaded server starts a thread per connection, with no cap and no
read timeout: a client that sends its headers a byte at a time holds a thread
for ever, and a few hundred of them exhaust the process. Here, as in nginx:

* one **reader** thread reads every connection's request (line, headers and — when
  its length is known — the body) with a selector, without a thread per
  connection, within ``read_timeout`` (else JSON 408) and within the size limits
  (else JSON 414 / 431 / 400). At most ``max_pending`` connections are read at
  once; past that, the one that has been sending longest is answered 408 and
  closed, so a flood of slow clients cannot lock out quick ones (``/healthz``);
* a complete request goes to a thread of its own, at most ``threads`` at once
  (an SSE stream holds its thread while it lasts; nothing times it out, the read
  timeout is over by then); past that, JSON 503 with ``Retry-After: 1``;
* every error the server sends itself is JSON (:mod:`chunkwatch_lab._limits`),
  and a refused request is drained for ``linger`` seconds before the close, so the
  client reads the answer rather than a connection reset.

Threads: the accept loop, the reader, and at most ``threads`` request threads.
"""

from __future__ import annotations

import io
import logging
import selectors
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler

from chunkwatch_lab._limits import (
    BodyDeadline,
    Complete,
    Incomplete,
    Limits,
    WSGIApp,
    error_body,
    error_response,
    scan_request,
    shut_reading,
)

__all__ = ["BoundedServer", "JSONRequestHandler"]

log = logging.getLogger("chunkwatch.serve")


class JSONRequestHandler(WSGIRequestHandler):
    """Werkzeug's handler for a request the reader has already (partly) read; JSON errors."""

    def __init__(self, request: Any, client_address: Any, server: Any, prefix: bytes = b"") -> None:
        self._prefix = prefix
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        super().setup()
        self.rfile = io.BufferedReader(_Prefixed(self._prefix, self.connection))

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's error page, as JSON (a malformed request line, a bad version…)."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # not parsed (yet): still send a status line
            self.request_version = "HTTP/1.0"
        short, long = self.responses.get(code, ("error", ""))
        body = error_body(code, message or long or short)
        self.send_response(code, short)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body)


class _Prefixed(io.RawIOBase):
    """The bytes the reader already received, then the socket."""

    def __init__(self, prefix: bytes, sock: socket.socket) -> None:
        self._prefix = memoryview(prefix)
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._prefix:
            n = min(len(b), len(self._prefix))
            b[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        return self._sock.recv_into(b)


class _ShutAfter:
    """The app's response; once it is all written, the socket is shut for reading.

    Werkzeug closes every connection after one response, and first drains what the
    client still sends with a blocking ``read``: shut for reading, that drain ends at
    once instead of holding the thread for a client that keeps its connection open.
    """

    def __init__(self, result: Iterable[bytes], sock: Any) -> None:
        self._result = result
        self._sock = sock

    def __iter__(self) -> Iterator[bytes]:
        yield from iter(self._result)
        shut_reading(self._sock)

    def close(self) -> None:
        shut_reading(self._sock)
        close = getattr(self._result, "close", None)
        if close is not None:
            close()


class QuietHandler(JSONRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


class BoundedServer(BaseWSGIServer):
    """Werkzeug's server with the reader and the thread cap above (see the module doc)."""

    multithread = True

    def __init__(
        self,
        host: str,
        port: int,
        app: WSGIApp,
        limits: Limits | None = None,
        handler: type[JSONRequestHandler] = JSONRequestHandler,
    ) -> None:
        self.limits = limits or Limits()
        bounded = BodyDeadline(app, self.limits.read_timeout, self.limits.max_body)

        def wrapped(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            return _ShutAfter(bounded(environ, start_response), environ.get("werkzeug.socket"))

        super().__init__(host, port, wrapped, handler=handler)
        self._busy = 0
        self._lock = threading.Lock()
        self._reader = _Reader(self)

    # socketserver calls this in the accept loop: never block here.
    def process_request(self, request: Any, client_address: Any) -> None:
        self._reader.add(request, client_address)

    def busy(self) -> int:
        with self._lock:
            return self._busy

    def _dispatch(self, sock: socket.socket, addr: Any, prefix: bytes) -> bool:
        """Start a thread for a complete request; False when ``threads`` are all busy."""
        with self._lock:
            if self._busy >= self.limits.threads:
                return False
            self._busy += 1
        sock.settimeout(self.limits.send_timeout)  # a client that stops reading its stream
        threading.Thread(
            target=self._serve, args=(sock, addr, prefix), name="chunkwatch-request", daemon=True
        ).start()
        return True

    def _serve(self, sock: socket.socket, addr: Any, prefix: bytes) -> None:
        try:
            self.RequestHandlerClass(sock, addr, self, prefix=prefix)  # type: ignore[call-arg,arg-type]
        except Exception:
            self.handle_error(sock, addr)
        finally:
            self.shutdown_request(sock)
            with self._lock:
                self._busy -= 1

    def server_close(self) -> None:
        super().server_close()
        self._reader.close()


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    addr: Any
    deadline: float
    buf: bytearray = field(default_factory=bytearray)
    started: bool = False
    lingering: bool = False
    need: int = 0  # the whole request's length, once its head is in


class _Reader:
    """One thread, one selector: reads requests until complete, refused, or late."""

    def __init__(self, server: BoundedServer) -> None:
        self.server = server
        self.limits = server.limits
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._incoming: list[tuple[socket.socket, Any]] = []
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, _Conn] = {}  # insertion order: oldest first
        self._closed = False
        self._line_or_head = min(self.limits.max_request_line, self.limits.max_header_bytes)
        self._warned = 0.0
        self._thread = threading.Thread(target=self._run, name="chunkwatch-reader", daemon=True)
        self._thread.start()

    def add(self, sock: socket.socket, addr: Any) -> None:
        with self._lock:
            if self._closed:
                sock.close()
                return
            self._incoming.append((sock, addr))
        self._wake()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._wake()
        self._thread.join(5)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # the pipe is full: the reader is awake anyway

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closed:
                        break
                    incoming, self._incoming = self._incoming, []
                for sock, addr in incoming:
                    self._accept(sock, addr)
                now = time.monotonic()
                nearest = min((c.deadline for c in self._conns.values()), default=now + 1)
                for key, _ in self._sel.select(max(0.0, min(nearest - now, 1.0))):
                    if key.fileobj is self._wake_r:
                        self._drain_wake()
                    else:
                        self._readable(self._conns[key.fileobj])  # type: ignore[index]
                self._expire(time.monotonic())
        finally:
            for conn in list(self._conns.values()):
                self._drop(conn)
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _accept(self, sock: socket.socket, addr: Any) -> None:
        lingering = [c for c in self._conns.values() if c.lingering]
        if len(lingering) >= self.limits.max_pending:
            self._drop(lingering[0])
        reading = [c for c in self._conns.values() if not c.lingering]
        if len(reading) >= self.limits.max_pending:
            oldest = reading[0]
            if time.monotonic() - self._warned > 10:  # once in 10 s under a flood
                self._warned = time.monotonic()
                log.warning(
                    "%d connections are still sending their request (--max-pending): "
                    "closing the oldest, from %s, with a 408",
                    len(reading),
                    oldest.addr,
                )
            self._refuse(oldest, 408, "the request was not complete in time: too many "
                         "connections were sending theirs at once")  # fmt: skip
        sock.setblocking(False)
        conn = _Conn(sock, addr, time.monotonic() + self.limits.read_timeout)
        self._conns[sock] = conn
        self._sel.register(sock, selectors.EVENT_READ)

    def _readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the client is gone (or, lingering, has sent all it had)
            self._drop(conn)
            return
        if conn.lingering:
            return
        conn.buf += data
        # Scan again only when it can change the verdict: a client sending a byte at a
        # time must not cost a scan of everything it sent per byte.
        if conn.need:
            if len(conn.buf) < conn.need:
                return
        elif b"\n" not in data and len(conn.buf) <= self._line_or_head and conn.started:
            return
        verdict = scan_request(bytes(conn.buf), self.limits)
        if isinstance(verdict, Incomplete):
            conn.started, conn.need = verdict.started, verdict.need
            return
        if not isinstance(verdict, Complete):
            self._refuse(conn, verdict.status, verdict.message)
            return
        self._sel.unregister(conn.sock)
        del self._conns[conn.sock]
        if not self.server._dispatch(conn.sock, conn.addr, bytes(conn.buf)):
            self._conns[conn.sock] = conn
            conn.sock.setblocking(False)
            self._sel.register(conn.sock, selectors.EVENT_READ)
            message = f"all {self.limits.threads} request threads are busy: retry shortly"
            self._refuse(conn, 503, message, [("Retry-After", "1")])

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            if conn.lingering or not conn.started:
                self._drop(conn)  # drained enough, or an idle connection: close quietly
            else:
                message = (
                    f"the request was not complete within {self.limits.read_timeout:g} s "
                    f"({len(conn.buf)} bytes received)"
                )
                self._refuse(conn, 408, message)

    def _refuse(
        self, conn: _Conn, status: int, message: str, headers: list[tuple[str, str]] | None = None
    ) -> None:
        """Send the JSON error, then drain what the client still sends, then close."""
        try:
            conn.sock.send(error_response(status, message, headers or []))
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(conn)
            return
        conn.lingering = True
        conn.buf = bytearray()
        conn.deadline = time.monotonic() + self.limits.linger
        self._conns[conn.sock] = self._conns.pop(conn.sock)  # now the newest

    def _drop(self, conn: _Conn) -> None:
        if self._conns.pop(conn.sock, None) is not None:
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        try:
            conn.sock.close()
        except OSError:
            pass
