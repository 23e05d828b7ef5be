"""chunkwatch's Python calls per request, by module and by function: a deterministic
measure of the per-request fixed cost (``bench/instructions.py`` counts instructions under
callgrind, ~10 min a run; this takes seconds and does not vary run to run).

The in-process reference service (tokens mode, guard off) answers ``N`` one-token chats
from the local upstream; a profile hook on every thread (the WSGI threads and the agent
loop; not the client's, in this process too) counts each call and generator resumption of
a function in ``chunkwatch/``.
One-token answers make the per-request part dominate; the per-token part is
``bench/probe_instructions.py``'s.

    uv run python bench/request_calls.py
"""

import argparse
import collections
import sys
import threading
import time
from types import FrameType
from typing import Any

from prometheus_client import CollectorRegistry

from chunkwatch_lab.agent import LLMConfig
from chunkwatch_lab.client import chat
from chunkwatch_lab.service import ServiceConfig, create_app
from chunkwatch_lab.serving import ServiceThread
from chunkwatch_lab.threaded import start_in_thread
from chunkwatch_lab.upstream import Upstream


def count_calls(requests: int) -> collections.Counter[tuple[str, str]]:
    """(module path, function) -> calls, over ``requests`` one-token chats."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()

    client = threading.get_ident()  # this thread is the client: its parsing is not counted

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and "/chunkwatch/" in frame.f_code.co_filename:
            if threading.get_ident() != client:
                code = frame.f_code
                counts[(code.co_filename.split("/src/")[-1], code.co_name)] += 1

    hooked_chats(requests, hook, threading.setprofile, sys.setprofile)
    return counts


def hooked_chats(requests: int, hook: Any, for_threads: Any, for_this_thread: Any) -> None:
    """``requests`` one-token chats of the in-process reference service, after a warm-up,
    with ``hook`` set (``for_threads``: threading.setprofile / settrace) on the threads
    started from then on (the WSGI requests) and on the agent loop's thread."""
    with start_in_thread(Upstream(tokens=1, token_delay=0.001)) as up:
        config = ServiceConfig(llm=LLMConfig(url=up.url), registry=CollectorRegistry(), guard=False)
        svc = ServiceThread(create_app(config))
        try:
            for _ in range(5):  # warm-up: metric children, the watchdog, caches
                chat(svc.url, "hi")
            loop = svc.app.extensions["chunkwatch.chat"].loop.loop
            for_threads(hook)  # threads started from now on (WSGI requests)
            loop.call_soon_threadsafe(for_this_thread, hook)  # the agent loop's thread
            time.sleep(0.2)
            for _ in range(requests):
                chat(svc.url, "hi")
            loop.call_soon_threadsafe(for_this_thread, None)
            for_threads(None)
            time.sleep(0.2)
        finally:
            svc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    counts = count_calls(args.requests)
    n = args.requests
    print(f"chunkwatch Python calls per request: {sum(counts.values()) / n:.0f}\n")
    print_ranked(collections.Counter({f"{m}:{f}": c for (m, f), c in counts.items()}), n, args.top)


def print_ranked(counts: collections.Counter[str], n: int, top: int) -> None:
    """Per request, by module (the label's part before ``:``), then the ``top`` labels."""
    by_module: collections.Counter[str] = collections.Counter()
    for label, c in counts.items():
        by_module[label.split(":")[0]] += c
    for module, c in by_module.most_common():
        print(f"{c / n:8.1f}  {module}")
    print()
    for label, c in counts.most_common(top):
        print(f"{c / n:8.1f}  {label}")


if __name__ == "__main__":
    main()
