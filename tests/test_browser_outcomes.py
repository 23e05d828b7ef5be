"""The browser layer's outcome from synthetic beacons, against a record of what the sse
layer wrote: the same rules as every layer (chunkwatch.outcomes.classify)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from chunkwatch.browser_layer import browser_tally, record_browser
from chunkwatch.browser_token import StreamRecord
from chunkwatch.outcomes import Evidence, Outcome, classify
from chunkwatch.runtime import Runtime
from chunkwatch.verdict import describe


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


def test_a_wait_the_service_did_not_have_is_stalled() -> None:
    """The page waited the idle deadline (30 s) longer between two events than the sse layer
    did, or the first-chunk deadline longer for its first event: stalled, counted as a stall
    and worded; a wait the service's own stream had too, or a hop's one burst, is not."""
    registry = CollectorRegistry()
    rt = Runtime(registry=registry)
    try:
        record = written(events=13, first_ms=40, last_ms=40_520)
        record.gap_ms = 100.0
        idle = browser_tally(rt, record, seen(gap_max_ms=31_000.0, duration_ms=41_000.0))
        assert (idle.outcome, idle.stalled, idle.deadline) == (Outcome.STALLED, "idle", 30.0)
        assert describe(idle).endswith("a hop between the service and the browser held the stream")
        stalls = {"layer": "browser", "kind": "idle", "upstream": "test-gw"}
        assert registry.get_sample_value("chunkwatch_stalls_total", stalls) == 1
        # its first event 35 s late, the rest as they were written (no one burst)
        late_first = seen(first_event_ms=35_000.0, gap_max_ms=2_000.0, duration_ms=60_000.0)
        late = browser_tally(rt, record, late_first)
        assert (late.outcome, late.stalled) == (Outcome.STALLED, "first_chunk")
        record.gap_ms = 30_500.0  # the model paused too: the service's own wait
        assert browser_tally(rt, record, seen(gap_max_ms=31_000.0)).outcome is Outcome.OK
        held = written(events=30, first_ms=50, last_ms=40_050)  # written over 40 s
        burst = seen(events=30, first_event_ms=40_100.0, gap_max_ms=2.0, duration_ms=40_200.0)
        assert browser_tally(rt, held, burst).outcome is Outcome.BUFFERED  # not stalled
    finally:
        rt.close()
