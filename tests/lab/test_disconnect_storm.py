"""Row 1 of the reliability work: every departed client's model stream stops, under
concurrency — in the reference service, on Python 3.11.

langchain-openai reads each chunk through ``asyncio.wait_for`` (``stream_chunk_timeout``),
and on 3.11 ``wait_for`` can swallow a cancel that lands as the read completes (CPython
gh-86296): with one client that is rare, with fifty at once some of them always ran to
their end. The reference service turns that timeout off (chunkwatch's deadlines cut
stalls instead); this storm is the test that it holds.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CollectorRegistry

from chunkwatch import semconv as sc
from chunkwatch.orphans import ORPHANED_AFTER
from chunkwatch_lab.agent import LLMConfig
from chunkwatch_lab.fault_gateway import Gateway
from chunkwatch_lab.service import ServiceConfig, create_app
from chunkwatch_lab.serving import ServiceThread
from chunkwatch_lab.threaded import start_in_thread
from chunkwatch_lab.upstream import Upstream

from ..helpers import open_chat, read_until

CLIENTS = 50
TOKENS, TOKEN_DELAY = 250, 0.02  # 5 s of answer per client, a token every 20 ms


def test_fifty_clients_that_leave_stop_fifty_model_streams_at_once() -> None:
    """50 clients hang up after their first token: the upstream sees 50 streams aborted,
    none completed, the last within half a second of the last client leaving; chunkwatch
    follows the ones still open and counts none as orphaned."""
    registry = CollectorRegistry()
    with (
        start_in_thread(Upstream(tokens=TOKENS, token_delay=TOKEN_DELAY)) as up,
        start_in_thread(Gateway(up.url)) as gw,
    ):
        config = ServiceConfig(
            llm=LLMConfig(url=gw.url),
            registry=registry,
            upstreams={f"127.0.0.1:{gw.port}": "storm"},
            guard=False,
        )
        service = ServiceThread(create_app(config))
        try:

            def leave_after_first_token(_: int) -> None:
                sock = open_chat(service.url, "Tell me a long story.")
                try:
                    read_until(sock, b"event: token")
                finally:
                    sock.close()

            with ThreadPoolExecutor(CLIENTS) as pool:
                list(pool.map(leave_after_first_token, range(CLIENTS)))
            left = time.monotonic()
            while up.server.stats["active_streams"] and time.monotonic() - left < 10:
                time.sleep(0.005)
            took = time.monotonic() - left
        finally:
            service.stop()
    stats = up.server.stats
    assert (stats["stream_requests"], stats["completed_streams"]) == (CLIENTS, 0), stats
    assert stats["aborted_streams"] == CLIENTS
    assert took < 0.5, f"the last departed client's model stream stopped after {took:.2f} s"

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, {sc.L_UPSTREAM: "storm", **labels}) or 0.0

    followed = sample(f"{sc.ORPHANED_STREAM_SECONDS}_count")
    quick = sample(f"{sc.ORPHANED_STREAM_SECONDS}_bucket", le=str(ORPHANED_AFTER))
    # the streams still open as each client left were followed, and all stopped at once
    assert 0 < followed <= CLIENTS and quick == followed
    assert sample(f"{sc.ORPHANED_CHUNKS}_total") <= 2 * followed
    assert sample(f"{sc.REQUESTS}_total", outcome="disconnected", layer="sse") == CLIENTS
