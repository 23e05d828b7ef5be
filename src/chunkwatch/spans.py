"""A stream's span: started for a layer, and written once when its tally finishes.

What :class:`~chunkwatch.runtime.Runtime` does with spans, apart from the rest of its
state. Two paths:

* a tracer that keeps spans (an SDK): the span starts with its layer's attributes,
  parented to the request when nothing is current in this thread, and at the stream's
  end gets its counts, outcome and status;
* the API's no-op tracer (no SDK, or one not configured yet): its ``start_span`` hands
  back the current span, non-recording, and drops every attribute. :func:`start_span`
  does the same without building the attributes or the tracer's call chain, so the
  probes of a service without tracing pay a lookup a stream, not a span.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import (
    INVALID_SPAN,
    NonRecordingSpan,
    NoOpTracer,
    ProxyTracer,
    Span,
    SpanKind,
    Status,
    StatusCode,
)

from chunkwatch import semconv as sc
from chunkwatch.outcomes import FAULT_OUTCOMES, Outcome
from chunkwatch.verdict import describe

if TYPE_CHECKING:
    from chunkwatch.ledger import Ledger, Tally
    from chunkwatch.runtime import Runtime

__all__ = ["end_stream_span", "keeps_spans", "noop_span", "start_span", "trace_id_of", "tracing"]

_current_span = trace.get_current_span


def tracing(rt: Runtime) -> bool:
    """False when ``rt``'s tracer is the API's no-op one (directly or through the proxy).

    Asked per stream, not once: a provider set globally later is found by the API's proxy
    tracer, and from then on spans are written (and this is not asked again)."""
    if rt.traces:
        return True
    proxy = rt.noop_proxy
    # What ProxyTracer._tracer asks, without the property's call: a tracer of the provider
    # set globally (once set, it stays), else the no-op (see keeps_spans for the names).
    if proxy is not None and (proxy._real_tracer is not None or trace._TRACER_PROVIDER is not None):
        rt.traces = True
    return rt.traces


def keeps_spans(tracer: Any) -> tuple[bool, ProxyTracer | None]:
    """For a new tracer: whether it keeps spans, or the API's proxy tracer that may start
    to (a global provider set later), which :func:`tracing` then asks per stream."""
    if type(tracer) is NoOpTracer:
        return False, None
    if type(tracer) is ProxyTracer:
        # ProxyTracer._real_tracer and trace._TRACER_PROVIDER are private to
        # opentelemetry-api (checked: 1.30 .. 1.45; tests/test_private_internals.py):
        # should a release rename them, every span is written, as with an SDK.
        if hasattr(tracer, "_real_tracer") and hasattr(trace, "_TRACER_PROVIDER"):
            return False, tracer
    return True, None


def trace_id_of(span: Span | None) -> str | None:
    """``span``'s trace id, for an exemplar, when it is sampled."""
    if span is None:
        return None
    ctx = span.get_span_context()
    if not ctx.is_valid or not ctx.trace_flags.sampled:
        return None
    return format(ctx.trace_id, "032x")


def start_span(
    rt: Runtime,
    name: str,
    layer: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    context: Any = None,
    attributes: Mapping[str, Any] | None = None,
    links: Any = None,
    ledger: Ledger | None = None,
) -> Span | None:
    """A span of ``layer`` (:meth:`Runtime.start_span <chunkwatch.runtime.Runtime.start_span>`).

    With ``ledger`` and no explicit ``context``, a span that would start a trace of its
    own (nothing current here: a thread nobody propagated the context to) is parented to
    the request instead; an unlinked stream says so."""
    try:
        if not tracing(rt):
            return noop_span(context, ledger)
        if (
            ledger is not None
            and context is None
            and not ledger.unlinked
            and ledger.parent_context is not None
            and _current_span() is INVALID_SPAN  # no span in this context
        ):
            context = ledger.parent_context
        attrs: dict[str, Any] = {sc.A_LAYER: layer}
        if attributes:
            attrs.update(attributes)
        if ledger is not None and ledger.unlinked:
            attrs[sc.A_LINKED] = False
        return rt.tracer.start_span(name, context=context, kind=kind, attributes=attrs, links=links)
    except Exception:
        rt.bookkeeping_error(layer, "span")
        return None


def noop_span(context: Any, ledger: Ledger | None) -> Span:
    """NoOpTracer.start_span's answer, without its call chain: the parent span (of
    ``context``, else the current one), non-recording; the request's (``ledger``'s)
    where nothing is current in this thread."""
    span = _current_span(context)
    if (
        span is INVALID_SPAN
        and context is None
        and ledger is not None
        and ledger.parent_context is not None
    ):
        span = _current_span(ledger.parent_context)
    if type(span) is NonRecordingSpan or isinstance(span, NonRecordingSpan):
        return span  # (the type first: an ABC's isinstance is slower)
    return NonRecordingSpan(span.get_span_context())


def end_stream_span(rt: Runtime, t: Tally, span: Span) -> None:
    """What ``t``'s stream did, on its recording span, which ends unless its owner ends it."""
    try:
        outcome = t.outcome or Outcome.OK
        attrs: dict[str, Any] = {
            sc.A_CHUNKS: t.units,
            sc.A_OUTCOME: str(outcome),
            sc.A_UPSTREAM: t.upstream,
        }
        if t.end is not None:
            attrs[sc.A_END] = str(t.end)
        if t.t_first is not None and t.genai is None:  # a chat span has the GenAI one
            attrs[sc.A_TTFC] = (t.t_first - t.t_start) / 1e9
        if t.units > 1:
            attrs[sc.A_GAP_MAX] = t.max_gap_ns / 1e9
        if outcome is not Outcome.OK:
            attrs[sc.ERROR_TYPE] = str(outcome)
            attrs[sc.A_DETAIL] = describe(t)
        span.set_attributes(attrs)
        if outcome in FAULT_OUTCOMES:
            span.set_status(Status(StatusCode.ERROR, str(outcome)))
        if not t.keep_span:
            span.end()
    except Exception:
        rt.bookkeeping_error(t.layer, "span")
