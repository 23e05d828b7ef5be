"""The reference pipeline in one service process, its probes switched between blocks.

``bench/pipeline.py`` compares two processes; this keeps one ``chunkwatch serve``
(started instrumented, under ``--launch``) and switches what is on between blocks, by
signal, in place: ``off`` (every probe out, as ``--no-instrument``), ``library`` (the
gateway, sdk and langgraph probes; the Flask app bare) and ``all`` (as served). The same
``Runtime`` stays throughout. Load, answers and CPU are read as in ``bench/pipeline.py``.
Each round of blocks runs the states in a rotated order; the ratios to ``off`` of each
round, in CPU per request and in requests per second, are reported as medians with
their IQR and a bootstrap 95 % interval of the median (``--states off,all`` puts every
block into the one comparison the budget is about).

What it separates: the part of the pipeline's overhead that two processes show and one
does not, and the share of the app-side probes (http, sse, queue consumer) and the
per-request work.

    uv run python bench/serve_toggle.py [--processes 3] [--rounds 16] [--requests 64]
        [--states off,library,all]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import time
from typing import Any

STATES = ("off", "library", "all")


def median_interval(values: list[float], resamples: int = 2000) -> tuple[float, float]:
    """A bootstrap 95 % interval of the median of ``values`` (fixed seed: repeatable)."""
    rng = random.Random(0)
    medians = sorted(
        statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples)
    )
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def hold_app() -> dict[str, Any]:
    """Patch the server ``chunkwatch serve`` builds so that, once it starts, the returned
    dict holds its ``app`` and the runtime ``rt``: what switching the probes in place
    needs (:func:`app_probes` switches the app-side ones)."""
    from chunkwatch import runtime
    from chunkwatch_lab import serving

    held: dict[str, Any] = {}
    server_class = serving.BoundedServer

    def capture(host: str, port: int, app: Any, *args: Any, **kwargs: Any) -> Any:
        held.update(app=app, rt=runtime.active())
        return server_class(host, port, app, *args, **kwargs)

    serving.BoundedServer = capture  # type: ignore[assignment,misc]
    return held


def app_probes(held: dict[str, Any], on: bool) -> None:
    """The http, sse and queue probes on the served Flask app, on or off, in place (the
    middleware stays where instrument() put it, switched by its ``enabled`` flag)."""
    held["app"].extensions["chunkwatch.middleware"].enabled = on


def set_state(pid: int, flag: str, state: str) -> None:
    """Ask the service ``pid`` (started with a ``--launch`` of this kind) to switch to
    ``state`` through the file ``flag``, and wait until it says it has."""
    with open(flag, "w") as fh:
        fh.write(state + "\n")
    os.kill(pid, signal.SIGUSR1)
    while True:
        with open(flag) as fh:
            if fh.read() == f"{state} done\n":
                return
        time.sleep(0.01)


def launch(argv: list[str]) -> int:
    """``chunkwatch serve ARGS`` with SIGUSR1 setting the state named in ``$TOGGLE_FILE``."""
    from chunkwatch import runtime
    from chunkwatch.cli import main
    from chunkwatch.probes import gateway, langgraph, sdk

    held = hold_app()

    def switch(*_: Any) -> None:
        path = os.environ["TOGGLE_FILE"]
        with open(path) as fh:
            state = fh.read().strip()
        rt = held["rt"]
        for probe in (gateway, sdk, langgraph):
            probe.uninstrument()
        runtime.activate(None)
        if state != "off":
            runtime.activate(rt)
            for probe in (gateway, sdk, langgraph):
                probe.instrument(rt)
        app_probes(held, state == "all")
        with open(path, "w") as fh:
            fh.write(f"{state} done\n")

    signal.signal(signal.SIGUSR1, switch)
    return main(argv)


def drive(args: argparse.Namespace) -> None:
    from pipeline import cpu_seconds, load, python_pid, spawn, stop

    states = tuple(args.states.split(","))
    here = os.path.abspath(__file__)
    upstream, url = spawn(
        ["upstream", "--port", "0", "--tokens", str(args.tokens),
         "--token-delay", str(args.token_delay)],
        args.log,
    )  # fmt: skip
    others = [s for s in states if s != "off"]
    ratios: dict[str, list[float]] = {s: [] for s in others}
    rates: dict[str, list[float]] = {s: [] for s in others}
    cpu: dict[str, list[float]] = {s: [] for s in states}
    bad = 0
    print(f"# serve toggle — {args.processes} processes x {args.rounds} rounds x "
          f"{len(states)} blocks of {args.requests} chats, {args.clients} clients\n")  # fmt: skip
    head = " | ".join(f"{s} CPU ms/req | {s} req/s" for s in states)
    tail = " | ".join(f"{s}/off CPU | {s}/off req/s" for s in others)
    print(f"| process | round | {head} | {tail} |")
    print("|---|---|" + "---|" * (2 * len(states) + 2 * len(others)))
    try:
        for p in range(args.processes):
            flag = f"/tmp/chunkwatch-bench-toggle-{os.getpid()}-{p}"
            os.environ["TOGGLE_FILE"] = flag
            proc, service = spawn(
                ["serve", "--llm-url", url, "--port", "0"], args.log, seed=args.seed + p,
                launcher=[sys.executable, here, "--launch"],
            )  # fmt: skip
            pid = python_pid(proc.pid, "serve")

            for state in states:  # warm-up
                set_state(pid, flag, state)
                load(service, args.warmup, args.clients, args.tokens)
            for r in range(args.rounds):
                k = r % len(states)
                order = states[k:] + states[:k]
                got: dict[str, float] = {}
                rate: dict[str, float] = {}
                for state in order:
                    set_state(pid, flag, state)
                    c0 = cpu_seconds(pid)
                    result, wall = load(service, args.requests, args.clients, args.tokens)
                    got[state] = (cpu_seconds(pid) - c0) * 1000 / args.requests
                    rate[state] = args.requests / wall
                    cpu[state].append(got[state])
                    bad += len(result.bad)
                cells = " | ".join(f"{got[s]:.2f} | {rate[s]:.2f}" for s in states)
                for s in others:
                    ratios[s].append(got[s] / got["off"])
                    rates[s].append(rate[s] / rate["off"])
                shares = " | ".join(f"{ratios[s][-1]:.4f} | {rates[s][-1]:.4f}" for s in others)
                print(f"| {p + 1} | {r + 1} | {cells} | {shares} |", flush=True)
            stop(proc)
            os.unlink(flag)
    finally:
        stop(upstream)
    print()
    for state in states:
        print(f"{state}: {statistics.median(cpu[state]):.2f} ms/req (median of blocks)")
    for what, table in (("CPU per request", ratios), ("requests/s", rates)):
        for name, values in table.items():
            q1, _, q3 = statistics.quantiles(values, n=4)
            lo, hi = median_interval(values)
            print(f"{name}/off {what}, median of {len(values)} rounds: "
                  f"**{statistics.median(values):.4f}** (95 % interval of the median "
                  f"{lo:.4f}..{hi:.4f}; IQR {q1:.4f}..{q3:.4f}; mean "
                  f"{statistics.mean(values):.4f})")  # fmt: skip
    print(f"bad answers: {bad}")


def main() -> None:
    if sys.argv[1:2] == ["--launch"]:
        sys.exit(launch(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=32)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--token-delay", type=float, default=0.002)
    parser.add_argument("--seed", type=int, default=301)
    parser.add_argument("--log", default="/tmp/chunkwatch-bench-serve-toggle.log")
    parser.add_argument("--states", default=",".join(STATES), help="off and any of library, all")
    args = parser.parse_args()
    states = args.states.split(",")
    if "off" not in states or len(states) < 2 or not set(states) <= set(STATES):
        parser.error(f"--states: off and at least one of library, all (got {args.states})")
    if args.rounds < 2:
        parser.error("--rounds must be at least 2")
    drive(args)


if __name__ == "__main__":
    main()
