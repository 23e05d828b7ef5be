"""The one reader of a streamed chat-completions response body: bytes in, evidence out.

Sans-IO: no sockets, no OpenTelemetry, no metrics, no clock. The caller gives the head
facts (``Content-Encoding``; whether the body is read as an event stream), feeds the
body's reads as they arrive and closes it; :class:`WireReader` answers with
:class:`WireEvidence`. The gateway probe (:mod:`chunkwatch.probes.gateway`) and the
doctor's wire step (:mod:`chunkwatch.doctor.wire_step`) both read bodies with it, so a
body gets one reading wherever it is read; :func:`record` writes the evidence into a
tally for :func:`chunkwatch.outcomes.classify`. Bytes, units and their timing are the
caller's: :meth:`WireReader.feed` returns the data events a read completed.

What it reads:

* **Content-Encoding**: ``gzip`` / ``x-gzip`` (several members one after another too)
  and ``deflate``, zlib-wrapped as RFC 9110 says or raw as many servers send it (told
  apart by trying the wrapper first and replaying the bytes raw if it fails before any
  output). Any other coding is read as it came.
* **SSE framing**: the counting mode of the shared strict parser
  (:class:`chunkwatch.sse.SSEParser`): data events (``[DONE]`` noted, not counted),
  comments, ``event: error`` and ``{"error": ...}`` events, payloads that are not a
  JSON object (``malformed``, checked by shape, not decoded), field lines never
  dispatched (no blank lines), and a body that starts with the gzip magic bytes (gzip
  that nobody declared, or decoded once and compressed twice).
* **Payload kinds** (:func:`chunkwatch.outcomes.payload_kind`), once per stream, never
  per event: until the first read that holds a completion chunk (a byte search) the
  decoded body is kept, up to :data:`HEAD_MAX` bytes. A stream that ends before one is
  parsed whole: data events that are all annotations (``choices: []``: prompt-filter
  results, usage) make ``annotations``, and the stream is empty. A stream that ends
  without ``[DONE]`` or with an error event has its **last read** parsed: an object
  that is not a chunk (``{"message": ...}``) is an error event, and the first error's
  text (bounded, keys redacted: :func:`chunkwatch.outcomes.upstream_text`) is
  ``upstream_said``. An in-band error split across two reads, or followed by
  ``[DONE]`` in a later read, is not read here (the sdk layer sees every chunk).

**A decompression error is malformed.** A body whose declared ``Content-Encoding``
does not decode is not what its headers say, and a client's own decoder fails on it
too (httpx raises ``DecodingError``, which the rules read as malformed): it is
evidence about the wire, ``malformed`` with ``malformed_why`` "Content-Encoding gzip
does not decode: ...", never chunkwatch's own bookkeeping error. Reading stops there:
what came before stands, nothing after is parsed. A body cut inside its compressed
stream is not a decode error: its end tells (no ``[DONE]``: truncated).

Once :meth:`WireReader.feed` has seen the first completion chunk of a body that needs
no decoding, :attr:`WireReader.fast` offers the parser's own counter: a caller on a hot
path may count the remaining reads with it (one call a read) and pass the body's last
read to :meth:`WireReader.close`. The gateway probe's body loop does.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chunkwatch.outcomes import Payload, payload_kind, upstream_text
from chunkwatch.sse import Event, SSEParser

if TYPE_CHECKING:
    from chunkwatch.ledger import Tally

__all__ = ["HEAD_MAX", "WireEvidence", "WireReader", "decoder_for", "record"]

HEAD_MAX = 8 * 1024  # decoded body bytes kept while no completion chunk has come
_COMPLETION = (b'"choices":[{', b'"choices": [{')  # a chunk with choices, as JSON writes it
_GZIP = 16 + zlib.MAX_WBITS


class _Decoder:
    """One body's Content-Encoding, decoded as it comes. ``decode`` raises ``zlib.error``."""

    __slots__ = ("_obj", "_replay", "_wbits", "name")

    def __init__(self, name: str, wbits: int) -> None:
        self.name = name
        self._wbits = wbits
        self._obj = zlib.decompressobj(wbits)
        # deflate: the input kept until the first output, to replay it raw if the
        # zlib wrapper turns out to be missing (None: the wrapper question is settled)
        self._replay: bytes | None = b"" if wbits == zlib.MAX_WBITS else None

    def decode(self, data: bytes) -> bytes:
        if self._replay is not None:
            return self._deflate(data)
        out = self._obj.decompress(data)
        while self._wbits == _GZIP and self._obj.eof and self._obj.unused_data:
            rest = self._obj.unused_data  # the next gzip member
            self._obj = zlib.decompressobj(_GZIP)
            out += self._obj.decompress(rest)
        return out

    def _deflate(self, data: bytes) -> bytes:
        assert self._replay is not None
        self._replay += data
        try:
            out = self._obj.decompress(data)
        except zlib.error:
            seen, self._replay = self._replay, None
            self._wbits = -zlib.MAX_WBITS  # raw deflate, no zlib header
            self._obj = zlib.decompressobj(self._wbits)
            return self._obj.decompress(seen)  # raises if it is not raw deflate either
        if out or self._obj.eof:
            self._replay = None
        return out


def decoder_for(content_encoding: str | None) -> _Decoder | None:
    """The decoder of a ``Content-Encoding`` value (None: read the bytes as they are)."""
    enc = (content_encoding or "").strip().lower()
    if enc in ("gzip", "x-gzip"):
        return _Decoder(enc, _GZIP)
    if enc == "deflate":
        return _Decoder(enc, zlib.MAX_WBITS)
    return None


@dataclass(slots=True)
class WireEvidence:
    """What one body said, as :func:`chunkwatch.outcomes.classify` needs it."""

    data_events: int = 0  # dispatched events with data, [DONE] excluded
    events: int = 0  # dispatched events, [DONE] included
    comments: int = 0
    done: bool = False  # `data: [DONE]` was dispatched
    error_events: int = 0
    annotations: int = 0  # data events of a stream with no completion: none the model's
    malformed: int = 0
    malformed_why: str | None = None  # why the first malformed thing was malformed
    gzip_magic: bool = False
    pending_fields: int = 0  # field lines never followed by a blank line
    upstream_said: str | None = None  # the first in-band error's text, bounded and redacted


class WireReader:
    """Reads one response body (see the module doc).

    ``parser``: the counting parser to read an event stream with (None: the body is
    not read as one, only decoded and kept). ``keep``: decoded bytes to keep in
    :attr:`kept` (an error page, a whole answer). ``on_event``: called with each
    dispatched event, for a caller that wants to look at payloads (the doctor's
    finish reasons and usage); it sees the events, never changes the evidence."""

    __slots__ = (
        "_decode_error",
        "_decoder",
        "_evidence",
        "_keep",
        "_last",
        "_on_event",
        "_view",
        "fast",
        "head",
        "kept",
        "parser",
    )

    def __init__(
        self,
        content_encoding: str | None,
        *,
        parser: SSEParser | None,
        keep: int = 0,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        if getattr(parser, "collect", False):  # (a stand-in parser may have no such flag)
            raise ValueError("WireReader reads with a counting parser (collect=False)")
        self.parser = parser
        self._decoder = decoder_for(content_encoding)
        self._decode_error: str | None = None
        self._keep = keep
        self.kept = b""
        self._on_event = on_event
        self._view = SSEParser(collect=True, strict_json=False) if on_event else None
        self._last = b""
        self._evidence: WireEvidence | None = None
        self.fast: Callable[[bytes], int] | None = None  # the parser's counter, when offered
        self.head: bytes | None = b"" if parser is not None else None

    def feed(self, chunk: bytes) -> int:
        """Read one piece of the body; the data events it completed."""
        decoder = self._decoder
        if decoder is not None:
            if self._decode_error is not None:
                return 0
            try:
                chunk = decoder.decode(chunk)
            except zlib.error as err:
                self._decode_error = f"Content-Encoding {decoder.name} does not decode: {err}"
                return 0
        if len(self.kept) < self._keep:
            self.kept += chunk[: self._keep - len(self.kept)]
        parser = self.parser
        if parser is None:
            return 0
        self._last = chunk
        if self._view is not None and self._on_event is not None:
            for event in self._view.feed(chunk):
                self._on_event(event)
        new = parser.count(chunk)
        head = self.head
        if head is not None:
            if (
                _COMPLETION[0] in chunk
                or _COMPLETION[1] in chunk
                or len(head) + len(chunk) > HEAD_MAX
            ):
                self.head = None  # the model speaks (or too long to keep): count from now on
                if decoder is None:
                    self.fast = parser.count
            else:
                self.head = head + chunk
        return new

    def close(self, last: bytes | None = None) -> WireEvidence:
        """End of the body: the evidence (the same object on later calls). ``last``: the
        body's last read, when the caller counted the reads after :attr:`fast` was offered
        itself (the reader did not see them); None when every read went to :meth:`feed`."""
        if self._evidence is not None:
            return self._evidence
        ev = self._evidence = WireEvidence()
        if self._decode_error is not None:
            ev.malformed, ev.malformed_why = 1, self._decode_error
        parser = self.parser
        if parser is None:
            return ev
        parser.close()
        if self._view is not None and self._on_event is not None:
            for event in self._view.close():
                self._on_event(event)
        ev.data_events, ev.events, ev.comments = parser.data_events, parser.events, parser.comments
        ev.done, ev.error_events = parser.done, parser.error_events
        ev.malformed += parser.malformed
        ev.malformed_why = ev.malformed_why or parser.first_error
        ev.gzip_magic, ev.pending_fields = parser.gzip_magic, parser.pending_fields
        if parser.data_events:
            _payloads(ev, self.head, last if last is not None and self.fast else self._last)
        return ev


def _payloads(ev: WireEvidence, head: bytes | None, last: bytes) -> None:
    """Once per stream: a stream with no completion chunk (its kept head), or one that
    ended without ``[DONE]`` or with an error event (its last read), parsed for what the
    counting cannot tell: annotations only, an error object, the error's text."""
    if head is not None:
        events = _events(head)
    elif not ev.done or ev.error_events:
        events = _events(last)
    else:
        return
    kinds = [(event, obj, payload_kind(obj)) for event, obj in events]
    if head is not None and all(k is not Payload.COMPLETION for *_, k in kinds):
        ev.annotations = sum(k is Payload.ANNOTATION for *_, k in kinds)
    for event, obj, kind in kinds:
        if kind is not Payload.ERROR and event.event != "error":
            continue
        if not _counted(event):  # an error the counting parser let pass as a chunk
            ev.error_events += 1
        if ev.upstream_said is None:
            ev.upstream_said = upstream_text(obj if obj is not None else event.data)


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


def record(ev: WireEvidence, tally: Tally) -> None:
    """Write ``ev`` into ``tally`` (units and bytes are the caller's, counted as read)."""
    tally.terminal_seen = ev.done
    tally.error_events = ev.error_events
    tally.annotations = ev.annotations
    tally.malformed = ev.malformed
    tally.gzip_magic = ev.gzip_magic
    tally.pending_fields = ev.pending_fields
    tally.comments = ev.comments
    if ev.malformed_why is not None:
        tally.malformed_why = ev.malformed_why
    if ev.upstream_said is not None:
        tally.upstream_said = ev.upstream_said
