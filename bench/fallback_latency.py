"""What a guard fallback costs the user: time to first content and to the whole answer.

Healthy token streaming vs. the guard's non-streaming re-issue under three faults,
through the instrumented reference service, alternating, in one process.

    uv run python bench/fallback_latency.py [--runs 15]

The upstream is a model with 300 ms to first token and 50 tokens/s (100 tokens);
the watchdog's first-chunk deadline is 2 s (the `stall` case pays it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chunkwatch.guard import BreakerConfig
from chunkwatch.watchdog import Deadlines
from tests.helpers import instrumented_system

CASES = [("pass", {}), ("zero", {}), ("reject-stream-options", {}), ("stall", {"limit": 30.0})]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    first: dict[str, list[float]] = {c: [] for c, _ in CASES}
    whole: dict[str, list[float]] = {c: [] for c, _ in CASES}
    with instrumented_system(
        tokens=100,
        token_delay=0.02,
        guard=True,
        breaker=BreakerConfig(failures=10**6),
        deadlines=Deadlines(first_chunk=2.0, idle=2.0, abort=True),
    ) as system:
        system.upstream.server.first_token_delay = 0.3
        for _ in range(args.runs):
            for fault, params in CASES:
                t0 = time.perf_counter()
                r = system.ask("How long does a fallback take?", fault, **params)
                assert r.done, (fault, [e.event for e in r.events])
                assert r.first_content_after is not None
                first[fault].append(r.first_content_after)
                whole[fault].append(time.perf_counter() - t0)
    base_first = statistics.median(first["pass"])
    base_whole = statistics.median(whole["pass"])
    print("| case | first content (median) | whole answer (median) | whole vs healthy |")
    print("|---|---|---|---|")
    for fault, _ in CASES:
        f, w = statistics.median(first[fault]), statistics.median(whole[fault])
        label = "healthy streaming" if fault == "pass" else f"fallback under `{fault}`"
        print(f"| {label} | {f * 1000:.0f} ms | {w * 1000:.0f} ms | {w / base_whole:.2f}x |")
    print(f"\n{args.runs} runs each, alternating; healthy first content {base_first * 1000:.0f} ms")


if __name__ == "__main__":
    main()
