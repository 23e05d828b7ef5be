"""`chunkwatch demo`, the main job, as a user runs it."""

from __future__ import annotations

import subprocess
import sys


def test_demo_reproduces_names_and_heals_the_incident() -> None:
    """The demo exits 0 and shows: the bare ValueError, the named layer, the guard's answer."""
    out = subprocess.run(
        [sys.executable, "-m", "chunkwatch", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "No generations found in stream." in text
    assert "verdict: empty@gateway" in text
    assert "gateway: HTTP 200 text/event-stream, 0 data events, closed cleanly" in text
    assert "event: mode   -> updates (empty@gateway)" in text
    assert 'chunkwatch_requests_total{outcome="empty",layer="gateway"} 2' in text
    # and, without --serve, how to get the page (tests/lab/test_demo_serve.py runs it)
    assert text.rstrip().endswith("To break it yourself on the chat page: chunkwatch demo --serve")
