"""What came over the wire from a gateway: response headers and body bytes, into a tally.

The gateway probe's reading half: :func:`note_headers` records status and the
headers that matter (never Authorization or api-key: only the names listed here
are read), and :class:`Reader` feeds the body to the shared SSE parser in
counting mode and finalizes the tally once.

Two things the counting parser cannot tell are read off a few kept bytes, once per
stream, never per event:

* **no completion at all**: until the first chunk with choices (a byte search of each
  read, on the reads before it only), the body is kept (up to ``_HEAD_MAX`` bytes).
  A stream that ends before one is parsed whole at its end: data events that are all
  ``choices: []`` (Azure's prompt-filter results, usage) are ``annotations``, and the
  stream is ``empty``: the model produced nothing.
* **an error delivered in-band**: a stream that ends without ``[DONE]`` or with an
  error event has its last read parsed: a JSON object that is not a chunk
  (``{"message": ...}``) is an error event, and the error's text (bounded, keys
  redacted: :func:`chunkwatch.outcomes.upstream_text`) goes to the verdict.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable
from typing import Any

from chunkwatch import semconv as sc
from chunkwatch.ledger import Tally
from chunkwatch.outcomes import End, Payload, payload_kind, upstream_text
from chunkwatch.runtime import Runtime, active
from chunkwatch.sse import Event, SSEParser

__all__ = ["Reader", "note_headers"]

_HEAD_MAX = 8 * 1024  # body bytes kept while no completion chunk has come (then dropped)
_COMPLETION = (b'"choices":[{', b'"choices": [{')  # a chunk with choices, as JSON writes it


_NOTED = frozenset(
    (
        "content-type",
        "content-length",
        "content-encoding",
        "transfer-encoding",
        *sc.REQUEST_ID_HEADERS,
    )
)


# of the noted headers, those also recorded under their HTTP semantic-convention names
_SEMCONV_HEADERS = ("content-type", "content-length", "content-encoding", "transfer-encoding")


def _noted(headers: Any) -> dict[str, str]:
    """The values of the noted headers, by lower-case name, repeated ones joined with ", "
    (as ``headers[name]`` gives them), in one pass: an httpx ``Headers`` lookup scans
    every header, and a missing name costs a ``KeyError``."""
    noted: dict[str, str] = {}
    for name, value in headers.multi_items():  # lower-case names, in order
        if name in _NOTED:
            noted[name] = f"{noted[name]}, {value}" if name in noted else value
    return noted


def note_headers(rt: Runtime, tally: Tally, response: Any) -> SSEParser | None:
    """Record status and headers; return the parser for the body (None: not an event stream)."""
    tally.t_headers = time.perf_counter_ns()
    headers = _noted(response.headers)
    tally.status = response.status_code
    tally.content_type = headers.get("content-type")
    cl = headers.get("content-length")
    tally.content_length = int(cl) if cl and cl.isdigit() else None
    tally.content_encoding = headers.get("content-encoding")
    facts = {
        sc.HTTP_RESPONSE_STATUS_CODE: tally.status,
        "chunkwatch.http.content_type": tally.content_type or "",
        "chunkwatch.http.transfer_encoding": headers.get("transfer-encoding", ""),
    }
    if tally.content_length is not None:
        facts["chunkwatch.http.content_length"] = tally.content_length
    if tally.content_encoding:
        facts["chunkwatch.http.content_encoding"] = tally.content_encoding
    for name in sc.REQUEST_ID_HEADERS:
        if name in headers:
            facts[f"chunkwatch.http.{name.replace('-', '_')}"] = headers[name][:128]
    for name in _SEMCONV_HEADERS:  # http.response.header.<name>: string[] (HTTP semconv)
        if name in headers:
            facts[sc.HTTP_RESPONSE_HEADER_PREFIX + name] = (headers[name][:256],)
    tally.facts["span_attributes"] = facts
    if not tally.stream_requested:
        return None
    return SSEParser()


class Reader:
    """Feeds body bytes to the parser and the tally; finalizes the tally once.

    ``fast`` is the parser's ``count`` once the body can be counted as it comes (an
    event stream, not compressed, first byte and first completion chunk seen): the
    bodies then inline :meth:`feed`. ``head`` holds the body until then."""

    __slots__ = ("_inflate", "fast", "head", "parser", "tally")

    def __init__(self, tally: Tally, parser: SSEParser | None) -> None:
        self.tally = tally
        self.parser = parser
        enc = (tally.content_encoding or "").lower()
        self._inflate = (
            zlib.decompressobj(16 + zlib.MAX_WBITS if "gzip" in enc else zlib.MAX_WBITS)
            if parser is not None and enc in ("gzip", "deflate", "x-gzip")
            else None
        )
        self.fast: Callable[[bytes], int] | None = None
        self.head: bytes | None = b"" if parser is not None and self._inflate is None else None

    def feed(self, chunk: bytes) -> None:
        tally = self.tally
        if not tally.bytes:
            tally.facts["t_first_byte"] = time.perf_counter_ns()
        tally.bytes += len(chunk)
        parser = self.parser
        if parser is None:
            return
        if self._inflate is not None:
            chunk = self._inflate.decompress(chunk)
        new = parser.count(chunk)
        if new:
            tally.unit(new)
        head = self.head
        if head is None:
            return
        if _COMPLETION[0] in chunk or _COMPLETION[1] in chunk or len(head) + len(chunk) > _HEAD_MAX:
            self.head = None  # the model speaks (or too long to keep): count from now on
            if tally.bytes:
                self.fast = parser.count
        else:
            self.head = head + chunk

    def end(self, end: End, exc: BaseException | None = None, last: bytes = b"") -> None:
        """Finish the tally (once); ``last`` is the last read of the body."""
        tally = self.tally
        if tally.finished:
            return
        parser = self.parser
        if parser is not None:
            parser.close()
            tally.terminal_seen = parser.done
            tally.error_events = parser.error_events
            tally.malformed = parser.malformed
            tally.gzip_magic = parser.gzip_magic and not tally.content_encoding
            tally.pending_fields = parser.pending_fields
            tally.comments = parser.comments
            if parser.first_error:
                tally.facts["malformed_why"] = parser.first_error
            if parser.data_events and self._inflate is None:
                self._payloads(parser, last)
        elif tally.status is not None and tally.bytes:
            tally.unit()  # a whole non-stream response is one unit
        if exc is not None:
            tally.exc_type = type(exc).__name__
        self._span_facts()
        tally.finish(end)

    def _payloads(self, parser: SSEParser, last: bytes) -> None:
        """Once per stream: a stream with no completion chunk (its kept head), or one that
        ended without ``[DONE]`` or with an error event (its last read), parsed for what the
        counting parser cannot tell: annotations only, an error object, the error's text."""
        tally = self.tally
        try:
            if self.head is not None:
                events = _events(self.head)
            elif not parser.done or parser.error_events:
                events = _events(last)
            else:
                return
            kinds = [(event, obj, payload_kind(obj)) for event, obj in events]
            if self.head is not None and all(k is not Payload.COMPLETION for *_, k in kinds):
                tally.annotations = sum(k is Payload.ANNOTATION for *_, k in kinds)
            for event, obj, kind in kinds:
                if kind is not Payload.ERROR and event.event != "error":
                    continue
                if not _counted(event):  # an error the counting parser let pass as a chunk
                    tally.error_events += 1
                if "upstream_said" not in tally.facts:
                    said = upstream_text(obj if obj is not None else event.data)
                    tally.facts["upstream_said"] = said
        except Exception:
            rt = active()
            if rt is not None:
                rt.bookkeeping_error(sc.GATEWAY, "payloads")

    def _span_facts(self) -> None:
        tally = self.tally
        span = tally.span
        if span is None:
            return
        attrs = dict(tally.facts.get("span_attributes", {}))
        attrs[sc.A_BYTES] = tally.bytes
        attrs[sc.HTTP_RESPONSE_BODY_SIZE] = tally.bytes
        attrs[sc.A_DONE] = tally.terminal_seen
        attrs[sc.A_COMMENTS] = tally.comments
        if tally.t_headers is not None:
            attrs["chunkwatch.time_to_headers"] = (tally.t_headers - tally.t_start) / 1e9
        first_byte = tally.facts.get("t_first_byte")
        if first_byte is not None:
            attrs["chunkwatch.time_to_first_byte"] = (first_byte - tally.t_start) / 1e9
        span.set_attributes(attrs)


def _json(data: str) -> object:
    try:
        return json.loads(data)
    except ValueError:
        return None


def _events(body: bytes) -> list[tuple[Event, object]]:
    """The whole events in ``body`` (a stream's head or its last read, which may start in
    the middle of an event: a cut line is an unknown field, ignored), with their JSON."""
    parser = SSEParser(collect=True, strict_json=False)
    return [(event, _json(event.data)) for event in parser.feed(body) if event.data != "[DONE]"]


def _counted(event: Event) -> bool:
    """Whether the counting parser counted this event as an error event already."""
    data = event.data.strip()
    return event.event == "error" or data.startswith(('{"error":', '{ "error":'))
