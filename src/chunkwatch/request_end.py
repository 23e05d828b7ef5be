"""The end of a request: what is still open below it, then the verdict, written once.

:func:`finish_request` runs when the response's last byte is written (or the client
left). Streams below the response that are still open and silent then are judged
``stalled`` (:func:`stalled_at_end`); then the ledger is closed — nothing recorded later
belongs to this request — and the verdict goes to ``chunkwatch_requests_total``, the
root span and one log line.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from chunkwatch import semconv as sc
from chunkwatch.orphans import WAIT, Orphans, client_left
from chunkwatch.outcomes import End
from chunkwatch.probes import model_layers
from chunkwatch.spans import trace_id_of
from chunkwatch.verdict import judge

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from chunkwatch.ledger import Ledger
    from chunkwatch.runtime import Runtime
    from chunkwatch.verdict import Verdict

__all__ = ["finish_request", "stalled_at_end"]

log = logging.getLogger("chunkwatch")


def stalled_at_end(rt: Runtime, ledger: Ledger) -> None:
    """Streams below the response still open and silent when the request ends (the app
    stopped waiting, the client left): stalled, with the time they were silent."""
    limit = rt.deadlines.silent_at_end
    if limit is None:
        return
    now = time.perf_counter_ns()
    for t in list(ledger.tallies):
        if t.outcome is not None or t.layer in (sc.SSE, sc.HTTP) or not t.stream_requested:
            continue
        silent = (now - (t.t_last if t.t_last is not None else t.t_start)) / 1e9
        if silent < limit:
            continue  # still flowing: an orphan, not a stall
        t.silent_for = silent
        if not t.stalled:
            t.stalled = "first_chunk" if t.t_last is None else "idle"
            rt.on_stall(t, t.stalled, silent)
        elif rt.deadlines.abort and t.abort is not None and t.aborted is None:
            t.abort_stalled(t.stalled, silent)
        t.finish(End.TIMEOUT)


def finish_request(rt: Runtime, ledger: Ledger, span: Span | None) -> Verdict | None:
    """Draw the verdict of a finished request, count it, and end ``span`` (the request's
    root) with it. If the client left while model streams were still open, the span and
    the log line wait until those stop (:mod:`chunkwatch.orphans`), to say what they did."""
    try:
        stalled_at_end(rt, ledger)
    except Exception:
        rt.bookkeeping_error(sc.HTTP, "stalled_at_end")
    orphans = None
    try:
        if client_left(ledger):
            orphans = _follow_orphans(rt, ledger)
    except Exception:
        rt.bookkeeping_error(sc.HTTP, "orphans")
    ledger.closed = True
    try:
        verdict = judge(ledger)
    except Exception:
        rt.bookkeeping_error(sc.HTTP, "verdict")
        if span is not None:
            span.end()
        return None
    upstream = ledger.upstream or "none"
    trace_id = trace_id_of(span)
    try:
        rt.metrics.request_finished(verdict, upstream, trace_id)
    except Exception:
        rt.bookkeeping_error(sc.HTTP, "metrics")
    if orphans is None:
        _report(rt, ledger, span, verdict, trace_id, {})
        return verdict
    orphans.trace_id = trace_id

    def settled(o: Orphans) -> None:
        _report(rt, ledger, span, o.verdict(verdict), trace_id, o.attributes())

    orphans.when_settled(settled)  # when the last of them stops (or at orphans.WAIT)
    return verdict


def _follow_orphans(rt: Runtime, ledger: Ledger) -> Orphans:
    """The model streams still open as the client leaves, and any the request's agent
    opens from now on, followed until they stop."""
    models = model_layers()
    # One layer counts, so a model call is counted once: the lowest one probed.
    layer = next((m for m in models if m in rt.probed), models[-1])
    orphans = Orphans(rt, ledger, layer)
    for t in ledger.tallies:
        if t.layer in models and t.stream_requested and t.outcome is None:
            orphans.adopt(t, t.units)
    ledger.orphans = orphans
    if orphans.following():
        rt.watchdog.call_later(WAIT, orphans.expire)
    return orphans


def _report(
    rt: Runtime,
    ledger: Ledger,
    span: Span | None,
    verdict: Verdict,
    trace_id: str | None,
    extra: dict[str, Any],
) -> None:
    """The verdict on the root span (which ends here) and in one log line."""
    upstream = ledger.upstream or "none"
    if span is not None and span.is_recording():
        try:
            attrs: dict[str, Any] = {
                sc.A_VERDICT: str(verdict),
                sc.A_VERDICT_LAYER: verdict.layer,
                sc.A_VERDICT_OUTCOME: str(verdict.outcome),
                sc.A_VERDICT_DETAIL: verdict.detail,
                sc.A_UPSTREAM: upstream,
            }
            for layer, units in ledger.funnel().items():
                attrs[sc.A_FUNNEL_PREFIX + layer] = units
            attrs.update(ledger.attributes)
            attrs.update(extra)
            span.set_attributes(attrs)
            if not verdict.ok:
                span.set_attribute(sc.ERROR_TYPE, str(verdict.outcome))
        except Exception:
            rt.bookkeeping_error(sc.HTTP, "span")
    if span is not None:
        span.end()
    level = logging.INFO if verdict.ok and not extra.get(sc.A_ORPHANED) else logging.WARNING
    if not log.isEnabledFor(level):
        return  # (the detail of a healthy verdict is written when read: not for nothing)
    log.log(
        level,
        "chunkwatch verdict=%s upstream=%s trace_id=%s detail=%s",
        verdict,
        upstream,
        trace_id or "-",
        verdict.detail,
    )
