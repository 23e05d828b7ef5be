"""OpenTelemetry's httpx2 instrumentation and chunkwatch put on and taken off in either
order, and ``instrument()`` called twice — each in a fresh process
(``scripts/stacking.py``) making real streamed openai SDK calls to the local upstream.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chunkwatch_lab.threaded import Running, start_in_thread
from chunkwatch_lab.upstream import Upstream

SCRIPT = Path(__file__).parent / "scripts" / "stacking.py"
ORDERS = ("otel,chunkwatch", "chunkwatch,otel")
TIMEOUT = 90.0
CALLS = 2  # a step makes one sync and one async streamed call


@pytest.fixture(scope="module")
def results() -> Iterator[dict[str, tuple[int, str, str]]]:
    """Every script run at once against one upstream: args -> (status, stdout, stderr)."""
    with start_in_thread(Upstream(tokens=12, token_delay=0.005)) as up:
        yield _run_all(up)


def _run_all(up: Running[Upstream]) -> dict[str, tuple[int, str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHUNKWATCH_", "OTEL_"))}
    env["CHUNKWATCH_UPSTREAMS"] = f"127.0.0.1:{up.port}=from-env"
    runs = {
        f"toggle {i} {r}": ["toggle", "--instrument", i, "--remove", r]
        for i in ORDERS
        for r in ORDERS
    }
    runs["reconfigure"] = ["reconfigure"]
    procs = {
        key: subprocess.Popen(
            [sys.executable, str(SCRIPT), args[0], up.url, *args[1:]],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for key, args in runs.items()
    }
    out = {}
    try:
        for key, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
            out[key] = (proc.returncode, stdout, stderr)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    return out


def _lines(result: tuple[int, str, str]) -> list[dict[str, Any]]:
    status, stdout, stderr = result
    assert status == 0, f"the script raised (status {status}):\n{stderr[-3000:]}"
    return [json.loads(line) for line in stdout.splitlines()]


@pytest.mark.parametrize("remove", ORDERS, ids=("remove_otel_first", "remove_chunkwatch_first"))
@pytest.mark.parametrize("instrument", ORDERS, ids=("otel_first", "chunkwatch_first"))
def test_uninstrumenting_one_tool_leaves_the_other_working(
    results: dict[str, tuple[int, str, str]], instrument: str, remove: str
) -> None:
    """Instrumented in either order and taken off in either order, neither tool raises;
    while both are on, OTel's httpx2 span is the one HTTP CLIENT span of each streamed call
    and chunkwatch's ``chunkwatch_streams_total{layer="gateway"}`` counts it; with one
    removed, the other still does its part (chunkwatch alone has its own CLIENT span);
    with both removed neither records; instrumented again, both work again. The SDK yields
    the same chunks throughout."""
    steps = {s["step"]: s for s in _lines(results[f"toggle {instrument} {remove}"])}
    first_removed = remove.split(",")[0]
    expected = {  # step -> (HTTP CLIENT spans, OTel's of them, chunkwatch gateway streams)
        "both": (CALLS, CALLS, CALLS),
        "without otel": (CALLS, 0, CALLS),
        "without chunkwatch": (CALLS, CALLS, 0),
        "neither": (0, 0, 0),
        "both again": (CALLS, CALLS, CALLS),
    }
    wanted = ["both", f"without {first_removed}", "neither", "both again"]
    assert list(steps) == wanted
    got = {
        name: (s["http_client_spans"], s["otel_client_spans"], s["chunkwatch_gateway_streams"])
        for name, s in steps.items()
    }
    assert got == {name: expected[name] for name in wanted}
    assert len({tuple(s["chunks"]) for s in steps.values()}) == 1, steps
    assert all(n > 0 for s in steps.values() for n in s["chunks"]), steps


def test_a_second_instrument_applies_its_registry_and_upstreams(
    results: dict[str, tuple[int, str, str]],
) -> None:
    """``chunkwatch.instrument()`` (configured from CHUNKWATCH_UPSTREAMS=...=from-env) then
    ``chunkwatch.instrument(registry=R, upstreams={host:port: "second"})``: the streams that
    follow are counted in R, under the second call's upstream name, and not in the global
    registry."""
    ((counts,),) = [_lines(results["reconfigure"])]
    assert counts["R"]["second"] == CALLS, counts
    assert sum(counts["R"].values()) == CALLS, counts
    assert sum(counts["global"].values()) == 0, counts
