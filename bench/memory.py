"""Memory per open stream: what each probe holds, after 10 chunks and after 100k chunks.

For every per-chunk wrapper, one stream is opened and read chunk by chunk from a
source that never accumulates (the same bytes / object repeated), with
``tracemalloc`` on. Traced memory (after ``gc.collect()``) is taken just before the
stream opens, after ``--early`` chunks and after ``--late`` chunks, with the stream
still open; then the stream is read to its end. Each wrapper is run bare (no
runtime) and instrumented (``chunkwatch.instrument(registry=CollectorRegistry(),
tracer_provider=TracerProvider())``), after one unmeasured warm-up stream of each
(lazy one-time set-up — metric children, the watchdog thread — is not per stream).

Reported: the memory the instrumentation holds for one open stream (instrumented -
bare, at ``--early`` chunks), the growth from ``--early`` to ``--late`` chunks bare and
instrumented, and the chunkwatch source line that grew most between the two points
(a tracemalloc snapshot diff filtered to ``chunkwatch/``, taken on a second stream:
a snapshot kept in memory would itself be counted). Constant memory means: the
probe's growth (instrumented - bare) is ~0, independent of the chunk count.

Also reported: what is still held once the stream has ended (traced memory after the
last chunk and ``gc.collect()``, relative to before the stream, instrumented - bare):
a finished stream should leave nothing behind.

``sdk, capture_content=True`` is the opt-in content capture (off by default): shown
for what it is, not judged against the budget.

    uv run python bench/memory.py [--early 10] [--late 100000] [--only gateway,sdk]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import platform
import sys
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpcore2
import httpx2
import openai
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

import chunkwatch
from chunkwatch.ledger import Ledger
from chunkwatch.probes import langgraph as lg_probe
from chunkwatch.probes.queue import WatchedQueue
from chunkwatch.probes.sse_out import SSEBody
from chunkwatch.runtime import active

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from probe_cost import (
    ITEM,
    REQUEST_BODY,
    SSE_HEADERS,
    URL,
    _create_kwargs,
    _tiny_graph,
    graph_events,
    openai_events,
    service_events,
)

# -- sources that never accumulate ---------------------------------------------------------


def event_source(total: int) -> Iterator[bytes]:
    """``total`` OpenAI data events then [DONE]; the same content bytes object repeated."""
    first, content, finish, usage, done = openai_events(4)
    yield first
    yield from itertools.repeat(content, total - 3)
    yield finish
    yield usage
    yield done


async def aevent_source(total: int) -> AsyncIterator[bytes]:
    for piece in event_source(total):
        yield piece


class LazyPool:
    """httpcore2's pool stand-in: answers from a lazily generated body of ``total`` events."""

    total = 0

    def handle_request(self, request: Any) -> httpcore2.Response:
        return httpcore2.Response(200, headers=SSE_HEADERS, content=event_source(self.total))

    async def handle_async_request(self, request: Any) -> httpcore2.Response:
        return httpcore2.Response(200, headers=SSE_HEADERS, content=aevent_source(self.total))

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


# -- measuring ---------------------------------------------------------------------------------


def traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def cw_snapshot() -> tracemalloc.Snapshot:
    gc.collect()
    return tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*chunkwatch/*")])


@dataclass
class Points:
    early: int  # bytes held at `early` chunks, relative to just before the stream opened
    late: int
    top_growth: str = ""
    retained: int = 0  # bytes still held after the stream ended (and gc.collect())


class Probe:
    """Where the measuring points are taken while a stream is read chunk by chunk."""

    def __init__(self, early: int, late: int, *, snapshots: bool = False) -> None:
        self.early, self.late = early, late
        self.snapshots = snapshots  # a snapshot held in memory would be measured too
        self.base = 0
        self.m_early = 0
        self.snap: tracemalloc.Snapshot | None = None
        self.points: Points | None = None

    def start(self) -> None:
        self.base = traced()

    def at(self, n: int) -> None:
        if n == self.early:
            self.m_early = traced() - self.base
            if self.snapshots:
                self.snap = cw_snapshot()
        elif n == self.late:
            m_late = traced() - self.base
            if self.snap is None:
                self.points = Points(self.m_early, m_late)
                return
            diff = cw_snapshot().compare_to(self.snap, "lineno")
            growing = [d for d in diff if d.size_diff > 0]
            top = ""
            if growing:
                d = max(growing, key=lambda s: s.size_diff)
                frame = d.traceback[0]
                top = f"{frame.filename.split('chunkwatch/')[-1]}:{frame.lineno} +{d.size_diff} B"
            self.points = Points(self.m_early, m_late, top)


Driver = Callable[[Probe, int], None]  # reads one stream of `total` chunks, calling probe.at(n)


def gateway_sync() -> Driver:
    transport = httpx2.HTTPTransport()
    pool = LazyPool()
    transport._pool = pool  # type: ignore[assignment]
    client = httpx2.Client(transport=transport)

    def drive(probe: Probe, total: int) -> None:
        pool.total = total
        probe.start()
        with client.stream("POST", URL, content=REQUEST_BODY) as resp:
            for n, _piece in enumerate(resp.iter_bytes(), 1):
                probe.at(n)

    return drive


def gateway_async(loop: asyncio.AbstractEventLoop) -> Driver:
    transport = httpx2.AsyncHTTPTransport()
    pool = LazyPool()
    transport._pool = pool  # type: ignore[assignment]
    client = httpx2.AsyncClient(transport=transport)

    async def run(probe: Probe, total: int) -> None:
        pool.total = total
        probe.start()
        async with client.stream("POST", URL, content=REQUEST_BODY) as resp:
            n = 0
            async for _piece in resp.aiter_bytes():
                n += 1
                probe.at(n)

    return lambda probe, total: loop.run_until_complete(run(probe, total))


def sdk_sync() -> Driver:
    total_box = [0]

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers=SSE_HEADERS, content=event_source(total_box[0]))

    client = openai.OpenAI(
        api_key="sk-bench",
        base_url="http://127.0.0.1:9/v1",
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
        max_retries=0,
    )

    def drive(probe: Probe, total: int) -> None:
        total_box[0] = total
        probe.start()
        stream = client.chat.completions.create(**_create_kwargs())
        for n, _chunk in enumerate(stream, 1):
            probe.at(n)

    return drive


def sdk_async(loop: asyncio.AbstractEventLoop) -> Driver:
    total_box = [0]

    async def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers=SSE_HEADERS, content=aevent_source(total_box[0]))

    client = openai.AsyncOpenAI(
        api_key="sk-bench",
        base_url="http://127.0.0.1:9/v1",
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
        max_retries=0,
    )

    async def run(probe: Probe, total: int) -> None:
        total_box[0] = total
        probe.start()
        n = 0
        async for _chunk in await client.chat.completions.create(**_create_kwargs()):
            n += 1
            probe.at(n)

    return lambda probe, total: loop.run_until_complete(run(probe, total))


def client_stack(loop: asyncio.AbstractEventLoop) -> Driver:
    """AsyncOpenAI over the patched httpx2 transport, each chunk awaited through
    ``asyncio.wait_for`` in a task of its own, as langchain-openai reads a stream:
    the gateway and sdk probes together, as the reference service runs them."""
    transport = httpx2.AsyncHTTPTransport()
    pool = LazyPool()
    transport._pool = pool  # type: ignore[assignment]
    client = openai.AsyncOpenAI(
        api_key="sk-bench",
        base_url="http://127.0.0.1:9/v1",
        http_client=httpx2.AsyncClient(transport=transport),
        max_retries=0,
    )

    async def run(probe: Probe, total: int) -> None:
        pool.total = total
        probe.start()
        stream = await client.chat.completions.create(**_create_kwargs())
        it = stream.__aiter__()
        n = 0
        while True:
            try:
                await asyncio.wait_for(it.__anext__(), timeout=60)
            except StopAsyncIteration:
                break
            n += 1
            probe.at(n)

    return lambda probe, total: loop.run_until_complete(run(probe, total))


def langgraph_watch(loop: asyncio.AbstractEventLoop) -> Driver:
    graph = _tiny_graph()
    event = graph_events(1)[0]

    async def source(total: int) -> AsyncIterator[Any]:
        for ev in itertools.repeat(event, total):
            yield ev

    async def run(probe: Probe, total: int) -> None:
        probe.start()
        rt = active()
        inner = source(total)
        stream = lg_probe._watch(inner, rt, graph, "token") if rt is not None else inner
        n = 0
        async for _ev in stream:
            n += 1
            probe.at(n)

    return lambda probe, total: loop.run_until_complete(run(probe, total))


def queue_watched() -> Driver:
    def drive(probe: Probe, total: int) -> None:
        probe.start()
        q: WatchedQueue[Any] = WatchedQueue(Ledger())
        for n in range(1, total + 1):
            q.put(ITEM)
            q.get(timeout=15.0)
            probe.at(n)
        q.producer_done()
        q.consumer_done(complete=True)

    return drive


def sse_body() -> Driver:
    event = service_events(1)[0]

    def drive(probe: Probe, total: int) -> None:
        probe.start()
        body: Any = iter(itertools.repeat(event, total))
        rt = active()
        if rt is not None:
            body = SSEBody(body, rt, Ledger())
        for n, _ev in enumerate(body, 1):
            probe.at(n)
        close = getattr(body, "close", None)
        if close is not None:
            close()

    return drive


@dataclass
class Case:
    name: str
    layer: str
    drive: Driver
    capture_content: bool = False


def cases(loop: asyncio.AbstractEventLoop) -> list[Case]:
    return [
        Case("gateway sync (httpx2 transport + body)", "gateway", gateway_sync()),
        Case("gateway async (httpx2 transport + body)", "gateway", gateway_async(loop)),
        Case("sdk sync (openai Stream)", "sdk", sdk_sync()),
        Case("sdk async (openai AsyncStream)", "sdk", sdk_async(loop)),
        Case(
            "gateway + sdk: AsyncOpenAI, chunks via asyncio.wait_for (as langchain-openai)",
            "sdk",
            client_stack(loop),
        ),
        Case("langgraph `_watch`", "langgraph", langgraph_watch(loop)),
        Case("queue `WatchedQueue`", "queue", queue_watched()),
        Case("sse `SSEBody`", "sse", sse_body()),
        Case("sdk sync, capture_content=True (opt-in)", "sdk", sdk_sync(), capture_content=True),
    ]


def run_case(case: Case, instrumented: bool, early: int, late: int) -> Points:
    if instrumented:
        chunkwatch.instrument(
            registry=CollectorRegistry(),
            tracer_provider=TracerProvider(),
            capture_content=case.capture_content,
        )
    try:
        case.drive(Probe(early, late), 50)  # warm-up stream: one-time lazy set-up
        probe = Probe(early, late)
        case.drive(probe, late + 10)
        assert probe.points is not None
        probe.points.retained = traced() - probe.base
        if instrumented:  # a second stream only to name the lines that grew
            lines = Probe(early, late, snapshots=True)
            case.drive(lines, late + 10)
            assert lines.points is not None
            probe.points.top_growth = lines.points.top_growth
    finally:
        if instrumented:
            chunkwatch.uninstrument()
    return probe.points


def kib(n: int) -> str:
    return f"{n / 1024:+.1f} KiB" if abs(n) >= 1024 else f"{n:+d} B"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--early", type=int, default=10)
    parser.add_argument("--late", type=int, default=100_000)
    parser.add_argument("--only", default="", help="comma-separated layers or case-name parts")
    args = parser.parse_args()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    todo = cases(loop)
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        todo = [c for c in todo if any(k == c.layer or k in c.name for k in keys)]
    tracemalloc.start(1)
    print(
        f"# memory per open stream — Python {platform.python_version()}; tracemalloc, "
        f"traced bytes after gc.collect(), stream open; {args.early} vs {args.late} chunks\n"
    )
    print(
        f"| wrapper | held by the probe at {args.early} chunks (inst - bare) | "
        f"growth {args.early}→{args.late}, bare | growth, instrumented | "
        f"growth due to the probe | chunkwatch line that grew most | verdict | "
        f"held after the stream ended (inst - bare) |"
    )
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for case in todo:
        bare = run_case(case, False, args.early, args.late)
        inst = run_case(case, True, args.early, args.late)
        g_bare, g_inst = bare.late - bare.early, inst.late - inst.early
        extra = g_inst - g_bare
        per_chunk = extra / (args.late - args.early)
        verdict = "constant" if abs(extra) < 4096 else f"GROWS {per_chunk:.1f} B/chunk"
        if case.capture_content:
            verdict += " (opt-in)"
        print(
            f"| {case.name} | {kib(inst.early - bare.early)} | {kib(g_bare)} | {kib(g_inst)} | "
            f"**{kib(extra)}** | {inst.top_growth or '—'} | {verdict} | "
            f"{kib(inst.retained - bare.retained)} |",
            flush=True,
        )
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
