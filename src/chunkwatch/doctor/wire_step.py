"""Steps 1, 2, 3 and 5 of the doctor: one chat request, measured on the wire.

:func:`measure` sends one request with ``httpx2`` (the HTTP stack under the openai
SDK) and reads the raw body as it arrives with :class:`WireBody`, through the gateway
probe's own body reader (:class:`chunkwatch.wire.WireReader`: Content-Encoding, SSE
framing, payload kinds, in-band errors, malformed reasons, by one set of rules). What
it sees becomes a :class:`~chunkwatch.ledger.Tally` of layer ``gateway`` — the
evidence the gateway probe records inside a service, read the same way — and
:meth:`Tally.finish` classifies it with :func:`chunkwatch.outcomes.classify`.
:class:`Wire` keeps the facts a person debugging the endpoint wants beyond that:
reason phrase, protocol, framing, request ids, time to connect / request sent / first
byte, reads, gaps, finish reasons, usage, error text.

Every wait is bounded: the first data event (for a non-stream answer: the headers)
must come within ``timeout`` seconds of sending the request, each next one within
``timeout`` of the previous one (comments do not count: a keepalive-only stream
stalls), and the whole request ends after ``total`` seconds. Passing a deadline ends
the request with ``End.TIMEOUT`` (``stalled``), never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import httpx2

from chunkwatch import semconv as sc
from chunkwatch.doctor.progress import Progress
from chunkwatch.doctor.target import Target
from chunkwatch.ledger import Tally
from chunkwatch.outcomes import End, Payload, end_for_exception, payload_kind, upstream_text
from chunkwatch.sse import Event, SSEParser
from chunkwatch.wire import WireReader, record

__all__ = ["REQUEST_ID_HEADERS", "Wire", "WireBody", "measure", "new_client"]

_now = time.perf_counter_ns

REQUEST_ID_HEADERS = sc.REQUEST_ID_HEADERS
_KEEP = 64 * 1024  # body bytes kept to read an error message or an aggregated answer
_KEEP_CONTROL = 4 * 1024 * 1024  # a non-stream answer is read whole (up to this)
_TITLE = re.compile(rb"<title>(.*?)</title>", re.IGNORECASE | re.DOTALL)


@dataclass(slots=True, eq=False)
class Wire:
    """One request as seen on the wire. ``tally`` holds the classified evidence."""

    tally: Tally
    stream: bool | None  # the request's "stream" field (None: left out)
    stream_options: bool  # the request carried stream_options
    reason: str | None = None
    http_version: str | None = None
    transfer_encoding: str | None = None
    request_ids: dict[str, str] = field(default_factory=dict)
    t_connected: int | None = None
    t_sent: int | None = None
    t_first_byte: int | None = None
    events: int = 0  # dispatched SSE events, [DONE] included
    reads: int = 0
    max_read_gap_ns: int = 0
    event_gaps_ns: list[int] = field(default_factory=list)  # between data events
    usage: bool = False  # a usage object was seen
    answer_chars: int | None = None  # a non-stream (or aggregated) answer's length
    api_error: str | None = None  # the error message the endpoint sent (body or event)
    error: str | None = None  # the exception that ended the request, "Type: message"
    total_limit: bool = False  # the doctor's total limit ended a flowing stream

    @property
    def is_sse(self) -> bool:
        media = (self.tally.content_type or "").split(";", 1)[0].strip().lower()
        return media == "text/event-stream"

    def seconds(self, t: int | None) -> float | None:
        return None if t is None else (t - self.tally.t_start) / 1e9


def new_client(timeout: float) -> httpx2.AsyncClient:
    """The client the doctor's raw requests share: keep-alive and redirects followed, like
    the openai SDK's; ``timeout`` is only a safety net under the doctor's own deadlines."""
    return httpx2.AsyncClient(timeout=httpx2.Timeout(timeout), follow_redirects=True)


async def measure(
    client: httpx2.AsyncClient,
    target: Target,
    *,
    stream: bool | None,
    stream_options: bool,
    timeout: float,
    total: float,
    progress: Progress,
    label: str,
) -> Wire:
    """Send one chat request to ``target`` and measure its answer; never raises for
    anything the endpoint does, and returns within about ``total`` seconds."""
    streaming = bool(stream)
    tally = Tally(
        layer=sc.GATEWAY,
        t_start=_now(),
        stream_requested=streaming,
        terminal_known=streaming,
        needs_status=True,
    )
    tally.deadline = timeout
    wire = Wire(tally, stream, stream_options)
    body = WireBody(wire)

    async def trace(name: str, info: Any) -> None:
        if name.endswith(
            ("connect_tcp.complete", "start_tls.complete", "connect_unix_socket.complete")
        ):
            wire.t_connected = _now()
        elif name.endswith("send_request_body.complete"):
            wire.t_sent = _now()

    request = client.build_request(
        "POST",
        target.chat_url,
        content=target.body(stream=stream, stream_options=stream_options),
        headers=target.headers(),
        extensions={"trace": trace},
    )
    timeout_ns, end_ns = int(timeout * 1e9), int(total * 1e9)

    bound_by_total = False

    def left() -> float:
        """Seconds until the next deadline (noting whether it is the total limit)."""
        nonlocal bound_by_total
        if streaming and (tally.status is None or wire.is_sse):
            anchor = tally.t_last if tally.t_last is not None else tally.t_start
        else:  # a whole answer: the headers, then each read
            anchor = body.t_read if body.t_read is not None else tally.t_start
        deadline, total_end = anchor + timeout_ns, tally.t_start + end_ns
        bound_by_total = total_end < deadline
        return max(0.0, min(deadline, total_end) - _now()) / 1e9

    response: httpx2.Response | None = None
    end = End.CLEAN
    tally.t_start = _now()
    try:
        progress.waiting(f"{label}: the response headers")
        response = await asyncio.wait_for(client.send(request, stream=True), left())
        body.headers(response)
        chunks = response.aiter_raw()
        while True:
            progress.waiting(f"{label}: {body.awaiting()}")
            try:
                piece = await asyncio.wait_for(anext(chunks), left())
            except StopAsyncIteration:
                break
            body.feed(piece)
    except TimeoutError:
        end = End.TIMEOUT
        if bound_by_total:
            wire.total_limit = True
        else:
            tally.stalled = "first_chunk" if tally.t_first is None else "idle"
    except Exception as exc:
        end = end_for_exception(exc)
        tally.exc_type = type(exc).__name__
        wire.error = _exception_text(exc)
    finally:
        progress.done()
        if response is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(response.aclose(), 2.0)
    body.close()
    tally.finish(end)
    if not streaming:  # describe() counts a whole answer, not data events
        tally.unit_name = "answer" if tally.units == 1 else "answers"
    return wire


def _exception_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


class WireBody:
    """Reads a response body into the tally and the wire facts: the evidence with the
    library's one body reader (:class:`chunkwatch.wire.WireReader`, the gateway probe's),
    the doctor's own facts (reads, gaps, finish reasons, usage, the endpoint's error
    text, a whole answer) beside it."""

    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.tally = wire.tally
        self.reader: WireReader | None = None
        self.keep = _KEEP_CONTROL if not self.tally.stream_requested else _KEEP
        self.t_read: int | None = None

    def headers(self, response: httpx2.Response) -> None:
        tally, wire, h = self.tally, self.wire, response.headers
        tally.t_headers = self.t_read = _now()
        tally.status = response.status_code
        tally.content_type = h.get("content-type")
        cl = h.get("content-length")
        tally.content_length = int(cl) if cl and cl.strip().isdigit() else None
        tally.content_encoding = h.get("content-encoding")
        wire.transfer_encoding = h.get("transfer-encoding")
        wire.reason = response.reason_phrase
        wire.http_version = response.http_version
        for name in REQUEST_ID_HEADERS:
            if name in h:
                wire.request_ids[name] = h[name][:128]
        streaming = tally.stream_requested
        self.reader = WireReader(
            tally.content_encoding,
            parser=SSEParser() if streaming else None,
            keep=self.keep,
            on_event=self.see if streaming else None,
        )

    def awaiting(self) -> str:
        if self.reader is not None and self.reader.parser is not None and self.wire.is_sse:
            n = self.tally.units
            return "the first event" if n == 0 else f"the next event ({n} so far)"
        return "the response body"

    def feed(self, piece: bytes) -> None:
        now = _now()
        tally, wire = self.tally, self.wire
        tally.bytes += len(piece)
        wire.reads += 1
        if wire.t_first_byte is None:
            wire.t_first_byte = now
        elif self.t_read is not None and now - self.t_read > wire.max_read_gap_ns:
            wire.max_read_gap_ns = now - self.t_read
        self.t_read = now
        assert self.reader is not None, "feed() before headers()"
        last = tally.t_last
        new = self.reader.feed(piece)
        if new:
            tally.unit(new)
            if last is not None:
                wire.event_gaps_ns.append(now - last)
            wire.event_gaps_ns.extend([0] * (new - 1))  # arrived in the same read

    def see(self, event: Event) -> None:
        """One dispatched event, for the doctor's own facts (the evidence is the reader's)."""
        if event.data == "[DONE]":
            return
        try:
            obj = json.loads(event.data)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        _note_choices(self.wire, obj, "delta")
        error = obj.get("error")
        if self.wire.api_error is None:
            if error is not None:
                self.wire.api_error = _message_of(error)
            elif payload_kind(obj) is Payload.ERROR:  # {"message": ...}: in-band
                self.wire.api_error = upstream_text(obj)

    def close(self) -> None:
        tally, wire, reader = self.tally, self.wire, self.reader
        if reader is None:  # no response
            return
        evidence = reader.close()
        if reader.parser is not None or evidence.malformed:  # malformed: does not decode
            record(evidence, tally)
        wire.events = evidence.events
        if tally.status is None or (reader.parser is not None and wire.is_sse):
            return
        self.whole_body()

    def whole_body(self) -> None:
        """A non-event-stream body: the answer or the error it carries."""
        tally, wire = self.tally, self.wire
        kept = self.reader.kept if self.reader is not None else b""
        status = tally.status or 0
        try:
            obj = json.loads(kept) if kept.strip() else None
        except (ValueError, UnicodeDecodeError):
            obj = None
        if not 200 <= status < 300:
            wire.api_error = _error_text(obj, kept)
            return
        if isinstance(obj, dict):
            if obj.get("error") is not None:
                wire.api_error = _message_of(obj["error"])
            answered = _note_choices(wire, obj, "message")
            if not tally.stream_requested and answered:
                tally.unit()
        elif not tally.stream_requested and not tally.malformed:
            tally.malformed += 1
            tally.malformed_why = "the body is not a JSON object"
        elif kept:
            wire.api_error = _error_text(None, kept)


def _note_choices(wire: Wire, obj: dict[str, Any], key: str) -> bool:
    """Note content, finish reasons and usage of a chunk (``delta``) or completion
    (``message``); True when it carries an answer."""
    tally = wire.tally
    answered = False
    if obj.get("usage"):
        wire.usage = True
    choices = obj.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        part = choice.get(key)
        if isinstance(part, dict) and (part.get("content") or part.get("tool_calls")):
            answered = True
            tally.content_units += 1
            if key == "message":
                wire.answer_chars = (wire.answer_chars or 0) + len(str(part.get("content") or ""))
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            tally.finish_reasons.append(reason)
    if key == "message" and wire.answer_chars is None and choices is not None:
        wire.answer_chars = 0
    return answered


def _message_of(error: object) -> str:
    if isinstance(error, dict):
        for key in ("message", "code", "type"):
            if error.get(key):
                return str(error[key])[:300]
    return str(error)[:300]


def _error_text(obj: object, body: bytes) -> str | None:
    """The message an error response carries: OpenAI's ``error.message``, a page title,
    or the first line of the body."""
    if isinstance(obj, dict):
        for key in ("error", "message", "detail"):
            if obj.get(key):
                return _message_of(obj[key])
    title = _TITLE.search(body)
    if title:
        return title.group(1).decode(errors="replace").strip()[:300]
    text = body.decode(errors="replace").strip()
    return text.splitlines()[0][:300] if text else None
