"""The one SSE parser and writer: framing rules, counters, and split-anywhere robustness."""

from __future__ import annotations

import gzip
import json
import random

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
    events = feed_all(p, b'data: {"a": [1,}\n\n' + CHUNK)
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


@pytest.mark.parametrize("first", [CHUNK, b"data: [DONE]\n\n", b": open\n\n"])
def test_the_gzip_magic_counts_only_at_the_start(first: bytes) -> None:
    """A counting parser's first read may take the one-event path; the magic bytes in a
    later read are then not the start of the body, as the line rules say too."""
    fast, strict = SSEParser(), SSEParser(collect=True, strict_json=False)
    for parser in (fast, strict):
        for read in (first, b"\x1f\x8b" + CHUNK, CHUNK):
            parser.feed(read)
    assert not fast.gzip_magic and not strict.gzip_magic
    assert (fast.events, fast.done) == (strict.events, strict.done)


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
    fields = (
        "events",
        "data_events",
        "comments",
        "done",
        "error_events",
        "malformed",
        "pending_fields",
    )
    assert {f: getattr(fast, f) for f in fields} == {f: getattr(strict, f) for f in fields}


# Reads of exactly one event each: the shapes the one-event fast path takes, and the
# near misses it must leave to the line rules.
ONE_EVENT_READS = [
    b": open\n\n",
    b":\n\n",
    b": cr\r\n\r\n",
    b": two\n\n: comments\n\n",
    b": half\n",
    b"\n",
    CHUNK + b"data: [DONE]\n\n",
    b"data: [DONE]\n\n" + CHUNK,
    CHUNK,
    b'event: token\ndata: {"text": "hi"}\n\n',
    b'event: error\ndata: {"message": "boom"}\n\n',
    b'data: {"error": {"message": "x"}}\n\n',
    b'event: token\ndata: {"error": "named, not an error event"}\n\n',
    b'data: { "error": 1}\n\n',
    b'data: {"a": 1} \n\n',
    b'data: {"a": 1}\r\n\r\n',
    b'data: {"a": 1}\rdata: {"b": 2}\n\n',
    b'data: {"a": 1,\r: "b": 2}\n\n',
    b'data: {"a": 1}\ndata: {"b": 2}\n\n',
    b'event: token\nid: 3\ndata: {"a": 1}\n\n',
    b'event:token\ndata: {"a": 1}\n\n',
    b'data: {"cut\n\n',
    b'data: {"a": 1]\n\n',
    b'data: {"\n\n',
    b'data: {"}\n\n',
    b'event: token\ndata: {"a": 1\n\n',
    b"data: [DONE]\n\n",
    b'data: {"half": ',
    b"1}\n\n",
    b"event: token\n",
    b'data: {"a": 1}\n\n',
    CHUNK + CHUNK,
    b"",
    CHUNK,
]


@pytest.mark.parametrize("first", [b"", CHUNK, b"\x1f\x8b"])
def test_one_event_reads_count_like_the_line_rules(first: bytes) -> None:
    """Reads of one event each (how a paced stream arrives) take the one-event fast
    path where they can, and every counter still matches the strict line rules."""
    fast, strict = SSEParser(), SSEParser(collect=True, strict_json=False)
    for parser in (fast, strict):
        for read in [first, *ONE_EVENT_READS]:
            parser.feed(read)
        parser.close()
    fields = (
        "events",
        "data_events",
        "comments",
        "done",
        "error_events",
        "malformed",
        "pending_fields",
        "gzip_magic",
    )
    assert {f: getattr(fast, f) for f in fields} == {f: getattr(strict, f) for f in fields}
    assert fast.error_events == 4 and fast.malformed == 5


PIECES = [
    *ONE_EVENT_READS,
    b"\n",
    b"\r\n",
    b"\r",
    b"data: x\n",
    b": c\n",
    b"id: 1\n",
    b"event: token\n",
    b"event: error\n",
    b'data: {"a": 1}\n',
    b'data: {"error": 1}\n',
]


@pytest.mark.parametrize("seed", range(20))
def test_counting_mode_counts_like_the_line_rules_on_random_streams(seed: int) -> None:
    """Random streams (valid, cut and malformed pieces) read in random cuts: counting
    mode's fast paths and the strict line rules always agree on every counter."""
    rng = random.Random(seed)
    body = b"".join(rng.choice(PIECES) for _ in range(300))
    cuts = sorted(rng.sample(range(1, len(body)), 150))
    reads = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    fast, strict = SSEParser(), SSEParser(collect=True, strict_json=False)
    for parser in (fast, strict):
        for read in reads:
            parser.feed(read)
        parser.close()
    fields = (
        "events",
        "data_events",
        "comments",
        "done",
        "error_events",
        "malformed",
        "pending_fields",
    )
    assert {f: getattr(fast, f) for f in fields} == {f: getattr(strict, f) for f in fields}
    assert fast.events > 0


def test_a_long_body_without_blank_lines_is_read_line_by_line() -> None:
    """Counting mode does not hold an endless event raw: past 64 KiB it reads lines."""
    p = SSEParser()
    line = b'data: {"a": 1}\n'
    for _ in range(10_000):
        p.feed(line)
    assert len(p._buf) < 100
    p.close()
    assert p.events == 0 and p.pending_fields == 1
