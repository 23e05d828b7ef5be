"""The one SSE parser and writer: framing rules, counters, and split-anywhere robustness."""

from __future__ import annotations

import gzip
import json

import pytest

from chunkwatch.sse import Event, SSEParser, format_comment, format_event

CHUNK = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'


def feed_all(parser: SSEParser, body: bytes, step: int | None = None) -> list[Event]:
    out: list[Event] = []
    pieces = [body] if step is None else [body[i : i + step] for i in range(0, len(body), step)]
    for piece in pieces:
        out.extend(parser.feed(piece))
    out.extend(parser.close())
    return out


def test_counts_data_events_done_and_comments() -> None:
    """Data events exclude [DONE]; [DONE] and comments are noted separately."""
    p = SSEParser()
    feed_all(p, b": open\n\n" + CHUNK * 3 + b"data: [DONE]\n\n")
    assert (p.events, p.data_events, p.comments, p.done) == (4, 3, 1, True)
    assert p.malformed == 0 and p.pending_fields == 0


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_any_split_and_any_line_ending_gives_the_same_events(step: int, eol: bytes) -> None:
    """Events are the same however the bytes are cut, with LF, CRLF or CR line endings."""
    body = (b"event: token" + eol + b"data: a" + eol + b"data: b" + eol + eol) * 3
    body += b"data: [DONE]" + eol + eol
    p = SSEParser(collect=True, strict_json=False)
    events = feed_all(p, body, step)
    assert [e.data for e in events] == ["a\nb"] * 3 + ["[DONE]"]
    assert [e.event for e in events][:3] == ["token"] * 3
    assert p.data_events == 3 and p.done


def test_events_without_blank_lines_are_never_dispatched() -> None:
    """A body of data lines with no blank line is zero events, flagged as pending fields."""
    p = SSEParser()
    feed_all(p, b'data: {"a": 1}\ndata: {"a": 2}\ndata: [DONE]\n')
    assert p.events == 0 and p.data_events == 0
    assert p.pending_fields == 1


def test_counting_mode_flags_cut_json_and_error_payloads() -> None:
    """Counting mode notices a JSON object cut short and an OpenAI-style error payload."""
    p = SSEParser()
    feed_all(p, b'data: {"id": "x", "choi\n\n' + b'data: {"error": {"message": "boom"}}\n\n')
    assert p.malformed == 1 and p.error_events == 1
    assert p.first_error == "data is not a JSON object"


def test_collecting_mode_validates_json_strictly() -> None:
    """Collecting mode parses every payload: invalid JSON is malformed, with the reason."""
    p = SSEParser(collect=True)
    events = feed_all(p, b"data: {\"a\": [1,}\n\n" + CHUNK)
    assert len(events) == 2 and p.malformed == 1
    assert p.first_error is not None and p.first_error.startswith("data is not JSON")


def test_event_error_is_counted_once() -> None:
    """``event: error`` counts as one error event, with or without an "error" key in its data."""
    p = SSEParser()
    feed_all(p, b"event: error\ndata: {}\n\n")
    assert p.error_events == 1
    for collect in (False, True):
        p = SSEParser(collect=collect)
        feed_all(p, b'event: error\ndata: {"error": {"message": "x"}}\n\n')
        assert p.error_events == 1


def test_an_event_without_data_is_not_dispatched() -> None:
    """WHATWG: a blank line after only ``event:`` dispatches nothing and resets the name."""
    p = SSEParser(collect=True, strict_json=False)
    events = feed_all(p, b"event: ping\n\ndata: x\n\n")
    assert [(e.event, e.data) for e in events] == [("", "x")]
    assert p.events == 1


@pytest.mark.parametrize("step", [None, 1])
def test_gzip_magic_is_noticed(step: int | None) -> None:
    """A gzip body (magic bytes first) is flagged, even when the first read is one byte."""
    p = SSEParser()
    feed_all(p, gzip.compress(CHUNK), step)
    assert p.gzip_magic and p.data_events == 0


def test_undecodable_data_is_malformed_in_collecting_mode() -> None:
    """Bytes that are not UTF-8 make the event malformed instead of raising."""
    p = SSEParser(collect=True, strict_json=False)
    assert feed_all(p, b"data: \xff\xfe\n\n") == []
    assert p.undecodable and p.malformed == 1


def test_writer_round_trips_through_the_parser() -> None:
    """What format_event writes, the parser reads back identically, multi-line data too."""
    payload = {"text": "line one\nline two", "n": 2}
    body = format_comment("open") + format_event(json.dumps(payload), event="token", id="7")
    body += format_event("x\ny", event="update")
    p = SSEParser(collect=True, strict_json=False)
    events = feed_all(p, body)
    assert events[0] == Event(data=json.dumps(payload), event="token", id="7")
    assert events[1].data == "x\ny" and p.comments == 1


def test_writer_refuses_line_breaks_in_field_names() -> None:
    """An event name with a newline would forge events: it is refused."""
    with pytest.raises(ValueError, match="line break"):
        format_event("x", event="token\ndata: forged")


BODIES = [
    b": open\n\n" + CHUNK * 5 + b"data: [DONE]\n\n",
    b"event: token\ndata: a\ndata: b\n\n" + CHUNK + b"\n\n" + CHUNK + b": hb\n\n",
    b'data: {"error": {"message": "x"}}\n\nevent: error\ndata: {}\n\n' + CHUNK,
    b'data: {"cut\n\n' + CHUNK.replace(b"\n", b"\r\n") + CHUNK,
    b'data: {"a": 1}\ndata: {"a": 2}\n' * 3,
    b"data:  { }  \n\nid: 7\nretry: 5\ndata: {}\n\n:\n\n" + CHUNK[:-1],
]


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("step", [None, 1, 5, 40])
def test_counting_fast_path_counts_like_the_line_rules(body: bytes, step: int | None) -> None:
    """Counting mode's block fast path gives the same counters as the strict line rules
    (collecting mode with the same shape check), however the bytes are cut."""
    fast, strict = SSEParser(), SSEParser(collect=True, strict_json=False)
    feed_all(fast, body, step)
    feed_all(strict, body, step)
    fields = ("events", "data_events", "comments", "done", "error_events", "malformed",
              "pending_fields", "bytes")
    assert {f: getattr(fast, f) for f in fields} == {f: getattr(strict, f) for f in fields}


def test_a_long_body_without_blank_lines_is_read_line_by_line() -> None:
    """Counting mode does not hold an endless event raw: past 64 KiB it reads lines."""
    p = SSEParser()
    line = b'data: {"a": 1}\n'
    for _ in range(10_000):
        p.feed(line)
    assert len(p._buf) < 100
    p.close()
    assert p.events == 0 and p.pending_fields == 1
