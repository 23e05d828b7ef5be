"""A minimal asyncio HTTP/1.1 toolkit for the reference servers (stdlib only).

Server side: :class:`HTTPServer` reads requests with limits (request line and
headers at most 64 KiB, a body by ``Content-Length`` of at most 1 MiB; chunked
request bodies are refused with 411), keeps HTTP/1.1 connections alive (75 s idle
at most), and hands each request to an async handler together with a
:class:`Responder`, which writes a whole response (:meth:`Responder.send`,
:meth:`Responder.send_json`), a streamed one (:meth:`Responder.start` /
:meth:`Responder.write` / :meth:`Responder.end`), or drops the connection
abruptly (:meth:`Responder.abort`).

The message-head helpers (:func:`read_head`, :func:`parse_headers`,
:func:`parse_content_length`, :func:`find_header`) are shared with the client
side, the gateway's way to its upstream: :mod:`chunkwatch_lab._upstream_pool`.

Not a general-purpose server: no TLS termination, no pipelining, no HTTP/2.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus

__all__ = [
    "JSON_HEADERS",
    "MAX_BODY",
    "MAX_HEAD",
    "ClientGone",
    "HTTPError",
    "HTTPServer",
    "Headers",
    "Request",
    "Responder",
    "find_header",
    "parse_content_length",
    "parse_headers",
    "read_head",
]

log = logging.getLogger("chunkwatch.http")

MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024
IDLE_TIMEOUT = 75.0  # seconds a kept-alive connection may wait for its next request (nginx's)
Headers = list[tuple[str, str]]
JSON_HEADERS: Headers = [("Content-Type", "application/json")]
Handler = Callable[["Request", "Responder"], Awaitable[None]]


class HTTPError(Exception):
    """A request the server refuses before the handler sees it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ClientGone(ConnectionError):
    """The peer closed the connection while we were writing to it."""


def find_header(headers: Headers, name: str) -> str | None:
    name = name.lower()
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


@dataclass(slots=True)
class Request:
    method: str
    target: str  # path and query, as sent
    version: str  # "HTTP/1.1" or "HTTP/1.0"
    headers: Headers
    body: bytes = b""

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header(self, name: str) -> str | None:
        return find_header(self.headers, name)

    @property
    def keep_alive(self) -> bool:
        conn = (self.header("connection") or "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


def parse_headers(lines: list[bytes]) -> Headers:
    headers: Headers = []
    for raw in lines:
        if raw[:1] in (b" ", b"\t"):
            raise HTTPError(400, "obsolete line folding in headers is not accepted")
        name, sep, value = raw.partition(b":")
        if not sep or not name or name != name.strip():
            raise HTTPError(400, f"malformed header line: {raw[:80]!r}")
        headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    return headers


async def read_head(reader: asyncio.StreamReader) -> list[bytes] | None:
    """The head's lines, or None when the peer closed cleanly before sending one."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as err:
        if not err.partial.strip():
            return None
        raise HTTPError(400, "connection closed in the middle of the message head") from err
    except asyncio.LimitOverrunError as err:
        raise HTTPError(400, f"request line and headers exceed {MAX_HEAD} bytes") from err
    return head.lstrip(b"\r\n").split(b"\r\n")[:-2]


def parse_content_length(headers: Headers) -> int | None:
    values = {v.strip() for k, v in headers if k.lower() == "content-length"}
    if not values:
        return None
    if len(values) > 1 or not next(iter(values)).isdigit():
        raise HTTPError(400, f"invalid Content-Length: {sorted(values)}")
    return int(values.pop())


async def read_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> Request | None:
    """Read one request; None at a clean end of the connection."""
    lines = await read_head(reader)
    if lines is None:
        return None
    parts = lines[0].decode("latin-1").split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise HTTPError(400, f"malformed request line: {lines[0][:80]!r}")
    req = Request(parts[0], parts[1], parts[2], parse_headers(lines[1:]))
    if req.header("transfer-encoding") is not None:
        raise HTTPError(411, "chunked request bodies are not accepted; send Content-Length")
    length = parse_content_length(req.headers) or 0
    if length > MAX_BODY:
        raise HTTPError(413, f"request body of {length} bytes exceeds the {MAX_BODY} byte limit")
    if length:
        if (req.header("expect") or "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            req.body = await reader.readexactly(length)
        except asyncio.IncompleteReadError as err:
            raise ClientGone("client closed the connection in the middle of the body") from err
    return req


class Responder:
    """Writes the response to one request: whole, streamed, or dropped."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: Request):
        self._reader = reader
        self._writer = writer
        self.keep_alive = req.keep_alive
        self._chunked = req.version == "HTTP/1.1"
        self.started = False
        self.finished = False
        self.aborted = False

    async def send(
        self, status: int, headers: Iterable[tuple[str, str]], body: bytes = b""
    ) -> None:
        """A complete response with ``Content-Length``."""
        await self.start(status, headers, content_length=len(body), body=body)
        self.finished = True

    async def send_json(
        self, status: int, obj: object, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        """A complete ``application/json`` response with ``obj`` as its body."""
        await self.send(status, [*JSON_HEADERS, *headers], json.dumps(obj).encode())

    async def start(
        self,
        status: int,
        headers: Iterable[tuple[str, str]],
        *,
        content_length: int | None = None,
        body: bytes = b"",
    ) -> None:
        """Status line and headers. Without ``content_length`` the body is chunked
        (close-delimited for an HTTP/1.0 client); ``body`` goes out in the same write."""
        lines = [f"HTTP/1.1 {status} {_phrase(status)}"]
        lines += [f"{k}: {v}" for k, v in headers]
        if content_length is not None:
            lines.append(f"Content-Length: {content_length}")
            self._chunked = False
        elif self._chunked:
            lines.append("Transfer-Encoding: chunked")
        else:
            self.keep_alive = False
        if not self.keep_alive:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.started = True
        await self._send(head + self._frame(body) if body else head)

    async def write(self, data: bytes) -> None:
        """One piece of the body (one chunk when chunked). Raises ClientGone."""
        if data:
            await self._send(self._frame(data))

    async def end(self) -> None:
        """The clean end of a streamed body: the chunk terminator."""
        if self._chunked:
            await self._send(b"0\r\n\r\n")
        self.finished = True

    async def abort(self) -> None:
        """Drop the connection: flush what was written, then close the socket at once
        (no chunk terminator; the client sees an incomplete body)."""
        transport = self._writer.transport
        for _ in range(100):
            if transport.is_closing() or transport.get_write_buffer_size() == 0:
                break
            await asyncio.sleep(0.01)
        self.aborted = True
        transport.abort()

    async def hold(self, seconds: float) -> bool:
        """Wait up to ``seconds`` without writing; True if the client closed first."""
        try:
            await asyncio.wait_for(self._until_eof(), seconds)
        except TimeoutError:
            return False
        return True

    async def _until_eof(self) -> None:
        while await self._reader.read(65536):
            pass

    def _frame(self, data: bytes) -> bytes:
        return b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data

    async def _send(self, data: bytes) -> None:
        if self._writer.transport.is_closing():
            raise ClientGone("client closed the connection")
        self._writer.write(data)
        try:
            await self._writer.drain()
        except ConnectionError as err:
            raise ClientGone(str(err)) from err


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class HTTPServer:
    """An asyncio HTTP/1.1 server calling ``handler(request, responder)`` per request."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0) -> None:
        self._handler = handler
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def open_connections(self) -> int:
        """Client connections open right now."""
        return len(self._tasks)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._connection, self.host, self.port, limit=MAX_HEAD, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and cut every open connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while await self._one_request(reader, writer):
                pass
        except (ClientGone, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass  # stop() cut this connection; end the task quietly
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Serve one request; True if the connection can carry another."""
        try:
            async with asyncio.timeout(IDLE_TIMEOUT):
                req = await read_request(reader, writer)
        except HTTPError as err:
            await _refuse(writer, err)
            return False
        except TimeoutError:
            return False
        if req is None:
            return False
        resp = Responder(reader, writer, req)
        try:
            if not await _unless_client_leaves(self._handler(req, resp), reader):
                return False  # the client went away: its handler (and upstream call) is cancelled
        except (ClientGone, ConnectionError):
            return False
        except Exception:
            log.exception("handler failed on %s %s", req.method, req.path)
            if not resp.started:
                await resp.send(500, [("Content-Type", "text/plain")], b"internal server error\n")
            elif not resp.aborted:
                await resp.abort()
            return False
        return resp.finished and resp.keep_alive and not resp.aborted


CLIENT_CHECK = 0.05  # seconds between looks at whether the client closed its connection


async def _unless_client_leaves(handler: Awaitable[None], reader: asyncio.StreamReader) -> bool:
    """Run ``handler``; cancel it as soon as the client closes its connection (EOF or a
    reset), not only when a write to it fails — a stream held or waiting for its upstream
    would otherwise keep its upstream request until the next write. False if cancelled.

    Only ``at_eof()`` / ``exception()`` are looked at: nothing is read, so bytes a client
    sent ahead (a pipelined request) stay for the next request."""
    task = asyncio.ensure_future(handler)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=CLIENT_CHECK)
            if not task.done() and (reader.at_eof() or reader.exception() is not None):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                return False
    except asyncio.CancelledError:
        task.cancel()
        raise
    await task  # its result, or its exception, as before
    return True


async def _refuse(writer: asyncio.StreamWriter, err: HTTPError) -> None:
    body = f"{err.status} {_phrase(err.status)}: {err.message}\n".encode()
    writer.write(
        f"HTTP/1.1 {err.status} {_phrase(err.status)}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    with contextlib.suppress(ConnectionError):
        await writer.drain()
