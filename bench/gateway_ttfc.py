"""Gateway overhead on time to first chunk (TTFC), healthy (`pass`) mode.

Starts ``chunkwatch upstream`` and ``chunkwatch gateway --fault pass`` as separate
processes on loopback, then, from this one process, sends the same streaming chat
request alternately straight to the upstream and through the gateway (ABBA order,
to cancel drift), each over its own keep-alive connection, as the openai SDK's pool
would. TTFC is the time from writing the request to reading the first HTTP chunk that
carries a ``data:`` event. Reports median / p95 of each path and of the per-pair
difference (gateway - direct).

    uv run python bench/gateway_ttfc.py [--pairs 1000] [--warmup 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time

BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "How fast is the first chunk?"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
).encode()
PATH = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"


def spawn(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"{args[0]} did not start: {line!r}")
    return proc, line.split()[-1]


class Conn:
    """One keep-alive HTTP/1.1 connection that measures TTFC of a streamed answer."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.request = (
            f"POST {PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"api-key: bench\r\nContent-Length: {len(BODY)}\r\n\r\n"
        ).encode() + BODY

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def ttfc(self) -> float:
        """Seconds to the first chunk with a data event; reads the whole response."""
        start = time.perf_counter()
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower(), head
        first = None
        while size := int(await self.reader.readline(), 16):
            chunk = await self.reader.readexactly(size + 2)
            if first is None and b"data:" in chunk:
                first = time.perf_counter() - start
        await self.reader.readline()
        assert first is not None
        return first

    def close(self) -> None:
        self.writer.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(upstream: str, gateway: str, pairs: int, warmup: int) -> dict[str, list[float]]:
    direct, through = Conn(upstream), Conn(gateway)
    await direct.open()
    await through.open()
    for _ in range(warmup):
        await direct.ttfc()
        await through.ttfc()
    out: dict[str, list[float]] = {"direct": [], "gateway": [], "diff": []}
    for i in range(pairs):
        if i % 2:
            g, d = await through.ttfc(), await direct.ttfc()
        else:
            d, g = await direct.ttfc(), await through.ttfc()
        out["direct"].append(d)
        out["gateway"].append(g)
        out["diff"].append(g - d)
    direct.close()
    through.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()
    up, up_url = spawn(
        ["chunkwatch_lab.upstream", "--port", "0", "--tokens", "4", "--token-delay", "0"]
    )
    gw, gw_url = spawn(["chunkwatch_lab.fault_gateway", "--port", "0", "--upstream", up_url])
    try:
        result = asyncio.run(measure(up_url, gw_url, args.pairs, args.warmup))
    finally:
        for proc in (gw, up):
            proc.terminate()
            proc.wait(5)
    print(
        f"{args.pairs} alternating pairs after {args.warmup} warm-up pairs, keep-alive, loopback\n"
    )
    print("| path | median | p95 | p99 |")
    print("|---|---|---|---|")
    for name, label in (
        ("direct", "direct to upstream"),
        ("gateway", "through gateway"),
        ("diff", "difference (gateway - direct), per pair"),
    ):
        ms = [v * 1e3 for v in result[name]]
        median, p95, p99 = statistics.median(ms), pct(ms, 0.95), pct(ms, 0.99)
        print(f"| {label} | {median:.3f} ms | {p95:.3f} ms | {p99:.3f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
