"""Instructions per request of the reference pipeline, counted by callgrind, probes switched.

CPU time on this shared 2-core machine varies by ±5-8 % from block to block and by a few
per cent between processes (``bench/pipeline.py``, ``bench/serve_toggle.py``), so a 2 %
budget takes hours of alternation to resolve. Instructions do not vary that way:
``valgrind --tool=callgrind`` counts the instructions the service executes, whatever
else the machine is doing. The same block run twice counts the same within ~0.1 %.

One ``chunkwatch serve`` (started instrumented, ``PYTHONHASHSEED`` fixed) runs under
callgrind with instrumentation off while it starts and warms up (the imports alone
are ~23 G instructions), then counted. It switches what is on in place, by signal, as
``bench/serve_toggle.py`` does: a state is a set of probes, ``off`` (none, as
``--no-instrument``), ``library`` (gateway + sdk + langgraph), ``all`` (as served), or
any ``+``-joined subset of ``gateway``, ``sdk``, ``langgraph``, ``app`` (the http, sse
and queue probes on the Flask app). After each switch the service calls ``getppid()``,
which callgrind is told to dump (and zero) its counters before: every block between two
switches is one dump file, its total is that block's instructions.

Load: ``chunkwatch upstream`` (a native process, not counted) answers ``--tokens``
tokens at ``--token-delay``; ``--clients`` threads send ``--requests`` chats per block
(``bench/pipeline.py``'s load, every answer checked). Under callgrind the service runs
~40x slower, so it is saturated, as in ``bench/pipeline.py``; the first-chunk and idle
deadlines are raised to 600 s so that the slowdown does not abort a stream (their
values change no per-chunk work).

What it does not count: time that is not instructions (cache misses, the kernel, lock
waits). It is a deterministic proxy for CPU, to be read beside the CPU benchmarks.

    uv run python bench/instructions.py [--states off,library,all] [--rounds 2]
                                        [--requests 16] [--clients 16] [--warmup 16]
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from typing import Any

PROBES = ("gateway", "sdk", "langgraph", "app")
RUNTIME = "runtime"  # a state of its own: the runtime active, no probe (what probes share)
NAMED = {"off": (), "library": ("gateway", "sdk", "langgraph"), "all": PROBES}


def probes_of(state: str) -> set[str]:
    if state in NAMED:
        return set(NAMED[state])
    parts = set(state.split("+"))
    unknown = parts - set(PROBES) - {RUNTIME}
    if unknown:
        raise SystemExit(f"unknown probes in state {state!r}: {sorted(unknown)}")
    return parts


def launch(argv: list[str]) -> int:
    """``chunkwatch serve ARGS``; SIGUSR1 switches to the state named in ``$TOGGLE_FILE``
    (``measure`` turns callgrind's counting on), then marks the switch with getppid()."""
    from serve_toggle import app_probes, hold_app

    from chunkwatch import runtime
    from chunkwatch.cli import main
    from chunkwatch.probes import gateway, langgraph, sdk

    library = {"gateway": gateway, "sdk": sdk, "langgraph": langgraph}
    held = hold_app()

    def switch(*_: Any) -> None:
        path = os.environ["TOGGLE_FILE"]
        with open(path) as fh:
            state = fh.read().strip()
        if state == "measure":
            subprocess.run(
                ["callgrind_control", "--instr=on", str(os.getpid())],
                check=True, capture_output=True,
            )  # fmt: skip
        else:
            on = probes_of(state)
            rt = held["rt"]
            for probe in library.values():
                probe.uninstrument()
            runtime.activate(None)
            if on:
                runtime.activate(rt)
                for name in on & set(library):
                    library[name].instrument(rt)
            app_probes(held, "app" in on)
        os.getppid()  # callgrind dumps the block that ended here (--dump-before=getppid)
        with open(path, "w") as fh:
            fh.write(f"{state} done\n")

    signal.signal(signal.SIGUSR1, switch)
    return main(argv)


def totals(path: str) -> tuple[int, int, int]:
    """``(instructions, of them in the cyclic garbage collector, collections)`` of a dump.

    The collector's share is the inclusive cost of every call to ``gc_collect_main``
    (callgrind's ``calls=`` lines; names are compressed to ``(id) name`` on first use).
    """
    names: dict[str, str] = {}
    instructions = gc_cost = collections = 0
    callee, calls = "", 0
    with open(path) as fh:
        for line in fh:
            if line.startswith("cfn="):
                ref, _, name = line[4:].rstrip("\n").partition(" ")
                if name:
                    names[ref] = name
                callee = names.get(ref, name)
            elif line.startswith("fn="):
                ref, _, name = line[3:].rstrip("\n").partition(" ")
                if name:
                    names[ref] = name
            elif line.startswith("calls="):
                calls = int(line[6:].split()[0])
            elif calls:
                if callee == "gc_collect_main":
                    gc_cost += int(line.split()[1])
                    collections += calls
                calls = 0
            elif line.startswith(("summary:", "totals:")) and not instructions:
                instructions = int(line.split()[1])
    if not instructions:
        raise SystemExit(f"{path}: no totals line")
    return instructions, gc_cost, collections


def drive(args: argparse.Namespace) -> None:
    from pipeline import load, python_pid, spawn, stop
    from serve_toggle import set_state as toggle

    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed (Debian: apt-get install valgrind)")
    here = os.path.abspath(__file__)
    out = tempfile.mkdtemp(prefix="chunkwatch-callgrind-")
    flag = os.path.join(out, "state")
    os.environ["TOGGLE_FILE"] = flag
    os.environ["CHUNKWATCH_FIRST_CHUNK_TIMEOUT"] = "600"
    os.environ["CHUNKWATCH_IDLE_TIMEOUT"] = "600"
    states = args.states.split(",")
    for state in states:
        probes_of(state)
    upstream, url = spawn(
        ["upstream", "--port", "0", "--tokens", str(args.tokens),
         "--token-delay", str(args.token_delay)],
        args.log,
    )  # fmt: skip
    valgrind = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-before=getppid",
        "--collect-systime=no", f"--callgrind-out-file={out}/cg.%p",
        sys.executable, here, "--launch",
    ]  # fmt: skip
    print(f"# instructions per request — Python {platform.python_version()}, callgrind, "
          f"{args.rounds} rounds x {len(states)} blocks of {args.requests} chats, "
          f"{args.clients} clients, {args.tokens} tokens at {args.token_delay * 1000:g} ms, "
          f"PYTHONHASHSEED={args.seed}\n", flush=True)  # fmt: skip
    per: dict[str, list[float]] = {s: [] for s in states}
    no_gc: dict[str, list[float]] = {s: [] for s in states}
    bad: list[str] = []
    proc, service = spawn(
        ["serve", "--llm-url", url, "--port", "0"], args.log, seed=args.seed, launcher=valgrind
    )
    try:
        pid = python_pid(proc.pid, "serve", exe="callgrind")  # valgrind runs the tool

        def set_state(state: str) -> None:
            toggle(pid, flag, state)

        for state in states:  # warm-up, counting off
            set_state(state)
            got, _ = load(service, args.warmup, args.clients, args.tokens)
            bad += got.bad
        set_state("measure")  # callgrind counts from here; its first dump is this switch
        order: list[str] = []
        for r in range(args.rounds):
            k = r % len(states)
            for state in states[k:] + states[:k]:
                set_state(state)
                got, _ = load(service, args.requests, args.clients, args.tokens)
                bad += got.bad
                order.append(state)
        set_state(states[0])  # ends the last block
        files = sorted(glob.glob(f"{out}/cg.{pid}.*"), key=lambda p: int(p.rsplit(".", 1)[1]))
        counts = {int(p.rsplit(".", 1)[1]): totals(p) for p in files}
        # Dump 1: the measure switch; 2: from there to the first state; 3..: the blocks.
        print("| block | state | M instructions/request | of them GC | collections | "
              "without GC |\n|---|---|---|---|---|---|")  # fmt: skip
        for i, state in enumerate(order):
            n, gc_n, runs = counts[3 + i]
            per[state].append(n / args.requests / 1e6)
            no_gc[state].append((n - gc_n) / args.requests / 1e6)
            print(f"| {i + 1} | {state} | {per[state][-1]:.2f} | {gc_n / args.requests / 1e6:.2f} "
                  f"| {runs} | {no_gc[state][-1]:.2f} |", flush=True)  # fmt: skip
    finally:
        stop(proc)
        stop(upstream)
    base = statistics.median(per[states[0]])
    base_no_gc = statistics.median(no_gc[states[0]])
    print(f"\n| state | M instructions/request, median (min..max) | ratio to {states[0]} | "
          f"without GC | ratio |\n|---|---|---|---|---|")  # fmt: skip
    for state in states:
        m, g = statistics.median(per[state]), statistics.median(no_gc[state])
        print(f"| {state} | {m:.2f} ({min(per[state]):.2f}..{max(per[state]):.2f}) | "
              f"**{m / base:.4f}** | {g:.2f} | {g / base_no_gc:.4f} |")  # fmt: skip
    print(f"\nbad answers: {len(bad)}{' ' + str(bad[:3]) if bad else ''}")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    else:
        print(f"callgrind files: {out}")


def main() -> None:
    if sys.argv[1:2] == ["--launch"]:
        sys.exit(launch(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--states", default="off,library,all",
                        help="comma-separated; the first is the baseline")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=16, help="requests per state, not counted")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--token-delay", type=float, default=0.002)
    parser.add_argument("--seed", type=int, default=0, help="PYTHONHASHSEED of the service")
    parser.add_argument("--keep", action="store_true", help="keep the callgrind files")
    parser.add_argument("--log", default="/tmp/chunkwatch-bench-instructions.log")
    args = parser.parse_args()
    drive(args)


if __name__ == "__main__":
    main()
