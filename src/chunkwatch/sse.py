"""One strict Server-Sent Events parser and writer, shared by every part of chunkwatch.

The parser follows the WHATWG event-stream rules (lines end in CRLF, LF or CR; a
blank line dispatches an event; ``:`` starts a comment; an event without a blank
line after it is never dispatched) and is incremental: feed it bytes as they
arrive, in whatever pieces the network delivers.

It runs in two modes:

* **counting** (``collect=False``, the gateway probe's hot path): no objects per
  event, no decoding, only integer counters and a cheap shape check of each
  ``data:`` payload.
* **collecting** (``collect=True``, the doctor and the tests): every dispatched
  event is returned as an :class:`Event`, and each ``data:`` payload that is not
  ``[DONE]`` is checked as JSON (``strict_json=True``).

Either way the counters describe the stream: dispatched events, events with
data, comments, ``[DONE]`` seen, error events, malformed payloads, and
field lines left pending at the end (events without a blank line).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = ["Event", "SSEParser", "WholeEvent", "format_comment", "format_event"]

_GZIP_MAGIC = b"\x1f\x8b"
_DONE = b"[DONE]"
_DONE_EVENT = b"data: [DONE]\n\n"
_DONE_LINE = b"data: [DONE]"
_MAX_RAW_BLOCK = 64 * 1024  # an unfinished event kept raw in counting mode, at most


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched event: ``event`` is ``""`` when the stream named none."""

    data: str
    event: str = ""
    id: str | None = None

    def json(self) -> object:
        return json.loads(self.data)


class SSEParser:
    """Incremental event-stream parser with counters.

    ``feed(chunk)`` returns the events completed by ``chunk`` (always an empty list
    in counting mode); ``close()`` ends the stream and returns nothing new, since
    an event without its blank line is never dispatched (it is counted in
    ``pending_fields``).
    """

    __slots__ = (
        "_buf",
        "_data",
        "_event",
        "_has_data",
        "_id",
        "_sniffed",
        "collect",
        "comments",
        "data_events",
        "done",
        "error_events",
        "events",
        "first_error",
        "gzip_magic",
        "idle",
        "malformed",
        "pending_fields",
        "strict_json",
        "undecodable",
    )

    def __init__(self, *, collect: bool = False, strict_json: bool | None = None) -> None:
        self.collect = collect
        self.strict_json = collect if strict_json is None else strict_json
        self._buf = b""
        self._data: list[bytes] = []
        self._has_data = False
        self._event = b""
        self._id: bytes | None = None
        # Counting mode, no event half-parsed and no bytes held back: the next chunk starts
        # a new event (the one-event path of count(), and SSEBody's WholeEvent, are open).
        # So is a counting parser's first chunk: one the one-event path takes does not start
        # with the gzip magic; any other goes through the rules, which look for it.
        self.idle = not collect
        self._sniffed = 0  # bytes seen while looking for the gzip magic
        self.events = 0  # dispatched events (with or without data)
        self.data_events = 0  # dispatched events with data, [DONE] excluded
        self.comments = 0
        self.done = False  # a `data: [DONE]` event was dispatched
        self.error_events = 0  # `event: error`, or a JSON payload with an "error" key
        self.malformed = 0  # data payloads that are not JSON objects
        self.first_error: str | None = None  # why the first malformed payload was malformed
        self.gzip_magic = False  # the body starts with the gzip magic bytes
        self.undecodable = False  # a line that is not UTF-8 (collecting mode only)
        self.pending_fields = 0  # field lines never followed by a blank line (seen at close)

    # -- feeding ---------------------------------------------------------------------------

    def count(self, chunk: bytes) -> int:
        """Counting mode: feed ``chunk``; return how many data events (``[DONE]`` aside)
        it completed. The common read, exactly one ``data: {"...}`` event (with an
        ``event:`` line before it, or not), is recognised with a few C-speed byte
        operations, cheaper than the line rules and than method calls such as
        ``bytes.startswith`` (slices and indexes where they can; the measured figures are
        ``bench/probe_instructions.py``'s, in ``bench/RESULTS.md``)."""
        if self.idle:
            if chunk[:8] == b'data: {"':  # the model's events: two memchr scans
                line, _, rest = chunk.partition(b"\n")
                ok = (
                    rest == b"\n"  # one line, then the blank line, and nothing after it
                    and line[-1] == 125  # }
                    and (line[8] != 101 or line[8:15] != b'error":')  # 101: e
                    and 13 not in line  # CR; an int probe skips the argument parsing
                )
            elif chunk[:7] == b"event: ":  # named events: one pass over the lines
                lines = chunk.splitlines()  # LF, CR or CRLF, as the rules read them
                ok = len(lines) == 3 and not lines[2] and chunk[-1] == 10
                if ok:
                    data = lines[1]
                    ok = (
                        lines[0] != b"event: error"
                        and data[:8] == b'data: {"'
                        and data[-1] == 125
                        and (data[8] != 101 or data[8:15] != b'error":')
                    )
            elif chunk == _DONE_EVENT:  # the end of an OpenAI stream, alone in its read
                self.events += 1
                self.done = True
                return 0
            elif chunk[:1] == b":":  # a comment alone (an SSE server's opening or heartbeat)
                line, _, rest = chunk.partition(b"\n")
                if rest == b"\n" and 13 not in line:
                    self.comments += 1
                    self._sniffed = 2  # the start of the body was read: no gzip magic there
                    return 0
                ok = False
            else:
                ok = False
            if ok:
                self.events += 1
                self.data_events += 1
                return 1
        before = self.data_events
        self._rules(chunk)
        return self.data_events - before

    def feed(self, chunk: bytes) -> list[Event]:
        if self.idle:
            self.count(chunk)  # the one-event fast path, else the rules
            return []
        return self._rules(chunk)

    def _rules(self, chunk: bytes) -> list[Event]:
        out = self._rules_once(chunk)
        self.idle = self._sniffed > 1 and not self._buf and self._counting_between_events()
        return out

    def _counting_between_events(self) -> bool:
        """Counting mode, and no event half-parsed (no field line since the last blank)."""
        return not self.collect and not self._has_data and not self._event and self._id is None

    def _rules_once(self, chunk: bytes) -> list[Event]:
        if not chunk:
            return []
        buf = self._buf + chunk if self._buf else chunk
        if self._sniffed < 2:
            if self.events:  # the one-event path read the start: no magic there
                self._sniffed = 2
            else:
                self._sniffed += len(chunk)
                if buf[:2] == _GZIP_MAGIC:
                    self.gzip_magic = True
        if self._counting_between_events() and 13 not in buf:  # no CR
            self._blocks(buf)
            return []
        # Cut after the last line terminator, but hold back a trailing CR: it may be
        # the first half of a CRLF split across two reads.
        end = len(buf)
        if buf[-1:] == b"\r":
            end -= 1
        cut = max(buf.rfind(b"\n", 0, end), buf.rfind(b"\r", 0, end))
        if cut < 0:
            self._buf = buf
            return []
        self._buf = buf[cut + 1 :]
        return self._lines(buf[: cut + 1].splitlines())

    def close(self) -> list[Event]:
        """End of stream. A trailing line without terminator still counts as a line."""
        out: list[Event] = []
        if self._buf:
            rest, self._buf = self._buf, b""
            out = self._lines(rest.splitlines())
        if self._has_data:
            self.pending_fields += 1
        self._reset()
        return out

    # -- internals ---------------------------------------------------------------------------

    def _blocks(self, buf: bytes) -> None:
        """Counting mode, LF line endings, no event half-parsed: split into lines (a
        single-byte split, at memchr speed) and take the common event, one
        ``data: {"...}`` line and a blank line, with two byte comparisons; anything else
        goes through the line rules. Same counts as :meth:`_lines`, at a fraction of the
        cost (``bench/probe_instructions.py``)."""
        lines = buf.split(b"\n")
        stop = len(lines) - 2  # an event at i is complete when lines[i + 1] ends too
        i = fast = 0
        while i < stop:
            line = lines[i]
            if not lines[i + 1]:
                if (
                    line.startswith(b'data: {"')
                    and line.endswith(b"}")
                    and (line[8] != 101 or not line.startswith(b'data: {"error":'))
                ):
                    fast += 1
                    i += 2
                    continue
                if line == _DONE_LINE:  # the stream's end, after its last chunks
                    self.events += 1
                    self.done = True
                    i += 2
                    continue
            j = i  # the line rules, up to this event's blank line
            while j <= stop and lines[j]:
                j += 1
            if j > stop:
                break  # the event is still arriving
            self._lines([*lines[i:j], b""])
            i = j + 1
        self.events += fast
        self.data_events += fast
        self._buf = b"\n".join(lines[i:])  # the event still arriving, raw
        if len(self._buf) > _MAX_RAW_BLOCK:  # long without a blank line: go line by line
            cut = self._buf.rfind(b"\n") + 1
            if cut:
                head, self._buf = self._buf[:cut], self._buf[cut:]
                self._lines(head.split(b"\n")[:-1])  # leaves the event pending: line mode

    def _reset(self) -> None:
        self._data = []
        self._has_data = False
        self._event = b""
        self._id = None

    def _lines(self, lines: list[bytes]) -> list[Event]:
        out: list[Event] = []
        for line in lines:
            if not line:
                if self._has_data:
                    ev = self._dispatch()
                    if ev is not None:
                        out.append(ev)
                else:  # WHATWG: no data, no event; the event name is reset
                    self._reset()
                continue
            if line[0] == 58:  # b":"
                self.comments += 1
                continue
            name, sep, value = line.partition(b":")
            if sep and value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self._data.append(value)
                self._has_data = True
            elif name == b"event":
                self._event = value
            elif name == b"id":
                self._id = value
            # `retry` and unknown fields are ignored, as the spec says
        return out

    def _dispatch(self) -> Event | None:
        self.events += 1
        data = b"\n".join(self._data) if len(self._data) != 1 else self._data[0]
        event, id_ = self._event, self._id
        self._reset()
        flagged = False
        if data == _DONE:
            self.done = True
        else:
            self.data_events += 1
            flagged = self._check(data, named_error=event == b"error")
        if not self.collect:
            return None
        try:
            return Event(
                data=data.decode(),
                event=event.decode(),
                id=None if id_ is None else id_.decode(),
            )
        except UnicodeDecodeError:
            self.undecodable = True
            if not flagged:
                self._malformed("data is not UTF-8")
            return None

    def _check(self, data: bytes, *, named_error: bool) -> bool:
        """Count what ``data`` reveals; True when it is malformed. One error event at most."""
        if named_error:
            self.error_events += 1
        if self.strict_json:
            try:
                obj = json.loads(data)
            except (ValueError, UnicodeDecodeError) as err:
                return self._malformed(f"data is not JSON: {err}")
            if not isinstance(obj, dict):
                return self._malformed("data is JSON but not an object")
            if obj.get("error") is not None and not named_error:
                self.error_events += 1
            return False
        # Counting mode: a shape check that costs two byte comparisons, plus a
        # substring search only for payloads that may carry an error.
        stripped = data.strip()
        if stripped[:1] != b"{" or stripped[-1:] != b"}":
            return self._malformed("data is not a JSON object")
        if not named_error and (stripped[:9] == b'{"error":' or stripped[:10] == b'{ "error":'):
            self.error_events += 1
        return False

    def _malformed(self, why: str) -> bool:
        self.malformed += 1
        if self.first_error is None:
            self.first_error = why
        return True


# -- writing -------------------------------------------------------------------------------


class WholeEvent(bytes):
    """The bytes of one whole event, as :func:`format_event` encodes it: a parser that is
    between events dispatches exactly one event from them (a ``data:`` line is always
    written, and the blank line that ends the event). The ``sse`` probe counts such a chunk
    without parsing it again; any other bytes it parses. Operations on it (``+``,
    slicing) return plain ``bytes``."""

    __slots__ = ()


def format_event(data: str, event: str | None = None, id: str | None = None) -> WholeEvent:
    """Encode one event. Multi-line data becomes several ``data:`` lines."""
    parts = []
    if event:
        _check_field(event)
        parts.append(f"event: {event}\n")
    if id is not None:
        _check_field(id)
        parts.append(f"id: {id}\n")
    for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        parts.append(f"data: {line}\n")
    parts.append("\n")
    return WholeEvent("".join(parts), "utf-8")


def format_comment(text: str = "") -> bytes:
    """A comment line (``: text``): ignored by clients, keeps proxies and timers awake."""
    _check_field(text)
    return f": {text}\n\n".encode() if text else b":\n\n"


def _check_field(value: str) -> None:
    if "\n" in value or "\r" in value:
        raise ValueError(f"an SSE field value cannot contain a line break: {value!r}")
