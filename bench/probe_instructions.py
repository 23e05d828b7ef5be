"""Instructions per chunk of each probe, counted by callgrind: ``bench/probe_cost.py``'s
cases, bare and instrumented, in one process.

``bench/probe_cost.py`` times the cases in CPU nanoseconds, which vary between runs
on this machine by more than the differences being sought. Here each case runs
``--chunks`` units bare and then instrumented (after one warm-up run of each) under
``valgrind --tool=callgrind``, which dumps its counters at every ``getppid()`` the
script makes around a run: a run's instructions are exact, and a case gives the
same figure twice within a few instructions per unit. Reported: instructions per
unit bare, instrumented, and their difference (the probe's own cost). The tracer
provider is the API's no-op one, as in the reference service without ``OTEL_*``;
the sdk "real client" cases are left out (the SDK's own work dwarfs the probe).

    uv run python bench/probe_instructions.py [--only gateway,sse] [--chunks 2000]
                                              [--per-stream 200]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import glob
import os
import shutil
import subprocess
import sys
import tempfile


def run_cases(only: list[str], chunks: int, per_stream: int, names_file: str) -> None:
    """Under callgrind: every case bare, then instrumented, between two dumps each."""
    import probe_cost as pc
    from opentelemetry import trace
    from prometheus_client import CollectorRegistry

    import chunkwatch

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    provider = trace.NoOpTracerProvider()
    names = []
    for case in pc.build_cases(loop):
        if "real client" in case.name or (only and not any(o in case.name for o in only)):
            continue
        names.append(case.name)
        for instrumented in (False, True):
            pc.one_run(case, instrumented, chunks, per_stream, provider)  # warm-up
            gc.collect()
            runtime = instrumented and case.probe_runtime
            if runtime:
                chunkwatch.instrument(
                    registry=CollectorRegistry(), tracer_provider=provider, deadlines=case.deadlines
                )
            os.getppid()  # callgrind dumps here (--dump-before=getppid)
            (case.probe if instrumented else case.bare)(chunks, per_stream)
            os.getppid()
            if runtime:
                chunkwatch.uninstrument()
    with open(names_file, "w") as fh:
        fh.write("\n".join(names))


def total(path: str) -> int:
    with open(path) as fh:
        for line in fh:
            if line.startswith("summary:"):
                return int(line.split()[1])
    raise SystemExit(f"{path}: no summary line")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated parts of case names")
    parser.add_argument("--chunks", type=int, default=2000, help="units per run")
    parser.add_argument("--per-stream", type=int, default=0,
                        help="units per stream (default: one stream of --chunks); 200 puts "
                             "a 200-token answer's per-stream work in")  # fmt: skip
    parser.add_argument("--inside", default="", help=argparse.SUPPRESS)  # the run under callgrind
    args = parser.parse_args()
    only = [x for x in args.only.split(",") if x]
    if args.inside:
        run_cases(only, args.chunks, args.per_stream or args.chunks, args.inside)
        return 0
    out = tempfile.mkdtemp(prefix="chunkwatch-probe-callgrind-")
    names_file = os.path.join(out, "names")
    command = [
        "valgrind", "--tool=callgrind", "--dump-before=getppid",
        f"--callgrind-out-file={out}/cg.%p", sys.executable, os.path.abspath(__file__),
        "--only", args.only, "--chunks", str(args.chunks), "--per-stream", str(args.per_stream),
        "--inside", names_file,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return 1
    with open(names_file) as fh:
        names = fh.read().split("\n")
    files = sorted(glob.glob(f"{out}/cg.*.*"), key=lambda p: int(p.rsplit(".", 1)[1]))
    runs = [total(p) for p in files][1::2]  # dump 1: start-up; then (run, gap) pairs
    streams = f"streams of {args.per_stream}" if args.per_stream else "one stream"
    print(f"instructions per unit, {args.chunks} units per run in {streams} (callgrind)\n")
    print("| case | bare | instrumented | probe |\n|---|---|---|---|")
    for i, name in enumerate(names):
        bare, probe = runs[2 * i] / args.chunks, runs[2 * i + 1] / args.chunks
        print(f"| {name} | {bare:.0f} | {probe:.0f} | **{probe - bare:+.0f}** |")
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
