"""A model stream finds its request without user code; what cannot be linked says so."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import CollectorRegistry

import chunkwatch
from chunkwatch import semconv as sc
from chunkwatch.config import Settings
from chunkwatch.ledger import Ledger, bind, current_ledger
from chunkwatch.outcomes import Outcome
from chunkwatch.runtime import Runtime
from chunkwatch.watchdog import Deadlines


@pytest.fixture
def rt() -> Iterator[Runtime]:
    runtime = chunkwatch.instrument(registry=CollectorRegistry())
    try:
        yield runtime
    finally:
        chunkwatch.uninstrument()


def _seen_in_thread(start: str) -> Ledger | None:
    seen: list[Ledger | None] = []
    if start == "thread":
        t = threading.Thread(target=lambda: seen.append(current_ledger()))
        t.start()
        t.join()
    elif start == "thread_subclass":

        class Worker(threading.Thread):
            def run(self) -> None:
                seen.append(current_ledger())

        w = Worker()
        w.start()
        w.join()
    elif start == "executor":
        with ThreadPoolExecutor(1) as ex:
            seen.append(ex.submit(current_ledger).result())
    elif start == "run_in_executor":

        async def main() -> Ledger | None:
            return await asyncio.get_running_loop().run_in_executor(None, current_ledger)

        seen.append(asyncio.run(main()))
    return seen[0]


@pytest.mark.parametrize("start", ["thread", "thread_subclass", "executor", "run_in_executor"])
def test_work_started_inside_a_request_runs_with_its_ledger(rt: Runtime, start: str) -> None:
    """Threads (also subclasses overriding run), executor work and run_in_executor started
    while a request's ledger is current see that ledger; started outside, they see none."""
    ledger = Ledger()
    with bind(ledger):
        assert _seen_in_thread(start) is ledger
    assert _seen_in_thread(start) is None


def test_a_finished_request_is_not_carried_into_new_threads(rt: Runtime) -> None:
    """Once its verdict is drawn, a request's ledger no longer travels, and a stream that
    still finds it (a thread kept from that request) gets a ledger of its own."""
    ledger = Ledger()
    rt.finish_request(ledger, None)
    assert ledger.closed
    with bind(ledger):
        assert _seen_in_thread("thread") is None
        assert rt.ledger(sc.GATEWAY) is not ledger


def test_nothing_is_carried_once_uninstrumented() -> None:
    """Without chunkwatch, threads start exactly as before."""
    chunkwatch.instrument(registry=CollectorRegistry())
    chunkwatch.uninstrument()
    with bind(Ledger()):
        assert _seen_in_thread("thread") is None


def test_an_unlinked_stream_is_counted_and_told_once(
    rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    """With an app instrumented, a stream no request can be found for is counted in
    chunkwatch_unlinked_streams_total{layer} and logged once, with what to add."""
    rt.serving = True
    with caplog.at_level(logging.WARNING, logger="chunkwatch"):
        for _ in range(3):
            own = rt.ledger(sc.GATEWAY)
            assert own.unlinked
    reg = rt.metrics.registry
    assert reg.get_sample_value("chunkwatch_unlinked_streams_total", {"layer": "gateway"}) == 3
    told = [r for r in caplog.records if "could not be tied" in r.getMessage()]
    assert len(told) == 1
    assert "chunkwatch.bind" in told[0].getMessage()


def test_without_an_app_streams_are_not_called_unlinked(rt: Runtime) -> None:
    """A process that serves no requests (a batch job) has no requests to link to."""
    rt.ledger(sc.GATEWAY)
    reg = rt.metrics.registry
    assert reg.get_sample_value("chunkwatch_unlinked_streams_total", {"layer": "gateway"}) is None


def test_a_stream_open_and_silent_when_the_request_ends_is_stalled(rt: Runtime) -> None:
    """The app gave up waiting (its own queue timeout) while the gateway stream was open
    and silent: the verdict is stalled at the gateway, with the time it was silent, not
    ok and not a disconnect "after 0 ms"."""
    rt.configure(rt.settings.override(deadlines=Deadlines(silent_at_end=0.05)))
    ledger = Ledger()
    gw = rt.open(sc.GATEWAY, ledger=ledger, upstream="gw", watch=False)
    sse = rt.open(sc.SSE, ledger=ledger, watch=False)
    sse.unit()
    threading.Event().wait(0.1)
    sse.finish()
    verdict = rt.finish_request(ledger, None)
    assert verdict is not None
    assert (verdict.outcome, verdict.layer) == (Outcome.STALLED, sc.GATEWAY)
    assert "open and silent for" in verdict.detail and "when the request ended" in verdict.detail
    assert gw.finished


def test_a_stream_still_flowing_when_the_client_leaves_is_not_stalled(rt: Runtime) -> None:
    """A lower stream that delivered a unit just now is not silent: the verdict stays the
    client's disconnect."""
    rt.configure(rt.settings.override(deadlines=Deadlines(silent_at_end=5.0)))
    ledger = Ledger()
    gw = rt.open(sc.GATEWAY, ledger=ledger, upstream="gw", watch=False)
    gw.unit()
    sse = rt.open(sc.SSE, ledger=ledger, watch=False)
    sse.unit()
    from chunkwatch.outcomes import End

    sse.finish(End.CLOSED)
    verdict = rt.finish_request(ledger, None)
    assert verdict is not None
    assert (verdict.outcome, verdict.layer) == (Outcome.DISCONNECTED, sc.SSE)
    assert not gw.finished
    gw.finish()


def test_configuration_comes_from_the_environment() -> None:
    """Every option can be set in the environment; a malformed value names its variable."""
    s = Settings.from_env(
        {
            "CHUNKWATCH_UPSTREAMS": "gw.example.com=azure-gw, 10.0.0.5:8443 = internal",
            "CHUNKWATCH_FIRST_CHUNK_TIMEOUT": "5",
            "CHUNKWATCH_IDLE_TIMEOUT": "0",
            "CHUNKWATCH_SILENT_AT_END": "1.5",
            "CHUNKWATCH_ABORT_STALLED": "1",
            "CHUNKWATCH_CAPTURE_CONTENT": "true",
            "CHUNKWATCH_TRANSLATE_ERRORS": "0",
            "CHUNKWATCH_METRICS_PATH": "",
        }
    )
    assert s.upstreams == {"gw.example.com": "azure-gw", "10.0.0.5:8443": "internal"}
    assert (s.deadlines.first_chunk, s.deadlines.idle) == (5.0, None)
    assert s.deadlines.silent_at_end == 1.5 and s.deadlines.abort
    assert s.capture_content and not s.translate_errors and s.metrics_path is None
    for env in (
        {"CHUNKWATCH_IDLE_TIMEOUT": "soon"},
        {"CHUNKWATCH_ABORT_STALLED": "maybe"},
        {"CHUNKWATCH_UPSTREAMS": "just-a-host"},
        {"CHUNKWATCH_METRICS_PATH": "metrics"},
    ):
        with pytest.raises(ValueError, match=next(iter(env))):
            Settings.from_env(env)


def test_a_later_instrument_applies_its_options(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """instrument() with no arguments (as the entry point does) reads the environment; a
    later instrument(...) with options applies them to the running instrumentation and
    logs what changed, instead of silently keeping the first."""
    monkeypatch.setenv("CHUNKWATCH_UPSTREAMS", "127.0.0.1=from-env")
    first = chunkwatch.instrument()
    try:
        assert first.upstream_for("http://127.0.0.1:1") == "from-env"
        registry = CollectorRegistry()
        with caplog.at_level(logging.INFO, logger="chunkwatch"):
            second = chunkwatch.instrument(
                registry=registry, upstreams={"127.0.0.1": "given"}, deadlines=Deadlines(idle=3)
            )
        assert second is first
        assert second.upstream_for("http://127.0.0.1:1") == "given"
        assert second.metrics.registry is registry
        assert second.deadlines.idle == 3
        said = " ".join(r.getMessage() for r in caplog.records)
        assert "upstreams" in said and "registry" in said and "deadlines" in said
    finally:
        chunkwatch.uninstrument()


@pytest.mark.parametrize("first", ["chunkwatch", "otel"])
def test_beside_otel_threading_both_contexts_travel_and_either_can_leave(first: str) -> None:
    """With OpenTelemetry's threading instrumentation installed before or after
    chunkwatch, a thread carries both the ledger and the trace context; removing
    chunkwatch leaves OTel's propagation working, and the reverse."""
    from opentelemetry import trace
    from opentelemetry.instrumentation.threading import ThreadingInstrumentor
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("test")

    def seen() -> tuple[Ledger | None, int]:
        out: list[tuple[Ledger | None, int]] = []

        def look() -> None:
            out.append((current_ledger(), trace.get_current_span().get_span_context().span_id))

        t = threading.Thread(target=look)
        t.start()
        t.join()
        return out[0]

    installs = [
        lambda: chunkwatch.instrument(registry=CollectorRegistry()),
        ThreadingInstrumentor().instrument,
    ]
    for install in installs if first == "chunkwatch" else reversed(installs):
        install()
    try:
        ledger = Ledger()
        with tracer.start_as_current_span("request") as span, bind(ledger):
            span_id = span.get_span_context().span_id
            assert seen() == (ledger, span_id)
            chunkwatch.uninstrument()
            assert seen() == (None, span_id)  # OTel's propagation survived ours leaving
            chunkwatch.instrument(registry=CollectorRegistry())
            ThreadingInstrumentor().uninstrument()
            assert seen()[0] is ledger  # ours survived OTel's leaving
    finally:
        chunkwatch.uninstrument()
        ThreadingInstrumentor().uninstrument()


def test_chunkwatchs_own_threads_do_not_hold_the_request_that_started_them(
    rt: Runtime,
) -> None:
    """The watchdog thread, started by the first stream of some request, is not bound to
    that request: it serves all of them."""
    ledger = Ledger()
    seen: list[Ledger | None] = []
    with bind(ledger):
        t = threading.Thread(target=lambda: seen.append(current_ledger()), name="chunkwatch-x")
        t.start()
        t.join()
    assert seen == [None]
