"""``chunkwatch gateway``: a reverse proxy that injects the faults real gateways commit.

Usage::

    chunkwatch gateway --upstream http://127.0.0.1:8400 --port 8401 --fault pass
    curl -X PUT localhost:8401/_chaos -d '{"fault": "truncate", "events": 3}'
    curl localhost:8401/_chaos/stats

    # in-process (tests, ``chunkwatch demo``):
    gw = start_in_thread(Gateway(upstream.url))
    gw.server.set_fault("zero")

Every request is forwarded to the upstream (path and query kept; hop-by-hop headers
dropped; header values are never logged). A healthy gateway forwards a streamed
body chunk by chunk as it arrives, without buffering.

Faults apply only to requests whose JSON body has ``"stream": true``; everything
else passes through healthy, as in real incidents where only streaming breaks.
Modes that transform the stream (``json``, ``buffer*``, ``truncate*``,
``trickle``, ``malformed``, ``no-blank-lines``, ``error-event``,
``gzip-stripped``, ``reject-stream-options`` when it passes) call the upstream
and apply only to a ``200 text/event-stream`` answer (an upstream error passes
through unchanged); the others answer without calling the upstream. The modes
and their parameters are listed in :data:`FAULT_MODES` / :data:`FAULT_PARAMS`
and in ``docs/gateway.md``.

Chaos API (never forwarded):

* ``GET /_chaos`` -> ``{"fault": MODE, ...params}`` (defaults filled in).
* ``PUT /_chaos`` with ``{"fault": MODE, ...params}`` sets it; an unknown mode or
  a bad parameter is a 400 whose JSON lists the valid modes, and the previous
  setting stays.
* ``GET /_chaos/stats`` -> ``{"requests": {MODE: n}, "stream_requests": n,
  "non_stream_requests": n, "upstream_connections": n, "upstream_requests": n,
  "open_connections": n}`` (``open_connections``: client connections open now);
  ``requests`` counts each proxied request under the mode it received (a
  non-stream request is always ``pass``). ``DELETE /_chaos/stats`` resets them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import ssl
import sys
import threading
import time
import zlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from chunkwatch.reference._http import (
    ClientGone,
    HTTPError,
    HTTPServer,
    Request,
    Responder,
    ResponseHead,
    iter_body,
    read_response_head,
)
from chunkwatch.reference.threaded import run_until_signal
from chunkwatch.sse import Event, SSEParser, format_comment, format_event

__all__ = [
    "FAULT_MODES",
    "FAULT_PARAMS",
    "FaultSetting",
    "Gateway",
    "add_gateway_parser",
    "main",
    "run_gateway",
]

log = logging.getLogger("chunkwatch.gateway")

# fmt: off
FAULT_MODES: tuple[str, ...] = (
    "pass", "zero", "zero-abrupt", "done-only", "json", "html", "buffer", "buffer-late",
    "truncate", "truncate-abrupt", "stall", "stall-headers", "keepalive-only", "trickle",
    "status", "reject-stream-options", "malformed", "no-blank-lines", "error-event",
    "gzip-stripped",
)
# fmt: on

# mode -> {param: default}; the type of the default is the type of the parameter.
FAULT_PARAMS: Mapping[str, Mapping[str, int | float]] = {
    "truncate": {"events": 3},
    "truncate-abrupt": {"events": 3},
    "error-event": {"events": 3},
    "stall": {"limit": 60.0},
    "stall-headers": {"limit": 60.0},
    "keepalive-only": {"interval": 1.0, "limit": 60.0},
    "trickle": {"bytes": 7, "delay": 0.2},
    "status": {"status": 502},
}
_MINIMUM = {"events": 0, "limit": 0.001, "interval": 0.001, "bytes": 1, "delay": 0.0, "status": 400}
_MAXIMUM = {"status": 599}

_HOP_BY_HOP = frozenset(
    "connection keep-alive proxy-authenticate proxy-authorization proxy-connection te trailer "
    "transfer-encoding upgrade content-length host".split()
)
_SSE_HEADERS = [("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache")]
_JSON = [("Content-Type", "application/json")]
_HTML = [("Content-Type", "text/html; charset=utf-8")]


# -- the fault setting ---------------------------------------------------------------------


@dataclass(frozen=True)
class FaultSetting:
    """A fault mode and its parameters (all of them, defaults filled in)."""

    mode: str = "pass"
    params: Mapping[str, int | float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"fault": self.mode, **self.params}

    @classmethod
    def parse(cls, mode: object, params: Mapping[str, object]) -> FaultSetting:
        """Validate ``mode`` and ``params``; ValueError says what is wrong and what is valid."""
        if mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {mode!r}; valid modes: {', '.join(FAULT_MODES)}")
        assert isinstance(mode, str)
        spec = FAULT_PARAMS.get(mode, {})
        unknown = sorted(set(params) - set(spec))
        if unknown:
            allowed = ", ".join(spec) or "none"
            raise ValueError(
                f"fault {mode!r} takes no parameter {unknown}; its parameters: {allowed}"
            )
        values = {
            name: _param(name, params.get(name, default), default) for name, default in spec.items()
        }
        return cls(mode, values)


def _param(name: str, value: object, default: int | float) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"parameter {name!r} must be a number, not {value!r}")
    if isinstance(default, int) and not float(value).is_integer():
        raise ValueError(f"parameter {name!r} must be an integer, not {value!r}")
    number: int | float = int(value) if isinstance(default, int) else float(value)
    low, high = _MINIMUM.get(name, 0), _MAXIMUM.get(name)
    if number < low or (high is not None and number > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"parameter {name!r} must be {bounds}, not {value!r}")
    return number


# -- the upstream side ---------------------------------------------------------------------


class _Exchange:
    """One request forwarded upstream: the response head, then its body, once."""

    def __init__(self, pool: _Pool, conn: _Conn, head: ResponseHead) -> None:
        self._pool, self._conn, self.head = pool, conn, head
        self._complete = False

    @property
    def is_sse(self) -> bool:
        ctype = (self.head.header("content-type") or "").lower()
        return self.head.status == 200 and ctype.startswith("text/event-stream")

    async def body(self) -> AsyncGenerator[bytes, None]:
        async for piece in iter_body(self._conn.reader, self.head):
            yield piece
        self._complete = True

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The response headers to pass on (hop-by-hop ones dropped)."""
        return _forward_headers(self.head.headers)

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


@dataclass(slots=True)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


class _Pool:
    """Keep-alive connections to the upstream."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream must be an http:// or https:// URL, not {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.netloc = parts.netloc
        self.prefix = parts.path.rstrip("/")
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._idle: list[_Conn] = []
        self.opened = 0

    async def get(self) -> tuple[_Conn, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.reader.at_eof() and not conn.writer.transport.is_closing():
                return conn, True
            conn.writer.transport.abort()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self._ssl, limit=2**16), 10.0
        )
        self.opened += 1
        return _Conn(reader, writer), False

    def put(self, conn: _Conn) -> None:
        if len(self._idle) < 64:
            self._idle.append(conn)
        else:
            conn.writer.transport.abort()

    def close(self) -> None:
        for conn in self._idle:
            conn.writer.transport.abort()
        self._idle.clear()


def _forward_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers minus hop-by-hop ones (and those named in ``Connection``)."""
    named = {
        token.strip().lower()
        for key, value in headers
        if key.lower() == "connection"
        for token in value.split(",")
    }
    return [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP and k.lower() not in named]


# -- the gateway ---------------------------------------------------------------------------


class Gateway:
    """The fault-injecting reverse proxy. ``set_fault`` may be called from any thread."""

    def __init__(
        self,
        upstream: str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        fault: str = "pass",
        **params: int | float,
    ) -> None:
        self.upstream = upstream
        self._pool = _Pool(upstream)
        self._http = HTTPServer(self._handle, host, port)
        self._lock = threading.Lock()
        self._setting = FaultSetting.parse(fault, params)
        self._counts = _zero_counts()

    @property
    def port(self) -> int:
        return self._http.port

    @property
    def url(self) -> str:
        return f"http://{self._http.host}:{self.port}"

    @property
    def fault(self) -> FaultSetting:
        return self._setting

    def set_fault(self, mode: str, **params: int | float) -> FaultSetting:
        """Switch the fault for requests that arrive from now on. Raises ValueError."""
        setting = FaultSetting.parse(mode, params)
        with self._lock:
            self._setting = setting
        log.info("fault set: %s", setting.as_dict())
        return setting

    def stats(self) -> dict[str, Any]:
        """What ``GET /_chaos/stats`` answers (see the module doc)."""
        with self._lock:
            counts = dict(self._counts)
            requests = dict(counts.pop("requests"))
        return {
            "requests": requests,
            **counts,
            "upstream_connections": self._pool.opened,
            "open_connections": self._http.open_connections,
        }

    def reset_stats(self) -> None:
        with self._lock:
            self._counts = _zero_counts()
        self._pool.opened = 0

    async def start(self) -> None:
        await self._http.start()

    async def stop(self) -> None:
        await self._http.stop()
        self._pool.close()

    # -- request handling

    async def _handle(self, req: Request, resp: Responder) -> None:
        if req.path == "/_chaos" or req.path.startswith("/_chaos/"):
            await self._chaos(req, resp)
            return
        stream = _is_stream(req.body)
        with self._lock:
            setting = self._setting if stream else FaultSetting()
            self._counts["requests"][setting.mode] += 1
            self._counts["stream_requests" if stream else "non_stream_requests"] += 1
        log.debug("%s %s stream=%s fault=%s", req.method, req.path, stream, setting.mode)
        await _FAULTS[setting.mode](_Call(self, req, resp, setting.params))

    async def open(self, req: Request) -> _Exchange:
        """Send ``req`` upstream and read the response head (retrying once on a fresh
        connection if a reused one turns out closed). Raises OSError / HTTPError."""
        for attempt in (1, 2):
            conn, reused = await self._pool.get()
            try:
                conn.writer.write(self._request_head(req) + req.body)
                head = await read_response_head(conn.reader, req.method)
            except (ConnectionError, OSError, asyncio.IncompleteReadError):
                conn.writer.transport.abort()
                if reused and attempt == 1:
                    continue  # the upstream closed an idle connection: retry on a new one
                raise
            with self._lock:
                self._counts["upstream_requests"] += 1
            return _Exchange(self._pool, conn, head)
        raise AssertionError("unreachable")

    def _request_head(self, req: Request) -> bytes:
        lines = [
            f"{req.method} {self._pool.prefix}{req.target} HTTP/1.1",
            f"Host: {self._pool.netloc}",
        ]
        lines += [f"{k}: {v}" for k, v in _forward_headers(req.headers)]
        if req.body or req.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(req.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _chaos(self, req: Request, resp: Responder) -> None:
        if req.path == "/_chaos" and req.method == "GET":
            await _send_json(resp, 200, self.fault.as_dict())
        elif req.path == "/_chaos" and req.method == "PUT":
            try:
                body = json.loads(req.body)
                if not isinstance(body, dict) or "fault" not in body:
                    raise ValueError('the body must be a JSON object with a "fault" key')
                mode = body.pop("fault")
                setting = FaultSetting.parse(mode, body)
            except ValueError as err:
                await _send_json(resp, 400, _chaos_error(str(err)))
                return
            self.set_fault(setting.mode, **setting.params)
            await _send_json(resp, 200, setting.as_dict())
        elif req.path == "/_chaos/stats" and req.method in ("GET", "DELETE"):
            if req.method == "DELETE":
                self.reset_stats()
            await _send_json(resp, 200, self.stats())
        elif req.path in ("/_chaos", "/_chaos/stats"):
            allow = "GET, PUT" if req.path == "/_chaos" else "GET, DELETE"
            message = f"{req.method} is not allowed on {req.path}; use {allow}"
            await resp.send(
                405, [*_JSON, ("Allow", allow)], json.dumps(_chaos_error(message)).encode()
            )
        else:
            await _send_json(
                resp,
                404,
                _chaos_error(f"no chaos endpoint {req.path}; use /_chaos or /_chaos/stats"),
            )


def _zero_counts() -> dict[str, Any]:
    return {
        "requests": dict.fromkeys(FAULT_MODES, 0),
        "stream_requests": 0,
        "non_stream_requests": 0,
        "upstream_requests": 0,
    }


def _chaos_error(message: str) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": "invalid_chaos_request",
            "valid_modes": list(FAULT_MODES),
        }
    }


def _is_stream(body: bytes) -> bool:
    if b'"stream"' not in body:
        return False
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(obj, dict) and obj.get("stream") is True


async def _send_json(
    resp: Responder, status: int, obj: object, extra: Sequence[tuple[str, str]] = ()
) -> None:
    await resp.send(status, [*_JSON, *extra], json.dumps(obj).encode())


def _openai_error(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# -- the faults ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Call:
    """One stream request under a fault."""

    gw: Gateway
    req: Request
    resp: Responder
    params: Mapping[str, int | float]


Fault = Callable[[_Call], Awaitable[None]]
StreamFault = Callable[[_Call, _Exchange], Awaitable[None]]


def _via_upstream(transform: StreamFault) -> Fault:
    """A fault that transforms the upstream's stream: call the upstream, pass a non-SSE
    answer through unchanged, and drop the client if the upstream drops us."""

    async def fault(c: _Call) -> None:
        try:
            ex = await c.gw.open(c.req)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, HTTPError) as err:
            await _bad_gateway(c, f"chunkwatch gateway got no answer from the upstream: {err!r}")
            return
        try:
            await (transform(c, ex) if ex.is_sse else _pass(c, ex))
        except ClientGone:
            raise
        except (ConnectionError, asyncio.IncompleteReadError) as err:
            if c.resp.started:
                log.info("the upstream dropped the stream, dropping the client too: %s", err)
                await c.resp.abort()
            else:
                await _bad_gateway(c, f"the upstream dropped the connection: {err}")
        finally:
            ex.release()

    return fault


async def _bad_gateway(c: _Call, message: str) -> None:
    message = f"{message} (upstream {c.gw.upstream})"
    log.warning("%s", message)
    await _send_json(c.resp, 502, _openai_error(message, "upstream_error", "bad_gateway"))


async def _pass(c: _Call, ex: _Exchange) -> None:
    """Healthy: the upstream's answer, each piece written as soon as it arrives."""
    framing, length = ex.head.framing, ex.head.length
    content_length = length if framing == "length" else (0 if framing == "none" else None)
    await c.resp.start(ex.head.status, ex.headers, content_length=content_length)
    async for piece in ex.body():
        await c.resp.write(piece)
    await c.resp.end()


async def _json(c: _Call, ex: _Exchange) -> None:
    await _send_json(c.resp, 200, aggregate([event async for event in ex.events()]))


async def _buffer(c: _Call, ex: _Exchange) -> None:
    await c.resp.send(200, ex.headers, await ex.read_all())


async def _buffer_late(c: _Call, ex: _Exchange) -> None:
    await c.resp.start(200, ex.headers)
    await c.resp.write(await ex.read_all())
    await c.resp.end()


async def _trickle(c: _Call, ex: _Exchange) -> None:
    size, delay = int(c.params["bytes"]), float(c.params["delay"])
    await c.resp.start(200, ex.headers)
    first = True
    async for piece in ex.body():
        for i in range(0, len(piece), size):
            if not first:
                await asyncio.sleep(delay)
            first = False
            await c.resp.write(piece[i : i + size])
    await c.resp.end()


async def _gzip(c: _Call, ex: _Exchange) -> None:
    gz = zlib.compressobj(wbits=31)  # gzip framing, flushed per piece: it still streams
    await c.resp.start(200, ex.headers)
    async for piece in ex.body():
        await c.resp.write(gz.compress(piece) + gz.flush(zlib.Z_SYNC_FLUSH))
    await c.resp.write(gz.flush())
    await c.resp.end()


async def _events(
    c: _Call, ex: _Exchange, encode: Callable[[Event], bytes], limit: int | None = None
) -> None:
    """Start an SSE response and write the upstream's events through ``encode``; with
    ``limit``, stop after that many events or before the final one, whichever is first."""
    await c.resp.start(200, ex.headers)
    sent = 0
    async with aclosing(ex.events()) as events:
        async for event in events:
            if limit is not None and (sent >= limit or _is_final(event)):
                return
            await c.resp.write(encode(event))
            sent += 1


def _same(event: Event) -> bytes:
    return format_event(event.data, event.event or None, event.id)


def _cut_short(event: Event) -> bytes:
    """A JSON object cut in the middle, as a proxy with a line limit would leave it."""
    if event.data == "[DONE]":
        return _same(event)
    return format_event(event.data[: max(1, len(event.data) // 2)].rstrip("}") or "{")


async def _truncate(c: _Call, ex: _Exchange) -> None:
    await _events(c, ex, _same, int(c.params["events"]))
    await c.resp.end()


async def _truncate_abrupt(c: _Call, ex: _Exchange) -> None:
    await _events(c, ex, _same, int(c.params["events"]))
    await c.resp.abort()


async def _error_event(c: _Call, ex: _Exchange) -> None:
    n = int(c.params["events"])
    await _events(c, ex, _same, n)
    message = (
        f"The model stream was interrupted after {n} events: upstream connection reset "
        "(fault injected by chunkwatch gateway)."
    )
    error = _openai_error(message, "server_error", "stream_interrupted")
    await c.resp.write(format_event(json.dumps(error), event="error"))
    await c.resp.end()


async def _malformed(c: _Call, ex: _Exchange) -> None:
    await _events(c, ex, _cut_short)
    await c.resp.end()


async def _no_blank_lines(c: _Call, ex: _Exchange) -> None:
    await _events(c, ex, lambda event: _same(event)[:-1])  # without the blank line
    await c.resp.end()


def _is_final(event: Event) -> bool:
    """``[DONE]``, a chunk with a finish_reason, or the usage chunk."""
    if event.data == "[DONE]":
        return True
    try:
        obj = json.loads(event.data)
    except ValueError:
        return False
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list):
        return False
    if not choices:
        return bool(obj.get("usage"))
    return any(isinstance(choice, dict) and choice.get("finish_reason") for choice in choices)


def aggregate(events: Sequence[Event]) -> dict[str, Any]:
    """The ``chat.completion`` a gateway builds from ``chat.completion.chunk`` events."""
    first: dict[str, Any] = {}
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    finish, usage = None, None
    for event in events:
        try:
            obj = json.loads(event.data)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        first = first or obj
        usage = obj.get("usage") or usage
        for choice in obj.get("choices") or []:
            delta = choice.get("delta") or {}
            content.append(delta.get("content") or "")
            for call in delta.get("tool_calls") or []:
                _merge_call(calls.setdefault(call.get("index", 0), {}), call)
            finish = choice.get("finish_reason") or finish
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
    if calls:
        message["content"] = message["content"] or None
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    result = {
        "id": first.get("id", "chatcmpl-gateway"),
        "object": "chat.completion",
        "created": first.get("created", int(time.time())),
        "model": first.get("model", ""),
        "choices": [choice],
    }
    return {**result, "usage": usage} if usage else result


def _merge_call(into: dict[str, Any], delta: dict[str, Any]) -> None:
    if delta.get("id"):
        into["id"] = delta["id"]
        into["type"] = delta.get("type", "function")
    fn = into.setdefault("function", {"name": "", "arguments": ""})
    part = delta.get("function") or {}
    fn["name"] = part.get("name") or fn["name"]
    fn["arguments"] += part.get("arguments") or ""


# -- the faults that answer without the upstream -------------------------------------------


async def _zero(c: _Call) -> None:
    await c.resp.start(200, _SSE_HEADERS)
    await c.resp.end()


async def _zero_abrupt(c: _Call) -> None:
    await c.resp.start(200, _SSE_HEADERS)
    await c.resp.abort()


async def _done_only(c: _Call) -> None:
    await c.resp.start(200, _SSE_HEADERS, body=format_event("[DONE]"))
    await c.resp.end()


async def _html(c: _Call) -> None:
    await c.resp.send(200, _HTML, _BLOCK_PAGE.encode())


async def _stall(c: _Call) -> None:
    await c.resp.start(200, _SSE_HEADERS)
    if not await c.resp.hold(float(c.params["limit"])):
        await c.resp.abort()


async def _stall_headers(c: _Call) -> None:
    if not await c.resp.hold(float(c.params["limit"])):
        await c.resp.abort()


async def _keepalive_only(c: _Call) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + float(c.params["limit"])
    interval = float(c.params["interval"])
    await c.resp.start(200, _SSE_HEADERS, body=format_comment("keepalive"))
    while (left := deadline - loop.time()) > 0:
        if await c.resp.hold(min(interval, left)):
            return  # the client went away
        if deadline - loop.time() > 0:
            await c.resp.write(format_comment("keepalive"))
    await c.resp.end()


async def _status(c: _Call) -> None:
    status = int(c.params["status"])
    if status in _NGINX_TITLES:
        await c.resp.send(status, _HTML, _nginx_page(status).encode())
        return
    retry = [("Retry-After", "1")] if status == 429 else []
    await _send_json(c.resp, status, _status_body(status), retry)


async def _reject_stream_options(c: _Call) -> None:
    try:
        has_options = "stream_options" in json.loads(c.req.body)
    except (ValueError, TypeError):
        has_options = False
    if not has_options:
        await _FAULTS["pass"](c)
        return
    message = "Unrecognized request argument supplied: stream_options"
    await _send_json(c.resp, 400, _openai_error(message, "invalid_request_error"))


_STATUS_ERRORS = {
    400: ("The gateway rejected the request: invalid request.", "invalid_request_error", None),
    429: (
        "Rate limit reached for requests. Please retry after 1 second.",
        "requests",
        "rate_limit_exceeded",
    ),
}
_SERVER_ERROR = "The server had an error while processing your request. Sorry about that!"
_NGINX_TITLES = {
    502: "Bad Gateway",
    503: "Service Temporarily Unavailable",
    504: "Gateway Time-out",
}


def _status_body(status: int) -> dict[str, Any]:
    if status in _STATUS_ERRORS:
        return _openai_error(*_STATUS_ERRORS[status])
    if status >= 500:
        return _openai_error(_SERVER_ERROR, "server_error")
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return _openai_error(f"{status} {phrase} (from the gateway)", "invalid_request_error")


def _nginx_page(status: int) -> str:
    title = f"{status} {_NGINX_TITLES[status]}"
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    )


_BLOCK_PAGE = """<!DOCTYPE html>
<html><head><title>Access Denied</title></head>
<body>
<h1>Web Page Blocked</h1>
<p>Access to the requested resource has been blocked by your organization's web gateway
(policy: streaming content inspection).</p>
<p>If you believe this is an error, contact your IT service desk.</p>
</body></html>
"""

_FAULTS: dict[str, Fault] = {
    "pass": _via_upstream(_pass),
    "zero": _zero,
    "zero-abrupt": _zero_abrupt,
    "done-only": _done_only,
    "json": _via_upstream(_json),
    "html": _html,
    "buffer": _via_upstream(_buffer),
    "buffer-late": _via_upstream(_buffer_late),
    "truncate": _via_upstream(_truncate),
    "truncate-abrupt": _via_upstream(_truncate_abrupt),
    "stall": _stall,
    "stall-headers": _stall_headers,
    "keepalive-only": _keepalive_only,
    "trickle": _via_upstream(_trickle),
    "status": _status,
    "reject-stream-options": _reject_stream_options,
    "malformed": _via_upstream(_malformed),
    "no-blank-lines": _via_upstream(_no_blank_lines),
    "error-event": _via_upstream(_error_event),
    "gzip-stripped": _via_upstream(_gzip),
}
assert tuple(_FAULTS) == FAULT_MODES


# -- command line --------------------------------------------------------------------------


def add_gateway_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``gateway`` subcommand to an argparse subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "gateway",
        help="run a reverse proxy that injects streaming faults",
        description="A reverse proxy that forwards streams chunk by chunk and injects the faults "
        "real gateways commit; switch them while it runs with PUT /_chaos.",
    )
    p.add_argument("--upstream", required=True, metavar="URL", help="where to forward requests")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8401, help="port (default 8401; 0 picks a free one)")
    p.add_argument(
        "--fault",
        default="pass",
        choices=FAULT_MODES,
        metavar="MODE",
        help=f"fault mode (default pass): {', '.join(FAULT_MODES)}",
    )
    p.add_argument(
        "--events", type=int, help="truncate*, error-event: data events before the cut (3)"
    )
    p.add_argument("--limit", type=float, help="stall*, keepalive-only: seconds held open (60)")
    p.add_argument("--interval", type=float, help="keepalive-only: seconds between comments (1)")
    p.add_argument("--bytes", type=int, help="trickle: bytes per write (7)")
    p.add_argument("--delay", type=float, help="trickle: seconds between writes (0.2)")
    p.add_argument("--status", type=int, help="status: the HTTP status (502)")
    p.set_defaults(func=run_gateway, _gateway_parser=p)
    return p


def gateway_from_args(args: argparse.Namespace) -> Gateway:
    """A :class:`Gateway` from parsed arguments; ValueError names a bad combination."""
    names = {name for spec in FAULT_PARAMS.values() for name in spec}
    params = {n: getattr(args, n) for n in sorted(names) if getattr(args, n, None) is not None}
    return Gateway(args.upstream, args.host, args.port, fault=args.fault, **params)


def run_gateway(args: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM; exit status 0 (2 for a bad fault or upstream URL)."""
    try:
        server = gateway_from_args(args)
    except ValueError as err:
        parser = getattr(args, "_gateway_parser", None)
        if parser is not None:
            parser.error(str(err))
        print(f"chunkwatch gateway: {err}", file=sys.stderr)
        return 2
    return asyncio.run(run_until_signal(server, "gateway"))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m chunkwatch.reference.gateway --upstream URL [...]``."""
    parser = argparse.ArgumentParser(prog="python -m chunkwatch.reference.gateway")
    add_gateway_parser(parser.add_subparsers(dest="command", required=True))
    return run_gateway(parser.parse_args(["gateway", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
