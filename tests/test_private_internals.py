"""The private internals of other libraries that the probes use, each gone or changed:
the probe falls back to its plain wrapper over public API, the host gets every chunk
unchanged and no exception, the tally still counts exactly, and
``chunkwatch_instrumentation_errors_total`` names what was not as checked.

Each internal is taken away with ``monkeypatch`` before ``instrument()`` (which checks
them), and a real stream is run: the real openai SDK over a loopback gateway and
upstream, and a real LangGraph graph.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from typing import Any

import httpx2
import openai
import pytest
from opentelemetry.trace import NoOpTracerProvider
from prometheus_client import CollectorRegistry

import chunkwatch
from chunkwatch import Deadlines
from chunkwatch.probes import sdk as sdk_probe
from chunkwatch_lab.agent import LLMConfig, build_graph, make_model
from chunkwatch_lab.fault_gateway import Gateway
from chunkwatch_lab.threaded import Running
from chunkwatch_lab.upstream import answer_tokens

from .conftest import UPSTREAM_TOKENS

PROMPT = "hi"
ANSWER = "".join(answer_tokens(PROMPT, UPSTREAM_TOKENS))
CHUNKS = UPSTREAM_TOKENS + 2  # role + tokens + finish
DEFAULT = httpx2._transports.default


class Watched:
    """The probes on (after the monkeypatches), a fresh registry; read its samples."""

    def __init__(self, **kwargs: Any) -> None:
        self.registry = CollectorRegistry()
        chunkwatch.instrument(
            registry=self.registry, tracer_provider=NoOpTracerProvider(), **kwargs
        )

    def value(self, name: str, **labels: str) -> float:
        return sum(
            s.value
            for metric in self.registry.collect()
            for s in metric.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def errors(self, layer: str, stage: str | None = None) -> float:
        labels = {"layer": layer} if stage is None else {"layer": layer, "stage": stage}
        return self.value("chunkwatch_instrumentation_errors_total", **labels)

    def chunks(self, layer: str) -> float:
        return self.value("chunkwatch_chunks_total", layer=layer)

    def ok(self, layer: str) -> float:
        return self.value("chunkwatch_streams_total", layer=layer, outcome="ok")


@pytest.fixture
def probes_off() -> Iterator[None]:
    """Whatever a test instruments is undone before its monkeypatches are."""
    yield
    chunkwatch.uninstrument()


def _client(gw: Running[Gateway], cls: Any) -> Any:
    return cls(
        azure_endpoint=gw.url, api_key="k", api_version="2024-10-21", max_retries=0, timeout=5
    )


def _args() -> dict[str, Any]:
    return {"model": "d", "messages": [{"role": "user", "content": PROMPT}], "stream": True}


def read_sync(gw: Running[Gateway]) -> list[Any]:
    with _client(gw, openai.AzureOpenAI).chat.completions.create(**_args()) as stream:
        return list(stream)


def read_async(gw: Running[Gateway]) -> list[Any]:
    async def run() -> list[Any]:
        client = _client(gw, openai.AsyncAzureOpenAI)
        stream = await client.chat.completions.create(**_args())
        chunks = [chunk async for chunk in stream]
        await stream.close()
        await client.close()
        return chunks

    return asyncio.run(run())


def assert_whole(chunks: list[Any]) -> None:
    """Every chunk of the answer reached the application, unchanged."""
    assert len(chunks) == CHUNKS
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ANSWER
    assert chunks[-1].choices[0].finish_reason == "stop"


def assert_counted(w: Watched, *layers: str) -> None:
    """Each layer counted one ok stream of exactly the answer's chunks."""
    for layer in layers:
        assert w.ok(layer) == 1, layer
        assert w.chunks(layer) == CHUNKS, layer


# -- httpx2: the transport's response stream -------------------------------------------


def test_with_every_internal_as_checked_no_error_is_counted(
    gateway: Running[Gateway], probes_off: None
) -> None:
    """With every internal as checked, nothing is counted as an instrumentation error."""
    w = Watched()
    assert_whole(read_sync(gateway))
    assert_whole(read_async(gateway))
    assert w.errors("gateway") == 0 and w.errors("sdk") == 0


def test_gateway_without_the_transports_response_stream_class(
    gateway: Running[Gateway], probes_off: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """httpx2 without ``_transports.default.ResponseStream`` where the probe looks (at
    ``instrument()``; put back for httpx2's own use after): every body is wrapped, and
    counted."""
    original = DEFAULT.ResponseStream
    monkeypatch.delattr(DEFAULT, "ResponseStream")
    w = Watched()
    monkeypatch.setattr(DEFAULT, "ResponseStream", original, raising=False)
    assert_whole(read_sync(gateway))
    assert_counted(w, "gateway", "sdk")
    assert w.errors("gateway", "private:ResponseStream") == 1


def test_gateway_with_a_changed_async_response_stream(
    gateway: Running[Gateway], probes_off: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An httpx2 whose ``AsyncResponseStream`` no longer reads ``_httpcore_stream`` under
    ``map_httpcore_exceptions``: the counting subclass would skip its loop, so every
    body is wrapped instead, and counted."""

    class AsyncResponseStream(httpx2.AsyncByteStream):  # a later version's, say
        def __init__(self, httpcore_stream: Any) -> None:
            self._core = httpcore_stream

        async def __aiter__(self) -> Any:
            async for part in self._core:
                yield part

        async def aclose(self) -> None:
            await self._core.aclose()

    monkeypatch.setattr(DEFAULT, "AsyncResponseStream", AsyncResponseStream)
    w = Watched()
    assert_whole(read_async(gateway))
    assert_counted(w, "gateway", "sdk")
    assert w.errors("gateway", "private:AsyncResponseStream") == 1


def test_gateway_stream_without_its_httpcore_stream_attribute(
    gateway: Running[Gateway], probes_off: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A response stream that holds the httpcore stream under another name (the class's
    loop still reads ``_httpcore_stream``, here a property): not given the subclass;
    wrapped, counted."""

    def init(self: Any, httpcore_stream: Any) -> None:
        self._core = httpcore_stream

    monkeypatch.setattr(DEFAULT.ResponseStream, "__init__", init)
    monkeypatch.setattr(
        DEFAULT.ResponseStream, "_httpcore_stream", property(lambda s: s._core), raising=False
    )
    w = Watched()
    assert_whole(read_sync(gateway))
    assert_counted(w, "gateway", "sdk")
    assert w.errors("gateway", "private:_httpcore_stream") == 1


class _TaskTable(Mapping[Any, Any]):
    """``asyncio.tasks._current_tasks`` as a later Python might keep it: not a dict."""

    def __init__(self, table: dict[Any, Any]) -> None:
        self.table = table

    def __getitem__(self, key: Any) -> Any:
        return self.table[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.table)

    def __len__(self) -> int:
        return len(self.table)


def test_gateway_abort_with_a_changed_asyncio_task_table(
    gateway: Running[Gateway], probes_off: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Python whose ``asyncio.tasks._current_tasks`` is not the dict the body reads
    (``asyncio.current_task()`` itself still reads it, so it cannot just be deleted):
    with ``abort=True`` the body asks ``asyncio.current_task()`` for the waiting task
    instead, and counts it."""
    table = _TaskTable(asyncio.tasks._current_tasks)  # type: ignore[attr-defined]
    monkeypatch.setattr(asyncio.tasks, "_current_tasks", table)
    w = Watched(deadlines=Deadlines(first_chunk=5.0, idle=5.0, abort=True))
    assert_whole(read_async(gateway))
    assert_counted(w, "gateway", "sdk")
    assert w.errors("gateway", "private:asyncio.tasks._current_tasks") == 1


# -- openai: Stream._iterator / AsyncStream._iterator ---------------------------------


def _rename_stream_iterator(monkeypatch: pytest.MonkeyPatch) -> None:
    """An SDK ``Stream`` that keeps its iterator as ``_events``; ``_iterator`` is a property."""
    monkeypatch.setattr(
        openai.Stream,
        "_iterator",
        property(lambda s: s._events, lambda s, v: setattr(s, "_events", v)),
        raising=False,
    )


def test_sdk_stream_without_its_iterator_attribute(
    gateway: Running[Gateway], probes_off: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An SDK ``Stream`` that keeps its iterator under another name: neither the counting
    subclass nor the iterator wrapper applies; the stream is counted over its public
    ``__iter__``, and that is counted."""
    _rename_stream_iterator(monkeypatch)
    w = Watched()
    assert_whole(read_sync(gateway))
    assert_counted(w, "gateway", "sdk")
    assert w.errors("sdk", "private:Stream._iterator") == 1


def test_sdk_reads_the_base_url_its_clients_property_returns(
    gateway: Running[Gateway], probes_off: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sdk probe names a client's upstream from its ``_base_url``, the object the
    ``base_url`` property returns, for every client class; a client without one is read
    through the property, and its calls are named alike."""
    for cls in (openai.OpenAI, openai.AsyncOpenAI, openai.AzureOpenAI, openai.AsyncAzureOpenAI):
        client = _client(gateway, cls) if "Azure" in cls.__name__ else cls(api_key="k")
        assert sdk_probe._base_url(client) is client.base_url, cls

    class Plain:
        base_url = gateway.url

    assert sdk_probe._base_url(Plain()) == gateway.url
    w = Watched()
    assert_whole(read_sync(gateway))
    client = _client(gateway, openai.AzureOpenAI)
    url = client.base_url
    monkeypatch.delattr(client, "_base_url")  # read through the property from here
    monkeypatch.setattr(type(client), "base_url", property(lambda s: url))
    with client.chat.completions.create(**_args()) as stream:
        assert_whole(list(stream))
    upstreams = {
        s.labels["upstream"]
        for m in w.registry.collect()
        for s in m.samples
        if s.name == "chunkwatch_streams_total" and s.labels["layer"] == "sdk"
    }
    assert len(upstreams) == 1 and w.value("chunkwatch_streams_total", layer="sdk") == 2
    assert w.errors("sdk") == 0


def test_sdk_stream_counted_over_public_api_finishes_once_when_closed_early(
    gateway: Running[Gateway], probes_off: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The public-API path finalizes as the others do: closed after two chunks, the
    stream is counted once, as closed early, not ok."""
    _rename_stream_iterator(monkeypatch)
    w = Watched()
    stream = _client(gateway, openai.AzureOpenAI).chat.completions.create(**_args())
    first = [next(stream), next(stream)]
    stream.close()
    assert first[1].choices[0].delta.content == answer_tokens(PROMPT, UPSTREAM_TOKENS)[0]
    assert w.value("chunkwatch_streams_total", layer="sdk", outcome="disconnected") == 1
    assert w.value("chunkwatch_streams_total", layer="sdk") == 1
    assert w.chunks("sdk") == 2
    assert w.errors("sdk", "private:Stream._iterator") == 1


def test_sdk_async_stream_that_no_longer_reads_its_iterator(
    gateway: Running[Gateway], probes_off: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An SDK whose ``AsyncStream.__anext__``/``__aiter__`` read something else than
    ``_iterator``: counted over the class's public ``__aiter__``, and that is counted."""
    original_init = openai.AsyncStream.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self._events = self.__dict__.pop("_iterator")

    async def anext_(self: Any) -> Any:
        return await self._events.__anext__()

    async def aiter_(self: Any) -> Any:
        async for item in self._events:
            yield item

    monkeypatch.setattr(openai.AsyncStream, "__init__", init)
    monkeypatch.setattr(openai.AsyncStream, "__anext__", anext_)
    monkeypatch.setattr(openai.AsyncStream, "__aiter__", aiter_)
    w = Watched()
    assert_whole(read_async(gateway))
    assert_counted(w, "gateway", "sdk")
    assert w.errors("sdk", "private:AsyncStream._iterator") == 1


# -- langchain-core: Runnable._astream_events_v1_v2 -----------------------------------


def _token_events(gw: Running[Gateway]) -> list[Any]:
    graph = build_graph(make_model(LLMConfig(url=gw.url), streaming=True))
    args = ({"messages": [("user", PROMPT)]}, {"configurable": {"thread_id": "t"}})

    async def run() -> list[Any]:
        return [ev async for ev in graph.astream_events(*args, version="v2")]

    return [ev for ev in asyncio.run(run()) if ev["event"] == "on_chat_model_stream"]


def _check_graph(w: Watched, events: list[Any], stage: str) -> None:
    content = "".join(ev["data"]["chunk"].content for ev in events)
    assert content == ANSWER
    assert w.value("chunkwatch_streams_total", layer="langgraph", outcome="ok") == 1
    assert w.chunks("langgraph") == len(events) >= UPSTREAM_TOKENS
    assert w.errors("langgraph", stage) == 1


def test_langgraph_when_astream_events_no_longer_calls_the_pass_through(
    gateway: Running[Gateway], probes_off: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A langchain-core whose ``astream_events`` calls a renamed pass-through: patching
    ours would count nothing, so ``Pregel.astream_events`` is wrapped, and counted."""
    from langchain_core.runnables.base import Runnable

    through = Runnable._astream_events_v1_v2

    def astream_events(self: Any, input: Any, config: Any = None, **kwargs: Any) -> Any:
        return self._events_v1_v2_renamed(input, config, **kwargs)

    monkeypatch.setattr(Runnable, "_events_v1_v2_renamed", through, raising=False)
    monkeypatch.delattr(Runnable, "_astream_events_v1_v2")
    monkeypatch.setattr(Runnable, "astream_events", astream_events)
    from langgraph.pregel import Pregel

    monkeypatch.setattr(Pregel, "astream_events", astream_events)
    w = Watched()
    _check_graph(w, _token_events(gateway), "private:Runnable._astream_events_v1_v2")


def test_langgraph_without_the_v2_event_stream(
    gateway: Running[Gateway], probes_off: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A langchain-core without ``tracers.event_stream._astream_events_implementation_v2``
    (what the counting generator would read in the pass-through's place):
    ``astream_events`` is wrapped, and counted."""
    from langchain_core.tracers import event_stream

    monkeypatch.delattr(event_stream, "_astream_events_implementation_v2")
    w = Watched()
    _check_graph(w, _token_events(gateway), "private:_astream_events_implementation_v2")


def test_no_op_tracer_check_without_the_proxys_internals_writes_every_span(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``spans.tracing`` reads two private names of opentelemetry-api to skip span work
    for the no-op tracer; without them it says "tracing", so nothing is dropped."""
    from opentelemetry import trace

    from chunkwatch.runtime import Runtime
    from chunkwatch.spans import keeps_spans, tracing

    rt = Runtime(registry=CollectorRegistry())
    try:
        proxy = trace.ProxyTracer("chunkwatch")  # the API's, whatever this process set
        monkeypatch.delattr(trace, "_TRACER_PROVIDER", raising=False)
        rt.tracer = proxy
        rt.traces, rt.noop_proxy = keeps_spans(proxy)
        assert (rt.traces, rt.noop_proxy) == (True, None)
        assert tracing(rt) is True
    finally:
        rt.close()


def test_request_context_is_extracted_unless_the_default_propagators_have_no_header(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The http probe skips ``propagate.extract`` only for the API's default propagators
    (W3C trace context and baggage) and a request with none of their headers; another
    propagator, or a composite whose private member list is gone, is always asked."""
    from opentelemetry import propagate
    from opentelemetry.context import Context
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import get_current_span

    from chunkwatch.probes import http_in

    asked: list[dict[str, Any]] = []

    class Custom(TextMapPropagator):
        def extract(self, carrier: Any, context: Any = None, getter: Any = None) -> Any:
            asked.append(carrier)
            return Context()

        def inject(self, carrier: Any, context: Any = None, setter: Any = None) -> None:
            pass

        @property
        def fields(self) -> set[str]:
            return {"x-custom"}

    default = propagate.get_global_textmap()
    assert type(default) is CompositePropagator  # the API's default, as in a plain service
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    try:
        assert http_in._extract({"PATH_INFO": "/chat"}) is http_in._NOTHING
        parent = http_in._extract({"HTTP_TRACEPARENT": traceparent})
        assert (
            format(get_current_span(parent).get_span_context().trace_id, "032x")
            == (traceparent.split("-")[1])
        )
        propagate.set_global_textmap(Custom())
        http_in._extract({"HTTP_X_CUSTOM": "1"})
        http_in._extract({"PATH_INFO": "/chat"})
        assert len(asked) == 2
        bare = CompositePropagator([Custom()])
        monkeypatch.delattr(bare, "_propagators")
        propagate.set_global_textmap(bare)
        with pytest.raises(AttributeError):  # asked (and the composite, broken, says so)
            http_in._extract({"PATH_INFO": "/chat"})
    finally:
        propagate.set_global_textmap(default)
