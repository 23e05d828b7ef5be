"""CPU cost of each per-chunk probe, against the uninstrumented path in the same run.

Every probe is driven through its real code with in-memory I/O below it, once bare
(no runtime: the unpatched library path) and once instrumented
(``chunkwatch.instrument(registry=CollectorRegistry(), tracer_provider=...)``, then
``chunkwatch.uninstrument()``), alternating bare/instrumented and instrumented/bare,
``--reps`` pairs after one warm-up pair. Each run is timed with
``time.thread_time_ns()`` (CPU of this thread: the watchdog thread a runtime starts
is not in it; it wakes every 50 ms whatever the chunk rate). The per-chunk overhead
of a pair is ``(instrumented - bare) / chunks``; reported: its median and
interquartile range over the pairs.

Two shapes per probe:

* **marginal** — one stream of ``--chunks`` chunks: the per-chunk cost alone;
* **200-chunk streams** — the same chunks as streams of 200 (a 200-token answer):
  the per-stream work (span, tally, metrics, verdict facts) amortized in.

The cases (what "bare" is, and what is included):

* ``gateway sync|async, k/read`` — a real ``httpx2.Client`` / ``AsyncClient`` over a
  real ``HTTPTransport`` / ``AsyncHTTPTransport`` whose connection pool is replaced
  by one that answers from memory (``httpcore2.Response`` over a list of reads).
  The body is the reference upstream's OpenAI chunks (273 bytes each), ``k``
  events per read; read with ``iter_bytes()`` as the SDK does. Instrumented: the
  patched ``handle_request`` (span, tally, headers) and the body wrapper with the
  counting SSE parser. Unit: a ``data:`` event. ``abort on``: the runtime with
  ``Deadlines(abort=True)``, where the async body also notes, at every read, the
  task that waits for it (so the watchdog can cancel the right one).
* ``sdk sync|async, real client`` — a real ``openai.OpenAI`` / ``AsyncOpenAI`` over
  ``httpx2.MockTransport`` (not patched by the gateway probe, so only the sdk probe
  is measured), one event per read, ``chat.completions.create(stream=True)`` and
  iteration: everything the SDK does (SSE decoding, JSON, model construction) is
  in both sides. Unit: a chunk.
* ``sdk sync|async, stream only`` — a real ``openai.Stream`` / ``AsyncStream``
  whose iterator yields pre-built ``ChatCompletionChunk`` objects, bare and watched
  as ``create`` watches it (``sdk._open``, then ``sdk._adopt``: the stream is given
  the probe's counting subclass). Bare is then almost free, so the difference is the
  probe's own cost with little SDK noise around it. Not included: ``create``'s
  ``use_span`` around the request (per stream, not per chunk).
* ``langgraph`` — ``probes.langgraph._watch`` over an async generator of
  ``astream_events`` v2 ``on_chat_model_stream`` event dicts (as LangGraph yields
  them), against the same generator read through a copy of langchain-core's
  pass-through (``Runnable._astream_events_v1_v2``), which ``_watch`` takes the place
  of under v2. Unit: a token event.
* ``queue`` — ``WatchedQueue.put`` + ``get(timeout=15)`` against ``queue.Queue``
  ``put`` + ``get(timeout=15)``, one thread, one item in flight (the service's usual
  depth). A second row: ``WatchedQueue`` with no runtime (what the uninstrumented
  reference service runs) against ``queue.Queue``. Unit: an item put and got.
* ``sse`` — ``SSEBody`` over a generator of the reference service's
  ``event: token`` events, iterated and closed as a WSGI server does, against
  iterating and closing the generator. Unit: an event.

    uv run python bench/probe_cost.py [--reps 15] [--chunks 100000] [--only gateway,sdk]
                                      [--providers sdk,noop] [--json out.json]
    uv run python bench/probe_cost.py --breakdown    # where the time goes, line by line
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import platform
import queue
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, ClassVar

import httpcore2
import httpx2
import openai
from openai._models import construct_type
from openai.types.chat import ChatCompletionChunk
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

import chunkwatch
from chunkwatch.ledger import Ledger
from chunkwatch.probes import langgraph as lg_probe
from chunkwatch.probes import sdk as sdk_probe
from chunkwatch.probes.queue import WatchedQueue
from chunkwatch.probes.sse_out import SSEBody
from chunkwatch.runtime import active
from chunkwatch.sse import format_event
from chunkwatch.watchdog import Deadlines

_cpu = time.thread_time_ns

MODEL = "gpt-4o-mini"
PROMPT = "How much does a probe cost per chunk?"
URL = f"http://127.0.0.1:9/openai/deployments/{MODEL}/chat/completions?api-version=2024-10-21"
REQUEST_BODY = json.dumps(
    {
        "messages": [{"role": "user", "content": PROMPT}],
        "model": MODEL,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
).encode()
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"transfer-encoding", b"chunked"),
]

# -- realistic payloads ------------------------------------------------------------------------


WORDS = ("cinder ", "harbor ", "lantern ", "meadow ", "quartz ", "signal ", "timber ", "vessel ")


class _Answer:
    """OpenAI ``chat.completion.chunk`` JSON, shaped as the reference upstream sends it."""

    def __init__(self) -> None:
        self.envelope = {
            "id": "chatcmpl-8f2b1c0d9e8a7b6c5d4e3f2a",
            "object": "chat.completion.chunk",
            "created": 1767225600,
            "model": MODEL,
            "system_fingerprint": "fp_chunkwatch",
        }

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return json.dumps({**self.envelope, "choices": [choice]})

    def usage_chunk(self, n: int) -> str:
        usage = {"prompt_tokens": 12, "completion_tokens": n, "total_tokens": 12 + n}
        return json.dumps({**self.envelope, "choices": [], "usage": usage})


def openai_events(n: int) -> list[bytes]:
    """A stream of ``n`` data events as the reference upstream sends it, then ``[DONE]``.

    Role chunk, ``n - 3`` content chunks, finish chunk, usage chunk (``n >= 4``); a
    content event is 273 bytes.
    """
    answer = _Answer()
    out = [format_event(answer.chunk({"role": "assistant", "content": "", "refusal": None}))]
    out += [format_event(answer.chunk({"content": WORDS[i % len(WORDS)]})) for i in range(n - 3)]
    out.append(format_event(answer.chunk({}, "stop")))
    out.append(format_event(answer.usage_chunk(n - 3)))
    out.append(format_event("[DONE]"))
    return out


def reads_of(events: list[bytes], per_read: int) -> list[bytes]:
    return [b"".join(events[i : i + per_read]) for i in range(0, len(events), per_read)]


@functools.lru_cache(maxsize=4)
def chunk_objects(n: int) -> list[ChatCompletionChunk]:
    """``n`` parsed chunks (the objects the SDK yields), the [DONE] marker left out."""
    out = []
    for raw in openai_events(n)[:-1]:
        data = json.loads(raw.removeprefix(b"data: ").strip())
        out.append(construct_type(type_=ChatCompletionChunk, value=data))
    return out


def service_events(n: int) -> list[bytes]:
    """What the reference service writes for an ``n``-token answer (``event: token``)."""
    return [
        format_event(json.dumps({"text": WORDS[i % len(WORDS)]}), event="token") for i in range(n)
    ]


# -- in-memory I/O under real clients ----------------------------------------------------------


class MemPool:
    """Stands in for httpcore2's connection pool: every request is answered from memory."""

    def __init__(self) -> None:
        self.reads: list[bytes] = []

    def handle_request(self, request: Any) -> httpcore2.Response:
        return httpcore2.Response(200, headers=SSE_HEADERS, content=iter(self.reads))

    async def handle_async_request(self, request: Any) -> httpcore2.Response:
        return httpcore2.Response(200, headers=SSE_HEADERS, content=_aiter(self.reads))

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def _aiter(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


def _iter(items: list[Any]) -> Iterator[Any]:
    yield from items


def mem_transport(asynchronous: bool = False) -> httpx2.HTTPTransport | httpx2.AsyncHTTPTransport:
    """A real httpx2 transport (the gateway probe's seam) over :class:`MemPool`."""
    transport = httpx2.AsyncHTTPTransport() if asynchronous else httpx2.HTTPTransport()
    transport._pool = MemPool()  # type: ignore[assignment]
    return transport


# -- cases ---------------------------------------------------------------------------------------

Runner = Callable[[int, int], int]  # (chunks, chunks per stream) -> CPU ns of the timed part


@dataclass
class Case:
    name: str
    layer: str
    unit: str
    bare: Runner
    probe: Runner
    probe_runtime: bool = True  # instrument around the probe run
    deadlines: Deadlines | None = None  # the runtime's deadlines (None: the defaults)
    chunks: int | None = None  # override of --chunks (slow bare paths)


def _run_async(loop: asyncio.AbstractEventLoop) -> Callable[[Callable[[int, int], Any]], Runner]:
    def wrap(coro_fn: Callable[[int, int], Any]) -> Runner:
        def run(chunks: int, per_stream: int) -> int:
            result: int = loop.run_until_complete(coro_fn(chunks, per_stream))
            return result

        return run

    return wrap


def gateway_sync(per_read: int) -> Runner:
    transport = mem_transport()
    client = httpx2.Client(transport=transport)

    def run(chunks: int, per_stream: int) -> int:
        transport._pool.reads = reads_of(openai_events(per_stream), per_read)  # type: ignore[union-attr]
        t0 = _cpu()
        for _ in range(chunks // per_stream):
            with client.stream("POST", URL, content=REQUEST_BODY) as resp:
                for _piece in resp.iter_bytes():
                    pass
        return _cpu() - t0

    return run


def gateway_async(loop: asyncio.AbstractEventLoop, per_read: int) -> Runner:
    transport = mem_transport(asynchronous=True)
    client = httpx2.AsyncClient(transport=transport)

    async def run(chunks: int, per_stream: int) -> int:
        transport._pool.reads = reads_of(openai_events(per_stream), per_read)  # type: ignore[union-attr]
        t0 = _cpu()
        for _ in range(chunks // per_stream):
            async with client.stream("POST", URL, content=REQUEST_BODY) as resp:
                async for _piece in resp.aiter_bytes():
                    pass
        return _cpu() - t0

    return _run_async(loop)(run)


def _create_kwargs() -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def sdk_sync_client() -> Runner:
    reads: list[bytes] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers=SSE_HEADERS, content=iter(reads))

    client = openai.OpenAI(
        api_key="sk-bench",
        base_url="http://127.0.0.1:9/v1",
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
        max_retries=0,
    )

    def run(chunks: int, per_stream: int) -> int:
        reads[:] = openai_events(per_stream)
        kwargs = _create_kwargs()
        t0 = _cpu()
        for _ in range(chunks // per_stream):
            for _chunk in client.chat.completions.create(**kwargs):
                pass
        return _cpu() - t0

    return run


def sdk_async_client(loop: asyncio.AbstractEventLoop) -> Runner:
    reads: list[bytes] = []

    async def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers=SSE_HEADERS, content=_aiter(reads))

    client = openai.AsyncOpenAI(
        api_key="sk-bench",
        base_url="http://127.0.0.1:9/v1",
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
        max_retries=0,
    )

    async def run(chunks: int, per_stream: int) -> int:
        reads[:] = openai_events(per_stream)
        kwargs = _create_kwargs()
        t0 = _cpu()
        for _ in range(chunks // per_stream):
            async for _chunk in await client.chat.completions.create(**kwargs):
                pass
        return _cpu() - t0

    return _run_async(loop)(run)


_RESOURCE: Any = None


def _completions() -> Any:
    global _RESOURCE
    if _RESOURCE is None:
        _RESOURCE = openai.OpenAI(api_key="sk-bench", base_url="http://127.0.0.1:9/v1")
    return _RESOURCE.chat.completions


def sdk_stream(objs: list[Any], asynchronous: bool) -> Any:
    """A real ``Stream`` / ``AsyncStream`` over ``objs``; watched when a runtime is active."""
    cls = openai.AsyncStream if asynchronous else openai.Stream
    stream = object.__new__(cls)
    stream.response = httpx2.Response(200)
    stream._iterator = _aiter(objs) if asynchronous else _iter(objs)
    rt = active()
    if rt is not None:
        tally = sdk_probe._open(rt, _completions(), _create_kwargs())
        watch = sdk_probe._watch_async if asynchronous else sdk_probe._watch_sync
        adopted = _adopted_stream_classes()[0 if asynchronous else 1]
        sdk_probe._adopt(stream, sdk_probe._Chunks(rt, tally), cls, adopted, watch)  # as create()
    return stream


@functools.lru_cache(maxsize=1)
def _adopted_stream_classes() -> tuple[type, type]:
    return sdk_probe._adoptive_classes()


def sdk_sync_wrapper() -> Runner:
    def run(chunks: int, per_stream: int) -> int:
        objs = chunk_objects(per_stream)
        t0 = _cpu()
        for _ in range(chunks // per_stream):
            for _chunk in sdk_stream(objs, asynchronous=False):
                pass
        return _cpu() - t0

    return run


def sdk_async_wrapper(loop: asyncio.AbstractEventLoop) -> Runner:
    async def run(chunks: int, per_stream: int) -> int:
        objs = chunk_objects(per_stream)
        t0 = _cpu()
        for _ in range(chunks // per_stream):
            async for _chunk in sdk_stream(objs, asynchronous=True):
                pass
        return _cpu() - t0

    return _run_async(loop)(run)


@functools.lru_cache(maxsize=4)
def graph_events(n: int) -> list[dict[str, Any]]:
    """``astream_events`` v2 token events, shaped as LangGraph yields them."""
    from langchain_core.messages import AIMessageChunk

    run_id = "019a0000-0000-7000-8000-000000000001"
    meta = {
        "thread_id": "t",
        "langgraph_step": 1,
        "langgraph_node": "model",
        "ls_provider": "azure",
    }
    return [
        {
            "event": "on_chat_model_stream",
            "data": {"chunk": AIMessageChunk(content=WORDS[i % len(WORDS)], id=f"run-{run_id}")},
            "run_id": run_id,
            "name": "AzureChatOpenAI",
            "tags": ["seq:step:1"],
            "metadata": meta,
            "parent_ids": ["019a0000-0000-7000-8000-000000000000"],
        }
        for i in range(n)
    ]


def _tiny_graph() -> Any:
    from langgraph.graph import END, START, MessagesState, StateGraph

    graph = StateGraph(MessagesState)
    graph.add_node("model", lambda state: {"messages": []})
    graph.add_edge(START, "model")
    graph.add_edge("model", END)
    return graph.compile()


async def _pass_through(event_stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The body of langchain-core's ``Runnable._astream_events_v1_v2``: what the service
    resumes per event when bare, and what ``_watch`` takes the place of under v2."""
    async with aclosing(event_stream):  # type: ignore[type-var]
        async for event in event_stream:
            yield event


def langgraph_watch(loop: asyncio.AbstractEventLoop) -> Runner:
    graph = _tiny_graph()

    async def run(chunks: int, per_stream: int) -> int:
        events = graph_events(per_stream)
        t0 = _cpu()
        for _ in range(chunks // per_stream):
            inner = _aiter(events)
            rt = active()
            watched = rt is not None
            stream = lg_probe._watch(inner, rt, graph, "token") if watched else _pass_through(inner)
            async for _ev in stream:
                pass
        return _cpu() - t0

    return _run_async(loop)(run)


ITEM = ("token", {"text": "cinder "})


def queue_bare() -> Runner:
    def run(chunks: int, per_stream: int) -> int:
        t0 = _cpu()
        for _ in range(chunks // per_stream):
            q: queue.Queue[Any] = queue.Queue()
            put, get = q.put, q.get
            for _i in range(per_stream):
                put(ITEM)
                get(timeout=15.0)
        return _cpu() - t0

    return run


def queue_watched() -> Runner:
    def run(chunks: int, per_stream: int) -> int:
        t0 = _cpu()
        for _ in range(chunks // per_stream):
            q: WatchedQueue[Any] = WatchedQueue(Ledger())
            put, get = q.put, q.get
            for _i in range(per_stream):
                put(ITEM)
                get(timeout=15.0)
            q.producer_done()
            q.consumer_done(complete=True)
        return _cpu() - t0

    return run


def sse_body(watched: bool) -> Runner:
    def run(chunks: int, per_stream: int) -> int:
        events = service_events(per_stream)
        t0 = _cpu()
        for _ in range(chunks // per_stream):
            body: Any = _iter(events)
            rt = active()
            if watched and rt is not None:
                body = SSEBody(body, rt, Ledger())
            for _ev in body:
                pass
            body.close()
        return _cpu() - t0

    return run


def build_cases(loop: asyncio.AbstractEventLoop) -> list[Case]:
    cases = []
    for per_read in (1, 8):
        run = gateway_sync(per_read)
        cases.append(Case(f"gateway sync, {per_read} event/read", "gateway", "event", run, run))
    for per_read in (1, 8):
        run = gateway_async(loop, per_read)
        cases.append(Case(f"gateway async, {per_read} event/read", "gateway", "event", run, run))
    run = gateway_async(loop, 1)
    cases.append(
        Case(
            "gateway async, 1 event/read, abort on",
            "gateway",
            "event",
            run,
            run,
            deadlines=Deadlines(abort=True),
        )
    )
    run = sdk_sync_client()
    cases.append(Case("sdk sync, real client", "sdk", "chunk", run, run, chunks=20_000))
    run = sdk_async_client(loop)
    cases.append(Case("sdk async, real client", "sdk", "chunk", run, run, chunks=20_000))
    run = sdk_sync_wrapper()
    cases.append(Case("sdk sync, stream only", "sdk", "chunk", run, run))
    run = sdk_async_wrapper(loop)
    cases.append(Case("sdk async, stream only", "sdk", "chunk", run, run))
    run = langgraph_watch(loop)
    cases.append(Case("langgraph `_watch`", "langgraph", "token event", run, run))
    cases.append(
        Case("queue: WatchedQueue vs queue.Queue", "queue", "item", queue_bare(), queue_watched())
    )
    cases.append(
        Case(
            "queue: WatchedQueue, no runtime, vs queue.Queue",
            "queue",
            "item",
            queue_bare(),
            queue_watched(),
            probe_runtime=False,
        )
    )
    cases.append(Case("sse `SSEBody`", "sse", "event", sse_body(False), sse_body(True)))
    return cases


# -- where the time goes -------------------------------------------------------------------------


def breakdown(loop: asyncio.AbstractEventLoop) -> None:
    """Line and component timings of the gateway, sse and queue per-chunk paths (timeit,
    min of 7 repeats, ns per call) on the same 273-byte OpenAI event / service event."""
    import timeit

    from chunkwatch.probes._gateway_body import sync_body
    from chunkwatch.probes._wire import Reader as reader_cls

    ev = openai_events(4)[1]
    sv = service_events(1)[0]
    data = ev.splitlines()[0][6:]

    def t(stmt: str, g: dict[str, Any], n: int = 100_000) -> float:
        return min(timeit.repeat(stmt, globals=g, number=n, repeat=7)) / n * 1e9

    class NoopReader:
        class tally:
            finished = True
            facts: ClassVar[dict[str, Any]] = {}

        def counter(self) -> None:  # not countable in place: every read goes to feed
            return None

        def feed(self, chunk: bytes) -> None:
            pass

        def end(self, *args: Any) -> None:
            pass

    class StubParser:
        data_events = 0

        def count(self, chunk: bytes) -> int:
            return 0

    from chunkwatch.sse import SSEParser

    watched_body = sync_body(httpx2)[2]  # the wrapping body
    tally = Ledger().open("gateway")
    items = [ev] * 100_000
    g: dict[str, Any] = {
        "WSB": watched_body,
        "NoopReader": NoopReader,
        "items": items,
        "ev": ev,
        "sv": sv,
        "tally": tally,
        "data": data,
        "lines": ev.splitlines(),
        "svlines": sv.splitlines(),
        "r_none": reader_cls(tally, None),
        "r_stub": reader_cls(tally, StubParser()),
        "r_full": reader_cls(tally, SSEParser()),
        "p": SSEParser(),
    }
    g["p"].feed(b"data: {}\n\n")
    g["rest"] = b"\n"
    loop_only = t("for c in items: pass", g, 1) / len(items)
    gen = t("for c in WSB(items, NoopReader()): pass", g, 1) / len(items)
    rows: list[tuple[str, float]] = [
        (
            "gateway `WatchedSyncBody.__iter__`: the generator layer + `reader.feed` call",
            gen - loop_only,
        ),
        ("gateway `_Reader.feed`: `tally.bytes += len(chunk)` (+ call)", t("r_none.feed(ev)", g)),
        (
            "gateway `_Reader.feed`: + `facts.get('t_first_byte')`, inflate check, before/after "
            "(parser stubbed)",
            t("r_stub.feed(ev)", g),
        ),
        ("gateway `_Reader.feed`, whole", t("r_full.feed(ev)", g)),
        ("`SSEParser.count(openai event)`: the one-event fast path", t("p.count(ev)", g)),
        ("`SSEParser.feed(openai event)`, counting mode, whole", t("p.feed(ev)", g)),
        ("`SSEParser.feed(service event)` (`event:` + `data:` lines), whole", t("p.feed(sv)", g)),
        ("  `_lines([data line, blank])` (2 lines, incl. `_dispatch`)", t("p._lines(lines)", g)),
        ("  `_lines([event line, data line, blank])`", t("p._lines(svlines)", g)),
        (
            "  `_dispatch()` (incl. `_check`, `_reset`)",
            t("p._data=[data]; p._has_data=True; p._dispatch()", g)
            - t("p._data=[data]; p._has_data=True", g),
        ),
        ("  `_check(data)`", t("p._check(data, named_error=False)", g)),
        ("  `_reset()`", t("p._reset()", g)),
        ("`Tally.unit(1)`", t("tally.unit(1)", g)),
    ]
    lines_of_feed = {  # the steps of SSEParser.count's one-event fast path
        "`chunk[:8] == b'data: {\"'`": "ev[:8] == b'data: {\"'",
        "`line, _, rest = chunk.partition(b'\\n')`": "line, _, rest = ev.partition(b'\\n')",
        "`rest == b'\\n' and line[-1] == 125`": "rest == b'\\n' and data[-1] == 125",
        "`line[8] != 101`": "data[2] != 101",
        "`13 not in line` (CR: scans the line)": "13 not in data",
        "`self.events += 1; self.data_events += 1`": "p.events += 1; p.data_events += 1",
        "`.splitlines()` (the `event:` path)": "sv.splitlines()",
    }
    for name, stmt in lines_of_feed.items():
        rows.append((f"  line: {name}", t(stmt, g)))

    async def task_cost() -> tuple[float, float]:
        n = 200_000
        ct = asyncio.current_task
        t0 = _cpu()
        for _ in range(n):
            pass
        t1 = _cpu()
        for _ in range(n):
            ct()
        t2 = _cpu()
        get, running = asyncio.tasks._current_tasks.get, asyncio.get_running_loop()
        for _ in range(n):
            get(running)
        t3 = _cpu()
        return ((t2 - t1) - (t1 - t0)) / n, ((t3 - t2) - (t1 - t0)) / n

    ct_cost, get_cost = loop.run_until_complete(task_cost())
    rows.append(
        (
            "gateway async: `tally.task = current_task()` per read "
            f"(`asyncio.current_task` is Python code on {platform.python_version()})",
            ct_cost,
        )
    )
    rows.append(
        ("  vs `asyncio.tasks._current_tasks.get(loop)` with the loop bound per stream", get_cost)
    )
    q: queue.Queue[Any] = queue.Queue()
    g["q"], g["ITEM"], g["now"] = q, ITEM, time.perf_counter_ns
    rows.append(
        ("queue: `queue.Queue.put` + `get(timeout=15)`", t("q.put(ITEM); q.get(timeout=15.0)", g))
    )
    rows.append(("queue: `WatchedQueue._put`: `(_now(), item)`", t("(now(), ITEM)", g)))
    print("| what (per event / read / item) | ns |")
    print("|---|---|")
    for name, ns in rows:
        print(f"| {name} | {ns:.0f} |")


# -- the harness ---------------------------------------------------------------------------------


def providers(names: list[str]) -> dict[str, trace.TracerProvider]:
    out: dict[str, trace.TracerProvider] = {}
    for name in names:
        if name == "sdk":
            out["sdk"] = TracerProvider()  # SDK provider, no span processor / exporter
        elif name == "noop":
            out["noop"] = trace.NoOpTracerProvider()
        else:
            raise SystemExit(f"unknown provider {name!r} (sdk, noop)")
    return out


def one_run(
    case: Case, instrumented: bool, chunks: int, per_stream: int, provider: trace.TracerProvider
) -> float:
    gc.collect()
    runtime = instrumented and case.probe_runtime
    if runtime:
        chunkwatch.instrument(
            registry=CollectorRegistry(), tracer_provider=provider, deadlines=case.deadlines
        )
    try:
        ns = (case.probe if instrumented else case.bare)(chunks, per_stream)
    finally:
        if runtime:
            chunkwatch.uninstrument()
    return ns / chunks


@dataclass
class Result:
    bare: list[float]
    probe: list[float]
    diff: list[float]

    @staticmethod
    def q(values: list[float], p: float) -> float:
        ordered = sorted(values)
        k = (len(ordered) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    def summary(self) -> dict[str, float]:
        return {
            "bare_ns": statistics.median(self.bare),
            "probe_ns": statistics.median(self.probe),
            "diff_ns": statistics.median(self.diff),
            "diff_p25": self.q(self.diff, 0.25),
            "diff_p75": self.q(self.diff, 0.75),
            "diff_min": min(self.diff),
            "diff_max": max(self.diff),
        }


def measure(
    case: Case, chunks: int, per_stream: int, reps: int, provider: trace.TracerProvider
) -> Result:
    chunks -= chunks % per_stream
    for instrumented in (False, True):  # warm-up pair, not recorded
        one_run(case, instrumented, chunks, per_stream, provider)
    res = Result([], [], [])
    for i in range(reps):
        order = (False, True) if i % 2 == 0 else (True, False)
        got = {inst: one_run(case, inst, chunks, per_stream, provider) for inst in order}
        res.bare.append(got[False])
        res.probe.append(got[True])
        res.diff.append(got[True] - got[False])
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=15, help="alternating pairs per measurement")
    parser.add_argument("--chunks", type=int, default=100_000, help="chunks per run")
    parser.add_argument("--per-stream", type=int, default=200, help="chunks per stream (amortized)")
    parser.add_argument("--only", default="", help="comma-separated layers or case-name parts")
    parser.add_argument("--providers", default="sdk,noop", help="tracer providers: sdk,noop")
    parser.add_argument("--shapes", default="marginal,streams", help="marginal,streams")
    parser.add_argument("--json", default="", help="write the raw numbers here")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="only the line / component timings of the slow paths",
    )
    args = parser.parse_args()

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    if args.breakdown:
        breakdown(loop)
        return 0
    cases = build_cases(loop)
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        cases = [c for c in cases if any(k == c.layer or k in c.name for k in keys)]
    provs = providers([p.strip() for p in args.providers.split(",") if p.strip()])
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]

    print(
        f"# probe cost — Python {platform.python_version()}, {platform.machine()}, "
        f"{len(__import__('os').sched_getaffinity(0))} CPUs, {args.reps} alternating pairs "
        f"+ 1 warm-up pair; ns of thread CPU per unit\n",
        flush=True,
    )
    raw: list[dict[str, Any]] = []
    header = (
        "| probe | unit | provider | shape | bare ns/unit | instrumented ns/unit | "
        "overhead ns/unit, median | IQR | min..max |"
    )
    print(header)
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for case in cases:
        chunks = case.chunks or args.chunks
        for pname, provider in provs.items():
            for shape in shapes:
                per_stream = chunks if shape == "marginal" else args.per_stream
                label = f"1 x {chunks}" if shape == "marginal" else f"{per_stream}/stream"
                res = measure(case, chunks, per_stream, args.reps, provider)
                s = res.summary()
                raw.append(
                    {
                        "case": case.name,
                        "layer": case.layer,
                        "provider": pname,
                        "shape": shape,
                        "chunks": chunks,
                        "per_stream": per_stream,
                        **s,
                        "raw": res.__dict__,
                    }
                )
                print(
                    f"| {case.name} | {case.unit} | {pname} | {label} | {s['bare_ns']:.0f} | "
                    f"{s['probe_ns']:.0f} | **{s['diff_ns']:.0f}** | "
                    f"{s['diff_p25']:.0f}..{s['diff_p75']:.0f} | "
                    f"{s['diff_min']:.0f}..{s['diff_max']:.0f} |",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(raw, fh, indent=1)
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
