"""The browser layer's outcome from synthetic beacons, against a record of what the sse
layer wrote: the same rules as every layer (chunkwatch.outcomes.classify)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from chunkwatch.browser_layer import browser_tally, record_browser
from chunkwatch.browser_token import StreamRecord
from chunkwatch.outcomes import Evidence, Outcome, classify
from chunkwatch.runtime import Runtime


def written(events: int = 13, first_ms: float = 40.0, last_ms: float = 520.0) -> StreamRecord:
    """The sse layer wrote `events`, the first at first_ms, the last at last_ms."""
    return StreamRecord(
        expiry=2**40,
        events=events,
        first_ms=first_ms,
        last_ms=last_ms,
        terminal=True,
        parent=None,
        upstream="test-gw",
        funnel={"gateway": 12, "sse": events, "http": 1},
    )


def seen(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": 1,
        "token": "t",
        "events": 13,
        "first_byte_ms": 5.0,
        "first_event_ms": 45.0,
        "gap_max_ms": 42.0,
        "terminal": True,
        "end": "clean",
        "duration_ms": 530.0,
    }
    body.update(fields)
    return body


def outcome(record: StreamRecord, beacon: dict[str, Any]) -> Outcome:
    rt = Runtime(registry=CollectorRegistry())
    try:
        tally = browser_tally(rt, record, beacon)
        assert tally.outcome is not None
        return tally.outcome
    finally:
        rt.close()


def test_the_same_count_as_sse_is_ok() -> None:
    """Every event written arrived, as it was written, the terminal one last: ok."""
    assert outcome(written(), seen()) is Outcome.OK


def test_fewer_than_written_is_lost() -> None:
    """The terminal event arrived but two events did not: lost."""
    assert outcome(written(), seen(events=11)) is Outcome.LOST


def test_written_over_seconds_arrived_in_one_burst_is_buffered() -> None:
    """Written over 1.5 s; the browser's first event after 1.6 s, the rest within 1 ms
    each (a store-and-forward hop): buffered, though every event arrived."""
    record = written(events=30, first_ms=50, last_ms=1550)
    beacon = seen(events=30, first_event_ms=1600.0, gap_max_ms=2.0, duration_ms=1640.0)
    assert outcome(record, beacon) is Outcome.BUFFERED
    # The same burst from a stream written in a burst itself is no hop's doing: ok.
    fast = written(events=30, first_ms=1500, last_ms=1550)
    assert outcome(fast, beacon) is Outcome.OK
    # Events as they were written, late first (a slow model): ok.
    assert outcome(record, seen(events=30, first_event_ms=60.0, duration_ms=1600)) is Outcome.OK


def test_closed_before_the_terminal_is_disconnected() -> None:
    """The person left (page hidden, stop) before the terminal event: disconnected."""
    beacon = seen(events=5, terminal=False, end="closed")
    assert outcome(written(), beacon) is Outcome.DISCONNECTED


def test_cut_without_the_terminal_is_truncated() -> None:
    """The body ended without the terminal event (a hop closed early): truncated."""
    beacon = seen(events=5, terminal=False, end="abrupt")
    assert outcome(written(), beacon) is Outcome.TRUNCATED
    assert outcome(written(), seen(events=0, first_event_ms=None, gap_max_ms=None)) is (
        Outcome.EMPTY
    )


def test_the_record_gains_the_browser_row() -> None:
    """An accepted beacon adds the browser to the funnel and its outcome to the record;
    the request's verdict is left as it was drawn."""
    record = written()
    record.verdict = {"layer": "none", "outcome": "ok", "detail": "ok"}
    rt = Runtime(registry=CollectorRegistry())
    try:
        record_browser(rt, record, seen(events=11))
    finally:
        rt.close()
    assert record.funnel == {"gateway": 12, "sse": 13, "http": 1, "browser": 11}
    assert record.browser == {"events": 11, "outcome": "lost", "end": "clean", "terminal": True}
    assert record.verdict["outcome"] == "ok"


def test_the_relative_buffer_rule_needs_the_layer_below() -> None:
    """Without `spread_below`, classify's rule 12 is as before (layers other than browser)."""
    ev = Evidence("sse", t_start=0, t_first=300_000_000, t_last=400_000_000, t_end=401_000_000)
    ev.units = 30
    assert classify(ev) is Outcome.OK
    ev.spread_below = 1_000_000_000
    assert classify(ev) is Outcome.BUFFERED
