"""Orphaned model streams: clients that leave, and the model calls that run on without them.

A disconnect storm (many clients at once, each hanging up after its first token) against
services as users write them, behind the fault gateway: ``shared_loop`` never stops its
agent when the client goes away (the common shape, and a leak), ``shared_loop_cancelled``
cancels it and turns off langchain-openai's per-chunk ``wait_for`` (the fix the runbook
gives). chunkwatch must tell them apart from its metrics, verdicts and root spans alone,
and the upstream's own count of aborted streams says which is right.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chunkwatch import semconv as sc
from chunkwatch.orphans import ORPHANED_AFTER
from chunkwatch_lab.fault_gateway import Gateway
from chunkwatch_lab.threaded import start_in_thread
from chunkwatch_lab.upstream import Upstream

from ..helpers import open_chat, read_until
from ..otlp_receiver import OTLPReceiver
from .harness import UPSTREAM_NAME, _get, _read, service_process

CLIENTS = 20
TOKENS, TOKEN_DELAY = 100, 0.03  # a 3 s answer; a token every 30 ms


def _orphan_samples(port: int) -> dict[str, float]:
    text = _get(f"http://127.0.0.1:{port}/metrics").decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("chunkwatch_orphaned") and s.labels.get("upstream") == (
                UPSTREAM_NAME
            ):
                key = s.name + (f"{{le={s.labels['le']}}}" if "le" in s.labels else "")
                out[key] = s.value
    return out


def _leave_after_first_token(port: int) -> None:
    sock = open_chat(f"http://127.0.0.1:{port}", "Tell me a long story.")
    try:
        read_until(sock, b"data: ")
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("shape", "leaks"), [("shared_loop", True), ("shared_loop_cancelled", False)]
)
def test_a_disconnect_storm_names_the_model_streams_left_running(shape: str, leaks: bool) -> None:
    """20 clients hang up after their first token. Without cancellation every model stream
    runs to its end: 20 streams in `chunkwatch_orphaned_stream_seconds` over a second, the
    rest of each answer in `chunkwatch_orphaned_chunks_total`, "orphaned" in each verdict's
    detail and `chunkwatch.orphaned=true` on each root span. With it, the upstream sees all
    20 aborted within a few token intervals and chunkwatch reports no orphan."""
    with (
        OTLPReceiver() as receiver,
        start_in_thread(Upstream(tokens=TOKENS, token_delay=TOKEN_DELAY)) as up,
        start_in_thread(Gateway(up.url)) as gw,
        service_process(shape, "alone", gw.url, gw.port, receiver) as (port, log),
        ThreadPoolExecutor(CLIENTS) as pool,
    ):
        started = time.time_ns()
        list(pool.map(lambda _: _leave_after_first_token(port), range(CLIENTS)))
        left = time.monotonic()
        while up.server.stats["active_streams"] and time.monotonic() - left < 10:
            time.sleep(0.01)
        stopped_after = time.monotonic() - left
        assert up.server.stats["stream_requests"] == CLIENTS
        if leaks:
            assert up.server.stats["completed_streams"] == CLIENTS  # nobody stopped them
        else:
            assert up.server.stats["aborted_streams"] == CLIENTS
            assert stopped_after < 0.5, f"the last model stream stopped after {stopped_after:.2f} s"

        deadline = time.monotonic() + 10
        roots = []
        while time.monotonic() < deadline:
            spans = [s for s in receiver.spans() if s.span.start_time_unix_nano >= started]
            roots = [s for s in spans if sc.A_VERDICT in s.attrs]
            if len(roots) == CLIENTS:
                break
            time.sleep(0.1)
        assert len(roots) == CLIENTS
        assert {r.attrs[sc.A_VERDICT] for r in roots} == {"disconnected@sse"}
        orphans = _orphan_samples(port)
        count = orphans.get("chunkwatch_orphaned_stream_seconds_count", 0.0)
        quick = orphans.get(f"chunkwatch_orphaned_stream_seconds_bucket{{le={ORPHANED_AFTER}}}", 0)
        chunks = orphans.get("chunkwatch_orphaned_chunks_total", 0.0)
        verdicts = re.findall(r"chunkwatch verdict=\S+ .*", _read(log))
        if leaks:
            assert count == CLIENTS and quick == 0, orphans
            assert chunks > CLIENTS * TOKENS / 2, orphans  # most of each answer, unread
            assert all(r.attrs[sc.A_ORPHANED] is True for r in roots)
            assert all(r.attrs[sc.A_ORPHANED_CHUNKS] > TOKENS / 2 for r in roots)
            assert all(r.attrs[sc.A_ORPHANED_SECONDS] > ORPHANED_AFTER for r in roots)
            assert sum("orphaned" in v for v in verdicts) == CLIENTS, verdicts
        else:
            assert 0 < count <= CLIENTS and quick == count, orphans  # followed, stopped at once
            assert chunks <= 2 * count, orphans  # a chunk or two in flight, no more
            assert not any(r.attrs.get(sc.A_ORPHANED) for r in roots)
            assert not any("orphaned" in v for v in verdicts), verdicts
