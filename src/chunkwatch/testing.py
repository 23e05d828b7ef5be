"""Assert in your own tests what chunkwatch concluded about your service.

Usage (pytest; the OpenTelemetry SDK must be installed in the test environment)::

    import chunkwatch.testing

    def test_a_dropped_stream_is_named(gateway_url):
        app = create_app(llm_url=gateway_url)          # your Flask app
        with chunkwatch.testing.capture(app) as cap:
            ...                                        # serve it, make a request
            cap.wait_for_verdicts(1)
        assert str(cap.last_verdict) == "empty@gateway"
        assert cap.last_verdict.funnel["sdk"] == 0
        assert cap.sample("chunkwatch_requests_total", outcome="empty", layer="gateway",
                          upstream="none") == 1

:func:`capture` instruments with a Prometheus registry and a tracer provider of its
own — nothing reaches the process's global registry or tracer provider — and undoes
it on exit. Inside the block:

* :attr:`Capture.verdicts` — every request verdict, in the order drawn, each with its
  ledger's funnel and streams (:class:`RequestVerdict`); :attr:`Capture.last_verdict`,
  :attr:`Capture.last_ledger`;
* :meth:`Capture.wait_for_verdicts` — a request's verdict is drawn when its response
  body closes, which may be after your HTTP client returned, on the server's thread;
* :attr:`Capture.spans`, :meth:`Capture.spans_of`, :meth:`Capture.root_span` — the
  finished spans (an ``InMemorySpanExporter``);
* :meth:`Capture.sample`, :meth:`Capture.streams` — the private registry.

If chunkwatch is already instrumented when the block starts (your app module calls
``chunkwatch.instrument(app)`` at import), the running instrumentation is pointed at
the private registry and tracer provider, with the options given, and put back as it
was on exit (an ``app`` it instrumented for the block stays instrumented, as the running
instrumentation does); otherwise ``capture`` instruments and uninstruments. Calling
``chunkwatch.instrument(...)`` inside the block (an app factory does) reuses the
capture's instrumentation; give it ``registry=cap.registry,
tracer_provider=cap.tracer_provider`` if it passes those options at all, or it moves
them away from the capture. Spans your own code starts on the global tracer are not
captured.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from chunkwatch import semconv as sc
from chunkwatch.instrumentation import instrument, uninstrument
from chunkwatch.ledger import Ledger
from chunkwatch.outcomes import End, Outcome
from chunkwatch.runtime import Runtime, active
from chunkwatch.verdict import Verdict

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import Span

__all__ = ["Capture", "RequestVerdict", "Stream", "capture"]

_SDK_MISSING = (
    "chunkwatch.testing needs the OpenTelemetry SDK for its in-memory span exporter "
    "(opentelemetry-sdk; chunkwatch itself depends only on the API): "
    "pip install opentelemetry-sdk, or chunkwatch[otel]"
)


@dataclass(frozen=True)
class Stream:
    """One stream of a request at one layer, as its tally was when the verdict was drawn
    (``outcome`` is None for a stream still open then: a client left mid-answer)."""

    layer: str
    outcome: Outcome | None
    units: int
    end: End | None
    upstream: str


@dataclass(frozen=True)
class RequestVerdict:
    """A request's verdict and what its ledger held when it was drawn.

    ``str(v)`` is the verdict as in metrics and logs (``ok``, ``empty@gateway``). It is the
    verdict counted in ``chunkwatch_requests_total``, drawn as the response ended; when the
    client left while model streams ran on, the root span and the log line add later what
    those did (:meth:`Capture.root_span` waits for that)."""

    verdict: Verdict
    ledger: Ledger
    funnel: Mapping[str, int]  # units each layer passed on, bottom to top
    streams: Mapping[str, tuple[Stream, ...]]  # per layer, in the order opened
    trace_id: str | None  # 32 hex digits; None when the request's span was not sampled

    @property
    def outcome(self) -> Outcome:
        return self.verdict.outcome

    @property
    def layer(self) -> str:
        """The layer at fault, ``none`` when ok."""
        return self.verdict.layer

    @property
    def detail(self) -> str:
        return self.verdict.detail

    @property
    def ok(self) -> bool:
        return self.verdict.ok

    def __str__(self) -> str:
        return str(self.verdict)

    @classmethod
    def of(cls, verdict: Verdict, ledger: Ledger, span: Span | None) -> RequestVerdict:
        """The record of a verdict just drawn (what :class:`Capture` collects)."""
        streams: dict[str, list[Stream]] = {}
        for t in list(ledger.tallies):
            streams.setdefault(t.layer, []).append(
                Stream(t.layer, t.outcome, t.units, t.end, t.upstream)
            )
        trace_id = None
        if span is not None:
            ctx = span.get_span_context()
            if ctx.is_valid and ctx.trace_flags.sampled:
                trace_id = format(ctx.trace_id, "032x")
        return cls(
            verdict=verdict,
            ledger=ledger,
            funnel=ledger.funnel(),
            streams={layer: tuple(s) for layer, s in streams.items()},
            trace_id=trace_id,
        )


class Capture:
    """What chunkwatch concluded while a :func:`capture` block ran. Thread-safe: verdicts
    are recorded on whichever thread closes a response body."""

    def __init__(
        self,
        runtime: Runtime,
        registry: CollectorRegistry,
        exporter: InMemorySpanExporter,
        tracer_provider: TracerProvider,
    ) -> None:
        self.runtime = runtime
        self.registry = registry
        self.exporter = exporter
        self.tracer_provider = tracer_provider
        self._verdicts: list[RequestVerdict] = []
        self._changed = threading.Condition()

    # -- verdicts -----------------------------------------------------------------------------

    def _record(self, verdict: Verdict, ledger: Ledger, span: Span | None) -> None:
        entry = RequestVerdict.of(verdict, ledger, span)
        with self._changed:
            self._verdicts.append(entry)
            self._changed.notify_all()

    @property
    def verdicts(self) -> list[RequestVerdict]:
        """Every request verdict drawn so far, oldest first (a copy)."""
        with self._changed:
            return list(self._verdicts)

    @property
    def last_verdict(self) -> RequestVerdict | None:
        with self._changed:
            return self._verdicts[-1] if self._verdicts else None

    @property
    def last_ledger(self) -> Ledger | None:
        last = self.last_verdict
        return None if last is None else last.ledger

    def wait_for_verdicts(self, n: int = 1, timeout: float = 5.0) -> list[RequestVerdict]:
        """Wait until at least ``n`` request verdicts were drawn; return all of them.

        Raises :class:`TimeoutError` saying how many were drawn (and which) after
        ``timeout`` seconds."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._verdicts) >= n, timeout):
                got = ", ".join(str(v) for v in self._verdicts) or "none"
                raise TimeoutError(
                    f"chunkwatch.testing: {n} request verdict(s) expected within {timeout:g} s, "
                    f"{len(self._verdicts)} drawn ({got}); a verdict is drawn when the "
                    "response body closes: read the whole response, or close it"
                )
            return list(self._verdicts)

    def clear(self) -> None:
        """Forget the verdicts and spans so far (the registry's counts stay)."""
        with self._changed:
            self._verdicts.clear()
        self.exporter.clear()

    # -- spans --------------------------------------------------------------------------------

    @property
    def spans(self) -> list[ReadableSpan]:
        """Every finished span, in the order they ended."""
        return list(self.exporter.get_finished_spans())

    def spans_of(self, trace_id: str | int) -> list[ReadableSpan]:
        """The finished spans of one trace (``trace_id``: 32 hex digits, or the int)."""
        tid = int(trace_id, 16) if isinstance(trace_id, str) else trace_id
        return [s for s in self.spans if s.context is not None and s.context.trace_id == tid]

    def root_span(self, trace_id: str | int | None = None, timeout: float = 5.0) -> ReadableSpan:
        """The request's span (layer ``http``) of ``trace_id`` — by default the last
        verdict's — waiting up to ``timeout`` seconds for it to end: when the client left
        while model streams ran on, it ends once they stop (``chunkwatch.orphans``)."""
        if trace_id is None:
            last = self.last_verdict
            if last is None or last.trace_id is None:
                raise LookupError("chunkwatch.testing: no sampled request verdict yet")
            trace_id = last.trace_id
        deadline = time.monotonic() + timeout
        while True:
            for span in self.spans_of(trace_id):
                if (span.attributes or {}).get(sc.A_LAYER) == sc.HTTP:
                    return span
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"chunkwatch.testing: the request span of trace {trace_id} did not end "
                    f"within {timeout:g} s"
                )
            time.sleep(0.01)

    # -- metrics ------------------------------------------------------------------------------

    def sample(self, name: str, **labels: str) -> float:
        """A sample of the private registry, e.g. ``sample("chunkwatch_requests_total",
        outcome="ok", layer="none", upstream="azure-gw")``; 0.0 when there is none."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def streams(self, layer: str) -> dict[str, float]:
        """Streams finished at ``layer`` by outcome, all upstreams together (from
        ``chunkwatch_streams_total``; streams no request could be tied to included)."""
        out: dict[str, float] = {}
        total = sc.STREAMS + "_total"
        for metric in self.registry.collect():
            for s in metric.samples:
                if s.name == total and s.labels.get(sc.L_LAYER) == layer:
                    outcome = s.labels[sc.L_OUTCOME]
                    out[outcome] = out.get(outcome, 0.0) + s.value
        return out


def _sdk() -> tuple[Any, Any, Any]:
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )
    except ImportError as err:
        raise ImportError(_SDK_MISSING) from err
    return TracerProvider, SimpleSpanProcessor, InMemorySpanExporter


@contextmanager
def capture(
    app: Any = None,
    *,
    exporter: InMemorySpanExporter | None = None,
    tracer_provider: TracerProvider | None = None,
    **instrument_options: Any,
) -> Iterator[Capture]:
    """Instrument (``app`` too, if given) with a private registry and in-memory spans;
    yield a :class:`Capture`; restore the previous state on exit.

    ``instrument_options`` are :func:`chunkwatch.instrument`'s (``upstreams``,
    ``deadlines``, ``translate_errors`` ...; not ``registry``, which is the capture's).
    ``tracer_provider`` replaces the capture's own (then ``exporter`` should be one of
    its processors' exporters, or :attr:`Capture.spans` stays empty); the capture shuts
    down only a provider it made. Raises :class:`ImportError` without the OpenTelemetry
    SDK."""
    if "registry" in instrument_options:
        raise TypeError("chunkwatch.testing.capture() brings its own registry: Capture.registry")
    provider_cls, processor_cls, exporter_cls = _sdk()
    exporter = exporter if exporter is not None else exporter_cls()
    own_provider = tracer_provider is None
    provider = provider_cls() if tracer_provider is None else tracer_provider
    if own_provider:
        provider.add_span_processor(processor_cls(exporter))
    registry = CollectorRegistry()
    previous = active()
    restore = None
    if previous is not None:
        restore = (previous.settings, previous.registry, previous.tracer_provider, previous.serving)
    try:
        rt = instrument(app, registry=registry, tracer_provider=provider, **instrument_options)
    except BaseException:
        if own_provider:
            provider.shutdown()
        raise
    cap = Capture(rt, registry, exporter, provider)
    rt.add_verdict_listener(cap._record)
    try:
        yield cap
    finally:
        rt.remove_verdict_listener(cap._record)
        if restore is None:
            if active() in (rt, None):  # not when the block instrumented anew
                uninstrument(app)
        else:
            settings, old_registry, old_provider, serving = restore
            rt.configure(settings, registry=old_registry, tracer_provider=old_provider)
            rt.serving = serving
        if own_provider:
            provider.shutdown()
