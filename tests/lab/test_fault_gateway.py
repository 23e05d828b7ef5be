"""The fault-injecting gateway at the HTTP level: for every mode, what exactly goes on the
wire (status, headers, framing, body, and whether it ends cleanly or is dropped), the
/_chaos API, and healthy pass-through of non-stream requests under every fault."""

from __future__ import annotations

import gzip
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx2
import pytest

from chunkwatch.sse import Event, SSEParser
from chunkwatch_lab import fault_gateway as gateway_module
from chunkwatch_lab import faults
from chunkwatch_lab.fault_gateway import FAULT_MODES, FAULT_PARAMS, Gateway, aggregate
from chunkwatch_lab.threaded import Running, start_in_thread
from chunkwatch_lab.upstream import Upstream, answer_tokens

PROMPT = "Tell me about gateways."
TOKENS = 12  # the session upstream (conftest.py): 12 tokens, 10 ms apart
ANSWER = "".join(answer_tokens(PROMPT, TOKENS))
STREAM_BODY = {
    "model": "gpt-4o",
    "messages": [{"role": "user", "content": PROMPT}],
    "stream": True,
    "stream_options": {"include_usage": True},
}
PATH = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"


# -- a raw HTTP/1.1 client that records how a response ends ---------------------------------


@dataclass
class Raw:
    """One response as it came off the socket."""

    status: int | None = None  # None: no status line ever arrived
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""  # chunked framing removed
    chunks: list[int] = field(default_factory=list)  # sizes of the HTTP chunks
    end: str = ""  # clean (terminator / Content-Length met), dropped (EOF before), timeout
    t_head: float = 0.0  # seconds from request to the end of the head
    t_body: float | None = None  # ... to the first body byte
    t_end: float = 0.0  # ... to the end

    def events(self) -> tuple[list[Event], SSEParser]:
        parser = SSEParser(collect=True)
        return parser.feed(self.body) + parser.close(), parser

    def data(self) -> list[str]:
        return [e.data for e in self.events()[0]]


class RawClient:
    """A keep-alive connection that reads responses byte by byte as the server frames them."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Raw:
        data = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(data)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        start = time.perf_counter()
        self.sock.sendall(head.encode() + b"\r\n" + data)
        raw = Raw()
        try:
            self._read(raw, start)
        except TimeoutError:
            raw.end = "timeout"
        except EOFError:
            raw.end = "dropped"
        raw.t_end = time.perf_counter() - start
        return raw

    def _fill(self) -> None:
        more = self.sock.recv(65536)
        if not more:
            raise EOFError
        self.buf += more

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _read(self, raw: Raw, start: float) -> None:
        raw.status = None
        status_line = self._line()
        raw.status = int(status_line.split()[1])
        while line := self._line():
            name, _, value = line.decode("latin-1").partition(":")
            raw.headers[name.lower()] = value.strip()
        raw.t_head = time.perf_counter() - start
        if raw.headers.get("transfer-encoding") == "chunked":
            while size := int(self._line(), 16):
                raw.body += self._take(size)
                raw.chunks.append(size)
                raw.t_body = raw.t_body or time.perf_counter() - start
                self._take(2)
            assert self._line() == b""
        elif "content-length" in raw.headers:
            raw.body = self._take(int(raw.headers["content-length"]))
            raw.t_body = time.perf_counter() - start
        else:
            raise AssertionError(f"response without framing: {raw.headers}")
        raw.end = "clean"

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def call(
    gw: Running[Gateway],
    body: Any = STREAM_BODY,
    timeout: float = 5.0,
    headers: dict[str, str] | None = None,
) -> Raw:
    with RawClient(gw.port, timeout) as client:
        return client.request("POST", PATH, body, headers)


def chunks_of(raw: Raw) -> list[dict[str, Any]]:
    return [json.loads(d) for d in raw.data() if d != "[DONE]"]


def content_of(raw: Raw) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks_of(raw) if c["choices"]
    )


def finish_reasons(raw: Raw) -> list[str]:
    return [
        c["choices"][0]["finish_reason"]
        for c in chunks_of(raw)
        if c["choices"] and c["choices"][0]["finish_reason"]
    ]


def is_sse(raw: Raw) -> bool:
    return raw.headers.get("content-type", "").startswith("text/event-stream")


def full_stream_ok(raw: Raw) -> None:
    """The whole valid upstream stream: role + tokens + finish + usage, then [DONE]."""
    data = raw.data()
    assert data[-1] == "[DONE]"
    assert len(data) == TOKENS + 4
    assert content_of(raw) == ANSWER and finish_reasons(raw) == ["stop"]


# -- every mode, on the wire ------------------------------------------------------------------


def test_fault_modes_constant_lists_every_mode() -> None:
    """FAULT_MODES is the documented list, in order; every parameterised mode is in it."""
    assert FAULT_MODES == (
        "pass", "zero", "zero-abrupt", "done-only", "json", "html", "buffer", "buffer-late",
        "truncate", "truncate-abrupt", "stall", "stall-headers", "keepalive-only", "trickle",
        "status", "reject-stream-options", "malformed", "no-blank-lines", "error-event",
        "gzip-stripped", "filter-only", "inband-error",
    )  # fmt: skip
    assert set(FAULT_PARAMS) <= set(FAULT_MODES)


def test_gateway_module_reexports_the_fault_api() -> None:
    """The names tests, the demo and users import from chunkwatch_lab.fault_gateway are the
    very objects defined in chunkwatch_lab.faults, and both __all__ lists are curated."""
    assert gateway_module.__all__ == [
        "FAULT_MODES",
        "FAULT_PARAMS",
        "FaultSetting",
        "Gateway",
        "add_gateway_parser",
        "aggregate",
        "main",
        "run_gateway",
    ]
    for name in ("FAULT_MODES", "FAULT_PARAMS", "FaultSetting", "aggregate"):
        assert getattr(gateway_module, name) is getattr(faults, name), name
    assert all(hasattr(faults, name) for name in faults.__all__)
    assert all(hasattr(gateway_module, name) for name in gateway_module.__all__)


def test_pass_forwards_the_upstream_stream_unchanged(
    gateway: Running[Gateway], upstream: Running[Upstream]
) -> None:
    """pass: the same events as straight from the upstream, chunked SSE, clean end."""
    through = call(gateway)
    with RawClient(upstream.port) as client:
        direct = client.request("POST", PATH, STREAM_BODY)
    assert through.status == direct.status == 200 and through.end == direct.end == "clean"
    assert through.headers["content-type"] == direct.headers["content-type"]
    assert (
        through.headers["transfer-encoding"] == "chunked"
        and "content-length" not in through.headers
    )

    def shape(raw: Raw) -> list[Any]:
        return [d if d == "[DONE]" else json.loads(d)["choices"] for d in raw.data()]

    assert shape(through) == shape(direct)
    full_stream_ok(through)


def test_pass_forwards_chunk_by_chunk_without_buffering(gateway: Running[Gateway]) -> None:
    """pass: the first event arrives long before the upstream finishes (12 tokens x 10 ms),
    and the body arrives as many HTTP chunks, one per upstream write."""
    raw = call(gateway)
    assert raw.t_body is not None and raw.t_body < 0.05
    assert raw.t_end > 0.1
    assert len(raw.chunks) >= TOKENS


def test_zero_is_200_sse_with_an_empty_body_and_a_clean_end(gateway: Running[Gateway]) -> None:
    """zero: 200 text/event-stream, chunked, immediate terminator; the connection stays usable."""
    gateway.server.set_fault("zero")
    with RawClient(gateway.port) as client:
        raw = client.request("POST", PATH, STREAM_BODY)
        assert (raw.status, raw.body, raw.end) == (200, b"", "clean")
        assert is_sse(raw) and raw.headers["transfer-encoding"] == "chunked"
        again = client.request("POST", PATH, {**STREAM_BODY, "stream": False})  # same socket
        assert again.status == 200 and again.end == "clean"


def test_zero_abrupt_drops_the_connection_after_the_headers(gateway: Running[Gateway]) -> None:
    """zero-abrupt: 200 chunked SSE headers, then EOF without a chunk terminator."""
    gateway.server.set_fault("zero-abrupt")
    raw = call(gateway)
    assert (raw.status, raw.body, raw.end) == (200, b"", "dropped")
    assert is_sse(raw) and raw.headers["transfer-encoding"] == "chunked"


def test_done_only_sends_just_done(gateway: Running[Gateway]) -> None:
    """done-only: a 200 SSE body that is exactly `data: [DONE]`."""
    gateway.server.set_fault("done-only")
    raw = call(gateway)
    assert (raw.status, raw.body, raw.end) == (200, b"data: [DONE]\n\n", "clean")
    assert is_sse(raw)


def test_json_aggregates_the_stream_into_a_chat_completion(gateway: Running[Gateway]) -> None:
    """json: 200 application/json with Content-Length: a chat.completion whose content is
    the joined deltas, with the finish reason and usage."""
    gateway.server.set_fault("json")
    raw = call(gateway)
    assert raw.status == 200 and raw.end == "clean"
    assert raw.headers["content-type"] == "application/json"
    assert (
        int(raw.headers["content-length"]) == len(raw.body)
        and "transfer-encoding" not in raw.headers
    )
    body = json.loads(raw.body)
    assert body["object"] == "chat.completion" and body["model"] == "gpt-4o"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == TOKENS


def test_json_keeps_the_envelope_behind_azures_prompt_filter_chunk(
    azure_upstream: Running[Upstream],
) -> None:
    """json in front of an Azure content-filtering upstream: the chat.completion takes its
    id and model from the first real chunk, not from the prompt-filter chunk's blanks."""
    with start_in_thread(Gateway(azure_upstream.url, fault="json")) as gw:
        body = json.loads(call(gw).body)
    assert body["id"].startswith("chatcmpl-") and body["model"] == "gpt-4o"
    assert body["choices"][0]["message"]["content"] == ANSWER


def test_aggregate_builds_a_chat_completion_from_plain_events() -> None:
    """aggregate (the json mode's logic, no I/O): content joined, tool-call fragments merged
    by index, the last finish reason and the usage kept; an event that is not a JSON object
    and a chunk without an id (Azure's prompt filter) do not set the envelope."""

    def chunk(choices: list[Any], **extra: Any) -> Event:
        return Event(
            data=json.dumps({"id": "c1", "model": "m", "created": 7, "choices": choices, **extra})
        )

    call = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "f", "arguments": ""},
    }
    events = [
        Event(data=json.dumps({"id": "", "model": "", "created": 0, "choices": []})),
        Event(data="not json"),
        chunk([{"delta": {"role": "assistant", "content": "Hi "}}]),
        chunk([{"delta": {"content": "there."}}]),
        chunk([{"delta": {"tool_calls": [call]}}]),
        chunk([{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}}]),
        chunk([{"delta": {}, "finish_reason": "tool_calls"}]),
        chunk([], usage={"completion_tokens": 4}),
        Event(data="[DONE]"),
    ]
    body = aggregate(events)
    assert (body["id"], body["model"], body["created"]) == ("c1", "m", 7)
    message = body["choices"][0]["message"]
    assert message["content"] == "Hi there."
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["usage"] == {"completion_tokens": 4}


def test_html_is_a_block_page(gateway: Running[Gateway]) -> None:
    """html: 200 text/html with Content-Length, no event in it."""
    gateway.server.set_fault("html")
    raw = call(gateway)
    assert raw.status == 200 and raw.end == "clean"
    assert raw.headers["content-type"].startswith("text/html")
    assert int(raw.headers["content-length"]) == len(raw.body)
    assert b"<html" in raw.body and b"data:" not in raw.body


def test_buffer_sends_the_whole_stream_at_once_with_content_length(
    gateway: Running[Gateway],
) -> None:
    """buffer: no headers until the upstream finished (>= 12 x 10 ms), then the complete
    valid SSE body with Content-Length, not chunked."""
    gateway.server.set_fault("buffer")
    raw = call(gateway)
    assert raw.status == 200 and raw.end == "clean" and is_sse(raw)
    assert (
        int(raw.headers["content-length"]) == len(raw.body)
        and "transfer-encoding" not in raw.headers
    )
    assert raw.t_head >= TOKENS * 0.01 * 0.9
    full_stream_ok(raw)


def test_buffer_late_sends_headers_at_once_and_the_body_in_one_write(
    gateway: Running[Gateway],
) -> None:
    """buffer-late: chunked SSE headers at once; the whole body as one chunk at the end."""
    gateway.server.set_fault("buffer-late")
    raw = call(gateway)
    assert raw.status == 200 and raw.end == "clean" and is_sse(raw)
    assert raw.headers["transfer-encoding"] == "chunked"
    assert raw.t_head < 0.05
    assert raw.t_body is not None and raw.t_body >= TOKENS * 0.01 * 0.9
    assert len(raw.chunks) == 1
    full_stream_ok(raw)


@pytest.mark.parametrize("events", [0, 1, 3, 5, 100])
def test_truncate_ends_cleanly_after_n_events(gateway: Running[Gateway], events: int) -> None:
    """truncate: the first N data events (role chunk counts), then a clean end, with no
    [DONE] and no finish_reason even when N exceeds the stream."""
    gateway.server.set_fault("truncate", events=events)
    raw = call(gateway)
    assert raw.status == 200 and raw.end == "clean" and is_sse(raw)
    data = raw.data()
    assert len(data) == min(events, 1 + TOKENS)
    assert "[DONE]" not in data and finish_reasons(raw) == []
    assert content_of(raw) == "".join(answer_tokens(PROMPT, TOKENS)[: max(0, len(data) - 1)])


def test_truncate_default_is_three_events(gateway: Running[Gateway]) -> None:
    """truncate without parameters cuts after 3 events (role + 2 tokens)."""
    gateway.server.set_fault("truncate")
    assert len(call(gateway).data()) == 3


def test_truncate_abrupt_drops_the_connection_after_n_events(gateway: Running[Gateway]) -> None:
    """truncate-abrupt: N events, then EOF in the middle of the chunked body."""
    gateway.server.set_fault("truncate-abrupt", events=4)
    raw = call(gateway)
    assert raw.status == 200 and raw.end == "dropped"
    _, parser = raw.events()
    assert parser.data_events == 4 and not parser.done


def test_stall_holds_headers_then_silence_then_drops(gateway: Running[Gateway]) -> None:
    """stall: 200 SSE headers, no byte of body for `limit` seconds, then dropped."""
    gateway.server.set_fault("stall", limit=0.5)
    raw = call(gateway)
    assert raw.status == 200 and is_sse(raw) and raw.body == b""
    assert raw.end == "dropped" and 0.45 <= raw.t_end < 2


def test_stall_headers_never_sends_a_status_line(gateway: Running[Gateway]) -> None:
    """stall-headers: the request is read, no status line ever; dropped after `limit`."""
    gateway.server.set_fault("stall-headers", limit=0.5)
    raw = call(gateway)
    assert raw.status is None and raw.end == "dropped" and 0.45 <= raw.t_end < 2


def test_stall_ends_early_when_the_client_gives_up(gateway: Running[Gateway]) -> None:
    """A client that goes away first is let go at once, not held for `limit`."""
    gateway.server.set_fault("stall", limit=30)
    raw = call(gateway, timeout=0.3)
    assert raw.end == "timeout"
    deadline = time.monotonic() + 1
    while gateway.server.stats()["open_connections"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gateway.server.stats()["open_connections"] == 0


def test_keepalive_only_sends_comments_then_ends_cleanly(gateway: Running[Gateway]) -> None:
    """keepalive-only: `: keepalive` comments every `interval`, never data, clean end at `limit`."""
    gateway.server.set_fault("keepalive-only", interval=0.1, limit=0.5)
    raw = call(gateway)
    assert raw.status == 200 and is_sse(raw) and raw.end == "clean"
    assert 0.45 <= raw.t_end < 2
    events, parser = raw.events()
    assert events == [] and parser.data_events == 0
    assert 4 <= parser.comments <= 6
    assert set(raw.body.split(b"\n\n")) == {b": keepalive", b""}


def test_trickle_dribbles_the_valid_stream(gateway: Running[Gateway]) -> None:
    """trickle: the complete valid stream, in HTTP chunks of at most `bytes` bytes."""
    gateway.server.set_fault("trickle", bytes=64, delay=0.001)
    raw = call(gateway)
    assert raw.status == 200 and raw.end == "clean"
    assert max(raw.chunks) <= 64 and len(raw.chunks) > len(raw.body) // 64
    full_stream_ok(raw)


@pytest.mark.parametrize(
    ("status", "ctype", "marker"),
    [
        (400, "application/json", b'"invalid_request_error"'),
        (429, "application/json", b'"rate_limit_exceeded"'),
        (500, "application/json", b'"server_error"'),
        (502, "text/html", b"502 Bad Gateway"),
        (503, "text/html", b"503 Service Temporarily Unavailable"),
        (504, "text/html", b"504 Gateway Time-out"),
    ],
)
def test_status_answers_with_a_realistic_error(
    gateway: Running[Gateway], status: int, ctype: str, marker: bytes
) -> None:
    """status: the configured status with the body a real gateway sends (OpenAI JSON errors
    for 400/429/500, nginx HTML pages for 502/503/504; 429 has Retry-After: 1)."""
    gateway.server.set_fault("status", status=status)
    raw = call(gateway)
    assert raw.status == status and raw.end == "clean"
    assert raw.headers["content-type"].startswith(ctype)
    assert marker in raw.body
    if ctype == "application/json":
        assert set(json.loads(raw.body)["error"]) >= {"message", "type", "param", "code"}
    assert (raw.headers.get("retry-after") == "1") is (status == 429)


def test_status_default_is_502(gateway: Running[Gateway]) -> None:
    """status without parameters answers 502."""
    gateway.server.set_fault("status")
    assert call(gateway).status == 502


def test_reject_stream_options_only_when_present(gateway: Running[Gateway]) -> None:
    """reject-stream-options: 400 OpenAI error naming stream_options if the body has it;
    a stream request without it passes."""
    gateway.server.set_fault("reject-stream-options")
    raw = call(gateway)
    assert raw.status == 400 and raw.headers["content-type"] == "application/json"
    error = json.loads(raw.body)["error"]
    assert error["type"] == "invalid_request_error" and "stream_options" in error["message"]
    without = {k: v for k, v in STREAM_BODY.items() if k != "stream_options"}
    ok = call(gateway, without)
    assert ok.status == 200 and content_of(ok) == ANSWER


def test_malformed_cuts_every_json_payload_short(gateway: Running[Gateway]) -> None:
    """malformed: every data payload starts with `{`, does not end with `}`, is not JSON;
    [DONE] stays; the end is clean."""
    gateway.server.set_fault("malformed")
    raw = call(gateway)
    assert raw.status == 200 and raw.end == "clean" and is_sse(raw)
    data = raw.data()
    assert data[-1] == "[DONE]" and len(data) == TOKENS + 4
    for payload in data[:-1]:
        assert payload.startswith("{") and not payload.endswith("}")
        with pytest.raises(json.JSONDecodeError):
            json.loads(payload)


def test_no_blank_lines_sends_data_lines_without_separators(gateway: Running[Gateway]) -> None:
    """no-blank-lines: every event's `data:` line, but no blank line, so no event dispatches."""
    gateway.server.set_fault("no-blank-lines")
    raw = call(gateway)
    assert raw.status == 200 and raw.end == "clean" and is_sse(raw)
    lines = raw.body.split(b"\n")
    assert lines[-1] == b"" and all(line.startswith(b"data: ") for line in lines[:-1])
    assert len(lines) - 1 == TOKENS + 4 and lines[-2] == b"data: [DONE]"
    events, parser = raw.events()
    assert events == [] and parser.pending_fields == 1


def test_error_event_follows_n_events(gateway: Running[Gateway]) -> None:
    """error-event: N events, then `event: error` with an OpenAI-style server_error, then a
    clean end."""
    gateway.server.set_fault("error-event", events=2)
    raw = call(gateway)
    assert raw.status == 200 and raw.end == "clean"
    events, _ = raw.events()
    assert len(events) == 3 and [e.event for e in events] == ["", "", "error"]
    error = json.loads(events[-1].data)["error"]
    assert error["type"] == "server_error" and error["message"] and "code" in error


def test_gzip_stripped_sends_gzip_without_content_encoding(gateway: Running[Gateway]) -> None:
    """gzip-stripped: the body is gzip (magic 1f 8b) but no Content-Encoding says so; it
    decompresses to the complete valid stream."""
    gateway.server.set_fault("gzip-stripped")
    raw = call(gateway, headers={"Accept-Encoding": "gzip"})
    assert raw.status == 200 and raw.end == "clean" and is_sse(raw)
    assert "content-encoding" not in raw.headers
    assert raw.body[:2] == b"\x1f\x8b"
    full_stream_ok(Raw(body=gzip.decompress(raw.body)))


FAST_PARAMS: dict[str, dict[str, float]] = {
    "stall": {"limit": 3},
    "stall-headers": {"limit": 3},
    "keepalive-only": {"interval": 1, "limit": 3},
    "trickle": {"bytes": 1, "delay": 1},
}


@pytest.mark.parametrize("mode", FAULT_MODES)
def test_non_stream_requests_pass_healthy_under_every_fault(
    gateway: Running[Gateway], mode: str
) -> None:
    """Faults hit only stream requests: stream=false gets the normal chat.completion at once."""
    gateway.server.set_fault(mode, **FAST_PARAMS.get(mode, {}))
    raw = call(gateway, {**STREAM_BODY, "stream": False})
    assert raw.status == 200 and raw.end == "clean" and raw.t_end < 1
    assert json.loads(raw.body)["choices"][0]["message"]["content"] == ANSWER
    assert gateway.server.stats()["requests"]["pass"] == 1


# -- the /_chaos API --------------------------------------------------------------------------


def test_chaos_get_and_put(gateway: Running[Gateway], upstream: Running[Upstream]) -> None:
    """GET /_chaos shows the fault with its defaults; PUT switches it; neither is forwarded."""
    before = httpx2.get(upstream.url + "/_stats").json()["requests"]
    assert httpx2.get(gateway.url + "/_chaos").json() == {"fault": "pass"}
    put = httpx2.put(gateway.url + "/_chaos", json={"fault": "truncate", "events": 5})
    assert put.status_code == 200 and put.json() == {"fault": "truncate", "events": 5}
    assert httpx2.get(gateway.url + "/_chaos").json() == {"fault": "truncate", "events": 5}
    httpx2.put(gateway.url + "/_chaos", json={"fault": "keepalive-only"})
    assert httpx2.get(gateway.url + "/_chaos").json() == {
        "fault": "keepalive-only",
        "interval": 1.0,
        "limit": 60.0,
    }
    assert len(call(gateway, timeout=0.3).body) > 0  # the new fault is in force
    assert httpx2.get(upstream.url + "/_stats").json()["requests"] == before


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"fault": "nope"}, "unknown fault mode 'nope'"),
        ({"fault": "truncate", "events": -1}, "'events' must be at least 0"),
        ({"fault": "truncate", "events": 1.5}, "'events' must be an integer"),
        ({"fault": "truncate", "events": "3"}, "'events' must be a number"),
        ({"fault": "status", "status": 200}, "'status' must be between 400 and 599"),
        ({"fault": "zero", "events": 3}, "takes no parameter ['events']"),
        ({"events": 3}, '"fault" key'),
        ("not an object", '"fault" key'),
    ],
)
def test_chaos_put_rejects_bad_settings_and_keeps_the_old_one(
    gateway: Running[Gateway], body: Any, words: str
) -> None:
    """A bad PUT /_chaos is a 400 whose JSON says what is wrong and lists the valid modes;
    the setting in force does not change."""
    gateway.server.set_fault("truncate", events=2)
    resp = httpx2.put(gateway.url + "/_chaos", json=body)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert words in error["message"]
    assert error["valid_modes"] == list(FAULT_MODES)
    assert httpx2.get(gateway.url + "/_chaos").json() == {"fault": "truncate", "events": 2}


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b'{"fault": "keepalive-only", "interval": NaN}', "'interval' must be a finite"),
        (b'{"fault": "stall", "limit": Infinity}', "'limit' must be a finite"),
        (b'{"fault": "truncate", "events": -Infinity}', "'events' must be a finite"),
    ],
)
def test_chaos_put_rejects_non_finite_numbers(
    gateway: Running[Gateway], raw: bytes, words: str
) -> None:
    """NaN and Infinity (which Python's JSON parser accepts) are a 400, and GET /_chaos stays
    valid JSON: a NaN interval would spin the gateway, an infinite limit hold forever."""
    resp = httpx2.put(gateway.url + "/_chaos", content=raw)
    assert resp.status_code == 400
    assert words in resp.json()["error"]["message"]
    assert httpx2.get(gateway.url + "/_chaos").json() == {"fault": "pass"}


def test_chaos_put_invalid_json_and_wrong_method(gateway: Running[Gateway]) -> None:
    """PUT with a non-JSON body -> 400; POST /_chaos -> 405 with Allow; /_chaos/other -> 404."""
    resp = httpx2.put(gateway.url + "/_chaos", content=b"{oops")
    assert resp.status_code == 400 and resp.json()["error"]["valid_modes"]
    resp = httpx2.post(gateway.url + "/_chaos", json={"fault": "zero"})
    assert resp.status_code == 405 and resp.headers["allow"] == "GET, PUT"
    assert httpx2.get(gateway.url + "/_chaos/other").status_code == 404
    assert gateway.server.fault.mode == "pass"


def test_set_fault_validates_in_python_too(gateway: Running[Gateway]) -> None:
    """Gateway.set_fault raises ValueError naming the valid modes; Gateway() validates its fault."""
    with pytest.raises(ValueError, match="valid modes: pass, zero"):
        gateway.server.set_fault("bogus")
    with pytest.raises(ValueError, match="'limit' must be at least"):
        Gateway("http://127.0.0.1:9", fault="stall", limit=0)
    with pytest.raises(ValueError, match="http:// or https://"):
        Gateway("ftp://example")


def test_chaos_stats_count_requests_by_mode(gateway: Running[Gateway]) -> None:
    """GET /_chaos/stats counts requests under the mode they received (non-stream: pass),
    stream vs non-stream, and upstream connections (reused while keep-alive works)."""
    call(gateway)
    call(gateway, {**STREAM_BODY, "stream": False})
    gateway.server.set_fault("zero")
    call(gateway)
    call(gateway, {**STREAM_BODY, "stream": False})
    stats = httpx2.get(gateway.url + "/_chaos/stats").json()
    assert stats["requests"] == {**dict.fromkeys(FAULT_MODES, 0), "pass": 3, "zero": 1}
    assert (stats["stream_requests"], stats["non_stream_requests"]) == (2, 2)
    assert stats["upstream_connections"] == 1 and stats["upstream_requests"] == 3
    reset = httpx2.delete(gateway.url + "/_chaos/stats").json()
    assert reset["stream_requests"] == 0 and sum(reset["requests"].values()) == 0


def test_secrets_never_appear_in_logs_or_stats(
    gateway: Running[Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    """api-key / Authorization values are forwarded but never logged or counted."""
    secret = "sk-very-secret-value-123"
    with caplog.at_level(logging.DEBUG):
        gateway.server.set_fault("truncate")
        call(gateway, headers={"api-key": secret, "Authorization": f"Bearer {secret}"})
        gateway.server.set_fault("pass")
        call(gateway, {**STREAM_BODY, "stream": False}, headers={"api-key": secret})
        stats = httpx2.get(gateway.url + "/_chaos/stats").text
    assert caplog.records, "the gateway should log at debug level"
    assert secret not in caplog.text and secret not in stats


def test_hop_by_hop_headers_are_not_forwarded() -> None:
    """The upstream sees the client's headers minus hop-by-hop ones, with its own Host."""
    seen: list[list[tuple[str, str]]] = []

    class Recording(Upstream):
        async def _handle(self, req: Any, resp: Any) -> None:
            seen.append(req.headers)
            await super()._handle(req, resp)

    with (
        start_in_thread(Recording(tokens=1, token_delay=0)) as up,
        start_in_thread(Gateway(up.url)) as gw,
    ):
        call(
            gw,
            headers={
                "api-key": "k",
                "Keep-Alive": "timeout=5",
                "X-Custom": "1",
                "Connection": "X-Drop, keep-alive",
                "X-Drop": "y",
            },
        )
    names = {k.lower(): v for k, v in seen[0]}
    assert names["api-key"] == "k" and names["x-custom"] == "1"
    assert names["host"] == f"127.0.0.1:{up.port}"
    assert not {"keep-alive", "connection", "x-drop"} & set(names)


def test_upstream_down_is_a_502_that_names_it() -> None:
    """With no upstream listening, the gateway answers 502 with a JSON error naming the URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with start_in_thread(Gateway(dead)) as gw:
        raw = call(gw)
    assert raw.status == 502 and dead.encode() in raw.body


def test_upstream_dropping_mid_stream_drops_the_client() -> None:
    """If the upstream's stream is cut, the client's is cut too (never a clean end)."""
    with (
        start_in_thread(Upstream(tokens=50, token_delay=0.01)) as up,
        start_in_thread(Gateway(up.url)) as gw,
    ):
        body = json.dumps(STREAM_BODY).encode()
        head = f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        with RawClient(gw.port) as client:
            client.sock.sendall(head.encode() + body)
            time.sleep(0.1)
            up.stop()  # cuts the upstream connection mid-stream
            raw = Raw()
            try:
                client._read(raw, time.perf_counter())
            except EOFError:
                raw.end = "dropped"
    assert raw.status == 200 and raw.end == "dropped"


def test_a_client_that_leaves_cancels_its_upstream_request_at_once() -> None:
    """A client that closes its connection while the upstream is between two slow tokens:
    the gateway cancels its upstream request within about a tenth of a second, not at the
    upstream's next chunk (a second later here)."""
    with (
        start_in_thread(Upstream(tokens=20, token_delay=1.0)) as up,
        start_in_thread(Gateway(up.url)) as gw,
    ):
        body = json.dumps(STREAM_BODY).encode()
        head = f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
            sock.sendall(head.encode() + body)
            seen = b""
            while b"data:" not in seen:  # the role chunk: the stream is open
                got = sock.recv(65536)
                assert got, f"closed before the first chunk: {seen!r}"
                seen += got
            assert up.server.stats["active_streams"] == 1
        left = time.monotonic()
        while up.server.stats["active_streams"] and time.monotonic() - left < 0.9:
            time.sleep(0.005)
        took = time.monotonic() - left
        assert up.server.stats["active_streams"] == 0, "the upstream stream is still running"
        assert took < 0.5, f"cancelled after {took:.2f} s"
        assert up.server.stats["aborted_streams"] == 1


# -- the command ------------------------------------------------------------------------------


def test_gateway_command_runs_with_a_fault_and_exits_0_on_sigterm(
    upstream: Running[Upstream],
) -> None:
    """`python -m chunkwatch_lab.fault_gateway --fault truncate --events 2` prints its
    listening line, serves with that fault, and exits 0 on SIGTERM."""
    cmd = [sys.executable, "-m", "chunkwatch_lab.fault_gateway", "--upstream", upstream.url]
    proc = subprocess.Popen(
        [*cmd, "--port", "0", "--fault", "truncate", "--events", "2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("chunkwatch gateway listening on http://127.0.0.1:"), line
        url = line.split()[-1]
        assert httpx2.get(url + "/_chaos").json() == {"fault": "truncate", "events": 2}
        with RawClient(int(url.rsplit(":", 1)[1])) as client:
            assert len(client.request("POST", PATH, STREAM_BODY).data()) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (
            ["--upstream", "http://127.0.0.1:9", "--fault", "zero", "--events", "3"],
            "takes no parameter",
        ),
        (["--upstream", "http://127.0.0.1:9", "--fault", "nope"], "invalid choice: 'nope'"),
        (["--upstream", "ftp://x"], "http:// or https://"),
    ],
)
def test_gateway_command_rejects_bad_flags(args: list[str], words: str) -> None:
    """A bad fault, a parameter the fault does not take, or a bad URL: exit 2 and say why."""
    cmd = [sys.executable, "-m", "chunkwatch_lab.fault_gateway", "--port", "0", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    assert proc.returncode == 2 and words in proc.stderr


def test_gateway_command_takes_its_side_and_the_downstream_flags(
    upstream: Running[Upstream],
) -> None:
    """`--side downstream --fault buffer-kb --kb 2` serves with that setting and says its
    side in /_chaos/stats; a downstream mode without `--side downstream` exits 2 saying
    which side it belongs to."""
    cmd = [sys.executable, "-m", "chunkwatch_lab.fault_gateway", "--upstream", upstream.url]
    proc = subprocess.Popen(
        [*cmd, "--port", "0", "--side", "downstream", "--fault", "buffer-kb", "--kb", "2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip().split()[-1]
        assert httpx2.get(url + "/_chaos").json() == {"fault": "buffer-kb", "kb": 2}
        assert httpx2.get(url + "/_chaos/stats").json()["side"] == "downstream"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
    wrong = subprocess.run(
        [*cmd, "--port", "0", "--fault", "idle-timeout", "--seconds", "5"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert wrong.returncode == 2 and "is a fault of the downstream side" in wrong.stderr
    assert "--side downstream" in wrong.stderr
