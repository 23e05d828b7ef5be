"""The whole reference pipeline, instrumented against uninstrumented: service CPU and throughput.

``chunkwatch upstream`` (one process for the whole session) answers every chat with
``--tokens`` tokens, one every ``--token-delay`` seconds. The service runs as two
processes side by side, ``chunkwatch serve --llm-url UPSTREAM`` and ``... --no-instrument``,
both started with ``uv run``. This process is the client: ``--clients`` threads, each
calling :func:`chunkwatch_lab.client.chat` (a full SSE read of ``POST /chat``)
back to back until a block's ``--requests`` are done.

A round: start both services (fresh processes), ``--warmup`` requests to each (not
measured), then ``--blocks`` blocks per service, alternating bare / instrumented /
instrumented / bare ... (only one service has load at a time; the idle one costs
nothing). A block: read the loaded service's CPU (``utime + stime`` of
``/proc/PID/stat``, all its threads), send ``--requests`` requests, read it again.
Per block: service CPU ms per request and requests/s (wall time of the block); each
consecutive bare/instrumented pair of blocks gives a ratio. Short alternating blocks
between two live processes cancel the slow drift of a shared machine far better than
alternating whole runs: the ratio is judged by its median over all pairs of all
``--rounds`` rounds, with its interquartile range. Resident memory is read at the
start and end of each block too.

Why 2 ms per token by default: it keeps 16 concurrent streams enough to saturate the
service (one Python process, one GIL: about one core), so CPU the probes add shows up
as lost throughput — the worst case for the throughput budget — while the upstream
still writes every token on its own, as a model does, instead of one burst. At a real
model's pace (20-50 ms per token) the same 16 clients leave the service mostly idle;
throughput is then set by the model and hides any CPU cost (``--token-delay 0.02``
shows CPU per request in that regime).

The service's stderr (and the upstream's) goes to ``--log``. No ``OTEL_*`` variables
reach the service, so ``serve`` traces with the API's no-op provider (it sets up an SDK
provider only when an exporter is configured).

Why many short rounds of fresh processes: two ``chunkwatch serve --no-instrument``
processes under the same load differ by up to 3.5 % in CPU per token for the life of
the process (string hashes are randomised per process, so every dict lays out
differently; with ``PYTHONHASHSEED`` fixed the two agree within 1 %). A comparison of
one bare and one instrumented process therefore carries a random offset as large as
the budget, and more blocks do not remove it. Each round starts a fresh pair with a
hash seed of its own, the same for both (``--seed``, +1 a round), and the ratio is
judged by its median over all rounds' pairs: the offset varies from round to round
and cancels instead of deciding the result.

Every answer is checked: HTTP 200, the stream ends with ``event: done``, and it
carries ``--tokens`` ``token`` events; a run with any bad answer is reported as such.

    uv run python bench/pipeline.py [--rounds 24] [--blocks 2] [--requests 96] [--warmup 48]
                                    [--clients 16] [--tokens 200] [--token-delay 0.002] [--seed 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from chunkwatch_lab.client import chat

CLK_TCK = os.sysconf("SC_CLK_TCK")
MESSAGE = "Explain how a streaming answer travels from the model to the browser."


def spawn(
    args: list[str],
    log: str,
    seed: int | None = None,
    without: str = "",
    launcher: list[str] | None = None,
) -> tuple[subprocess.Popen[str], str]:
    """``uv run chunkwatch ARGS``; returns the process and the URL it listens on.

    No ``OTEL_*`` variables reach it: ``serve`` then traces with the API's no-op provider.
    ``seed``: its ``PYTHONHASHSEED`` (see the module docstring). ``without``: probes to
    leave out (``bench/_serve_without.py``). ``launcher``: the command to run instead of
    ``chunkwatch`` (e.g. ``bench/serve_toggle.py --launch``).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if seed is not None:
        env["PYTHONHASHSEED"] = str(seed)
    here = os.path.dirname(os.path.abspath(__file__))
    command = (
        [*launcher, *args]
        if launcher
        else ["python", os.path.join(here, "_serve_without.py"), without, *args]
        if without
        else ["chunkwatch", *args]
    )
    with open(log, "a") as err:
        proc = subprocess.Popen(
            ["uv", "run", "--no-sync", *command],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,
            env=env,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"chunkwatch {args[0]} did not start: {line!r}")
    return proc, line.split()[-1]


def python_pid(root: int, word: str, exe: str = "python") -> int:
    """The process under ``root`` (``uv run`` starts a child) whose command line has
    ``word`` and whose executable's path has ``exe``."""
    for _ in range(50):
        parents, found = {root}, []
        grew = True
        while grew:
            grew = False
            for entry in os.listdir("/proc"):
                if not entry.isdigit() or int(entry) in parents:
                    continue
                try:
                    with open(f"/proc/{entry}/stat") as fh:
                        ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                    with open(f"/proc/{entry}/cmdline", "rb") as fh:
                        cmd = fh.read().replace(b"\0", b" ").decode()
                except (OSError, IndexError, ValueError):
                    continue
                if ppid in parents:
                    parents.add(int(entry))
                    grew = True
                    if word in cmd and exe in os.readlink(f"/proc/{entry}/exe"):
                        found.append(int(entry))
        if found:
            return found[0]
        if word in open(f"/proc/{root}/cmdline").read() and exe in os.readlink(f"/proc/{root}/exe"):
            return root  # uv exec'd the interpreter
        time.sleep(0.1)
    raise SystemExit(f"no python process for {word!r} under {root}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid``, in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@dataclass
class Load:
    ok: int = 0
    bad: list[str] = field(default_factory=list)


def load(url: str, requests: int, clients: int, tokens: int) -> tuple[Load, float]:
    """``requests`` chats from ``clients`` threads; returns what came back and the wall time."""
    left = [requests]
    lock = threading.Lock()
    result = Load()

    def worker() -> None:
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            try:
                r = chat(url, MESSAGE, timeout=120)
                n = sum(1 for e in r.events if e.event == "token")
                good = r.status == 200 and r.complete and r.done and n == tokens
                why = f"status={r.status} done={r.done} tokens={n} last={r.last_event}"
            except Exception as exc:  # reported, never hidden
                good, why = False, f"{type(exc).__name__}: {exc}"
            with lock:
                if good:
                    result.ok += 1
                else:
                    result.bad.append(why)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return result, time.perf_counter() - t0


@dataclass
class Block:
    instrumented: bool
    cpu_ms: float  # service CPU per request
    rps: float
    rss_kib: float  # resident memory gained per request
    bad: list[str]


class Service:
    """One ``chunkwatch serve`` process."""

    def __init__(
        self, upstream: str, instrumented: bool, log: str, seed: int, without: str = ""
    ) -> None:
        args = ["serve", "--llm-url", upstream, "--port", "0"]
        if not instrumented:
            args.append("--no-instrument")
        self.instrumented = instrumented
        self.proc, self.url = spawn(args, log, seed, without if instrumented else "")
        self.pid = python_pid(self.proc.pid, "serve")

    def block(self, args: argparse.Namespace) -> Block:
        cpu0, rss0 = cpu_seconds(self.pid), rss_kib(self.pid)
        got, wall = load(self.url, args.requests, args.clients, args.tokens)
        cpu1, rss1 = cpu_seconds(self.pid), rss_kib(self.pid)
        return Block(
            self.instrumented,
            (cpu1 - cpu0) * 1e3 / args.requests,
            args.requests / wall,
            (rss1 - rss0) / args.requests,
            got.bad,
        )

    def stop(self) -> None:
        stop(self.proc)


def q(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=24, help="fresh pairs of services")
    parser.add_argument(
        "--blocks", type=int, default=2, help="measured blocks per service per round"
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="PYTHONHASHSEED of round 1 (+1 a round)"
    )
    parser.add_argument(
        "--without",
        default="",
        help="probes the instrumented service leaves out, to attribute the "
        "overhead: gateway,sdk,langgraph,app (bench/_serve_without.py)",
    )
    parser.add_argument("--requests", type=int, default=96, help="requests per block")
    parser.add_argument("--warmup", type=int, default=48, help="unmeasured requests per service")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--token-delay", type=float, default=0.002)
    parser.add_argument(
        "--log",
        default="/tmp/chunkwatch-bench-pipeline.log",
        help="stderr of the upstream and service processes",
    )
    args = parser.parse_args()

    up, up_url = spawn(
        [
            "upstream",
            "--port",
            "0",
            "--tokens",
            str(args.tokens),
            "--token-delay",
            str(args.token_delay),
        ],
        args.log,
    )
    print(
        f"# pipeline — Python {platform.python_version()}, {len(os.sched_getaffinity(0))} CPUs; "
        f"{args.tokens} tokens, {args.token_delay * 1e3:g} ms/token, {args.clients} clients; "
        f"{args.rounds} rounds x {args.blocks} blocks/service x {args.requests} requests, "
        f"{args.warmup} warm-up requests per service"
        + (f"; instrumented without {args.without}" if args.without else "")
        + "\n",
        flush=True,
    )
    print(
        "| round | pair | bare CPU ms/req | inst CPU ms/req | CPU ratio | bare req/s | "
        "inst req/s | req/s ratio | bad answers |"
    )
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    blocks: list[tuple[Block, Block]] = []
    round_of: list[int] = []
    bad = 0
    try:
        for r in range(args.rounds):
            services = {}
            try:
                seed = args.seed + r  # one hash seed per round, the same for both services
                for inst in (False, True) if r % 2 == 0 else (True, False):
                    services[inst] = Service(up_url, inst, args.log, seed, args.without)
                for svc in services.values():
                    warm, _ = load(svc.url, args.warmup, args.clients, args.tokens)
                    bad += len(warm.bad)
                for i in range(args.blocks):
                    order = (False, True) if (i + r) % 2 == 0 else (True, False)
                    got = {inst: services[inst].block(args) for inst in order}
                    b, n = got[False], got[True]
                    blocks.append((b, n))
                    round_of.append(r)
                    bad += len(b.bad) + len(n.bad)
                    print(
                        f"| {r + 1} | {i + 1} | {b.cpu_ms:.2f} | {n.cpu_ms:.2f} | "
                        f"{n.cpu_ms / b.cpu_ms:.4f} | {b.rps:.2f} | {n.rps:.2f} | "
                        f"{n.rps / b.rps:.4f} | {len(b.bad) + len(n.bad)} |",
                        flush=True,
                    )
                    for why in sorted(set(b.bad + n.bad))[:5]:
                        print(f"|   |   | bad: {why} | | | | | | |", flush=True)
            finally:
                for svc in services.values():
                    svc.stop()
    finally:
        stop(up)

    med = statistics.median
    cpu_ratio = [n.cpu_ms / b.cpu_ms for b, n in blocks]
    rps_ratio = [n.rps / b.rps for b, n in blocks]
    bare = [b for b, _ in blocks]
    inst = [n for _, n in blocks]
    print()
    print("| | bare | instrumented | ratio inst/bare: median of pairs (IQR; min..max) |")
    print("|---|---|---|---|")
    print(
        f"| service CPU ms/request (median of blocks) | {med(x.cpu_ms for x in bare):.2f} | "
        f"{med(x.cpu_ms for x in inst):.2f} | **{med(cpu_ratio):.4f}** "
        f"({q(cpu_ratio, 0.25):.4f}..{q(cpu_ratio, 0.75):.4f}; "
        f"{min(cpu_ratio):.4f}..{max(cpu_ratio):.4f}) |"
    )
    print(
        f"| requests/s (median of blocks) | {med(x.rps for x in bare):.2f} | "
        f"{med(x.rps for x in inst):.2f} | **{med(rps_ratio):.4f}** "
        f"({q(rps_ratio, 0.25):.4f}..{q(rps_ratio, 0.75):.4f}; "
        f"{min(rps_ratio):.4f}..{max(rps_ratio):.4f}) |"
    )
    print(
        f"| resident memory gained, KiB/request (mean of blocks) | "
        f"{statistics.fmean(x.rss_kib for x in bare):.1f} | "
        f"{statistics.fmean(x.rss_kib for x in inst):.1f} | |"
    )
    # per round: the ratio of the round's mean CPU per request and mean throughput
    rounds_cpu, rounds_rps = [], []
    for r in sorted(set(round_of)):
        pairs = [p for p, rr in zip(blocks, round_of, strict=True) if rr == r]
        rounds_cpu.append(
            statistics.fmean(n.cpu_ms for _, n in pairs)
            / statistics.fmean(b.cpu_ms for b, _ in pairs)
        )
        rounds_rps.append(
            statistics.fmean(n.rps for _, n in pairs) / statistics.fmean(b.rps for b, _ in pairs)
        )
    print()
    print(f"per round ({len(rounds_cpu)} fresh pairs of processes), median (IQR):")
    for name, xs in (("CPU ratio", rounds_cpu), ("req/s ratio", rounds_rps)):
        print(
            f"  {name} {med(xs):.4f} ({q(xs, 0.25):.4f}..{q(xs, 0.75):.4f})"
            f"; mean {statistics.fmean(xs):.4f}"
        )
    cpu_extra = (med(cpu_ratio) - 1) * 100
    rps_loss = (1 - med(rps_ratio)) * 100
    print()
    print(
        f"CPU per request: {cpu_extra:+.1f} % (budget +2 %) — "
        f"{'met' if cpu_extra <= 2 else 'NOT met'}"
    )
    print(f"throughput: {-rps_loss:+.1f} % (budget -2 %) — {'met' if rps_loss <= 2 else 'NOT met'}")
    print(f"bad answers: {bad}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
