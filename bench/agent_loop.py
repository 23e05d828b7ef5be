"""The agent side of the reference service in one process, probes toggled per block.

What ``bench/pipeline.py`` cannot separate: two processes, even with one hash seed, differ
in how their heaps are laid out, and the Flask/WSGI threads add GIL hand-offs that vary
from block to block. This benchmark keeps one process and one event loop: the reference
``ChatService`` (real LangGraph graph, ``AzureChatOpenAI``, openai SDK, httpx2, guard on)
runs ``--requests`` chats per block, ``--clients`` at a time, against ``chunkwatch
upstream`` (a separate process: 200 tokens at 2 ms). Each chat's items go to a
``WatchedQueue`` drained after the chat, in the loop (no consumer threads).

Blocks alternate bare / instrumented in the same process: ``chunkwatch.instrument`` with
``Deadlines(abort=True)`` as the reference service uses, then ``chunkwatch.uninstrument``
(the library probes, gateway + sdk + langgraph, and the queue probe: the ones that run on
the agent's loop). Before each block the checkpointer is emptied and the garbage
collected, so every block starts from the same heap. Per block: process CPU per chat
(``time.process_time``). The ratio of each consecutive bare/instrumented pair is reported
with its median and interquartile range.

    uv run python bench/agent_loop.py [--blocks 60] [--requests 24] [--clients 16]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import platform
import statistics
import time
import uuid

from pipeline import spawn, stop  # bench/pipeline.py: starts `uv run chunkwatch ...`
from prometheus_client import CollectorRegistry

import chunkwatch
from chunkwatch.ledger import Ledger
from chunkwatch.probes.queue import WatchedQueue
from chunkwatch.verdict import judge
from chunkwatch.watchdog import Deadlines
from chunkwatch_lab.agent import LLMConfig
from chunkwatch_lab.service import ChatService, ServiceConfig


class Bench:
    def __init__(self, url: str, clients: int, tokens: int) -> None:
        self.svc = ChatService(ServiceConfig(llm=LLMConfig(url=url)))
        self.clients = clients
        self.tokens = tokens
        self.bad: list[str] = []

    def reset(self) -> None:
        checkpointer = self.svc.graphs["tokens"].checkpointer
        for name in ("storage", "writes", "blobs"):
            table = getattr(checkpointer, name, None)
            if table is not None:
                table.clear()
        gc.collect()

    async def chat(self, gate: asyncio.Semaphore, instrumented: bool) -> None:
        async with gate:
            ledger = Ledger() if instrumented else None
            items: WatchedQueue[tuple[str, object]] = WatchedQueue(ledger)
            await self.svc.run("hello there", uuid.uuid4().hex, "tokens", items, ledger)
            tokens, kind = 0, ""
            while kind not in ("done", "error"):
                kind, _ = items.get_nowait()
                tokens += kind == "token"
            items.consumer_done(complete=True)
            if ledger is not None:
                judge(ledger)
            if kind != "done" or tokens != self.tokens:
                self.bad.append(f"{kind}, {tokens} tokens")

    async def block(self, requests: int, instrumented: bool) -> float:
        """CPU ms per chat for ``requests`` chats."""
        self.reset()
        gate = asyncio.Semaphore(self.clients)
        t0 = time.process_time()
        await asyncio.gather(*(self.chat(gate, instrumented) for _ in range(requests)))
        return (time.process_time() - t0) * 1000 / requests


REGISTRY = CollectorRegistry()  # one for every switch on: the metrics are created once


def switch(on: bool) -> None:
    if on:
        chunkwatch.instrument(registry=REGISTRY, deadlines=Deadlines.from_env(abort=True))
    else:
        chunkwatch.uninstrument()


async def run(args: argparse.Namespace, url: str) -> None:
    bench = Bench(url, args.clients, args.tokens)
    for on in (True, False):  # warm-up, not measured
        switch(on)
        await bench.block(args.requests, on)
    ratios: list[float] = []
    cpu: dict[bool, list[float]] = {True: [], False: []}
    for b in range(args.blocks):
        pair: dict[bool, float] = {}
        for on in (False, True) if b % 2 == 0 else (True, False):
            switch(on)
            pair[on] = await bench.block(args.requests, on)
            cpu[on].append(pair[on])
        ratios.append(pair[True] / pair[False])
        print(f"| {b + 1} | {pair[False]:.2f} | {pair[True]:.2f} | {ratios[-1]:.4f} |", flush=True)
    switch(False)
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    print()
    print(
        f"bare {statistics.median(cpu[False]):.2f} ms/chat, instrumented "
        f"{statistics.median(cpu[True]):.2f} ms/chat (medians of blocks)"
    )
    print(
        f"CPU ratio inst/bare, median of {len(ratios)} pairs: "
        f"**{statistics.median(ratios):.4f}** "
        f"(IQR {q1:.4f}..{q3:.4f}; mean {statistics.mean(ratios):.4f})"
    )
    print(f"bad answers: {len(bench.bad)}{' ' + str(bench.bad[:3]) if bench.bad else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=60)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--token-delay", type=float, default=0.002)
    parser.add_argument("--log", default="/tmp/chunkwatch-bench-agent-loop.log",
                        help="stderr of the upstream process")  # fmt: skip
    args = parser.parse_args()
    if args.blocks < 2:
        parser.error("--blocks must be at least 2 (the spread needs two pairs)")
    upstream, url = spawn(
        ["upstream", "--port", "0", "--tokens", str(args.tokens),
         "--token-delay", str(args.token_delay)],
        args.log,
    )  # fmt: skip
    print(
        f"# agent loop — Python {platform.python_version()}, {args.blocks} pairs of blocks x "
        f"{args.requests} chats, {args.clients} at a time, {args.tokens} tokens at "
        f"{args.token_delay * 1000:g} ms\n"
    )
    print("| pair | bare CPU ms/chat | inst CPU ms/chat | ratio |\n|---|---|---|---|")
    try:
        asyncio.run(run(args, url))
    finally:
        stop(upstream)


if __name__ == "__main__":
    main()
