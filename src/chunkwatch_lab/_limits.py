"""What a request to the reference service may cost, and the JSON errors past each limit.

I/O-free except :class:`BodyDeadline`:

* :class:`Limits` — the bounds ``chunkwatch serve`` enforces (``docs/deployment.md``
  has the table, with the gunicorn equivalents).
* :func:`error_response` — the bytes of a whole JSON error response
  (``{"error": {"type": ..., "message": ...}}``), for the server's own answers.
* :func:`scan_request` — given the bytes a client has sent so far: is the request
  complete, still arriving, or past a limit (414, 431, 400)?
* :class:`BodyDeadline` — a WSGI middleware that reads the body before the app
  does, with a deadline for the whole body: a client that sends it too slowly gets
  a JSON 408 and its connection is closed. Used by ``chunkwatch serve`` and by
  the gunicorn entry point (:mod:`chunkwatch_lab.wsgi`).
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from chunkwatch_lab.service import MAX_BODY

__all__ = [
    "BodyDeadline",
    "Complete",
    "Incomplete",
    "Limits",
    "Refused",
    "error_body",
    "error_response",
    "scan_request",
    "shut_reading",
]

#: ``error.type`` of each status the servers answer themselves.
KINDS = {
    400: "bad_request",
    408: "request_timeout",
    413: "payload_too_large",
    414: "uri_too_long",
    431: "header_fields_too_large",
    500: "internal_error",
    501: "not_implemented",
    503: "overloaded",
    505: "http_version_not_supported",
}


@dataclass(frozen=True)
class Limits:
    """The bounds of ``chunkwatch serve`` (its CLI options; defaults in docs/deployment.md)."""

    threads: int = 64  # requests served at once; each open SSE stream holds one
    max_pending: int = 256  # connections still sending their request (read without a thread)
    read_timeout: float = 10.0  # seconds to send the whole request: line, headers, body
    max_request_line: int = 8190
    max_header_bytes: int = 32768  # the request line and every header line together
    max_header_fields: int = 100
    max_body: int = MAX_BODY  # the app's own limit (413 above it)
    send_timeout: float = 60.0  # seconds a client may leave a response unread (full buffers)
    linger: float = 2.0  # seconds to drain a refused request before closing (so the client
    # reads the error instead of a connection reset)


def error_body(status: int, message: str) -> bytes:
    return json.dumps({"error": {"type": KINDS.get(status, "error"), "message": message}}).encode()


def error_response(status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A whole HTTP/1.1 response: JSON body, ``Connection: close``."""
    body = error_body(status, message)
    reason = HTTPStatus(status).phrase
    lines = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json"]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# -- the request head, sans I/O ----------------------------------------------------------------


@dataclass(frozen=True)
class Incomplete:
    """More bytes are needed; ``started`` once a byte of the request has arrived.

    ``need``: the length of the whole request once the head is in (0 before).
    """

    started: bool
    need: int = 0


@dataclass(frozen=True)
class Complete:
    """Hand the first ``length`` bytes (head, and the body if it was waited for) to a thread."""

    length: int
    body_buffered: bool


@dataclass(frozen=True)
class Refused:
    status: int
    message: str


Scan = Incomplete | Complete | Refused


def scan_request(buf: bytes, limits: Limits) -> Scan:
    """What ``buf``, the bytes received so far on a connection, amounts to.

    The body is waited for when its length is known, within ``max_body`` and not
    behind ``Expect: 100-continue``; otherwise the head alone is complete (a chunked
    body, or one the app refuses with 413, is bounded by :class:`BodyDeadline`).
    """
    data = buf.lstrip(b"\r\n")  # RFC 9112 2.2: empty lines before the request line
    skipped = len(buf) - len(data)
    eol = data.find(b"\n")
    line_len = eol if eol >= 0 else len(data)
    if line_len > limits.max_request_line:
        return Refused(414, f"request line over {limits.max_request_line} bytes")
    if eol < 0:
        return Incomplete(started=bool(data))
    end, sep = data.find(b"\r\n\r\n"), 4
    lf_end = data.find(b"\n\n")
    if lf_end >= 0 and (end < 0 or lf_end < end):
        end, sep = lf_end, 2
    head = data if end < 0 else data[:end]
    if len(head) > limits.max_header_bytes:
        return Refused(431, f"request headers over {limits.max_header_bytes} bytes")
    lines = head.split(b"\n")[1:]
    if len(lines) > limits.max_header_fields:
        return Refused(431, f"more than {limits.max_header_fields} header fields")
    if end < 0:
        return Incomplete(started=True)
    head_len = skipped + end + sep
    fields: dict[bytes, list[bytes]] = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        if colon:
            fields.setdefault(name.strip().lower(), []).append(value.strip())
    if b"transfer-encoding" in fields or b"100-continue" in [
        v.lower() for v in fields.get(b"expect", [])
    ]:
        return Complete(head_len, body_buffered=False)
    lengths = set(fields.get(b"content-length", [b"0"]))
    if len(lengths) != 1 or not next(iter(lengths)).isdigit():
        return Refused(400, "Content-Length is not one decimal number")
    length = int(next(iter(lengths)))
    if length > limits.max_body:
        return Complete(head_len, body_buffered=False)  # answered 413 without reading it
    if len(buf) < head_len + length:
        return Incomplete(started=True, need=head_len + length)
    return Complete(head_len + length, body_buffered=True)


# -- the body, with a deadline -----------------------------------------------------------------

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class BodyDeadline:
    """WSGI middleware: read the request body (at most ``max_body`` bytes) within ``timeout``.

    The connection's socket (``gunicorn.socket`` or ``werkzeug.socket`` in the
    environ) is shut for reading at the deadline, so a read blocked on a client that
    sends a byte now and then returns at once, whichever server runs the app. Past
    the deadline: JSON 408; a body over ``max_body``: JSON 413, unread; a body that
    ends early: JSON 400. The app gets the body in memory (``wsgi.input`` a
    ``BytesIO``), so it never blocks on the client. The thread serving the request is
    held until the body is in or the deadline passes: that is the bound.
    """

    def __init__(self, app: WSGIApp, timeout: float, max_body: int = MAX_BODY) -> None:
        self.app = app
        self.timeout = timeout
        self.max_body = max_body

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        raw_length = environ.get("CONTENT_LENGTH") or ""
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if not raw_length and not chunked:
            return self.app(environ, start_response)
        sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
        length = None
        if not chunked:
            if not raw_length.strip().isdigit():
                return _answer(start_response, 400, "Content-Length is not a number", sock)
            length = int(raw_length)
            if length > self.max_body:
                return _answer(
                    start_response, 413, f"request body over {self.max_body} bytes", sock
                )
        started = time.monotonic()
        body, late = _read_body(environ["wsgi.input"], length, self.max_body, self.timeout, sock)
        if late:
            took = time.monotonic() - started
            message = (
                f"the request body did not arrive within {self.timeout:g} s ({len(body)} "
                f"bytes in {took:.1f} s): send it at once, or put a buffering proxy in front"
            )
            return _answer(start_response, 408, message, sock)
        if len(body) > self.max_body:
            return _answer(start_response, 413, f"request body over {self.max_body} bytes", sock)
        if length is not None and len(body) < length:
            message = f"the request body ended after {len(body)} of {length} bytes"
            return _answer(start_response, 400, message, sock)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        environ["wsgi.input_terminated"] = True
        return self.app(environ, start_response)


def _read_body(
    stream: Any, length: int | None, max_body: int, timeout: float, sock: Any
) -> tuple[bytes, bool]:
    """(the bytes read, whether the deadline cut them short)."""
    cut = threading.Event()

    def expire() -> None:
        cut.set()
        shut_reading(sock)

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    parts: list[bytes] = []
    got = 0
    want = max_body + 1 if length is None else length
    try:
        while got < want and not cut.is_set():
            part = stream.read(min(want - got, 16384))
            if not part:
                break
            parts.append(part)
            got += len(part)
    except (OSError, ValueError, EOFError, StopIteration):
        pass  # the client went away, or the read was shut at the deadline
    except Exception:  # gunicorn's NoMoreData and friends: the body ended
        pass
    finally:
        timer.cancel()
    return b"".join(parts), cut.is_set() and got < want


def shut_reading(sock: Any) -> None:
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass


def _answer(
    start_response: Callable[..., Any], status: int, message: str, sock: Any
) -> list[bytes]:
    """A JSON error; the rest of the body is not read, so the connection must not be reused."""
    shut_reading(sock)  # the server's drain and keep-alive read see the end at once
    body = error_body(status, message)
    start_response(
        f"{status} {HTTPStatus(status).phrase}",
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ],
    )
    return [body]
