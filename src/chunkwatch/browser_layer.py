"""The ``browser`` layer: one accepted beacon made a stream like every other layer's.

Pure in what it decides (the :class:`~chunkwatch.ledger.Tally` is classified by
:func:`chunkwatch.outcomes.classify`, as every layer's is); written through the runtime
(``chunkwatch_streams_total{layer="browser"}``, the chunk counter, the time-to-first-chunk
and gap histograms) and as a span ``browser stream`` in the request's trace.

The beacon's times are milliseconds from the moment the page called ``fetch``; the tally's
are laid out backwards from now (the beacon comes at the stream's end): ``t_start`` is now
minus ``duration_ms``. The beacon carries no time for the last event; the tally's ``t_last``
is the latest it can have been — the first event plus (events - 1) times the longest gap, at
most the end — so a spread judged tiny ("one burst") is tiny for certain.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry.trace import SpanKind

from chunkwatch import semconv as sc
from chunkwatch.browser_token import StreamRecord
from chunkwatch.ledger import Ledger, Tally
from chunkwatch.outcomes import End, is_burst_of_below
from chunkwatch.runtime import Runtime

__all__ = ["ENDS", "record_browser"]

ENDS = {"clean": End.CLEAN, "abrupt": End.ABRUPT, "closed": End.CLOSED, "error": End.ERROR}
_MS = 1_000_000  # ns


def _ns(ms: float | None) -> int | None:
    return None if ms is None else int(ms * _MS)


def browser_tally(rt: Runtime, record: StreamRecord, beacon: dict[str, Any]) -> Tally:
    """The browser layer's tally for ``beacon``, finished (classified and written)."""
    ledger = Ledger()
    duration = _ns(beacon["duration_ms"]) or 0
    start_wall = time.time_ns() - duration
    span = None
    try:
        span = rt.tracer.start_span(
            sc.SPAN_BROWSER,
            context=record.parent,
            kind=SpanKind.INTERNAL,
            attributes={sc.A_LAYER: sc.BROWSER},
            start_time=start_wall,
        )
    except Exception:
        rt.bookkeeping_error(sc.BROWSER, "span")
    tally = rt.open(sc.BROWSER, ledger=ledger, upstream=record.upstream, span=span, watch=False)
    events: int = beacon["events"]
    tally.t_start = time.perf_counter_ns() - duration
    tally.units = events
    tally.units_in = record.events
    tally.terminal_known = True
    tally.terminal_seen = bool(beacon["terminal"])
    first = _ns(beacon["first_event_ms"])
    gap = _ns(beacon["gap_max_ms"])
    if first is not None and events:
        tally.t_first = tally.t_start + first
        spread = (events - 1) * (gap or 0)
        tally.t_last = tally.t_start + min(first + spread, max(duration, first))
        tally.max_gap_ns = gap or 0
    if record.first_ms is not None and record.last_ms is not None:
        tally.spread_below = int((record.last_ms - record.first_ms) * _MS)
    stall = _stall(rt, record, tally, first, gap, duration)
    if stall is not None:  # counted now, as every layer's stall is when it is found
        tally.stalled = stall[0]
        rt.on_stall(tally, *stall)
    if span is not None and span.is_recording():
        try:
            attrs: dict[str, Any] = {
                sc.A_BROWSER_TERMINAL: tally.terminal_seen,
                sc.A_BROWSER_WRITTEN: record.events,
                sc.A_BROWSER_DURATION: duration / 1e9,
            }
            if beacon["first_byte_ms"] is not None:
                attrs[sc.A_BROWSER_FIRST_BYTE] = beacon["first_byte_ms"] / 1e3
            span.set_attributes(attrs)
        except Exception:
            rt.bookkeeping_error(sc.BROWSER, "span")
    tally.finish(ENDS[beacon["end"]])  # t_end: now, the start + the beacon's duration
    return tally


def _stall(
    rt: Runtime,
    record: StreamRecord,
    tally: Tally,
    first: int | None,
    gap: int | None,
    duration: int,
) -> tuple[str, float] | None:
    """``(kind, deadline)`` when the page waited a deadline longer than the sse layer did:
    for its first event (``first_chunk``) or between two (``idle``). The deadlines are the
    runtime's (``Deadlines.layers["browser"]``, else ``first_chunk`` / ``idle``). A wait the
    service's own stream had too is not the browser's; nor is a hop's one burst at the end
    (``buffered`` says more: which setting to change)."""
    deadlines = rt.deadlines
    first_limit, idle_limit = deadlines.layers.get(
        sc.BROWSER, (deadlines.first_chunk, deadlines.idle)
    )
    if is_burst_of_below(tally):
        return None
    if first_limit is not None and record.first_ms is not None:
        waited = (first if first is not None and tally.units else duration) / _MS
        if waited - record.first_ms >= first_limit * 1000:
            return "first_chunk", first_limit
    if idle_limit is not None and gap is not None and tally.units > 1:
        if gap / _MS - (record.gap_ms or 0.0) >= idle_limit * 1000:
            return "idle", idle_limit
    return None


def record_browser(rt: Runtime, record: StreamRecord, beacon: dict[str, Any]) -> None:
    """Record ``beacon`` as the browser layer of ``record``'s request; the request's own
    verdict stays as drawn (the browser layer has its own outcome)."""
    tally = browser_tally(rt, record, beacon)
    record.funnel = {**record.funnel, sc.BROWSER: tally.units}
    record.browser = {
        "events": tally.units,
        "outcome": str(tally.outcome),
        "end": beacon["end"],
        "terminal": tally.terminal_seen,
    }
