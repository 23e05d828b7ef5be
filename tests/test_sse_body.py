"""The sse probe's body on its own: events written are counted exactly, whether they come
from chunkwatch's writer (counted without a second parse) or as other bytes (parsed)."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry

from chunkwatch.ledger import Ledger
from chunkwatch.outcomes import Outcome
from chunkwatch.probes.sse_out import SSEBody
from chunkwatch.runtime import Runtime
from chunkwatch.sse import SSEParser, WholeEvent, format_comment, format_event


def written(chunks: list[bytes]) -> tuple[SSEBody, bytes]:
    """Run ``chunks`` through an SSEBody as a WSGI server does; what came out, joined."""
    rt = Runtime(registry=CollectorRegistry())
    try:
        body = SSEBody(iter(chunks), rt, Ledger())
        out = b"".join(body)
        body.close()
        return body, out
    finally:
        rt.close()


def strict_events(data: bytes) -> int:
    parser = SSEParser(collect=True, strict_json=False)
    parser.feed(data)
    parser.close()
    return parser.events


def test_the_writer_marks_its_output_as_one_whole_event() -> None:
    """format_event returns a WholeEvent (still bytes); what is built from it is plain bytes."""
    ev = format_event(json.dumps({"text": "hi"}), event="token")
    assert type(ev) is WholeEvent and isinstance(ev, bytes)
    assert type(ev + b"") is bytes and type(ev[:4]) is bytes
    assert type(format_comment("open")) is bytes
    assert strict_events(ev) == 1 and strict_events(format_event("")) == 1


def test_writer_events_and_other_bytes_are_counted_like_the_rules() -> None:
    """The tally counts what a strict parser dispatches from the bytes written: writer
    events, [DONE], plain bytes holding two events, comments; nothing is altered."""
    chunks = [
        format_comment("open"),
        format_event('{"text": "a"}', event="token"),
        b'data: {"x": 1}\n\ndata: {"y": 2}\n\n',
        format_event("[DONE]"),
        format_comment("heartbeat"),
        format_event("multi\nline", event="update", id="3"),
        format_event("", event="done"),
    ]
    body, out = written(chunks)
    assert out == b"".join(chunks)
    assert body.tally.units == strict_events(out) == 6
    assert body.tally.comments == 2 and body.tally.outcome is Outcome.OK


def test_a_writer_event_after_half_an_event_continues_it() -> None:
    """Bytes that leave an event half-written make the next writer event part of it: it is
    parsed, not counted on its own, so the count stays what the client's parser sees."""
    chunks = [
        format_comment("open"),
        b'data: {"x": 1}\n',  # half an event: its blank line comes with the next chunk
        format_event('{"text": "a"}'),  # ends that event (one event with two data lines)
        b"\n",  # a blank line with nothing pending: no event
        format_event('{"text": "b"}'),
    ]
    body, out = written(chunks)
    assert body.tally.units == strict_events(out) == 2


def test_used_alone_it_gives_the_ledger_back_its_parent_when_it_ends() -> None:
    """While the body runs, new work of the request is parented to the `sse stream` span;
    once it ends, to whatever was the parent before — never to the ended span (an SSEBody
    used without the http probe left it there)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    rt = Runtime(registry=CollectorRegistry(), tracer_provider=TracerProvider())
    try:
        ledger = Ledger()
        root = rt.tracer.start_span("request")
        before = ledger.parent_context = trace.set_span_in_context(root)
        body = SSEBody(iter([format_event("x")]), rt, ledger)
        assert ledger.parent_context is not before  # the sse span's, while it runs
        b"".join(body)
        body.close()
        assert ledger.parent_context is before
    finally:
        rt.close()
