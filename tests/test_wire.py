"""The one body reader (`chunkwatch.wire`), on real bytes: every fault shape a gateway
commits, Content-Encoding (gzip, gzip without the header, deflate zlib-wrapped and raw,
bytes that do not decode), and the same evidence however the body is cut into reads —
split at every byte boundary, read a byte at a time, counted on the probe's fast path.
"""

from __future__ import annotations

import gzip
import json
import time
import zlib
from dataclasses import replace

import pytest

from chunkwatch.ledger import Tally
from chunkwatch.outcomes import End
from chunkwatch.sse import Event, SSEParser
from chunkwatch.wire import HEAD_MAX, WireEvidence, WireReader, record

ROLE = b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
TOKEN = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
FINISH = b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
USAGE = b'data: {"id":"c","choices":[],"usage":{"total_tokens":3}}\n\n'
FILTER = b'data: {"id":"","choices":[],"prompt_filter_results":[{"prompt_index":0}]}\n\n'
DONE = b"data: [DONE]\n\n"
MESSAGE = b'data: {"message": "policy failed"}\n\n'
ERROR = (
    b"event: error\n"
    b'data: {"error": {"message": "upstream connection reset", "type": "server_error"}}\n\n'
)
HEALTHY = ROLE + TOKEN * 3 + FINISH + USAGE + DONE
CUT_JSON = b'data: {"id":"c","choices":[{"index":0,"del\n\n'  # a payload cut in half


def _deflate_raw(body: bytes) -> bytes:
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return raw.compress(body) + raw.flush()


def _gzip_streamed(body: bytes, piece: int = 40) -> bytes:
    """gzip flushed every ``piece`` bytes, as a compressing proxy streams it."""
    gz = zlib.compressobj(wbits=31)
    out = b"".join(
        gz.compress(body[i : i + piece]) + gz.flush(zlib.Z_SYNC_FLUSH)
        for i in range(0, len(body), piece)
    )
    return out + gz.flush()


def read(
    reads: list[bytes], encoding: str | None = None, *, fast: bool = False
) -> tuple[WireEvidence, int]:
    """Feed ``reads``; with ``fast``, count with the reader's counter once it offers one
    and hand it the last read, as the gateway probe's body loop does. (evidence, units)"""
    reader = WireReader(encoding, parser=SSEParser())
    units = 0
    for piece in reads:
        if fast and reader.fast is not None:
            units += reader.fast(piece)
        else:
            units += reader.feed(piece)
    last = reads[-1] if reads and fast and reader.fast is not None else None
    return reader.close(last), units


def outcome(ev: WireEvidence, units: int, end: End = End.CLEAN) -> str:
    """The outcome the rules give a 200 text/event-stream answer with this evidence."""
    tally = Tally(
        layer="gateway",
        t_start=time.perf_counter_ns(),
        status=200,
        content_type="text/event-stream",
        needs_status=True,
        terminal_known=True,
        units=units,
    )
    record(ev, tally)
    return str(tally.finish(end))


# name -> (body, Content-Encoding, outcome, the evidence that differs from a fresh one;
# ``...``: whatever compressed bytes happen to look like to the SSE rules)
SHAPES: dict[str, tuple[bytes, str | None, str, dict[str, object]]] = {
    "healthy": (HEALTHY, None, "ok", {"data_events": 6, "events": 7, "done": True}),
    "empty": (b"", None, "empty", {}),
    "comment only": (b": keepalive\n\n", None, "empty", {"comments": 1}),
    "done only": (DONE, None, "empty", {"events": 1, "done": True}),
    "truncated": (ROLE + TOKEN, None, "truncated", {"data_events": 2, "events": 2}),
    "gzip stripped": (
        gzip.compress(HEALTHY),
        None,
        "malformed",
        {"gzip_magic": True, "pending_fields": ..., "malformed": ..., "malformed_why": ...},
    ),
    "gzip": (_gzip_streamed(HEALTHY), "gzip", "ok", {"data_events": 6, "events": 7, "done": True}),
    "x-gzip, two members": (
        gzip.compress(HEALTHY[:100]) + gzip.compress(HEALTHY[100:]),
        "x-gzip",
        "ok",
        {"data_events": 6, "events": 7, "done": True},
    ),
    "deflate, zlib-wrapped": (
        zlib.compress(HEALTHY),
        "deflate",
        "ok",
        {"data_events": 6, "events": 7, "done": True},
    ),
    "deflate, raw": (
        _deflate_raw(HEALTHY),
        "Deflate",
        "ok",
        {"data_events": 6, "events": 7, "done": True},
    ),
    "gzip declared, plain body": (
        HEALTHY,
        "gzip",
        "malformed",
        {
            "malformed": 1,
            "malformed_why": "Content-Encoding gzip does not decode: "
            "Error -3 while decompressing data: incorrect header check",
        },
    ),
    "malformed": (
        ROLE + CUT_JSON + DONE,
        None,
        "malformed",
        {
            "data_events": 2,
            "events": 3,
            "done": True,
            "malformed": 1,
            "malformed_why": "data is not a JSON object",
        },
    ),
    "no blank lines": (
        (ROLE + TOKEN + DONE).replace(b"\n\n", b"\n"),
        None,
        "malformed",
        {"pending_fields": 1},
    ),
    "error event": (
        ROLE + TOKEN + ERROR,
        None,
        "error_event",
        {
            "data_events": 3,
            "events": 3,
            "error_events": 1,
            "upstream_said": "upstream connection reset",
        },
    ),
    "in-band error object": (
        ROLE + TOKEN + MESSAGE,
        None,
        "error_event",
        {"data_events": 3, "events": 3, "error_events": 1, "upstream_said": "policy failed"},
    ),
    "in-band error object only": (
        MESSAGE,
        None,
        "error_event",
        {"data_events": 1, "events": 1, "error_events": 1, "upstream_said": "policy failed"},
    ),
    "filter only": (
        FILTER + DONE,
        None,
        "empty",
        {"data_events": 1, "events": 2, "done": True, "annotations": 1},
    ),
    "filter and usage only, gzip": (
        gzip.compress(FILTER + USAGE + DONE),
        "gzip",
        "empty",
        {"data_events": 2, "events": 3, "done": True, "annotations": 2},
    ),
    "filter first, then the model": (
        FILTER + HEALTHY,
        None,
        "ok",
        {"data_events": 7, "events": 8, "done": True},
    ),
}


@pytest.mark.parametrize("name", SHAPES)
def test_each_shape_gives_its_evidence_and_outcome(name: str) -> None:
    """Each body, in one read: exactly the evidence listed (all else as for no body), and
    the outcome the rules draw from it."""
    body, encoding, expected, fields = SHAPES[name]
    ev, units = read([body], encoding)
    fields = {k: getattr(ev, k) if v is ... else v for k, v in fields.items()}
    assert ev == replace(WireEvidence(), **fields)  # type: ignore[arg-type]
    assert units == ev.data_events
    assert outcome(ev, units) == expected


SPLIT = ["healthy", "gzip", "deflate, raw", "malformed", "no blank lines", "filter only"]


@pytest.mark.parametrize("name", SPLIT)
def test_split_at_every_byte_boundary_gives_the_same_evidence(name: str) -> None:
    """Two reads, cut at every byte: the evidence and units of the body read whole, on the
    plain path and on the probe's fast path alike."""
    body, encoding, _, _ = SHAPES[name]
    whole = read([body], encoding)
    for cut in range(1, len(body)):
        for fast in (False, True):
            assert read([body[:cut], body[cut:]], encoding, fast=fast) == whole, (cut, fast)


@pytest.mark.parametrize("name", SHAPES)
def test_a_byte_at_a_time_gives_the_same_evidence(name: str) -> None:
    """One read per byte: the same evidence as in one read. (No read holds a whole
    completion chunk, so the head is kept to the end and parsed whole: the in-band
    error in it is read too.)"""
    body, encoding, _, _ = SHAPES[name]
    if not body:
        return
    ev, units = read([body[i : i + 1] for i in range(len(body))], encoding, fast=True)
    assert (ev, units) == read([body], encoding)


@pytest.mark.parametrize("name", ["in-band error object", "error event"])
def test_an_error_is_read_only_when_the_last_read_holds_it_whole(name: str) -> None:
    """The documented limit, at every cut: an error event's or in-band object's text is
    read off the last read, so a cut inside the final event's data line leaves it unread
    (an ``event: error`` is still counted; an in-band object is then just no [DONE])."""
    body, _, _, fields = SHAPES[name]
    start = body.rindex(b"data: ")  # the final event's data line
    for cut in range(1, len(body)):
        ev, units = read([body[:cut], body[cut:]], fast=True)
        whole = cut <= start
        assert ev.upstream_said == (fields["upstream_said"] if whole else None), cut
        named = name == "error event"
        assert ev.error_events == (1 if whole or named else 0), cut
        assert outcome(ev, units) == ("error_event" if whole or named else "truncated"), cut


def test_a_decode_error_stops_the_reading_and_keeps_what_came_before() -> None:
    """gzip that turns to garbage mid-stream: the events decoded before stand, nothing
    after is parsed, and the body is malformed with the decoder's reason."""
    good = _gzip_streamed(ROLE + TOKEN)
    ev, units = read([good[:-8], b"\x00not gzip at all", _gzip_streamed(DONE)], "gzip")
    assert (units, ev.data_events, ev.done) == (2, 2, False)
    assert ev.malformed == 1
    assert (ev.malformed_why or "").startswith("Content-Encoding gzip does not decode: ")
    assert outcome(ev, units) == "malformed"


def test_a_compressed_body_cut_short_is_truncated_not_malformed() -> None:
    """A gzip member that never ends (the connection dropped): no decode error, two
    events and no [DONE]: truncated."""
    gz = zlib.compressobj(wbits=31)
    body = gz.compress(ROLE + TOKEN) + gz.flush(zlib.Z_SYNC_FLUSH)
    ev, units = read([body], "gzip")
    assert (ev.malformed, ev.done, units) == (0, False, 2)
    assert outcome(ev, units, End.ABRUPT) == "truncated"


def test_fast_counter_is_offered_after_the_first_completion_of_a_plain_body() -> None:
    """The head is kept until the read with the first completion chunk; from there the
    parser's own counter is offered — never for a body that needs decoding."""
    reader = WireReader(None, parser=SSEParser())
    reader.feed(FILTER)
    assert reader.fast is None and reader.head == FILTER
    reader.feed(ROLE)
    assert reader.fast is not None and reader.head is None
    assert reader.fast == reader.parser.count if reader.parser else False
    gz = WireReader("gzip", parser=SSEParser())
    gz.feed(gzip.compress(FILTER + ROLE))
    assert gz.fast is None and gz.head is None


def test_head_is_kept_up_to_its_bound() -> None:
    """A body with no completion keeps at most HEAD_MAX bytes; past that it is counted as
    it comes (and its annotations are not told: the documented bound)."""
    reader = WireReader(None, parser=SSEParser())
    n = HEAD_MAX // len(FILTER) + 2
    for _ in range(n):
        reader.feed(FILTER)
    assert reader.head is None
    ev = reader.close()
    assert (ev.data_events, ev.annotations) == (n, 0)


def test_events_seen_by_a_caller_do_not_change_the_evidence() -> None:
    """``on_event`` hands every dispatched event over (the doctor reads finish reasons
    and usage off them); the evidence is the reader's, with or without it."""
    for body in (HEALTHY, ROLE + CUT_JSON + DONE, ROLE + TOKEN + ERROR):
        seen: list[Event] = []
        reader = WireReader(None, parser=SSEParser(), on_event=seen.append)
        for i in range(0, len(body), 7):
            reader.feed(body[i : i + 7])
        assert reader.close() == read([body])[0]
        assert len(seen) == body.count(b"\n\n")
    assert json.loads(seen[-1].data)["error"]["message"] == "upstream connection reset"


def test_a_body_not_read_as_a_stream_is_decoded_and_kept() -> None:
    """Without a parser (a non-stream answer) the body is only decoded and kept, up to
    ``keep`` bytes; a body that does not decode is malformed all the same."""
    answer = b'{"choices":[{"message":{"content":"hi"}}]}'
    reader = WireReader("deflate", parser=None, keep=10)
    assert reader.feed(zlib.compress(answer)) == 0
    assert reader.kept == answer[:10] and reader.close() == WireEvidence()
    broken = WireReader("gzip", parser=None)
    broken.feed(answer)
    assert broken.close().malformed == 1


def test_a_collecting_parser_is_refused() -> None:
    """The evidence comes from the counting rules only: a collecting parser is an error."""
    with pytest.raises(ValueError, match="counting parser"):
        WireReader(None, parser=SSEParser(collect=True))


def test_close_is_idempotent() -> None:
    """A second close returns the same evidence object, parsed once."""
    reader = WireReader(None, parser=SSEParser())
    reader.feed(ROLE + TOKEN + MESSAGE)
    first = reader.close()
    assert reader.close() is first and first.error_events == 1
