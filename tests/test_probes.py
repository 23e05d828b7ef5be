"""Probe behaviours at their seams, with the real openai SDK and real LangGraph."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import chunkwatch
from chunkwatch import semconv as sc
from chunkwatch.probes import _gateway_body as gateway_body
from chunkwatch.probes import langgraph as langgraph_probe
from chunkwatch.probes import sdk as sdk_probe
from chunkwatch.request_series import RequestSeries
from chunkwatch.runtime import Runtime
from chunkwatch.stream_series import StreamSeries
from chunkwatch_lab.agent import LLMConfig, build_graph, make_model
from chunkwatch_lab.fault_gateway import Gateway
from chunkwatch_lab.threaded import Running, start_in_thread
from chunkwatch_lab.upstream import Upstream, answer_tokens

from .helpers import instrumented_system


class Observed:
    def __init__(self, rt: Runtime, registry: CollectorRegistry, exporter: InMemorySpanExporter):
        self.rt, self.registry, self.exporter = rt, registry, exporter

    def streams(self, layer: str, outcome: str) -> float:
        total = 0.0
        for metric in self.registry.collect():
            for s in metric.samples:
                if (
                    s.name == "chunkwatch_streams_total"
                    and s.labels["layer"] == layer
                    and s.labels["outcome"] == outcome
                ):
                    total += s.value
        return total

    def chunks(self, layer: str) -> float:
        return sum(
            s.value
            for metric in self.registry.collect()
            for s in metric.samples
            if s.name == "chunkwatch_chunks_total" and s.labels["layer"] == layer
        )


@pytest.fixture
def observed(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Observed]:
    """The library probes on, with a fresh registry and span exporter; off afterwards.

    ``{"wrapped": True}``: the gateway and sdk probes wrap every stream, as they do for
    stream types they do not know, instead of giving the library's own stream a counting
    subclass; the langgraph probe wraps ``astream_events``, as it does on a langchain-core
    without the v1/v2 pass-through it otherwise takes the place of."""
    kwargs: dict[str, Any] = dict(getattr(request, "param", {}))
    if kwargs.pop("wrapped", False):
        monkeypatch.setattr(gateway_body, "_native", lambda mod, name: (None, None))
        monkeypatch.setattr(
            sdk_probe, "_adopt", lambda s, chunks, base, adopted, wrap: wrap(s, chunks)
        )
        monkeypatch.setattr(langgraph_probe, "_v2_event_stream", lambda: None)
    registry, exporter = CollectorRegistry(), InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    rt = chunkwatch.instrument(registry=registry, tracer_provider=provider, **kwargs)
    try:
        yield Observed(rt, registry, exporter)
    finally:
        chunkwatch.uninstrument()


@pytest.fixture(scope="module")
def gateway_() -> Iterator[Running[Gateway]]:
    with start_in_thread(Upstream(tokens=12, token_delay=0.002)) as up:
        with start_in_thread(Gateway(up.url)) as gw:
            yield gw


def client(gw: Running[Gateway], cls: Any = openai.AzureOpenAI) -> Any:
    return cls(
        azure_endpoint=gw.url,
        api_key="k",
        api_version="2024-10-21",
        azure_deployment="d",
        max_retries=0,
        timeout=5,
    )


def stream(gw: Running[Gateway], fault: str = "pass") -> Any:
    gw.server.set_fault(fault)
    return client(gw).chat.completions.create(
        model="d", messages=[{"role": "user", "content": "hi"}], stream=True
    )


# The library's own streams given a counting subclass (the usual path), and wrapped.
BOTH_PATHS = pytest.mark.parametrize(
    "observed", [{}, {"wrapped": True}], indirect=True, ids=["adopted", "wrapped"]
)


@BOTH_PATHS
def test_full_stream_then_close_is_counted_once_as_ok(
    observed: Observed, gateway_: Running[Gateway]
) -> None:
    """Read to the end, then close: one sdk stream, outcome ok, nothing else."""
    s = stream(gateway_)
    chunks = list(s)
    s.close()
    assert len(chunks) == 14  # role + 12 tokens + finish
    assert observed.streams("sdk", "ok") == 1
    assert sum(observed.streams("sdk", o) for o in ("closed", "disconnected", "abandoned")) == 0


def test_a_call_without_streaming_is_one_ok_unit_at_the_gateway_and_the_sdk(
    observed: Observed, gateway_: Running[Gateway]
) -> None:
    """``stream=False`` (what the guard falls back to): the gateway and the sdk each count
    one ok unit, opened as not streamed (a JSON answer is its right content type)."""
    gateway_.server.set_fault("pass")
    ledger = chunkwatch.Ledger()
    with chunkwatch.bind(ledger):
        answer = client(gateway_).chat.completions.create(
            model="d", messages=[{"role": "user", "content": "hi"}], stream=False
        )
    assert answer.choices[0].message.content
    assert [(t.layer, t.stream_requested, str(t.outcome), t.units) for t in ledger.tallies] == [
        ("sdk", False, "ok", 1),
        ("gateway", False, "ok", 1),
    ]
    assert observed.streams("sdk", "ok") == 1 and observed.streams("gateway", "ok") == 1


@BOTH_PATHS
def test_closed_early_is_disconnected(observed: Observed, gateway_: Running[Gateway]) -> None:
    """The consumer closes after two chunks: sdk and gateway are disconnected, not ok."""
    s = stream(gateway_)
    next(s), next(s)
    s.close()
    assert observed.streams("sdk", "disconnected") == 1
    assert observed.streams("gateway", "disconnected") == 1


@BOTH_PATHS
def test_abandoned_stream_is_abandoned_not_ok(
    observed: Observed, gateway_: Running[Gateway]
) -> None:
    """A stream dropped unfinished and garbage-collected is `abandoned`."""
    s = stream(gateway_)
    next(s), next(s)
    del s
    gc.collect()
    assert observed.streams("sdk", "abandoned") == 1
    assert observed.streams("sdk", "ok") == 0


@BOTH_PATHS
def test_zero_chunks_raises_stream_empty_error_with_the_verdict(
    observed: Observed, gateway_: Running[Gateway]
) -> None:
    """Where the bare SDK ends silently with zero chunks, the app gets StreamEmptyError."""
    s = stream(gateway_, "zero")
    with pytest.raises(chunkwatch.StreamEmptyError) as info:
        list(s)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.verdict is not None and str(err.verdict) == "empty@gateway"
    assert str(err).startswith("No generations found in stream.")


def test_the_libraries_own_streams_are_counted_with_no_layer_added(
    observed: Observed, gateway_: Running[Gateway]
) -> None:
    """The SDK's Stream and httpx2's response stream are read through their own
    iterators, given a counting subclass: the chain the service resumes per chunk is
    as deep as the bare one."""
    from httpx2._transports.default import ResponseStream

    s = stream(gateway_)
    assert type(s).__name__ == "WatchedStream" and type(s).__mro__[1] is openai.Stream
    assert s._iterator.gi_code.co_name == "__stream__"  # the SDK's own generator, unwrapped
    body = s.response.stream._stream  # httpx2's BoundSyncStream holds the transport's stream
    assert (
        type(body).__name__ == "WatchedResponseStream" and type(body).__mro__[1] is ResponseStream
    )
    assert len(list(s)) == 14
    assert observed.streams("sdk", "ok") == 1 and observed.streams("gateway", "ok") == 1


def test_gateway_notes_the_named_headers_once_and_no_others() -> None:
    """Status, content headers and gateway request ids, by any case, repeated ones joined
    as ``headers[name]`` joins them; an Authorization or api-key value is never read."""
    from chunkwatch.ledger import Ledger
    from chunkwatch.probes._wire import note_headers

    response = httpx2.Response(
        200,
        headers=[
            ("Content-Type", "text/event-stream"),
            ("APIM-Request-Id", "apim-1"),
            ("x-request-id", "r1"),
            ("X-Request-ID", "r2"),
            ("Content-Encoding", "identity"),
            ("X-Ms-Request-Id", "Zürich-1".encode()),  # not ASCII: httpx decodes all as UTF-8
            ("x-ms-request-id", "eu-2"),
            ("Authorization", "Bearer secret-token"),
            ("api-key", "secret-key"),
        ],
    )
    rt = Runtime(registry=CollectorRegistry())
    untraced = Ledger().open("gateway", stream_requested=True)
    assert note_headers(rt, untraced, response) is not None  # a stream was asked for
    assert untraced.status == 200 and "span_attributes" not in untraced.facts  # nobody reads
    tally = Ledger().open("gateway", stream_requested=True)
    tally.span = TracerProvider().get_tracer("test").start_span("POST chat")  # recording
    parser = note_headers(rt, tally, response)
    assert parser is not None  # a stream was asked for: the body is parsed
    assert (tally.status, tally.content_type) == (200, "text/event-stream")
    assert (tally.content_length, tally.content_encoding) == (None, "identity")
    facts = tally.facts["span_attributes"]
    assert facts["chunkwatch.http.apim_request_id"] == "apim-1"
    assert facts["chunkwatch.http.x_request_id"] == "r1, r2" == response.headers["x-request-id"]
    ms_id = response.headers["x-ms-request-id"]
    assert facts["chunkwatch.http.x_ms_request_id"] == "Zürich-1, eu-2" == ms_id
    assert facts["chunkwatch.http.transfer_encoding"] == ""
    assert "chunkwatch.http.content_length" not in facts
    assert not any("secret" in str(v) for v in [*facts.values(), *tally.facts.values()])


async def _async_stream(gw: Running[Gateway], fault: str) -> Any:
    gw.server.set_fault(fault)
    aclient = client(gw, openai.AsyncAzureOpenAI)
    return await aclient.chat.completions.create(
        model="d", messages=[{"role": "user", "content": "hi"}], stream=True
    )


@BOTH_PATHS
def test_async_stream_counted_through_anext_and_async_for(
    observed: Observed, gateway_: Running[Gateway]
) -> None:
    """``await stream.__anext__()`` and ``async for`` count the same chunks; an empty
    stream raises StreamEmptyError once, then StopAsyncIteration, either way."""
    import asyncio

    async def run() -> tuple[int, int, list[str]]:
        s = await _async_stream(gateway_, "pass")
        first = [await s.__anext__(), await s.__anext__()]
        rest = [c async for c in s]
        seen: list[str] = []
        for _ in range(2):
            e = await _async_stream(gateway_, "zero")
            try:
                await e.__anext__()
            except chunkwatch.StreamEmptyError:
                seen.append("empty")
            with pytest.raises(StopAsyncIteration):
                await e.__anext__()
            e2 = await _async_stream(gateway_, "zero")
            with pytest.raises(chunkwatch.StreamEmptyError):
                async for _ in e2:
                    pass
            seen.append("empty-for")
        return len(first), len(rest), seen

    first, rest, seen = asyncio.run(run())
    assert (first, rest) == (2, 12)
    assert seen == ["empty", "empty-for"] * 2
    assert observed.streams("sdk", "ok") == 1 and observed.streams("gateway", "ok") == 1
    assert observed.streams("sdk", "empty") == 4 and observed.streams("gateway", "empty") == 4


@pytest.mark.parametrize("observed", [{"translate_errors": False}], indirect=True)
def test_translation_can_be_turned_off(observed: Observed, gateway_: Running[Gateway]) -> None:
    """translate_errors=False: the SDK's own behaviour, zero chunks and no error."""
    assert list(stream(gateway_, "zero")) == []
    assert observed.streams("gateway", "empty") == 1


def test_sdk_errors_pass_through_unchanged(observed: Observed, gateway_: Running[Gateway]) -> None:
    """An HTTP error stays the SDK's own exception class, with its status."""
    gateway_.server.set_fault("status", status=429)
    with pytest.raises(openai.RateLimitError) as info:
        client(gateway_).chat.completions.create(
            model="d", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    assert info.value.status_code == 429
    assert observed.streams("gateway", "http_error") == 1
    assert observed.streams("sdk", "http_error") == 1


async def _events(graph: Any) -> list[dict[str, Any]]:
    return [
        ev
        async for ev in graph.astream_events(
            {"messages": [("user", "hi")]}, {"configurable": {"thread_id": "t"}}, version="v2"
        )
    ]


@BOTH_PATHS
def test_langgraph_translates_langchains_value_error_chained(
    observed: Observed, gateway_: Running[Gateway]
) -> None:
    """With only the langgraph probe: StreamEmptyError chained to langchain-core's ValueError."""
    import asyncio

    sdk_probe.uninstrument()
    gateway_.server.set_fault("zero")
    graph = build_graph(make_model(LLMConfig(url=gateway_.url), streaming=True))
    with pytest.raises(chunkwatch.StreamEmptyError) as info:
        asyncio.run(_events(graph))
    cause = info.value.__cause__
    assert type(cause) is ValueError and str(cause) == "No generations found in stream."
    assert info.value.verdict is not None and str(info.value.verdict) == "empty@gateway"


@BOTH_PATHS
def test_langgraph_passes_other_exceptions_through_as_the_same_object(
    observed: Observed,
) -> None:
    """A node's own exception reaches the caller as the very same object."""
    import asyncio

    from langgraph.graph import END, START, MessagesState, StateGraph

    boom = KeyError("the node's own error")

    async def node(state: MessagesState) -> dict[str, Any]:
        raise boom

    g = StateGraph(MessagesState)
    g.add_node("n", node)
    g.add_edge(START, "n")
    g.add_edge("n", END)
    graph = g.compile()

    async def run() -> None:
        async for _ in graph.astream_events({"messages": []}, version="v2"):
            pass

    with pytest.raises(KeyError) as info:
        asyncio.run(run())
    assert info.value is boom
    assert observed.streams("langgraph", "error") == 1


def _echo_graph() -> Any:
    from langgraph.graph import END, START, MessagesState, StateGraph

    async def node(state: MessagesState) -> dict[str, Any]:
        return {"messages": [("ai", "hello")]}

    g = StateGraph(MessagesState)
    g.add_node("n", node)
    g.add_edge(START, "n")
    g.add_edge("n", END)
    return g.compile()


def test_the_graphs_event_stream_is_counted_with_no_layer_added(
    observed: Observed, gateway_: Running[Gateway]
) -> None:
    """Under astream_events v2 the counting generator reads langchain-core's event stream
    in the place of langchain-core's own pass-through: as deep a chain as the bare one,
    the same events passed on, every token event counted, and the patch undone exactly."""
    import asyncio

    from langgraph.pregel import Pregel

    gateway_.server.set_fault("pass")
    graph = build_graph(make_model(LLMConfig(url=gateway_.url), streaming=True))
    args = ({"messages": [("user", "hi")]}, {"configurable": {"thread_id": "t"}})

    def chain(events: Any) -> list[str]:
        """The generator the caller resumes, and the one it resumes in turn."""
        names = events.ag_frame.f_locals  # after the first event: both exist
        inner = names.get("inner") or names["event_stream"]
        return [events.ag_code.co_name, inner.ag_code.co_name]

    async def run() -> tuple[list[str], list[tuple[str, str]]]:
        events = graph.astream_events(*args, version="v2")
        seen = [await events.__anext__()]
        names = chain(events)
        seen += [ev async for ev in events]
        return names, [(ev["event"], ev["name"]) for ev in seen]

    async def watched_then_bare() -> tuple[Any, Any]:  # one loop: the model's client is bound to it
        watched = await run()
        chunkwatch.uninstrument()
        return watched, await run()

    (names, watched), (bare_names, plain) = asyncio.run(watched_then_bare())
    assert names == ["_watch", "_astream_events_implementation_v2"]
    assert observed.streams("langgraph", "ok") == 1
    tokens = sum(1 for event, _ in watched if event == "on_chat_model_stream")
    assert tokens >= 12 and observed.chunks("langgraph") == tokens
    assert "_astream_events_v1_v2" not in Pregel.__dict__  # inherited again, not replaced
    assert bare_names == ["_astream_events_v1_v2", "_astream_events_implementation_v2"]
    assert watched == plain


@pytest.mark.filterwarnings("ignore:.*astream_events version='v1'")
def test_astream_events_v1_is_still_watched(observed: Observed) -> None:
    """v1 (deprecated) keeps langchain-core's own path, the counting generator in front."""
    import asyncio

    async def run() -> list[Any]:
        return [ev async for ev in _echo_graph().astream_events({"messages": []}, version="v1")]

    assert asyncio.run(run())  # the run's start and end events, at least
    assert observed.streams("langgraph", "empty") == 1  # no token events: a graph with no model


@BOTH_PATHS
def test_closing_the_graphs_event_stream_closes_the_run(observed: Observed) -> None:
    """The application stops reading after the first event and closes the stream: the
    graph's own event stream is closed with it (as langchain-core's pass-through does),
    and the langgraph stream is counted as closed early, not ok."""
    import asyncio

    graph = _echo_graph()

    async def run() -> Any:
        events = graph.astream_events({"messages": []}, version="v2")
        async for _ in events:
            break
        inner = events.ag_frame.f_locals["inner"]
        await events.aclose()
        return inner

    inner = asyncio.run(run())
    assert inner.ag_frame is None  # finished: closed, not left for the garbage collector
    assert observed.streams("langgraph", "disconnected") == 1
    assert observed.streams("langgraph", "ok") == 0


class RaisingExporter(SpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        raise RuntimeError("the exporter is down")

    def shutdown(self) -> None:
        pass


class BrokenRequests(RequestSeries):
    """Per-request metrics whose every write raises."""

    def verdict(self, *a: Any, **k: Any) -> None:
        raise RuntimeError("registry broken")

    def queue(self, *a: Any, **k: Any) -> None:
        raise RuntimeError("registry broken")


class BrokenSeries(StreamSeries):
    """Per-stream metrics whose every write raises."""

    def __getattribute__(self, name: str) -> Any:
        raise RuntimeError("registry broken")


def test_telemetry_failures_do_not_change_what_the_client_receives() -> None:
    """An exporter that raises and broken metrics: the client still gets the whole answer,
    and chunkwatch counts its own errors."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(RaisingExporter()))
    with instrumented_system(token_delay=0.002, tracer_provider=provider) as system:
        metrics = system.service.app.extensions["chunkwatch.chat"]  # the service is up
        assert metrics is not None
        rt = chunkwatch.runtime.active()
        assert rt is not None
        rt.metrics.series = BrokenSeries()
        rt.metrics.per_request = BrokenRequests()
        r = system.ask("still answered?")
        assert r.done and r.text == "".join(answer_tokens("still answered?", 12))
        assert (
            system.sample("chunkwatch_instrumentation_errors_total", layer="sdk", stage="metrics")
            >= 1
        )
        assert (
            system.sample("chunkwatch_instrumentation_errors_total", layer="http", stage="metrics")
            >= 1
        )


@pytest.mark.parametrize("observed", [{"capture_content": True}], indirect=True)
def test_content_capture_is_opt_in_and_truncated(
    observed: Observed, gateway_: Running[Gateway]
) -> None:
    """capture_content=True records the prompt and completion, cut to 1000 characters."""
    gateway_.server.set_fault("pass")
    long_prompt = "why? " * 400
    s = client(gateway_).chat.completions.create(
        model="d", messages=[{"role": "user", "content": long_prompt}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in s if c.choices)
    (span,) = [
        sp
        for sp in observed.exporter.get_finished_spans()
        if (sp.attributes or {}).get(sc.A_LAYER) == sc.SDK
    ]
    attrs = span.attributes or {}
    assert attrs[sc.A_PROMPT] == long_prompt[:1000]
    assert attrs[sc.A_COMPLETION] == text


def test_instrument_is_idempotent_and_uninstrument_restores() -> None:
    """Two instrument() calls patch once and share a runtime; uninstrument() restores."""
    original = httpx2.AsyncHTTPTransport.__dict__["handle_async_request"]
    rt1 = chunkwatch.instrument(registry=CollectorRegistry())
    rt2 = chunkwatch.instrument(registry=CollectorRegistry())
    try:
        assert rt1 is rt2
        patched = httpx2.AsyncHTTPTransport.__dict__["handle_async_request"]
        assert patched is not original
        assert patched.__chunkwatch_original__ is original
    finally:
        chunkwatch.uninstrument()
    assert httpx2.AsyncHTTPTransport.__dict__["handle_async_request"] is original
    assert chunkwatch.runtime.active() is None


def test_public_api_is_curated() -> None:
    """`chunkwatch.__all__` is the public surface, and every name in it exists."""
    assert sorted(chunkwatch.__all__) == sorted(set(chunkwatch.__all__))
    for name in chunkwatch.__all__:
        assert hasattr(chunkwatch, name), name
    assert {
        "instrument",
        "uninstrument",
        "StreamEmptyError",
        "Outcome",
        "Ledger",
        "WatchedQueue",
        "bind",
        "request_ledger",
        "error_payload",
    } <= set(chunkwatch.__all__)


def test_registered_as_an_opentelemetry_instrumentor() -> None:
    """The `opentelemetry_instrumentor` entry point loads ChunkwatchInstrumentor."""
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="opentelemetry_instrumentor") if e.name == "chunkwatch"]
    instrumentor = ep.load()()
    instrumentor.instrument(registry=CollectorRegistry())
    try:
        assert chunkwatch.runtime.active() is not None
    finally:
        instrumentor.uninstrument()
    assert chunkwatch.runtime.active() is None


def test_instrument_again_on_the_same_registry() -> None:
    """instrument -> uninstrument -> instrument on one registry reuses its metrics."""
    registry = CollectorRegistry()
    rt1 = chunkwatch.instrument(registry=registry)
    chunkwatch.uninstrument()
    rt2 = chunkwatch.instrument(registry=registry)
    try:
        assert rt1 is not rt2 and rt1.metrics is rt2.metrics
    finally:
        chunkwatch.uninstrument()


def test_a_registry_that_refuses_our_names_does_not_crash_the_host(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A user metric already named chunkwatch_requests: instrument() still works, says why."""
    from prometheus_client import Counter

    registry = CollectorRegistry()
    Counter("chunkwatch_requests", "the user's own", registry=registry)
    rt = chunkwatch.instrument(registry=registry)
    try:
        assert rt.metrics.registry is not registry
        assert "could not be registered" in caplog.text
    finally:
        chunkwatch.uninstrument()


@pytest.mark.parametrize(
    ("body", "asked"),
    [
        (b'{"model": "m", "stream": true}', True),
        (b'{"stream":true,"model":"m"}', True),
        (b'{"stream" :  true}', True),
        (b'{"stream": false}', False),
        (b'{"messages": [{"content": "stream"}], "stream": true}', True),
        (b'{"messages": [{"content": "\\"stream\\": true"}]}', False),
        (b'{"model": "m"}', False),
    ],
)
def test_gateway_reads_whether_a_stream_was_asked_for_from_the_body(
    body: bytes, asked: bool
) -> None:
    """The ``stream`` key of the request's JSON body, wherever it is; a quoted
    ``"stream": true`` inside a message is not the key."""
    from chunkwatch.probes.gateway import _stream_requested

    request = httpx2.Request("POST", "http://m/chat/completions", content=body)
    assert _stream_requested(request) is asked


def test_sdk_names_a_client_upstream_by_the_runtime_names_in_force() -> None:
    """A client's base URL is named once, and named again by a runtime with other names
    (a later ``instrument(upstreams=...)``): never a stale label."""
    from chunkwatch.probes.sdk import _upstream_of

    url = httpx2.URL("http://gw.internal:8443/openai/")
    east = Runtime(registry=CollectorRegistry(), upstreams={"gw.internal:8443": "azure-east"})
    west = Runtime(registry=CollectorRegistry(), upstreams={"gw.internal:8443": "azure-west"})
    assert _upstream_of(east, url) == _upstream_of(east, url) == "azure-east"
    assert _upstream_of(west, url) == "azure-west"
    assert _upstream_of(east, httpx2.URL("http://other:1/")) == "other:1"
    assert _upstream_of(east, None) == "unknown"
