"""Many clients at once: each request's verdict and trace are its own.

Linking a model stream to its request without user code rests on context that travels
with each request (copied into asyncio tasks, carried into threads). Under concurrency a
mistake shows as one request's stream counted in another's verdict, as unlinked streams,
or as traces that share spans — which one request at a time cannot reveal.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from chunkwatch import semconv as sc
from chunkwatch_lab.fault_gateway import Gateway
from chunkwatch_lab.threaded import start_in_thread
from chunkwatch_lab.upstream import Upstream

from ..otlp_receiver import OTLPReceiver
from .harness import UPSTREAM_NAME, _chat, _get, _new_verdicts, _request_counts, service_process

CLIENTS = 16


@pytest.mark.parametrize("shape", ["shared_loop", "thread_per_request", "sync_stream"])
def test_concurrent_requests_each_get_their_own_verdict_and_trace(shape: str) -> None:
    """16 clients at once through a gateway that drops every stream, then 16 through a
    healthy one: 16 `empty@gateway` and then 16 `ok`, no stream unlinked, and 16 traces
    of one gateway span each, every chunkwatch span in the trace of its own request."""
    with (
        OTLPReceiver() as receiver,
        start_in_thread(Upstream(tokens=12, token_delay=0.02)) as up,
        start_in_thread(Gateway(up.url)) as gw,
        service_process(shape, "alone", gw.url, gw.port, receiver) as (port, _log),
        ThreadPoolExecutor(CLIENTS) as pool,
    ):
        for fault, verdict in (("zero", "empty@gateway"), ("pass", "ok")):
            gw.server.set_fault(fault)
            before = _request_counts(port)
            started = time.time_ns()
            bodies = list(pool.map(lambda _: _chat(port), range(CLIENTS)))
            deadline = time.monotonic() + 10
            grown: list[str] = []
            while len(grown) < CLIENTS and time.monotonic() < deadline:
                grown = _new_verdicts(port, before)
                time.sleep(0.05)
            assert Counter(grown) == {f"{verdict} {UPSTREAM_NAME}": CLIENTS}, grown
            if fault == "pass":
                assert all("data:" in b and "error" not in b for b in bodies)
            metrics = _get(f"http://127.0.0.1:{port}/metrics").decode()
            assert "chunkwatch_unlinked_streams_total{" not in metrics

            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                spans = [s for s in receiver.spans() if s.span.start_time_unix_nano >= started]
                roots = [s for s in spans if s.attrs.get(sc.A_VERDICT) == verdict]
                gateways = [s for s in spans if s.layer == sc.GATEWAY]
                if len(roots) == CLIENTS and len(gateways) == CLIENTS:
                    break
                time.sleep(0.1)
            traces = {r.trace_id for r in roots}
            assert len(traces) == CLIENTS
            assert Counter(g.trace_id for g in gateways) == dict.fromkeys(traces, 1)
            ours = [s for s in spans if s.attrs.get(sc.A_LAYER)]
            assert {s.trace_id for s in ours} == traces
