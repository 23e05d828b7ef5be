"""The gateway's way to its upstream: a small asyncio HTTP/1.1 client (stdlib only).

:class:`UpstreamPool` keeps keep-alive connections to one upstream URL (at most
64 idle) and forwards a request to it (:meth:`UpstreamPool.forward`): the path
and query go under the URL's path prefix, hop-by-hop headers are dropped,
``Host`` is rewritten, and a reused connection that the upstream closed while it
was idle is retried once on a fresh one. The answer is an :class:`Exchange`: the
response head at once, then the body as bytes arrive, whatever its framing
(:func:`iter_body`), then :meth:`Exchange.release` gives the connection back to
the pool if the body was read to its end, and closes it otherwise.

:func:`read_response_head` and :func:`iter_body` also work on their own, on any
``asyncio.StreamReader``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from chunkwatch.sse import Event, SSEParser
from chunkwatch_lab._http import (
    Headers,
    HTTPError,
    Request,
    find_header,
    parse_content_length,
    parse_headers,
    read_head,
)

__all__ = [
    "Exchange",
    "ResponseHead",
    "UpstreamPool",
    "forward_headers",
    "iter_body",
    "read_response_head",
]

MAX_IDLE = 64  # idle connections kept per upstream
CONNECT_TIMEOUT = 10.0

_HOP_BY_HOP = frozenset(
    "connection keep-alive proxy-authenticate proxy-authorization proxy-connection te trailer "
    "transfer-encoding upgrade content-length host".split()
)


def forward_headers(headers: Sequence[tuple[str, str]]) -> Headers:
    """Headers minus hop-by-hop ones (and those named in ``Connection``)."""
    named = {
        token.strip().lower()
        for key, value in headers
        if key.lower() == "connection"
        for token in value.split(",")
    }
    return [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP and k.lower() not in named]


# -- reading a response ----------------------------------------------------------------------


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: str
    headers: Headers
    framing: str  # "chunked", "length", "close" or "none"
    length: int = 0

    def header(self, name: str) -> str | None:
        return find_header(self.headers, name)

    @property
    def keep_alive(self) -> bool:
        return "close" not in (self.header("connection") or "").lower() and self.framing != "close"


async def read_response_head(reader: asyncio.StreamReader, method: str = "GET") -> ResponseHead:
    """Read a status line and headers (skipping 1xx); raises ConnectionError on EOF."""
    while True:
        lines = await read_head(reader)
        if lines is None:
            raise ConnectionError("upstream closed the connection without a response")
        version, _, rest = lines[0].decode("latin-1").partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise HTTPError(502, f"malformed status line from upstream: {lines[0][:80]!r}")
        if not 100 <= int(code) < 200:
            break
    head = ResponseHead(int(code), reason, parse_headers(lines[1:]), "close")
    te = (head.header("transfer-encoding") or "").lower()
    length = parse_content_length(head.headers)
    if method == "HEAD" or head.status in (204, 304):
        head.framing = "none"
    elif "chunked" in te:
        head.framing = "chunked"
    elif length is not None:
        head.framing, head.length = "length", length
    return head


async def iter_body(reader: asyncio.StreamReader, head: ResponseHead) -> AsyncIterator[bytes]:
    """Body bytes as they arrive (chunked framing removed). A body cut short raises
    ConnectionError; a clean end just stops."""
    if head.framing == "chunked":
        while size := await _chunk_size(reader):
            async for piece in _exactly(reader, size):
                yield piece
            await _crlf(reader)
        await _crlf(reader)  # the terminator's empty trailer section
    elif head.framing == "length":
        async for piece in _exactly(reader, head.length):
            yield piece
    elif head.framing == "close":
        while piece := await reader.read(65536):
            yield piece


async def _chunk_size(reader: asyncio.StreamReader) -> int:
    line = await reader.readline()
    if not line.endswith(b"\n"):
        raise ConnectionError("upstream dropped the connection inside a chunked body")
    try:
        return int(line.split(b";")[0].strip(), 16)
    except ValueError as err:
        raise ConnectionError(f"upstream sent a malformed chunk size line: {line[:40]!r}") from err


async def _crlf(reader: asyncio.StreamReader) -> None:
    if await reader.readline() != b"\r\n":
        raise ConnectionError("upstream sent a malformed or incomplete chunked body")


async def _exactly(reader: asyncio.StreamReader, size: int) -> AsyncIterator[bytes]:
    while size > 0:
        piece = await reader.read(min(size, 65536))
        if not piece:
            raise ConnectionError(f"upstream dropped the connection with {size} body bytes missing")
        size -= len(piece)
        yield piece


# -- the pool and its exchanges --------------------------------------------------------------


@dataclass(slots=True)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


class Exchange:
    """One request forwarded upstream: the response head, then its body, once."""

    def __init__(self, pool: UpstreamPool, conn: _Conn, head: ResponseHead) -> None:
        self._pool, self._conn, self.head = pool, conn, head
        self._complete = False

    @property
    def is_sse(self) -> bool:
        ctype = (self.head.header("content-type") or "").lower()
        return self.head.status == 200 and ctype.startswith("text/event-stream")

    @property
    def headers(self) -> Headers:
        """The response headers to pass on (hop-by-hop ones dropped)."""
        return forward_headers(self.head.headers)

    async def body(self) -> AsyncGenerator[bytes, None]:
        async for piece in iter_body(self._conn.reader, self.head):
            yield piece
        self._complete = True

    async def read_all(self) -> bytes:
        return b"".join([piece async for piece in self.body()])

    async def events(self) -> AsyncGenerator[Event, None]:
        """The body as SSE events (``chunkwatch.sse`` parser, collecting mode)."""
        parser = SSEParser(collect=True)
        async for piece in self.body():
            for event in parser.feed(piece):
                yield event
        for event in parser.close():
            yield event

    def release(self) -> None:
        """Reuse the connection if the body was read to its end, else close it."""
        if self._complete and self.head.keep_alive:
            self._pool.put(self._conn)
        else:
            self._conn.writer.transport.abort()


class UpstreamPool:
    """Keep-alive connections to one upstream (``http://`` or ``https://`` URL).

    Owned by one event loop. ``opened`` counts the TCP connections opened so far,
    ``requests`` the requests answered (a response head arrived).
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream must be an http:// or https:// URL, not {url!r}")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.netloc = parts.netloc
        self.prefix = parts.path.rstrip("/")
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._idle: list[_Conn] = []
        self.opened = 0
        self.requests = 0

    async def forward(self, req: Request) -> Exchange:
        """Send ``req`` upstream and read the response head (retrying once on a fresh
        connection if a reused one turns out closed). Raises OSError / HTTPError."""
        for attempt in (1, 2):
            conn, reused = await self._get()
            try:
                conn.writer.write(self._request_head(req) + req.body)
                head = await read_response_head(conn.reader, req.method)
            except (ConnectionError, OSError, asyncio.IncompleteReadError):
                conn.writer.transport.abort()
                if reused and attempt == 1:
                    continue  # the upstream closed an idle connection: retry on a new one
                raise
            self.requests += 1
            return Exchange(self, conn, head)
        raise AssertionError("unreachable")

    def _request_head(self, req: Request) -> bytes:
        lines = [f"{req.method} {self.prefix}{req.target} HTTP/1.1", f"Host: {self.netloc}"]
        lines += [f"{k}: {v}" for k, v in forward_headers(req.headers)]
        if req.body or req.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(req.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _get(self) -> tuple[_Conn, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.reader.at_eof() and not conn.writer.transport.is_closing():
                return conn, True
            conn.writer.transport.abort()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self._ssl, limit=2**16),
            CONNECT_TIMEOUT,
        )
        self.opened += 1
        return _Conn(reader, writer), False

    def put(self, conn: _Conn) -> None:
        if len(self._idle) < MAX_IDLE:
            self._idle.append(conn)
        else:
            conn.writer.transport.abort()

    def close(self) -> None:
        for conn in self._idle:
            conn.writer.transport.abort()
        self._idle.clear()
