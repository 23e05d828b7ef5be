"""The chat page and chunkwatch.js in a real browser (Debian's Chromium, headless), against
the real reference service: local upstream, fault gateway, Flask, LangGraph, the openai
SDK, all on loopback.

The page tests drive the page as a person would (type, send, read); the event counts the
browser reports are held to what the service's ``sse`` layer wrote, from chunkwatch's own
verdict of the request. chunkwatch.js's SSE parser and beacon are tested in the same
browser on synthetic ``Response`` bodies (a ``ReadableStream`` fed chunk by chunk, with a
clock the test sets), so every split, line end and ending is exact; ``sendBeacon`` is
replaced in the page to capture what would be sent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from flask import request

from chunkwatch.guard import BreakerConfig
from chunkwatch_lab.agent import LLMConfig
from chunkwatch_lab.service import ServiceConfig, create_app
from chunkwatch_lab.serving import ServiceThread
from chunkwatch_lab.upstream import answer_tokens

from ..helpers import System, instrumented_system

if TYPE_CHECKING:  # imported by pytest as a plugin (so its asserts are rewritten)
    from playwright.sync_api import Browser

    from .browser import Tab

pytest_plugins = ("tests.lab.browser",)

PROMPT = "How far did the stream get?"
ANSWER = "".join(answer_tokens(PROMPT, 12))
BEACON_FIELDS = {
    "v",
    "token",
    "events",
    "first_byte_ms",
    "first_event_ms",
    "gap_max_ms",
    "terminal",
    "end",
    "duration_ms",
}

OpenTab = Callable[[str], "Tab"]


# -- the page against the real service ---------------------------------------------------------


def _sse_events_written(system: System) -> int:
    """Events the service's sse layer wrote for the one request (chunkwatch's verdict)."""
    (verdict,) = system.capture.wait_for_verdicts(1)
    return verdict.funnel["sse"]


def test_healthy_the_page_shows_the_answer_as_it_streams_and_counts_what_sse_wrote(
    open_tab: OpenTab,
) -> None:
    """A healthy answer appears token by token (the answer box grows in many steps over
    the answer's time, not at once), whole in the end; chunkwatch.js counts as many events
    as the sse layer wrote, the terminal event arrived and the stream ended `clean`; the
    funnel shows the browser's count, and the server layers' counts once the service reported
    them (after the beacon)."""
    with instrumented_system(tokens=12, token_delay=0.04) as system:
        tab = open_tab(system.service.url)
        tab.open()
        from .browser import record_answer_changes  # the plugin's module

        record_answer_changes(tab)
        tab.ask(PROMPT)
        assert tab.wait_for_state("done", "error", "stopped") == "done"
        assert tab.text("#answer") == ANSWER
        assert tab.page.locator("#answer").get_attribute("aria-live") == "polite"
        changes = [c for c in tab.evaluate("window.changes") if c[1] > 0]
        # 12 tokens 40 ms apart, shown as they come: over most of 440 ms, not all at once.
        assert len({length for _, length in changes}) >= 6, changes
        assert changes[-1][0] - changes[0][0] >= 250, changes
        stream = tab.last_stream()
        written = _sse_events_written(system)
        assert written == 13  # 12 tokens and `done`
        assert stream["events"] == written
        assert stream["terminal"] is True and stream["end"] == "clean"
        assert stream["beacon"] == "sent"  # to the service's endpoint, with its stream token
        assert 0 < stream["first_byte_ms"] <= stream["first_event_ms"] <= stream["duration_ms"]
        assert stream["gap_max_ms"] >= 20  # tokens came 40 ms apart
        assert tab.text("#browser-events") == str(written)
        assert tab.text("#browser-end") == "clean"
        # The server rows, from the service's report once the beacon was recorded
        # (tests/lab/test_browser_layer.py): units per layer; no verdict layer when ok.
        tab.page.wait_for_selector('body[data-browser-outcome="ok"]', state="attached")
        rows = {
            layer: tab.page.locator(f'tr[data-layer="{layer}"] td').all_inner_texts()
            for layer in ("gateway", "sdk", "langgraph", "queue", "sse")
        }
        funnel = system.capture.wait_for_verdicts(1)[0].funnel
        assert rows == {layer: [str(funnel[layer]), "—"] for layer in rows if layer in funnel}
        assert tab.page.locator("#error").is_hidden()
        assert tab.chats == [system.service.url + "/chat"]


def test_upstream_zero_without_the_guard_shows_the_error_in_words(open_tab: OpenTab) -> None:
    """Upstream `zero` (HTTP 200, no events) with the guard off: the page says what failed,
    where chunkwatch saw the data stop (gateway, empty), what it saw, and the request's
    trace id — the same verdict and trace the service recorded."""
    with instrumented_system(tokens=12, token_delay=0.01) as system:
        system.gateway.server.set_fault("zero")
        tab = open_tab(system.service.url)
        tab.open()
        tab.ask(PROMPT)
        assert tab.wait_for_state("done", "error", "stopped") == "error"
        (verdict,) = system.capture.wait_for_verdicts(1)
        assert str(verdict) == "empty@gateway"
        words = tab.text("#error")
        assert "The answer failed: No generations found in stream." in words
        assert "at the gateway layer (empty)" in words
        assert f"What chunkwatch saw: {verdict.detail}" in words
        assert verdict.trace_id and f"Trace id: {verdict.trace_id}" in words
        assert tab.page.get_by_role("alert").is_visible()
        stream = tab.last_stream()
        assert stream["events"] == verdict.funnel["sse"] == 1  # the error event alone
        assert stream["terminal"] is True and stream["end"] == "clean"
        assert tab.text("#answer") == ""


def test_upstream_zero_with_the_guard_shows_the_switch_and_still_an_answer(
    open_tab: OpenTab,
) -> None:
    """The guard on (breaker configured): the broken token stream falls back to state
    streaming; the page says so, naming the reason, and shows the whole answer."""
    breaker = BreakerConfig(failures=1000)
    with instrumented_system(tokens=12, token_delay=0.01, guard=True, breaker=breaker) as system:
        system.gateway.server.set_fault("zero")
        tab = open_tab(system.service.url)
        tab.open()
        tab.ask(PROMPT)
        assert tab.wait_for_state("done", "error", "stopped") == "done"
        note = tab.text("#mode")
        assert "The token stream broke (empty@gateway)" in note
        assert "switched to state streaming (updates)" in note
        assert tab.text("#answer") == ANSWER
        assert tab.page.locator("#error").is_hidden()
        stream = tab.last_stream()
        assert stream["events"] == _sse_events_written(system) == 3  # mode, update, done
        assert stream["end"] == "clean"


def test_q_sends_once_on_load_and_not_again_on_reload(open_tab: OpenTab) -> None:
    """`/?q=TEXT` fills the box with TEXT and sends it once; the query leaves the address
    bar, so reloading the page does not send it again."""
    with instrumented_system(tokens=12, token_delay=0.01) as system:
        tab = open_tab(system.service.url)
        tab.open("/?q=" + "How%20far%20did%20the%20stream%20get%3F")
        assert tab.wait_for_state("done", "error", "stopped") == "done"
        assert tab.page.get_by_label("Your message").input_value() == PROMPT
        assert tab.text("#answer") == ANSWER
        assert tab.page.url == system.service.url + "/"
        tab.page.reload()
        tab.page.wait_for_function("document.body.dataset.state === 'idle'")
        tab.page.wait_for_timeout(300)  # a resend would be on its way by now
        assert len(tab.chats) == 1
        assert len(system.capture.wait_for_verdicts(1)) == 1


# -- chunkwatch.js on synthetic bodies ----------------------------------------------------------


@dataclass
class Bare:
    url: str
    beacons: list[tuple[str, bytes]]  # (Content-Type, body) of each POST /test-beacon


@pytest.fixture(scope="module")
def bare() -> Iterator[Bare]:
    """The reference service uninstrumented and without a model: its page and
    /chunkwatch.js are all these tests need (an origin to import the module from). Plus a
    test-only `POST /test-beacon` that records what the browser really sent (the service's
    own beacon endpoint is not built yet)."""
    config = ServiceConfig(llm=LLMConfig(url="http://127.0.0.1:9", api_key="x"), instrument=False)
    app = create_app(config)
    received: list[tuple[str, bytes]] = []

    def record() -> tuple[str, int]:
        received.append((request.content_type or "", request.get_data()))
        return "", 204

    app.add_url_rule("/test-beacon", "test_beacon", record, methods=["POST"])
    service = ServiceThread(app)
    try:
        yield Bare(service.url, received)
    finally:
        service.stop()


@pytest.fixture(scope="module")
def bare_service(bare: Bare) -> str:
    return bare.url


@pytest.fixture(scope="module")
def tab(chromium: Browser, bare_service: str) -> Iterator[Tab]:
    """One page for the synthetic tests (each run builds its own body and stubs
    `sendBeacon` anew): a browser context costs about a second."""
    from .browser import tab_on  # the plugin pytest loaded (see pytest_plugins)

    with tab_on(chromium, bare_service) as t:
        t.open()
        yield t


# Runs chunkwatch.js's `events` on a body fed chunk by chunk. Each chunk is [at, kind, bytes]:
# the clock is set to `at` ms when the reader asks for it (highWaterMark 0: nothing is read
# ahead), then `data` enqueues the bytes, `close` ends the body, `TypeError` / `AbortError`
# fail it. `sendBeacon` is replaced to capture what would be sent.
RUN = """
async ({chunks, headers, options, breakAfter, hideAfter, hide}) => {
  const cw = await import('/chunkwatch.js');
  const beacons = [];
  navigator.sendBeacon = (url, data) => {
    beacons.push({url: String(url), type: data.type, size: data.size, body: data.text()});
    return true;
  };
  let t = 0, i = 0, cancelled = false, thrown = null;
  const source = {
    pull(c) {
      if (i >= chunks.length) { c.close(); return; }
      const [at, kind, bytes] = chunks[i++];
      t = at;
      if (kind === 'data') c.enqueue(new Uint8Array(bytes));
      else if (kind === 'close') c.close();
      else if (kind === 'TypeError') { thrown = new TypeError('network error'); c.error(thrown); }
      else { thrown = new DOMException('aborted', 'AbortError'); c.error(thrown); }
    },
    cancel() { cancelled = true; },
  };
  const body = new ReadableStream(source, {highWaterMark: 0});
  const response = new Response(body, {headers: headers || {}});
  const got = [];
  let error = null;
  try {
    for await (const ev of cw.events(response, {...options, start: 0, now: () => t})) {
      got.push(ev);
      if (hide && got.length === hideAfter) {
        if (hide === 'pagehide') {
          window.dispatchEvent(new PageTransitionEvent('pagehide', {persisted: false}));
        } else {
          const hidden = {configurable: true, get: () => 'hidden'};
          Object.defineProperty(document, 'visibilityState', hidden);
          document.dispatchEvent(new Event('visibilitychange'));
          delete document.visibilityState;  // the prototype's getter again
        }
      }
      if (breakAfter && got.length === breakAfter) break;
    }
  } catch (err) {
    error = {name: err.name, same: err === thrown};
  }
  await new Promise((r) => setTimeout(r, 0));  // a cancel() the generator started
  for (const b of beacons) b.body = await b.body;
  return {events: got, stream: cw.lastStream(), beacons, error, cancelled};
}
"""


def data(at: float, payload: str | bytes) -> list[Any]:
    raw = payload.encode() if isinstance(payload, str) else payload
    return [at, "data", list(raw)]


def run(tab: Tab, chunks: list[list[Any]], **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "chunks": chunks,
        "headers": None,
        "options": {},
        "breakAfter": 0,
        "hide": None,
    }
    args.update(kw)
    args.setdefault("hideAfter", 0)
    got = tab.evaluate(RUN, args)
    assert isinstance(got, dict)
    return got


STREAM_TOKEN = {"X-Chunkwatch-Stream": "st.1234.abcd"}
BEACON = {"beaconEndpoint": "/chunkwatch/beacon"}
GOOD = [
    data(5, ": open\n\n"),
    data(12.34, 'event: token\ndata: {"text": "a"}\n\n'),
    data(40, 'event: token\ndata: {"text": "b"}\n\n'),
    data(45.06, "event: done\ndata: {}\n\n"),
    [50, "close", []],
]


def test_the_parser_follows_the_sse_standard_across_any_chunking(tab: Tab) -> None:
    """A leading BOM, CRLF split between chunks, a field name split, CR-only and LF line
    ends, multi-line data, `id`, comments, an event with no data (not dispatched), a field
    with no colon, a UTF-8 character split between chunks, and a last event with no blank
    line (dropped): the events come out as the standard parses them."""
    chunks = [
        data(1, b"\xef\xbb\xbf: open\r\n\r\n"),
        data(2, "event: tok"),
        data(3, "en\r"),
        data(4, '\ndata: {"text"'),
        data(5, ': "a"}\r\n\r'),
        data(6, "\ndata: line one\ndata: line two\n\n"),
        data(7, "data:no-space\rid: 7\r\r"),
        data(8, ": heartbeat\n\nevent: x\n\n"),
        data(9, "data\n\n"),
        data(10, b"data: h\xc3"),
        data(11, b"\xa9llo\n\n"),
        data(12, "event: done\ndata: {}\n\n"),
        data(13, "data: never ended"),
        [14, "close", []],
    ]
    got = run(tab, chunks)
    assert got["events"] == [
        {"event": "token", "data": '{"text": "a"}', "id": ""},
        {"event": "message", "data": "line one\nline two", "id": ""},
        {"event": "message", "data": "no-space", "id": "7"},
        {"event": "message", "data": "", "id": "7"},
        {"event": "message", "data": "héllo", "id": "7"},
        {"event": "done", "data": "{}", "id": "7"},
    ]
    assert got["error"] is None
    stream = got["stream"]
    assert stream["events"] == 6 and stream["terminal"] is True and stream["end"] == "clean"
    assert stream["beacon"] == "off" and got["beacons"] == []


def test_the_counts_are_in_ms_from_the_start_rounded_to_a_tenth(tab: Tab) -> None:
    """First byte, first event, longest gap between events and duration, from the given
    start, rounded to 0.1 ms."""
    stream = run(tab, GOOD)["stream"]
    assert stream == {
        "events": 3,
        "first_byte_ms": 5,
        "first_event_ms": 12.3,
        "gap_max_ms": 27.7,  # 40 - 12.34
        "terminal": True,
        "end": "clean",
        "duration_ms": 50,
        "open": False,
        "beacon": "off",
    }


def test_one_beacon_at_the_end_with_the_documented_fields_only(tab: Tab) -> None:
    """With an endpoint and the response's X-Chunkwatch-Stream: exactly one beacon, to the
    endpoint, text/plain (no CORS preflight), under 512 bytes, holding exactly the contract's
    fields — the stream token and the counts, nothing of the text."""
    got = run(tab, GOOD, headers=STREAM_TOKEN, options=BEACON)
    (beacon,) = got["beacons"]
    assert beacon["url"] == "/chunkwatch/beacon"
    assert beacon["type"] == "text/plain;charset=utf-8"
    assert beacon["size"] < 512
    body = json.loads(beacon["body"])
    assert set(body) == BEACON_FIELDS
    assert body == {
        "v": 1,
        "token": "st.1234.abcd",
        "events": 3,
        "first_byte_ms": 5,
        "first_event_ms": 12.3,
        "gap_max_ms": 27.7,
        "terminal": True,
        "end": "clean",
        "duration_ms": 50,
    }
    assert got["stream"]["beacon"] == "sent"


@pytest.mark.parametrize(
    ("headers", "options"),
    [(STREAM_TOKEN, {}), ({}, BEACON), ({"X-Chunkwatch-Stream": "x" * 300}, BEACON)],
    ids=["no-endpoint", "no-stream-header", "oversized-token"],
)
def test_no_beacon_without_an_endpoint_or_a_stream_token(
    tab: Tab, headers: dict[str, str], options: dict[str, str]
) -> None:
    """No endpoint, no X-Chunkwatch-Stream header, or a token too long to be the service's
    (the body would pass 512 bytes): nothing is sent; the stream is still counted."""
    got = run(tab, GOOD, headers=headers, options=options)
    assert got["beacons"] == []
    assert got["stream"]["beacon"] == "off" and got["stream"]["events"] == 3


@pytest.mark.parametrize("hide", ["pagehide", "visibilitychange"])
def test_page_hide_sends_the_one_beacon_first_as_closed(tab: Tab, hide: str) -> None:
    """The page hidden mid-stream (pagehide, or visibilitychange to hidden): the beacon goes
    at once, `closed`, with the counts so far; the stream's own end later sends no second."""
    got = run(tab, GOOD, headers=STREAM_TOKEN, options=BEACON, hide=hide, hideAfter=1)
    assert len(got["events"]) == 3  # the caller still reads everything
    (beacon,) = got["beacons"]
    body = json.loads(beacon["body"])
    assert set(body) == BEACON_FIELDS
    assert body["end"] == "closed" and body["events"] == 1 and body["terminal"] is False
    assert body["duration_ms"] == 12.3
    assert got["stream"]["end"] == "closed" and got["stream"]["beacon"] == "sent"


@pytest.mark.parametrize(
    ("tail", "end", "error"),
    [
        ([[30, "close", []]], "abrupt", None),
        ([[30, "TypeError", []]], "abrupt", "TypeError"),
        ([[30, "AbortError", []]], "closed", "AbortError"),
    ],
    ids=["body-ends-without-terminal", "network-error", "aborted"],
)
def test_how_a_stream_ended(tab: Tab, tail: list[list[Any]], end: str, error: str | None) -> None:
    """The body ends without the terminal event (`abrupt`); the network fails mid-body
    (`abrupt`); the fetch is aborted (`closed`). The reader's error reaches the caller
    unchanged (the same object), and the one beacon says how it ended."""
    got = run(tab, [*GOOD[:2], *tail], headers=STREAM_TOKEN, options=BEACON)
    assert len(got["events"]) == 1
    if error is None:
        assert got["error"] is None
    else:
        assert got["error"] == {"name": error, "same": True}
    (beacon,) = got["beacons"]
    body = json.loads(beacon["body"])
    assert body["end"] == end and body["terminal"] is False and body["duration_ms"] == 30


@pytest.mark.parametrize(
    ("stop_after", "end"), [(1, "closed"), (3, "clean")], ids=["before-terminal", "after"]
)
def test_the_caller_stopping_closes_the_body(tab: Tab, stop_after: int, end: str) -> None:
    """`break` before the terminal event is `closed`; after it, `clean` (everything came).
    Either way the body is cancelled, so the service sees the client go."""
    got = run(tab, GOOD, headers=STREAM_TOKEN, options=BEACON, breakAfter=stop_after)
    assert got["cancelled"] is True
    (beacon,) = got["beacons"]
    assert json.loads(beacon["body"])["end"] == end


def test_a_custom_terminal_event_and_a_failed_response(tab: Tab) -> None:
    """`terminal` names the events that end a stream; a response that is not 2xx yields no
    event and ends `error`."""
    custom = run(tab, GOOD, options={"terminal": ["token"]})["stream"]
    assert custom["terminal"] is True
    failed = tab.evaluate(
        """async () => {
            const cw = await import('/chunkwatch.js');
            const r = new Response('{"error": {}}', {status: 503});
            const got = [];
            for await (const ev of cw.events(r)) got.push(ev);
            return {got, stream: cw.lastStream()};
        }"""
    )
    assert failed["got"] == []
    assert failed["stream"]["end"] == "error" and failed["stream"]["events"] == 0


def test_page_routes_serve_their_files_and_nothing_else(tab: Tab, bare_service: str) -> None:
    """`/`, `/static/<name>` and `/chunkwatch.js` answer with their content types and
    `Cache-Control: no-cache`; names outside the page's files, traversal included, are 404."""
    request = tab.page.request
    for path, kind in [
        ("/", "text/html; charset=utf-8"),
        ("/static/app.js", "text/javascript; charset=utf-8"),
        ("/static/page.css", "text/css; charset=utf-8"),
        ("/chunkwatch.js", "text/javascript; charset=utf-8"),
    ]:
        r = request.get(bare_service + path)
        assert r.status == 200, path
        assert r.headers["content-type"] == kind, path
        assert r.headers["cache-control"] == "no-cache", path
    for path in ["/static/../page.py", "/static/%2e%2e%2fpage.py", "/static/page.py", "/static/x"]:
        assert request.get(bare_service + path).status == 404, path


def test_a_real_page_leave_sends_the_beacon_over_the_network(open_tab: OpenTab, bare: Bare) -> None:
    """No stub: with a stream still open, the person leaves the page (a real navigation,
    so a real `pagehide`); Chromium sends the one beacon as a text/plain POST to the
    endpoint, and the body the server receives is the contract's fields, `end` `closed`."""
    tab = open_tab(bare.url)
    tab.open()
    bare.beacons.clear()
    tab.evaluate(
        """async () => {
            const cw = await import('/chunkwatch.js');
            const enc = new TextEncoder();
            const body = new ReadableStream({
              start(c) { c.enqueue(enc.encode(': open\\n\\nevent: token\\ndata: {}\\n\\n')); },
            });  // and never ends
            const r = new Response(body, {headers: {'X-Chunkwatch-Stream': 'st.leave'}});
            const it = cw.events(r, {beaconEndpoint: '/test-beacon'});
            await it.next();  // one event in; the stream stays open
            window.reading = it.next();
        }"""
    )
    tab.page.goto(bare.url + "/healthz")
    deadline = time.monotonic() + 5
    while not bare.beacons and time.monotonic() < deadline:
        time.sleep(0.02)
    ((kind, raw),) = bare.beacons
    assert kind == "text/plain;charset=utf-8"  # Blob types are lower-cased
    body = json.loads(raw)
    assert set(body) == BEACON_FIELDS
    assert body["token"] == "st.leave" and body["events"] == 1 and body["end"] == "closed"


def test_off_loopback_requests_are_refused_and_the_page_allows_only_its_origin(
    open_tab: OpenTab, bare_service: str
) -> None:
    """The guard every page test runs under works: a request off loopback is refused and
    recorded (here from a document without the page's policy). The page itself is served
    with a same-origin Content-Security-Policy, so the browser refuses such a request
    before it is made."""
    tab = open_tab(bare_service)
    tab.page.goto(bare_service + "/healthz")
    refused = tab.evaluate("fetch('http://192.0.2.1/x').then(() => false, () => true)")
    assert refused is True
    assert tab.outside == ["http://192.0.2.1/x"]
    assert tab.errors == ["console: Failed to load resource: net::ERR_FAILED"]
    tab.outside.clear()  # seen: the teardown's checks are for the page tests
    tab.errors.clear()
    policy = tab.page.request.get(bare_service + "/").headers["content-security-policy"]
    assert policy.startswith("default-src 'self'")
