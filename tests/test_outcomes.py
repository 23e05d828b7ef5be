"""The outcome rules and the verdict, on plain evidence (no I/O)."""

from __future__ import annotations

import pytest

from chunkwatch import semconv as sc
from chunkwatch.ledger import Ledger
from chunkwatch.outcomes import End, Evidence, Outcome, classify, end_for_exception
from chunkwatch.verdict import judge

MS = 1_000_000


def stream(
    *, units: int, first_ms: float, gap_ms: float, tail_ms: float = 1.0, **kw: object
) -> Evidence:
    """A stream whose first unit came after ``first_ms`` and the rest every ``gap_ms``."""
    t_first = int(first_ms * MS)
    t_last = t_first + int((units - 1) * gap_ms * MS)
    fields: dict[str, object] = dict(
        layer="gateway",
        t_start=0,
        t_first=t_first,
        t_last=t_last,
        t_end=t_last + int(tail_ms * MS),
        units=units,
        status=200,
        content_type="text/event-stream",
        terminal_known=True,
        terminal_seen=True,
        end=End.CLEAN,
    )
    fields.update(kw)
    return Evidence(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("evidence", "outcome"),
    [
        (
            Evidence(
                "gateway",
                status=200,
                content_type="text/event-stream",
                end=End.CLEAN,
                terminal_known=True,
            ),
            Outcome.EMPTY,
        ),
        (
            Evidence(
                "gateway",
                status=200,
                content_type="text/event-stream",
                end=End.ABRUPT,
                terminal_known=True,
            ),
            Outcome.EMPTY,
        ),
        (
            Evidence(
                "gateway", status=200, content_type="application/json", units=0, end=End.CLEAN
            ),
            Outcome.WRONG_CONTENT_TYPE,
        ),
        (
            Evidence(
                "gateway",
                status=200,
                content_type="text/html; charset=utf-8",
                units=0,
                end=End.CLEAN,
            ),
            Outcome.WRONG_CONTENT_TYPE,
        ),
        (
            Evidence("gateway", status=502, content_type="text/html", end=End.CLEAN),
            Outcome.HTTP_ERROR,
        ),
        (
            Evidence(
                "gateway",
                status=200,
                content_type="text/event-stream",
                units=3,
                malformed=1,
                end=End.CLEAN,
            ),
            Outcome.MALFORMED,
        ),
        (
            Evidence(
                "gateway",
                status=200,
                content_type="text/event-stream",
                pending_fields=1,
                end=End.CLEAN,
            ),
            Outcome.MALFORMED,
        ),
        (
            Evidence(
                "gateway",
                status=200,
                content_type="text/event-stream",
                gzip_magic=True,
                end=End.CLEAN,
            ),
            Outcome.MALFORMED,
        ),
        (
            Evidence(
                "gateway",
                status=200,
                content_type="text/event-stream",
                units=3,
                error_events=1,
                end=End.CLEAN,
            ),
            Outcome.ERROR_EVENT,
        ),
        (
            Evidence(
                "gateway",
                status=200,
                content_type="text/event-stream",
                units=0,
                stalled="first_chunk",
                end=End.TIMEOUT,
            ),
            Outcome.STALLED,
        ),
        (
            Evidence(
                "gateway",
                status=200,
                content_type="text/event-stream",
                units=3,
                terminal_known=True,
                end=End.CLEAN,
            ),
            Outcome.TRUNCATED,
        ),
        (
            Evidence(
                "gateway",
                status=200,
                content_type="text/event-stream",
                units=3,
                terminal_known=True,
                end=End.ABRUPT,
            ),
            Outcome.TRUNCATED,
        ),
        (Evidence("sdk", units=3, terminal_known=True, end=End.CLOSED), Outcome.DISCONNECTED),
        (Evidence("sdk", units=3, terminal_known=True, end=End.ABANDONED), Outcome.ABANDONED),
        (
            Evidence("sdk", units=3, terminal_known=True, terminal_seen=True, end=End.CLOSED),
            Outcome.OK,
        ),
        (Evidence("queue", units=80, units_in=120, end=End.CLEAN), Outcome.LOST),
        (Evidence("langgraph", units=2, end=End.ERROR, exc_type="KeyError"), Outcome.ERROR),
        (
            Evidence("gateway", needs_status=True, end=End.ABRUPT, exc_type="ConnectError"),
            Outcome.ERROR,
        ),
        (Evidence("sdk", units=2, end=End.ERROR, exc_type="JSONDecodeError"), Outcome.MALFORMED),
        (
            Evidence(
                "gateway",
                status=200,
                stream_requested=False,
                content_type="application/json",
                units=1,
                end=End.CLEAN,
            ),
            Outcome.OK,
        ),
    ],
)
def test_rules(evidence: Evidence, outcome: Outcome) -> None:
    """Each documented rule gives its outcome for the evidence that defines it."""
    assert classify(evidence) is outcome


def test_rule_order_http_error_beats_everything() -> None:
    """A 4xx/5xx is http_error even with wrong content type and zero events."""
    ev = Evidence("gateway", status=400, content_type="application/json", end=End.CLEAN)
    assert classify(ev) is Outcome.HTTP_ERROR


def test_buffered_when_every_event_arrives_in_one_burst_at_the_end() -> None:
    """60 events after 1.2 s of silence, microseconds apart: buffered."""
    assert classify(stream(units=60, first_ms=1200, gap_ms=0.01)) is Outcome.BUFFERED


@pytest.mark.parametrize(
    ("units", "first_ms", "gap_ms", "why"),
    [
        (200, 300, 20, "a healthy stream, 50 tokens/s"),
        (5, 2000, 8, "a slow first token then a fast short answer"),
        (200, 5, 0.5, "a very fast model, 2000 tokens/s"),
        (12, 40, 0.02, "a fast local stream: under the minimum wait"),
        (30, 800, 1500, "a slow model: 1.5 s between tokens"),
        (2, 3000, 0.01, "too few units to judge"),
    ],
)
def test_buffered_does_not_fire_on_healthy_streams(
    units: int, first_ms: float, gap_ms: float, why: str
) -> None:
    """Healthy fast, slow and short streams are ok, not buffered."""
    assert classify(stream(units=units, first_ms=first_ms, gap_ms=gap_ms)) is Outcome.OK, why


@pytest.mark.parametrize(
    ("exc", "end"),
    [
        (TimeoutError(), End.TIMEOUT),
        (ConnectionResetError(), End.ABRUPT),
        (GeneratorExit(), End.CLOSED),
        (KeyError("x"), End.ERROR),
    ],
)
def test_end_for_exception(exc: BaseException, end: End) -> None:
    """Exceptions map to how the stream ended, by class name anywhere in the MRO."""
    assert end_for_exception(exc) is end


def test_end_for_library_exceptions() -> None:
    """httpx2 / openai exception classes are recognised without importing them here."""
    import httpx2
    import openai

    req = httpx2.Request("POST", "http://x")
    assert end_for_exception(httpx2.RemoteProtocolError("x")) is End.ABRUPT
    assert end_for_exception(httpx2.ReadTimeout("x")) is End.TIMEOUT
    assert end_for_exception(openai.APIConnectionError(request=req)) is End.ABRUPT
    assert end_for_exception(openai.APITimeoutError(request=req)) is End.TIMEOUT


def finished(ledger: Ledger, layer: str, end: End = End.CLEAN, **facts: object) -> None:
    tally = ledger.open(layer)
    for key, value in facts.items():
        setattr(tally, key, value)
    tally.finish(end)


def test_verdict_names_the_lowest_faulty_layer() -> None:
    """gateway empty, sdk empty, langgraph error, sse ok: empty@gateway."""
    ledger = Ledger()
    finished(ledger, sc.SSE, units=1)
    finished(ledger, sc.LANGGRAPH, End.ERROR, exc_type="StreamEmptyError")
    finished(ledger, sc.SDK, terminal_known=True)
    finished(ledger, sc.GATEWAY, status=200, content_type="text/event-stream", terminal_known=True)
    v = judge(ledger)
    assert (str(v), v.layer, v.outcome) == ("empty@gateway", "gateway", Outcome.EMPTY)
    assert v.detail.startswith("gateway: HTTP 200 text/event-stream, 0 data events, closed cleanly")


def test_verdict_lost_between_layers() -> None:
    """sdk passed on fewer chunks than the gateway delivered: lost@sdk, with the numbers."""
    ledger = Ledger()
    finished(
        ledger,
        sc.GATEWAY,
        status=200,
        content_type="text/event-stream",
        units=120,
        terminal_known=True,
        terminal_seen=True,
    )
    finished(ledger, sc.SDK, units=80, terminal_known=True, terminal_seen=True)
    v = judge(ledger)
    assert str(v) == "lost@sdk"
    assert "80 of the 120" in v.detail


def test_verdict_of_a_client_that_left_names_the_layer_that_noticed() -> None:
    """Everything cancelled by a disconnect: disconnected@sse, not a fault lower down."""
    ledger = Ledger()
    finished(
        ledger,
        sc.GATEWAY,
        End.CLOSED,
        status=200,
        content_type="text/event-stream",
        units=3,
        terminal_known=True,
    )
    finished(ledger, sc.SDK, End.CLOSED, units=3, terminal_known=True)
    finished(ledger, sc.SSE, End.CLOSED, units=3)
    finished(ledger, sc.HTTP, End.CLOSED, units=1)
    assert str(judge(ledger)) == "disconnected@sse"


def test_healthy_verdict_is_ok_with_the_funnel() -> None:
    """All ok: verdict ok, layer none, detail lists the funnel bottom-up."""
    ledger = Ledger()
    finished(ledger, sc.SSE, units=13)
    finished(
        ledger,
        sc.GATEWAY,
        status=200,
        content_type="text/event-stream",
        units=15,
        terminal_known=True,
        terminal_seen=True,
    )
    v = judge(ledger)
    assert (str(v), v.layer) == ("ok", "none")
    assert v.detail == "every layer passed its data on (gateway 15, sse 13)"


def test_finish_is_once() -> None:
    """A tally finalizes once: later finishes return the first outcome and report nothing."""
    calls: list[str] = []
    ledger = Ledger()
    tally = ledger.open(sc.SDK, on_finish=lambda t: calls.append(str(t.outcome)))
    tally.unit()
    assert tally.finish(End.ABANDONED) is Outcome.ABANDONED
    assert tally.finish(End.CLEAN) is Outcome.ABANDONED
    assert calls == ["abandoned"]


def test_a_healthy_verdict_writes_its_words_when_read_and_is_a_verdict() -> None:
    """``ok`` over finished streams: the funnel in words only when its detail is read (no
    INFO log, span or browser asks on most requests), then what eager words would say; equal
    to, hashed like, replaced and frozen like any Verdict. With a stream still open the words
    are written at once (units may still come)."""
    from dataclasses import FrozenInstanceError, replace

    from chunkwatch.ledger import Ledger
    from chunkwatch.verdict import Verdict

    ledger = Ledger()
    for layer in ("http", "sse", "queue", "langgraph", "sdk", "gateway"):
        t = ledger.open(layer, stream_requested=True)
        t.unit()
        t.finish(End.CLEAN)
    ledger.closed = True
    verdict = judge(ledger)
    assert "detail" not in verdict.__dict__  # not written yet
    words = "every layer passed its data on (gateway 1, sdk 1, langgraph 1, queue 1, sse 1, http 1)"
    eager = Verdict(Outcome.OK, "none", words)
    assert verdict == eager and eager == verdict and hash(verdict) == hash(eager)
    assert verdict.detail == words and verdict.as_dict()["detail"] == words
    assert repr(verdict) == repr(eager) and str(verdict) == "ok" and verdict.ok
    assert replace(verdict, detail="x").detail == "x"
    with pytest.raises(FrozenInstanceError):
        verdict.layer = "sse"  # type: ignore[misc]
    ledger.open("sdk", stream_requested=True)  # still open when the request ended
    assert "detail" in judge(ledger).__dict__
