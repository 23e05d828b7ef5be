"""Orphaned streams, the bookkeeping: what is followed after a client leaves, when the
request's root span and verdict line are written, and what is counted.

The disconnect storms against real services are in tests/compat/test_orphans.py (a
service that leaks, one that cancels) and tests/lab/test_disconnect_storm.py (the reference
service under fifty departures).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import chunkwatch
from chunkwatch import orphans
from chunkwatch import semconv as sc
from chunkwatch.ledger import Ledger, bind
from chunkwatch.outcomes import End
from chunkwatch.runtime import Runtime
from chunkwatch.watchdog import Deadlines


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def rt(exporter: InMemorySpanExporter) -> Iterator[Runtime]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    runtime = chunkwatch.instrument(registry=CollectorRegistry(), tracer_provider=provider)
    runtime.configure(runtime.settings.override(deadlines=Deadlines(silent_at_end=None)))
    runtime.serving = True
    try:
        yield runtime
    finally:
        chunkwatch.uninstrument()


def _request(rt: Runtime) -> tuple[Ledger, object]:
    """A request with a root span, an open gateway and sdk stream that delivered 3 units,
    and an sse stream its client has just closed."""
    ledger = Ledger()
    root = rt.start_span("POST /chat", sc.HTTP)
    from opentelemetry import trace

    ledger.parent_context = trace.set_span_in_context(root)
    for layer in (sc.SDK, sc.GATEWAY):
        t = rt.open(layer, ledger=ledger, upstream="gw", watch=False, stream_requested=True)
        t.unit(3)
    sse = rt.open(sc.SSE, ledger=ledger, watch=False)
    sse.unit()
    sse.finish(End.CLOSED)
    return ledger, root


def _sample(rt: Runtime, name: str, **labels: str) -> float:
    return rt.metrics.registry.get_sample_value(name, {"upstream": "gw", **labels}) or 0.0


def _roots(exporter: InMemorySpanExporter) -> list[object]:
    return [s for s in exporter.get_finished_spans() if s.name == "POST /chat"]


def test_the_root_span_waits_for_the_model_streams_and_says_what_they_did(
    rt: Runtime, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """The client left with the model stream open: the request is counted at once, but its
    root span and verdict line wait until the stream stops, then carry what it received
    after the client left and how long it ran on."""
    ledger, _root = _request(rt)
    with caplog.at_level(logging.INFO, logger="chunkwatch"):
        verdict = rt.finish_request(ledger, _root)  # type: ignore[arg-type]
        assert verdict is not None and str(verdict) == "disconnected@sse"
        assert _sample(rt, "chunkwatch_requests_total", outcome="disconnected", layer="sse") == 1
        assert _roots(exporter) == [] and "chunkwatch verdict" not in caplog.text
        gateway, sdk = ledger.layer(sc.GATEWAY)[0], ledger.layer(sc.SDK)[0]
        gateway.unit(40)
        sdk.unit(40)
        time.sleep(orphans.ORPHANED_AFTER + 0.1)
        sdk.finish()
        assert _roots(exporter) == []  # the gateway stream is still open
        gateway.finish()
    (root,) = _roots(exporter)
    attrs = dict(root.attributes or {})  # type: ignore[attr-defined]
    assert attrs[sc.A_ORPHANED] is True
    assert attrs[sc.A_ORPHANED_STREAMS] == 1  # one model call, counted at the gateway
    assert attrs[sc.A_ORPHANED_CHUNKS] == 40
    assert attrs[sc.A_ORPHANED_SECONDS] > orphans.ORPHANED_AFTER
    assert "orphaned" in str(attrs[sc.A_VERDICT_DETAIL])
    line = next(r for r in caplog.records if "chunkwatch verdict" in r.getMessage())
    assert line.levelno == logging.WARNING and "received 40 gateway units" in line.getMessage()
    assert _sample(rt, "chunkwatch_orphaned_chunks_total") == 40
    assert _sample(rt, "chunkwatch_orphaned_stream_seconds_count") == 1
    assert _sample(rt, "chunkwatch_orphaned_stream_seconds_bucket", le="1.0") == 0


def test_a_model_stream_that_stops_at_once_is_followed_not_orphaned(
    rt: Runtime, exporter: InMemorySpanExporter
) -> None:
    """The app cancelled its agent: the stream stops with nothing more received. Observed
    in the histogram's first bucket, no orphaned chunks, `chunkwatch.orphaned=false`."""
    ledger, root = _request(rt)
    rt.finish_request(ledger, root)  # type: ignore[arg-type]
    for t in ledger.layer(sc.SDK) + ledger.layer(sc.GATEWAY):
        t.finish(End.CLOSED)
    (span,) = _roots(exporter)
    assert dict(span.attributes or {})[sc.A_ORPHANED] is False  # type: ignore[attr-defined]
    assert "stopped" in str(dict(span.attributes or {})[sc.A_VERDICT_DETAIL])  # type: ignore[attr-defined]
    assert _sample(rt, "chunkwatch_orphaned_chunks_total") == 0
    assert _sample(rt, "chunkwatch_orphaned_stream_seconds_bucket", le="0.05") == 1


def test_model_calls_the_agent_starts_after_the_client_left_are_its_orphans(
    rt: Runtime, exporter: InMemorySpanExporter
) -> None:
    """The agent runs on into its next model call: that stream belongs to the departed
    request (same trace, followed, counted) and is not called unlinked."""
    ledger, root = _request(rt)
    rt.finish_request(ledger, root)  # type: ignore[arg-type]
    with bind(ledger):  # the agent's context still holds the finished request
        own = rt.ledger(sc.GATEWAY)
        late = rt.open(sc.GATEWAY, ledger=own, upstream="gw", watch=False, stream_requested=True)
    late.unit(7)
    late.finish()
    for t in ledger.layer(sc.SDK) + ledger.layer(sc.GATEWAY):
        t.finish(End.CLOSED)
    assert not own.unlinked and own.parent_context is ledger.parent_context
    assert (
        rt.metrics.registry.get_sample_value(
            "chunkwatch_unlinked_streams_total", {"layer": "gateway"}
        )
        is None
    )
    assert _sample(rt, "chunkwatch_orphaned_chunks_total") == 7
    assert _sample(rt, "chunkwatch_orphaned_stream_seconds_count") == 2


def test_a_stream_that_never_stops_releases_the_root_span_after_the_wait(
    rt: Runtime, exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model stream that outlives orphans.WAIT: the root span ends then, saying it was
    still running; the request is not held forever."""
    monkeypatch.setattr(orphans, "WAIT", 0.2)
    import chunkwatch.request_end as request_end

    monkeypatch.setattr(request_end, "WAIT", 0.2)
    ledger, root = _request(rt)
    rt.finish_request(ledger, root)  # type: ignore[arg-type]
    deadline = time.monotonic() + 3
    while not _roots(exporter) and time.monotonic() < deadline:
        time.sleep(0.02)
    (span,) = _roots(exporter)
    attrs = dict(span.attributes or {})  # type: ignore[attr-defined]
    assert attrs[sc.A_ORPHANED] is True and attrs[sc.A_ORPHANED_STILL_RUNNING] == 1
    assert "still running" in str(attrs[sc.A_VERDICT_DETAIL])
    for t in ledger.layer(sc.SDK) + ledger.layer(sc.GATEWAY):
        t.finish()  # later: counted, nothing written twice
    assert len(_roots(exporter)) == 1
    assert _sample(rt, "chunkwatch_orphaned_stream_seconds_count") == 1


def test_a_request_that_completes_follows_nothing(
    rt: Runtime, exporter: InMemorySpanExporter
) -> None:
    """The answer was written to its end: nothing is followed, the root span ends with the
    verdict at once and has no orphan attributes."""
    ledger = Ledger()
    root = rt.start_span("POST /chat", sc.HTTP)
    gw = rt.open(sc.GATEWAY, ledger=ledger, upstream="gw", watch=False, stream_requested=True)
    gw.unit(3)
    gw.finish()
    sse = rt.open(sc.SSE, ledger=ledger, watch=False)
    sse.unit()
    sse.finish()
    rt.finish_request(ledger, root)
    (span,) = _roots(exporter)
    assert sc.A_ORPHANED not in dict(span.attributes or {})  # type: ignore[attr-defined]
    assert ledger.orphans is None


def test_units_in_flight_when_the_client_left_are_not_lost(rt: Runtime) -> None:
    """The sdk had counted a chunk the langgraph layer had not passed on yet when the client
    left: the stream is still open, the chunk is in flight, the verdict is the disconnect
    (fifty departing clients got `lost@langgraph` for this)."""
    ledger = Ledger()
    sdk = rt.open(sc.SDK, ledger=ledger, upstream="gw", watch=False, stream_requested=True)
    sdk.unit(4)
    graph = rt.open(sc.LANGGRAPH, ledger=ledger, upstream="gw", watch=False)
    graph.unit_kind = "token"
    graph.unit(3)
    sse = rt.open(sc.SSE, ledger=ledger, watch=False)
    sse.unit()
    sse.finish(End.CLOSED)
    verdict = rt.finish_request(ledger, None)
    assert verdict is not None and str(verdict) == "disconnected@sse"
    sdk.finish(End.CLOSED)
    graph.finish(End.CLOSED)
