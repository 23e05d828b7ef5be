"""Soak: a few thousand requests against ``chunkwatch serve``, faults switched, clients
leaving, hostile bodies — and the process's RSS, threads, open fds and metric series,
which must stay flat once every kind of traffic has been seen.

One ``chunkwatch serve`` process (instrumented, guard on, as shipped) behind the fault
gateway and the local upstream (both in this process). The load runs in blocks of
``--block`` requests at ``--concurrency``; every block switches the gateway's fault
(``pass``, ``zero``, ``truncate``, ``stall``, ``json``, ``filter-only``, ``inband-error``,
``buffer``, then again), and within a block a share of the clients hang up after their
first event, a share continue a conversation (``thread_id``), and a share send bodies
the service must refuse (nested too deep, not UTF-8, a lone surrogate, an unknown
``thread_id``). After each block the service's ``/proc`` figures and the number of
series on ``/metrics`` are sampled.

Warm-up is the first ``--warmup`` blocks (each fault twice, so each meets every kind of
client, and the conversation store filled to its cap: ``CHUNKWATCH_MAX_CONVERSATIONS``
is set to ``--conversations``).
Flat means: from the end of warm-up to the last block, RSS grows by less than
``--rss-budget`` MiB, and threads, fds and series end where they began (threads and fds
within a few: requests in flight). Exit status 0 when flat, 1 when not.

    uv run python bench/soak.py [--requests 4800] [--block 150] [--concurrency 8]
        [--warmup 16] [--conversations 200] [--duration 600]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from chunkwatch import semconv as sc
from chunkwatch.outcomes import Outcome
from chunkwatch_lab.fault_gateway import Gateway
from chunkwatch_lab.threaded import start_in_thread
from chunkwatch_lab.upstream import Upstream

FAULTS: list[tuple[str, dict[str, Any]]] = [
    ("pass", {}),
    ("zero", {}),
    ("truncate", {"events": 3}),
    ("stall", {"limit": 3.0}),
    ("json", {}),
    ("filter-only", {}),
    ("inband-error", {"events": 2}),
    ("buffer", {}),
]
# Label values a series may carry that it did not carry at the end of warm-up: closed
# vocabularies (a first sighting of a verdict, a breaker state) — never request data.
_LAYERS = {*sc.LAYERS, sc.NO_LAYER}
CLOSED = {
    sc.L_LAYER: _LAYERS,
    sc.L_OUTCOME: {str(o) for o in Outcome},
    sc.L_REASON: {f"{o}@{layer}" for o in Outcome for layer in _LAYERS},
    sc.L_TO: {"open", "half_open", "closed"},
    sc.L_KIND: {"first_chunk", "idle"},
    "error_type": {"", *(str(o) for o in Outcome)},
}
HOSTILE = [
    b"[" * 10_000,
    b'{"message": "\xff\xfe"}',
    b'{"message": "\\ud800"}',
    b'{"message": "hi", "thread_id": "not-one-we-issued"}',
]


Series = tuple[str, tuple[tuple[str, str], ...]]  # name, sorted labels


@dataclass
class Sample:
    requests: int
    rss_mib: float
    threads: int
    fds: int
    series: set[Series]
    seconds: float


def _proc(pid: int) -> tuple[float, int, int]:
    status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines())
    rss = int(status["VmRSS"].split()[0]) / 1024
    return rss, int(status["Threads"]), len(os.listdir(f"/proc/{pid}/fd"))


def _series(url: str) -> set[Series]:
    """The series on ``/metrics``: name and labels, no values."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items())))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _bounded(new: set[Series], seen: set[Series]) -> bool:
    """Every label value of every new series is from a closed vocabulary or was already
    in use at the end of warm-up for that label (the upstream, the model): nothing a
    client sends can become a label."""
    known: dict[str, set[str]] = {}
    for _name, labels in seen:
        for key, value in labels:
            known.setdefault(key, set()).add(value)
    return all(
        value in CLOSED.get(key, ()) or value in known.get(key, ()) or key == "le"
        for _name, labels in new
        for key, value in labels
    )


def _post(port: int, body: bytes, leave_early: bool) -> tuple[int, str]:
    """One POST /chat on a raw socket: the status and, for a stream, the last event name
    (or ``left`` when the client hung up after the first event)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        got = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
            if leave_early and b"event: " in got:
                return int(got.split(b" ", 2)[1]), "left"
    status = int(got.split(b" ", 2)[1]) if got.startswith(b"HTTP/") else 0
    events = [line[7:] for line in got.split(b"\n") if line.startswith(b"event: ")]
    return status, events[-1].decode() if events else "-"


def _start_conversation(port: int) -> str | None:
    """A new conversation's ``thread_id``, from its ``event: done``."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        body = b'{"message": "start"}'
        sock.sendall(
            b"POST /chat HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return _thread_id(answer)


def _thread_id(answer: bytes) -> str | None:
    for line in answer.split(b"\n"):
        if line.startswith(b"data: ") and b"thread_id" in line:
            try:
                value = json.loads(line[6:]).get("thread_id")
            except ValueError:
                return None
            return value if isinstance(value, str) else None
    return None


def one(port: int, rng: random.Random, threads: list[str]) -> str:
    roll = rng.random()
    if roll < 0.05:
        status, _ = _post(port, rng.choice(HOSTILE), False)
        return f"hostile {status}"
    payload: dict[str, Any] = {"message": "Which layer dropped the data?"}
    if roll < 0.25 and threads:
        payload["thread_id"] = rng.choice(threads)
    status, last = _post(port, json.dumps(payload).encode(), leave_early=roll > 0.85)
    return f"{status} {last}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=4800)
    ap.add_argument("--block", type=int, default=150)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=16, help="blocks before the baseline")
    ap.add_argument("--conversations", type=int, default=200)
    ap.add_argument("--duration", type=float, default=600.0, help="stop after this long")
    ap.add_argument("--rss-budget", type=float, default=16.0, help="MiB, warm-up to end")
    args = ap.parse_args()

    rng = random.Random(0)
    with (
        start_in_thread(Upstream(tokens=12, token_delay=0.002)) as up,
        start_in_thread(Gateway(up.url)) as gw,
    ):
        env = {
            **os.environ,
            "CHUNKWATCH_MAX_CONVERSATIONS": str(args.conversations),
            "CHUNKWATCH_FIRST_CHUNK_TIMEOUT": "1",
            "CHUNKWATCH_IDLE_TIMEOUT": "1",
            "PYTHONUNBUFFERED": "1",
        }
        cmd = [sys.executable, "-m", "chunkwatch", "serve", "--llm-url", gw.url, "--port", "0"]
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().split()[-1]
            port = int(url.rsplit(":", 1)[1])
            samples: list[Sample] = []
            outcomes: dict[str, int] = {}
            conversation_ids: list[str] = []
            began = time.monotonic()
            done = 0
            block = 0
            with ThreadPoolExecutor(args.concurrency) as pool:
                while done < args.requests and time.monotonic() - began < args.duration:
                    fault, params = FAULTS[block % len(FAULTS)]
                    gw.server.set_fault(fault, **params)
                    seeds = [rng.random() for _ in range(args.block)]
                    results = list(
                        pool.map(lambda s: one(port, random.Random(s), conversation_ids), seeds)
                    )
                    for r in results:
                        outcomes[f"{fault}: {r}"] = outcomes.get(f"{fault}: {r}", 0) + 1
                    if fault == "pass" and len(conversation_ids) < 50:
                        tid = _start_conversation(port)
                        if tid:
                            conversation_ids.append(tid)
                    done += args.block
                    block += 1
                    time.sleep(1.5)  # departed clients' streams stop; requests are counted
                    rss, threads, fds = _proc(proc.pid)
                    samples.append(
                        Sample(done, rss, threads, fds, _series(url), time.monotonic() - began)
                    )
                    now = samples[-1]
                    print(
                        f"{now.requests:6d} requests {now.seconds:6.0f} s  fault={fault:<13} "
                        f"rss={now.rss_mib:6.1f} MiB threads={now.threads:3d} fds={now.fds:3d} "
                        f"series={len(now.series)}",
                        flush=True,
                    )
        finally:
            proc.terminate()
            proc.wait(10)

    if len(samples) <= args.warmup:
        print("not enough blocks after warm-up")
        return 1
    base, last = samples[args.warmup - 1], samples[-1]
    after = samples[args.warmup - 1 :]
    growth = last.rss_mib - base.rss_mib
    flat = {
        "rss": growth < args.rss_budget,
        "threads": max(s.threads for s in after) - base.threads <= args.concurrency,
        "fds": last.fds - base.fds <= args.concurrency,
        # no series appeared after warm-up but first sightings of closed label sets
        "series": _bounded(last.series - base.series, base.series),
    }
    print(
        f"\nafter warm-up ({base.requests} requests) to the end ({last.requests} requests, "
        f"{last.seconds:.0f} s): RSS {base.rss_mib:.1f} -> {last.rss_mib:.1f} MiB "
        f"({growth:+.1f}; budget {args.rss_budget:g}), threads {base.threads} -> "
        f"{last.threads} (max {max(s.threads for s in after)}), fds {base.fds} -> "
        f"{last.fds}, series {len(base.series)} -> {len(last.series)}"
    )
    for name, labels in sorted(last.series - base.series):
        print("  new series after warm-up:", name, dict(labels))
    print("flat:", ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in flat.items()))
    print("\nanswers (fault: status last-event):")
    for key in sorted(outcomes):
        print(f"  {outcomes[key]:5d}  {key}")
    return 0 if all(flat.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
