"""chunkwatch in chat services written the way users write them, not our reference service.

Each service (``services/*.py``: Flask, a LangGraph node calling ``AzureChatOpenAI``, a
plain ``queue.Queue`` drained with ``get(timeout=3)``, exceptions forwarded as
``event: error``) hands the request to its agent in one of four shapes — a shared loop
fed by ``run_coroutine_threadsafe``, a thread per request, an executor, LangGraph's sync
``graph.stream`` in the response — and is instrumented in one of four set-ups: only
``chunkwatch.instrument(app)``; OpenTelemetry's httpx2 instrumentation before it, or
after it; ``opentelemetry-instrument``. chunkwatch is configured from the environment
only. Each runs as its own process against the real fault gateway and upstream on
loopback, exporting spans over OTLP to an in-test receiver; ``harness`` runs them, a few
at a time, and these tests read what every party saw.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from chunkwatch import semconv as sc

from ..otlp_receiver import OTLPReceiver
from .harness import (
    END_MARKERS,
    FAULTS,
    OTEL_HTTPX_SETUPS,
    SETUPS,
    SHAPES,
    UPSTREAM_CALLED,
    UPSTREAM_NAME,
    Exchange,
    Run,
    run_all,
)

Runs = dict[tuple[str, str], Run]


def matrix(
    setups: Iterable[str] = SETUPS, faults: Iterable[str] = tuple(FAULTS)
) -> pytest.MarkDecorator:
    """Parametrize over shape x setup x fault, ids ``shape-setup-fault``."""
    return pytest.mark.parametrize(
        ("shape", "setup", "fault"),
        [
            pytest.param(shape, setup, fault, id=f"{shape}-{setup}-{fault}")
            for shape in SHAPES
            for setup in setups
            for fault in faults
        ],
    )


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest) -> Iterator[Runs]:
    """Every service the selected tests need, each through every fault (harness.run_all)."""
    wanted = {
        (item.callspec.params["shape"], item.callspec.params["setup"])
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec")
    }
    with OTLPReceiver() as receiver:
        yield run_all(wanted, receiver)


def exchange(runs: Runs, shape: str, setup: str, fault: str) -> Exchange:
    return runs[shape, setup].exchange(fault)


def sole(spans: list[Any], what: str, ex: Exchange) -> Any:
    assert len(spans) == 1, f"expected one {what}, got {len(spans)}: {ex.describe()}"
    return spans[0]


@matrix()
def test_the_request_verdict_names_the_layer(
    runs: Runs, shape: str, setup: str, fault: str
) -> None:
    """With only ``chunkwatch.instrument(app)`` and CHUNKWATCH_* variables, one request
    through each gateway fault adds exactly one ``chunkwatch_requests_total`` sample, with
    the verdict that names the layer (pass: ok; zero: empty@gateway; json:
    wrong_content_type@gateway; truncate: truncated@gateway; stall: stalled@gateway —
    the app stopped waiting, or the gateway gave up, while the stream was silent) and
    the gateway's name from CHUNKWATCH_UPSTREAMS — in every hand-off shape and set-up."""
    ex = exchange(runs, shape, setup, fault)
    assert ex.verdicts == [f"{FAULTS[fault][1]} {UPSTREAM_NAME}"], ex.describe()


@matrix()
def test_the_root_span_and_the_log_line_say_the_same_verdict(
    runs: Runs, shape: str, setup: str, fault: str
) -> None:
    """The request's root span carries the verdict (``chunkwatch.verdict``), and the service's
    log has one ``chunkwatch verdict=... upstream=... trace_id=...`` line for the request,
    naming the same verdict and upstream and the root span's trace id."""
    ex = exchange(runs, shape, setup, fault)
    verdict = FAULTS[fault][1]
    assert ex.root is not None, f"no root span: {ex.describe()}"
    assert ex.root.attrs.get(sc.A_VERDICT) == verdict, ex.describe()
    assert ex.logged_verdicts == [f"{verdict} {UPSTREAM_NAME}"], "\n".join(ex.log_lines)


@matrix()
def test_the_body_ends_or_carries_the_error(runs: Runs, shape: str, setup: str, fault: str) -> None:
    """chunkwatch changes nothing the app sends: a healthy answer ends with the app's end
    event and no error; under every fault the app's own ``event: error`` is in the body
    (the SDK's or chunkwatch's exception forwarded, or the app's queue timeout)."""
    body = exchange(runs, shape, setup, fault).body
    if fault == "pass":
        last = body.rstrip("\n").rsplit("\n\n", 1)[-1]
        assert "event: error" not in body and last.startswith(END_MARKERS), body
        assert body.count('"token"') == 12, body
    else:
        assert "event: error" in body, body


@matrix()
def test_one_http_client_span_per_model_call(
    runs: Runs, shape: str, setup: str, fault: str
) -> None:
    """Each request makes one model HTTP call (``max_retries=0``), and it has exactly one
    HTTP CLIENT span, in the request's trace: chunkwatch's own when it is alone,
    OpenTelemetry httpx's when that is installed (before or after chunkwatch, or by
    ``opentelemetry-instrument``) — never both."""
    ex = exchange(runs, shape, setup, fault)
    client = sole(ex.http_clients, "HTTP CLIENT span", ex)
    assert ex.root is not None, f"no root span: {ex.describe()}"
    assert client.trace_id == ex.root.trace_id, ex.describe()


@matrix()
def test_every_chunkwatch_span_is_in_the_request_trace(
    runs: Runs, shape: str, setup: str, fault: str
) -> None:
    """Every chunkwatch span the request caused (``chunkwatch.layer`` set) is in the trace
    of the request's root span — the model streams are linked to their request without
    code of the user's, across the shape's hand-off — and the gateway's is among them."""
    ex = exchange(runs, shape, setup, fault)
    assert ex.root is not None, f"no root span: {ex.describe()}"
    outside = [s.describe() for s in ex.chunkwatch_spans if s.trace_id != ex.root.trace_id]
    assert not outside, ex.describe()
    assert any(s.layer == sc.GATEWAY for s in ex.trace), ex.describe()


@matrix(setups=OTEL_HTTPX_SETUPS)
def test_under_otel_httpx_the_gateway_span_is_a_child_of_its_client_span(
    runs: Runs, shape: str, setup: str, fault: str
) -> None:
    """When OpenTelemetry's httpx instrumentation owns the CLIENT span, chunkwatch's gateway
    span (the body's facts) is not a CLIENT span and is a child of OTel's CLIENT span."""
    ex = exchange(runs, shape, setup, fault)
    otel = sole([s for s in ex.http_clients if sc.A_LAYER not in s.attrs], "OTel CLIENT span", ex)
    gateway = sole([s for s in ex.spans if s.layer == sc.GATEWAY], "gateway span", ex)
    assert gateway.kind != "CLIENT", ex.describe()
    assert gateway.parent_id == otel.span_id, ex.describe()


@matrix(faults=UPSTREAM_CALLED)
def test_the_traceparent_at_the_model_names_the_client_span(
    runs: Runs, shape: str, setup: str, fault: str
) -> None:
    """The model (the upstream behind the gateway) received one ``traceparent`` naming the
    request's trace id and the HTTP CLIENT span's id: the service's trace continues in the
    gateway's and the model's."""
    ex = exchange(runs, shape, setup, fault)
    traceparent = sole(ex.traceparents, "traceparent at the upstream", ex)
    assert traceparent is not None, f"the model call carried no traceparent: {ex.describe()}"
    _version, trace_id, span_id, _flags = traceparent.split("-")
    client = sole(ex.http_clients, "HTTP CLIENT span", ex)
    assert ex.root is not None, f"no root span: {ex.describe()}"
    assert (trace_id, span_id) == (ex.root.trace_id, client.span_id), ex.describe()
