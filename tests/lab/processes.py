"""Real processes for the lab's tests: a clean environment and a child that is always
stopped (its whole process group: gunicorn's workers, valgrind's tool)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without its OTEL_*, CHUNKWATCH_* and PROMETHEUS_*
    settings (the test runner's are not the child's), plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_", "CHUNKWATCH_", "PROMETHEUS_", "prometheus_"))
    }
    env.update(extra)
    return env


def stop_group(proc: subprocess.Popen[bytes] | subprocess.Popen[str], sig: int) -> None:
    """Send ``sig`` to ``proc``'s process group, wait; SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


@contextmanager
def child(
    cmd: list[str], env: dict[str, str], log: Path, *, stop: int = signal.SIGTERM
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` in its own process group, output to ``log``; on exit ``stop`` its group
    (SIGTERM by default), then SIGKILL whatever is left."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        stop_group(proc, stop)
