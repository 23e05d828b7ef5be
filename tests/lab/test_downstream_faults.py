"""The gateway on the downstream side: in front of the real reference service (instrumented,
its LangGraph agent streaming from a local model endpoint), every downstream fault as a
client reading the gateway's SSE sees it, with the time each HTTP chunk arrived, held
against what the service's own ``sse`` layer recorded (chunkwatch.testing's ledger)."""

from __future__ import annotations

import gzip
import itertools
import json
import socket
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx2
import pytest

from chunkwatch.outcomes import Outcome
from chunkwatch.sse import Event, SSEParser
from chunkwatch.testing import Capture, RequestVerdict
from chunkwatch_lab.agent import LLMConfig
from chunkwatch_lab.downstream import DOWNSTREAM_MODES, MAX_BUFFER
from chunkwatch_lab.fault_gateway import Gateway
from chunkwatch_lab.service import ServiceConfig, create_app
from chunkwatch_lab.serving import ServiceThread
from chunkwatch_lab.threaded import Running, start_in_thread
from chunkwatch_lab.upstream import Upstream

from ..helpers import downstream_system

TOKENS = 100  # about 5 KB of token events, written over about half a second
SECOND = 1_000_000_000  # perf_counter_ns per second


# -- a client that records when each HTTP chunk arrived --------------------------------------


@dataclass
class Seen:
    """One answer from the gateway as it came off the socket."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[tuple[int, bytes]] = field(default_factory=list)  # (perf_counter_ns, bytes)
    end: str = ""  # clean (terminator / Content-Length met) or dropped (EOF before it)
    t_end: int = 0

    @property
    def body(self) -> bytes:
        return b"".join(data for _, data in self.chunks)

    def decoded(self) -> list[tuple[int, bytes]]:
        """The chunks with their Content-Encoding undone, piece by piece as they came."""
        if self.headers.get("content-encoding") != "gzip":
            return self.chunks
        gz = zlib.decompressobj(wbits=31)
        return [(t, gz.decompress(data)) for t, data in self.chunks]

    def events(self) -> list[tuple[int, Event]]:
        """Each data event, with the time the chunk that completed it arrived."""
        parser = SSEParser(collect=True, strict_json=False)
        return [(t, ev) for t, data in self.decoded() for ev in parser.feed(data)]

    def names(self) -> list[str]:
        return [ev.event for _, ev in self.events()]


def ask(url: str, message: str = "Tell me about proxies.", **headers: str) -> Seen:
    """POST /chat through ``url`` on a raw socket, reading the chunked body as it comes."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"message": message}).encode()
    head = f"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    seen, buf = Seen(), b""
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)

        def need(n: int) -> None:
            nonlocal buf
            while len(buf) < n:
                more = sock.recv(65536)
                if not more:
                    raise EOFError
                buf += more

        def line() -> bytes:
            nonlocal buf
            while b"\r\n" not in buf:
                need(len(buf) + 1)
            out, _, buf = buf.partition(b"\r\n")
            return out

        try:
            seen.status = int(line().split()[1])
            while h := line():
                name, _, value = h.decode("latin-1").partition(":")
                seen.headers[name.lower()] = value.strip()
            assert seen.headers.get("transfer-encoding") == "chunked", seen.headers
            while size := int(line(), 16):
                need(size + 2)
                seen.chunks.append((time.perf_counter_ns(), buf[:size]))
                buf = buf[size + 2 :]
            assert line() == b""
            seen.end = "clean"
        except EOFError:
            seen.end = "dropped"
    seen.t_end = time.perf_counter_ns()
    return seen


# -- the system: model endpoint -> instrumented service -> downstream gateway -> client ------


@dataclass
class Downstream:
    upstream: Running[Upstream]
    service: ServiceThread
    gateway: Running[Gateway]
    capture: Capture

    def ask(self, fault: str, **params: int | float) -> tuple[Seen, RequestVerdict]:
        """One /chat through the gateway under ``fault``, and the service's verdict on it."""
        self.gateway.server.set_fault(fault, **params)
        self.capture.clear()
        seen = ask(self.gateway.url, Accept_Encoding="gzip, deflate, br")  # as a browser
        return seen, self.capture.wait_for_verdicts(1)[0]


@pytest.fixture(scope="module")
def system() -> Iterator[Downstream]:
    with downstream_system(tokens=TOKENS, token_delay=0.005) as (up, service, gw, cap):
        ask(gw.url)  # warm the agent up: the first run is slower than the rest
        yield Downstream(up, service, gw, cap)


def sse_tally(verdict: RequestVerdict) -> tuple[int, int, int, Outcome | None]:
    """(first write, last write, data events written, outcome) of the service's sse layer."""
    [tally] = [t for t in verdict.ledger.tallies if t.layer == "sse"]
    assert tally.t_first is not None and tally.t_last is not None
    return tally.t_first, tally.t_last, tally.units, tally.outcome


def test_pass_delivers_each_event_as_the_service_writes_it(system: Downstream) -> None:
    """pass (the contrast): the events arrive spread over as long as the service took to
    write them, the first long before the last was written, all of them, done last."""
    seen, verdict = system.ask("pass")
    first, last, written, outcome = sse_tally(verdict)
    arrived = [t for t, _ in seen.events()]
    assert seen.end == "clean" and len(arrived) == written and seen.names()[-1] == "done"
    assert last - first > SECOND // 5
    assert arrived[0] < last - SECOND // 10
    assert arrived[-1] - arrived[0] > (last - first) // 2
    assert outcome == Outcome.OK and verdict.ok


def test_buffer_until_end_delivers_everything_in_one_burst_after_the_last_write(
    system: Downstream,
) -> None:
    """buffer-until-end (nginx proxy_buffering on): the service wrote its events over more
    than 0.2 s and its sse layer says ok, but the client gets every one of them in a single
    HTTP chunk that arrives after the service's last write."""
    seen, verdict = system.ask("buffer-until-end")
    first, last, written, outcome = sse_tally(verdict)
    assert outcome == Outcome.OK and verdict.ok  # chunkwatch in the service sees no fault
    assert last - first > SECOND // 5
    assert seen.end == "clean" and len(seen.chunks) == 1
    arrived = [t for t, _ in seen.events()]
    assert len(arrived) == written and seen.names()[-1] == "done"
    assert arrived[0] >= last and arrived[-1] == arrived[0]


def test_buffer_kb_delivers_bursts_of_n_kb_that_split_events(system: Downstream) -> None:
    """buffer-kb (proxy_buffers with buffering on): every HTTP chunk but the last is exactly
    `kb` KB, flushed whenever that much came in, so events arrive in bursts over the stream,
    some cut in the middle by a buffer boundary; nothing is lost."""
    seen, verdict = system.ask("buffer-kb", kb=1)
    _, last, written, outcome = sse_tally(verdict)
    sizes = [len(data) for _, data in seen.chunks]
    assert seen.end == "clean" and len(seen.body) > 3 * 1024
    assert sizes[:-1] == [1024] * (len(sizes) - 1) and 0 < sizes[-1] <= 1024
    assert any(not data.endswith(b"\n\n") for _, data in seen.chunks[:-1])  # an event split
    times = [t for t, _ in seen.chunks]
    assert times[0] < last and times[-1] >= last  # bursts while the service writes
    assert len(seen.events()) == written and outcome == Outcome.OK


def test_gzip_buffered_compresses_and_flushes_in_bursts(system: Downstream) -> None:
    """gzip-buffered (a compressing middleware/proxy): Content-Encoding gzip, the body is the
    whole stream compressed, and each compressed chunk but the last carries at least `kb`
    KB of the stream: the events wait for the compressor's buffer."""
    seen, verdict = system.ask("gzip-buffered", kb=2)
    _, _, written, outcome = sse_tally(verdict)
    assert seen.headers["content-encoding"] == "gzip" and seen.body[:2] == b"\x1f\x8b"
    assert seen.end == "clean" and outcome == Outcome.OK
    plain = [len(data) for _, data in seen.decoded()]
    assert len(plain) >= 2 and all(n >= 2048 for n in plain[:-1])
    assert gzip.decompress(seen.body).count(b"event: token") == TOKENS
    assert len(seen.events()) == written and seen.names()[-1] == "done"


def test_gzip_buffered_leaves_a_client_that_does_not_accept_gzip_alone(
    system: Downstream,
) -> None:
    """Like the real middlewares, gzip-buffered compresses only for a client that accepts
    gzip: without Accept-Encoding the stream passes as it came."""
    system.gateway.server.set_fault("gzip-buffered")
    seen = ask(system.gateway.url)
    assert "content-encoding" not in seen.headers and seen.names()[-1] == "done"
    assert len(seen.chunks) > 10


def test_close_after_events_ends_cleanly_with_fewer_events_than_written(
    system: Downstream,
) -> None:
    """close-after-events: exactly N data events, cut at an event boundary, then a clean
    end (as a close-delimited HTTP/1.0 hop's close looks behind an HTTP/1.1 proxy): no
    `done`, and the service, which had more to write, sees its client leave."""
    seen, verdict = system.ask("close-after-events", events=3)
    assert seen.end == "clean" and seen.names() == ["token"] * 3
    assert seen.body.endswith(b"\n\n")
    _, _, written, outcome = sse_tally(verdict)
    assert written >= 3 and outcome == Outcome.DISCONNECTED


def test_close_after_bytes_cuts_mid_event(system: Downstream) -> None:
    """close-after-bytes: exactly N body bytes, wherever that falls, then a clean end: a few
    whole events, the last one cut short, never dispatched."""
    seen, verdict = system.ask("close-after-bytes", bytes=500)
    assert seen.end == "clean" and len(seen.body) == 500
    assert 0 < len(seen.events()) < TOKENS and "done" not in seen.names()
    assert not seen.body.endswith(b"\n\n")
    assert sse_tally(verdict)[3] == Outcome.DISCONNECTED


def test_drop_terminal_delivers_everything_but_done(system: Downstream) -> None:
    """drop-terminal: every token, a clean end, but no `event: done` although the service
    wrote it; the service's own verdict is ok (it wrote one event more than arrived)."""
    seen, verdict = system.ask("drop-terminal")
    _, _, written, outcome = sse_tally(verdict)
    assert seen.end == "clean" and seen.names() == ["token"] * TOKENS
    assert written == TOKENS + 1 and outcome == Outcome.OK and verdict.ok
    assert b"event: done" not in seen.body


def test_downstream_faults_spare_every_answer_that_is_not_an_event_stream(
    system: Downstream,
) -> None:
    """A downstream gateway breaks only text/event-stream answers: /healthz and a JSON 400
    pass at once under every mode, counted as pass and non-stream."""
    client = httpx2.Client(base_url=system.gateway.url)
    for mode in DOWNSTREAM_MODES:
        system.gateway.server.set_fault(mode)
        system.gateway.server.reset_stats()
        start = time.monotonic()
        assert client.get("/healthz").json()["status"] == "ok"
        bad = client.post("/chat", json={"message": ""})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_message"
        assert time.monotonic() - start < 1
        stats = system.gateway.server.stats()
        assert stats["requests"]["pass"] == 2 and stats["non_stream_requests"] == 2
        assert stats["side"] == "downstream"


def test_a_side_takes_only_its_own_modes(system: Downstream) -> None:
    """An upstream mode on a downstream gateway (and the reverse) is refused, saying which
    side it belongs to; the chaos API lists this side's modes."""
    resp = httpx2.put(system.gateway.url + "/_chaos", json={"fault": "zero"})
    assert resp.status_code == 400
    error = resp.json()["error"]
    message = error["message"]
    assert "a fault of the upstream side" in message and "--side upstream" in message
    assert error["valid_modes"] == list(DOWNSTREAM_MODES)
    with pytest.raises(ValueError, match="a fault of the downstream side"):
        Gateway("http://127.0.0.1:9", fault="buffer-kb")
    with pytest.raises(ValueError, match="'kb' must be between 1 and 8192"):
        Gateway("http://127.0.0.1:9", side="downstream", fault="buffer-kb", kb=8193)
    assert 8192 * 1024 == MAX_BUFFER
    with pytest.raises(ValueError, match="side must be one of upstream, downstream"):
        Gateway("http://127.0.0.1:9", side="sideways")


# -- the idle timeout: a service with a pause in its answer ----------------------------------


@contextmanager
def slow_service(heartbeat: float) -> Iterator[Running[Gateway]]:
    """A service whose model pauses 0.6 s between tokens, with the given heartbeat, behind a
    downstream gateway with a 0.3 s idle timeout."""
    with start_in_thread(Upstream(tokens=3, token_delay=0.6)) as up:
        config = ServiceConfig(
            llm=LLMConfig(url=up.url, api_key="sk-test"), heartbeat=heartbeat, instrument=False
        )
        service = ServiceThread(create_app(config))
        try:
            gw = Gateway(service.url, side="downstream", fault="idle-timeout", seconds=0.3)
            with start_in_thread(gw) as running:
                yield running
        finally:
            service.stop()


def test_idle_timeout_cuts_a_silent_stream_and_heartbeats_below_it_prevent_it() -> None:
    """idle-timeout 0.3 s: with the service's heartbeat (15 s) above it, the connection is
    dropped (no chunk terminator, no `done`) 0.3 s after the last byte; with a 0.1 s
    heartbeat, the same pauses are filled with `: heartbeat` comments, the longest silence
    stays under 0.3 s and the whole answer arrives, `done` last."""
    with slow_service(heartbeat=15.0) as gw:
        cut = ask(gw.url)
    assert cut.status == 200 and cut.end == "dropped" and "done" not in cut.names()
    silent = (cut.t_end - cut.chunks[-1][0]) / SECOND
    assert 0.28 <= silent < 0.55, silent  # the client stamps a chunk a little after it left

    with slow_service(heartbeat=0.1) as gw:
        kept = ask(gw.url)
    assert kept.end == "clean" and kept.names() == ["token"] * 3 + ["done"]
    assert b": heartbeat" in kept.body
    times = [t for t, _ in kept.chunks]
    assert max(b - a for a, b in itertools.pairwise(times)) < 0.3 * SECOND
    assert (kept.t_end - times[0]) / SECOND > 1.2  # the pauses were there: 3 x 0.6 s


def test_idle_timeout_answers_504_when_the_head_does_not_come(
    upstream: Running[Upstream],
) -> None:
    """idle-timeout covers the wait for the response head too, as nginx's
    proxy_read_timeout does: a service that never answers gets the client a 504 page after
    `seconds`, not a hang (the service here: an upstream-side gateway in stall-headers)."""
    with (
        start_in_thread(Gateway(upstream.url, fault="stall-headers", limit=30)) as silent,
        start_in_thread(
            Gateway(silent.url, side="downstream", fault="idle-timeout", seconds=0.3)
        ) as gw,
    ):
        start = time.monotonic()
        resp = httpx2.post(gw.url + "/v1/chat/completions", json={"stream": True}, timeout=5)
        took = time.monotonic() - start
        assert resp.status_code == 504 and "504 Gateway Time-out" in resp.text
        assert 0.3 <= took < 1.5
        assert gw.server.stats()["requests"]["idle-timeout"] == 1
