"""Instructions of the runtime's per-request primitives, counted by callgrind: what one
request's six streams (gateway, sdk, langgraph, queue, sse, http) cost to open, span,
finish and judge, without a service around them.

``bench/instructions.py`` gives a request's whole cost and ``bench/request_calls.py``
its Python calls; this says which primitive the per-request instructions are in. Each
operation runs 20 times to warm up, then ``--n`` times between two ``getppid()`` calls,
at which callgrind dumps its counters: the figure is exact, and the same every run.
The tracer is the API's no-op one, as in the reference service without ``OTEL_*``.

    uv run python bench/request_primitives.py [--n 300]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable


def run_inside(n: int, names_file: str) -> None:
    """Under callgrind: every operation ``n`` times between two dumps."""
    import gc
    import logging

    from prometheus_client import CollectorRegistry

    from chunkwatch import semconv as sc
    from chunkwatch.ledger import Ledger, Tally, bind
    from chunkwatch.outcomes import End, classify
    from chunkwatch.runtime import Runtime
    from chunkwatch.verdict import judge

    gc.disable()
    logging.getLogger("chunkwatch").setLevel(logging.WARNING)  # the verdict line not written
    rt = Runtime(registry=CollectorRegistry())
    layers = [sc.GATEWAY, sc.SDK, sc.LANGGRAPH, sc.QUEUE, sc.SSE, sc.HTTP]

    def six() -> tuple[Ledger, list[Tally]]:
        ledger = Ledger()
        tallies = []
        for layer in layers:
            t = rt.open(layer, ledger=ledger, upstream="up", watch=False)
            t.unit()
            t.unit()
            tallies.append(t)
        return ledger, tallies

    judged, done = six()
    for t in done:
        t.finish(End.CLEAN)
    again = six()[1]

    def ledger_open() -> None:
        ledger = Ledger()
        for layer in layers:
            ledger.open(layer, upstream="up")

    def rt_open() -> None:
        ledger = Ledger()
        for layer in layers:
            rt.open(layer, ledger=ledger, upstream="up", watch=False)

    def rt_open_as_probes() -> None:  # the evidence keywords the gateway and sdk give
        ledger = Ledger()
        for layer in layers:
            model = layer in (sc.GATEWAY, sc.SDK)
            rt.open(
                layer,
                ledger=ledger,
                upstream="up",
                watch=False,
                keep_span=layer == sc.HTTP,
                stream_requested=model,
                terminal_known=model,
                needs_status=layer == sc.GATEWAY,
            )

    def bound() -> None:  # a hand-off: the request's ledger current in another thread
        with bind(judged):
            pass

    def spans() -> None:
        ledger = Ledger()
        for layer in layers:
            rt.start_span("x", layer, ledger=ledger)

    def finish() -> None:  # Tally.finish: classify, then Runtime._finish (metrics, span)
        for t in again:
            t.outcome = None
            t.finish(End.CLEAN)

    def classify_six() -> None:
        for t in done:
            classify(t)

    def request() -> None:
        ledger, tallies = six()
        for t in tallies:
            t.finish(End.CLEAN)
        rt.finish_request(ledger, None)

    ops: list[tuple[str, Callable[[], object]]] = [
        ("Ledger.open x6 (the tallies)", ledger_open),
        ("Runtime.open x6 (+ open series)", rt_open),
        ("Runtime.open x6, the probes' evidence keywords", rt_open_as_probes),
        ("bind(ledger): one block", bound),
        ("Runtime.start_span x6 (no-op tracer)", spans),
        ("Tally.finish x6 (classify, metrics)", finish),
        ("classify x6", classify_six),
        ("judge (the verdict)", lambda: judge(judged)),
        ("a request: open, unit x2, finish x6, finish_request", request),
    ]
    with open(names_file, "w") as f:
        json.dump([name for name, _ in ops], f)
    for _, fn in ops:
        for _ in range(20):
            fn()
        os.getppid()
        for _ in range(n):
            fn()
        os.getppid()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--inside", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        run_inside(args.n, args.inside)
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="chunkwatch-primitives-") as tmp:
        names_file = os.path.join(tmp, "names.json")
        out = os.path.join(tmp, "cg.out")
        cmd = [
            "valgrind",
            "--tool=callgrind",
            "--dump-before=getppid",
            f"--callgrind-out-file={out}",
            sys.executable,
            os.path.abspath(__file__),
            "--n",
            str(args.n),
            "--inside",
            names_file,
        ]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            sys.exit(done.returncode)
        with open(names_file) as f:
            names = json.load(f)
        dumps = sorted(glob.glob(out + ".*"), key=lambda p: int(p.rsplit(".", 1)[1]))
        totals = [_total(p) for p in dumps]
        print(f"instructions per operation, {args.n} runs each (callgrind)\n")
        print("| operation | instructions |\n|---|---|")
        for i, name in enumerate(names):  # dumps: [before], run, [between], run, ...
            print(f"| {name} | {totals[2 * i + 1] / args.n:,.0f} |")


def _total(path: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise ValueError(f"no totals in {path}")


if __name__ == "__main__":
    main()
