"""Many clients at once: each request's verdict and trace are its own.

Linking a model stream to its request without user code rests on context that travels
with each request (copied into asyncio tasks, carried into threads). Under concurrency a
mistake shows as one request's stream counted in another's verdict, as unlinked streams,
or as traces that share spans — which one request at a time cannot reveal.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from chunkwatch import semconv as sc
from chunkwatch_lab.fault_gateway import Gateway
from chunkwatch_lab.threaded import Running, start_in_thread
from chunkwatch_lab.upstream import Upstream

from ..otlp_receiver import OTLPReceiver
from .harness import UPSTREAM_NAME, _chat, _get, _new_verdicts, _request_counts, service_process

CLIENTS = 16


@contextmanager
def _clients_of(
    shape: str, setup: str
) -> Iterator[tuple[OTLPReceiver, Running[Gateway], int, Executor]]:
    """The service (``shape``, ``setup``) behind a fault gateway before a local upstream,
    exporting to a receiver, and a pool of ``CLIENTS`` clients."""
    with (
        OTLPReceiver() as receiver,
        start_in_thread(Upstream(tokens=12, token_delay=0.02)) as up,
        start_in_thread(Gateway(up.url)) as gw,
        service_process(shape, setup, gw.url, gw.port, receiver) as (port, _log),
        ThreadPoolExecutor(CLIENTS) as pool,
    ):
        yield receiver, gw, port, pool


@pytest.mark.parametrize("shape", ["shared_loop", "thread_per_request", "sync_stream"])
def test_concurrent_requests_each_get_their_own_verdict_and_trace(shape: str) -> None:
    """16 clients at once through a gateway that drops every stream, then 16 through a
    healthy one: 16 `empty@gateway` and then 16 `ok`, no stream unlinked, and 16 traces
    of one gateway span each, every chunkwatch span in the trace of its own request."""
    with _clients_of(shape, "alone") as (receiver, gw, port, pool):
        for fault, verdict in (("zero", "empty@gateway"), ("pass", "ok")):
            gw.server.set_fault(fault)
            before = _request_counts(port)
            started = time.time_ns()
            bodies = list(pool.map(lambda _: _chat(port), range(CLIENTS)))
            grown = _new_verdicts(port, before, timeout=10, at_least=CLIENTS)
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


def _trace_headers(i: int) -> dict[str, str]:
    """Client ``i``'s trace headers: a sampled W3C trace of its own, none, or junk."""
    kind = i % 4
    if kind == 0:
        return {"traceparent": f"00-{i + 1:032x}-{i + 1:016x}-01"}
    if kind == 1:  # hostile: not a traceparent, and a baggage header far over any limit
        return {"traceparent": "00-zz-not-a-trace-01", "baggage": "k=" + "v" * 20_000}
    if kind == 2:
        return {"tracestate": "vendor=1"}  # a state without a parent: nothing to continue
    return {}


@pytest.mark.parametrize("shape", ["shared_loop", "sync_stream"])
def test_a_service_without_tracing_under_many_clients_and_junk_trace_headers(shape: str) -> None:
    """The one line users try first, no OpenTelemetry SDK at all: 16 clients at once, some
    with a trace to continue and some with junk trace headers, get 16 `empty@gateway`,
    then 16 `ok`; no stream is unlinked, chunkwatch counts no error of its own, and every
    exemplar on /metrics is a trace a client sent (the probes start no spans of their
    own here: a stream's exemplar is its request's)."""
    sent = {f"{i + 1:032x}" for i in range(CLIENTS) if i % 4 == 0}
    with _clients_of(shape, "untraced") as (receiver, gw, port, pool):
        for fault, verdict in (("zero", "empty@gateway"), ("pass", "ok")):
            gw.server.set_fault(fault)
            before = _request_counts(port)
            bodies = list(pool.map(lambda i: _chat(port, _trace_headers(i)), range(CLIENTS)))
            grown = _new_verdicts(port, before, timeout=10, at_least=CLIENTS)
            assert Counter(grown) == {f"{verdict} {UPSTREAM_NAME}": CLIENTS}, grown
            if fault == "pass":
                assert all("data:" in b and "error" not in b for b in bodies)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            metrics = resp.read().decode()
        assert "chunkwatch_unlinked_streams_total{" not in metrics
        assert "chunkwatch_instrumentation_errors_total{" not in metrics
        exemplars = set(re.findall(r'# \{trace_id="([0-9a-f]{32})"\}', metrics))
        assert exemplars and exemplars <= sent, exemplars - sent
        assert receiver.spans() == []  # no SDK: nothing exported
