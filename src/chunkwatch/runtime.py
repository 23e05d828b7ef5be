"""The instrumentation runtime: what every probe shares.

One :class:`Runtime` holds the injected parts (metrics registry, tracer
provider, upstream names, deadlines, content capture) and does the once-per-
stream work: when a probe's tally finishes, the runtime classifies nothing
itself (the tally did) but writes the span attributes, ends the span, and
writes the metrics. When a request ends, it draws the verdict and writes it to
the root span, the log and ``chunkwatch_requests_total``.

Every step is guarded: a failure inside chunkwatch is logged at debug and
counted in ``chunkwatch_instrumentation_errors_total{layer,stage}``; the host
never sees it.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span
from prometheus_client import CollectorRegistry

from chunkwatch import semconv as sc
from chunkwatch import spans as _spans
from chunkwatch.config import UNSET, Settings
from chunkwatch.ledger import Ledger, Tally, current_ledger
from chunkwatch.metrics import Metrics
from chunkwatch.naming import Names
from chunkwatch.probes import model_layers
from chunkwatch.request_end import finish_request
from chunkwatch.spans import end_stream_span, trace_id_of
from chunkwatch.verdict import Verdict
from chunkwatch.watchdog import Deadlines, Plan, Watchdog

__all__ = ["Runtime", "activate", "active"]

log = logging.getLogger("chunkwatch")

VerdictListener = Callable[[Verdict, Ledger, Span | None], None]

CONTENT_LIMIT = 1000  # characters of prompt / completion kept when capture is on


class Runtime:
    """Shared state of one ``chunkwatch.instrument(...)``."""

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        upstreams: Mapping[str, str] | None = None,
        deadlines: Deadlines | None = None,
        capture_content: bool = False,
        translate_errors: bool = True,
        settings: Settings | None = None,
    ) -> None:
        if settings is None:
            settings = Settings(
                upstreams=dict(upstreams or {}),
                deadlines=deadlines or Deadlines(),
                capture_content=capture_content,
                translate_errors=translate_errors,
            )
        self.settings = settings
        self.registry = registry
        self.tracer_provider = tracer_provider
        self._set_metrics(registry)
        self._set_tracer(tracer_provider)
        self._apply(settings)
        self.watchdog = Watchdog(self.on_stall)
        self.serving = False  # an app is instrumented: streams are expected to have requests
        self.probed: set[str] = set()  # the layers whose probe is installed
        self._told_unlinked = False
        self._listeners: tuple[VerdictListener, ...] = ()
        self.provider: str | None = None  # the GenAI provider of the last model call seen

    def _set_metrics(self, registry: CollectorRegistry | None) -> None:
        try:
            self.metrics = Metrics.on(registry)
        except ValueError as err:  # the registry refuses our names: never crash the host
            log.warning(
                "chunkwatch: metrics could not be registered (%s); they are kept in a "
                "private registry that is not exported",
                err,
            )
            self.metrics = Metrics.on(CollectorRegistry())

    def _set_tracer(self, tracer_provider: trace.TracerProvider | None) -> None:
        from chunkwatch import __version__

        self.tracer = trace.get_tracer(
            "chunkwatch", __version__, tracer_provider=tracer_provider, schema_url=sc.SCHEMA_URL
        )
        # Whether it keeps spans (once True, stays), else the proxy to ask per stream
        # (chunkwatch.spans.tracing).
        self.traces, self.noop_proxy = _spans.keeps_spans(self.tracer)

    def _apply(self, settings: Settings) -> None:
        self.settings = settings
        self.upstreams = dict(settings.upstreams)
        self.names = Names(settings.upstreams)
        self.deadlines = settings.deadlines
        self._plans: dict[str, Plan | None] = {}  # the watchdog's plan of a layer's deadlines
        self.capture_content = settings.capture_content
        self.translate_errors = settings.translate_errors
        self.agent_name = settings.agent_name

    def configure(
        self,
        settings: Settings,
        *,
        registry: Any = UNSET,
        tracer_provider: Any = UNSET,
    ) -> list[str]:
        """Apply a later ``instrument(...)``'s options to this runtime; the names of the
        options that changed (streams already open keep what they started with)."""
        changed = settings.differences(self.settings)
        if registry is not UNSET and registry is not self.registry:
            self.registry = registry
            self._set_metrics(registry)
            changed.append("registry")
        if tracer_provider is not UNSET and tracer_provider is not self.tracer_provider:
            self.tracer_provider = tracer_provider
            self._set_tracer(tracer_provider)
            changed.append("tracer_provider")
        self._apply(settings)
        return changed

    # -- naming -----------------------------------------------------------------------------

    def upstream_for(self, url: str) -> str:
        """The ``upstream`` label for ``url`` (:mod:`chunkwatch.naming`)."""
        return self.names.upstream(url)

    def redacted_url(self, url: Any) -> str:
        """``url.full`` for a span, credentials and query values redacted."""
        return self.names.url_full(str(url))

    # -- streams ----------------------------------------------------------------------------

    def ledger(self, layer: str | None = None) -> Ledger:
        """The current request's ledger, or a ledger of its own for a stream outside one.

        A stream at ``layer`` that finds no request while an app is instrumented is
        *unlinked*: its outcome still goes to ``chunkwatch_streams_total`` (and so to the
        alerts), it is counted in ``chunkwatch_unlinked_streams_total{layer}``, and the
        first one is logged once with what to add."""
        ledger = current_ledger()
        if ledger is not None and not ledger.closed:
            return ledger
        if ledger is not None and ledger.orphans is not None:
            return ledger.orphans.ledger_for_new_stream()  # its client left; it runs on
        own = Ledger()
        own.unlinked = True
        if layer is not None and self.serving:
            try:
                self.metrics.unlinked.labels(layer).inc()
            except Exception:
                self.bookkeeping_error(layer, "unlinked")
            if not self._told_unlinked:
                self._told_unlinked = True
                log.warning(
                    "chunkwatch: a %s stream could not be tied to an inbound request, so no "
                    "request verdict includes it (its outcome is still counted in "
                    "chunkwatch_streams_total; chunkwatch_unlinked_streams_total counts such "
                    "streams). Threads, executors and run_coroutine_threadsafe started inside "
                    "a request are followed; for another hand-off, run the agent inside "
                    "`with chunkwatch.bind(ledger):` with `ledger = chunkwatch.request_ledger()` "
                    "taken in the view (docs/instrumentation.md). Logged once.",
                    layer,
                )
        return own

    # A span of a layer (:func:`chunkwatch.spans.start_span`): a method without a frame
    # of its own, as every stream of every probe starts one.
    start_span = _spans.start_span

    def open(
        self,
        layer: str,
        *,
        ledger: Ledger | None = None,
        upstream: str | None = None,
        span: Span | None = None,
        watch: bool = True,
        keep_span: bool = False,
        stream_requested: bool = True,
        terminal_known: bool = False,
        needs_status: bool = False,
    ) -> Tally:
        """A tally for one stream at ``layer``, finished through this runtime (its span's
        attributes, its metrics). ``watch``: the layer's deadlines apply to it.
        ``keep_span``: its span is not ended when it finishes — its owner ends it (the
        http probe, after the request's verdict went on it). ``stream_requested``,
        ``terminal_known``, ``needs_status``: the tally's evidence known at the start
        (:class:`chunkwatch.outcomes.Evidence`, whose defaults these are)."""
        ledger = ledger or self.ledger(layer)
        tally = ledger.add(layer, upstream, self._finish)
        if span is not None:
            tally.span = span
        if keep_span:
            tally.keep_span = True
        if not stream_requested:  # (each is set only where it is not the default)
            tally.stream_requested = False
        if terminal_known:
            tally.terminal_known = True
        if needs_status:
            tally.needs_status = True
        if ledger.orphans is not None and not ledger.closed and layer in model_layers():
            ledger.orphans.adopt(tally)
        try:
            self.metrics.series.opened(tally)
        except Exception:
            self.bookkeeping_error(layer, "open")
        if watch:
            plan = self._plans.get(layer)
            if plan is None and layer not in self._plans:
                plan = self._plans[layer] = self.watchdog.plan(*self.deadlines.for_layer(layer))
            if plan is not None:
                self.watchdog.watch(tally, plan)
                tally.watched = True
        return tally

    def trace_id(self, t: Tally) -> str | None:
        """The sampled trace id of ``t``'s span, for exemplars: its request's, found once
        per request (every span of a request is in the request's trace)."""
        ledger = t.ledger
        if ledger is None or ledger.unlinked:
            return trace_id_of(t.span)
        if not ledger.trace_known:
            span = t.span
            if span is None and ledger.parent_context is not None:
                # a stream the no-op tracer gave no span (the probes do not ask for one):
                # its request's span, whose trace holds the caller's propagated context
                span = trace.get_current_span(ledger.parent_context)
            ledger.trace_id, ledger.trace_known = trace_id_of(span), True
        return ledger.trace_id

    def _finish(self, t: Tally) -> None:
        if t.watched:
            self.watchdog.forget(t)
        # A finished stream must not keep its task (and the frames it holds) alive.
        t.task = t.abort = None
        opened_as = t.upstream
        if t.upstream == "none" and t.ledger is not None and t.ledger.upstream:
            t.upstream = t.ledger.upstream  # opened before the request reached a model
        orphans = t.orphans
        if orphans is not None:
            try:
                orphans.stream_ended(t)
            except Exception:
                self.bookkeeping_error(t.layer, "orphans")
        span = t.span
        try:
            if t.stream_metrics:
                ledger = t.ledger  # Runtime.trace_id, without its call once the request's is known
                if ledger is not None and ledger.trace_known:
                    trace_id = ledger.trace_id
                else:
                    trace_id = self.trace_id(t)
                self.metrics.series.finished(t, trace_id, t.stalled is not None, opened_as)
            else:
                self.metrics.series.closed(t, opened_as)
        except Exception:
            self.bookkeeping_error(t.layer, "metrics")
        if span is not None and span.is_recording():  # not unsampled, not the no-op tracer's
            end_stream_span(self, t, span)

    def on_stall(self, t: Tally, kind: str, after: float) -> None:
        """A stall of ``t``, found now (watchdog, request end): count it, note it on the
        span, log it, and abort the stream if ``Deadlines.abort``."""
        t.deadline = after
        self.metrics.stall(t, kind, self.trace_id(t))
        if t.span is not None:
            t.span.add_event(
                sc.EVENT_STALL,
                {sc.A_STALL_KIND: kind, sc.A_STALL_AFTER: after, sc.A_CHUNKS: t.units},
            )
        log.warning(
            "chunkwatch stall layer=%s kind=%s after=%.1fs upstream=%s units=%d",
            t.layer,
            kind,
            after,
            t.upstream,
            t.units,
        )
        if self.deadlines.abort and t.abort is not None:
            t.abort_stalled(kind, after)

    # -- requests ---------------------------------------------------------------------------

    def finish_request(self, ledger: Ledger, span: Span | None) -> Verdict | None:
        """Draw the verdict of a finished request and write it everywhere it goes
        (:mod:`chunkwatch.request_end`), then tell the verdict listeners."""
        verdict = finish_request(self, ledger, span)
        if verdict is not None:
            for listener in self._listeners:
                try:
                    listener(verdict, ledger, span)
                except Exception:  # a listener must not break the request either
                    self.bookkeeping_error(sc.HTTP, "listener")
        return verdict

    def add_verdict_listener(self, listener: VerdictListener) -> None:
        """Call ``listener(verdict, ledger, root_span)`` for every request verdict drawn
        from now on, in the thread that ends the request (its errors are counted, never
        raised). ``chunkwatch.testing`` collects verdicts this way."""
        self._listeners = (*self._listeners, listener)  # a new tuple: no lock to read it

    def remove_verdict_listener(self, listener: VerdictListener) -> None:
        self._listeners = tuple(x for x in self._listeners if x != listener)  # bound methods: ==

    # -- content (opt-in only) --------------------------------------------------------------

    def content(self, text: str | None) -> str | None:
        if not self.capture_content or text is None:
            return None
        return text[:CONTENT_LIMIT]

    # -- errors of our own ------------------------------------------------------------------

    def bookkeeping_error(self, layer: str, stage: str) -> None:
        log.debug("chunkwatch: %s bookkeeping failed at %s", layer, stage, exc_info=True)
        self.metrics.instrumentation_error(layer, stage)

    def close(self) -> None:
        self.watchdog.stop()


_extra: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "chunkwatch_extra_span_attributes", default=None
)


@contextmanager
def span_attributes(attrs: Mapping[str, Any]) -> Iterator[None]:
    """Extra attributes for the model-call spans opened in this block (e.g. a fallback's reason)."""
    token = _extra.set({**(_extra.get() or {}), **attrs})
    try:
        yield
    finally:
        _extra.reset(token)


def extra_span_attributes() -> Mapping[str, Any]:
    return _extra.get() or {}


_active: Runtime | None = None


def active() -> Runtime | None:
    """The runtime of the current ``chunkwatch.instrument(...)``, if any."""
    return _active


def activate(runtime: Runtime | None) -> None:
    global _active
    _active = runtime
