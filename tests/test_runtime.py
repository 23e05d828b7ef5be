"""The runtime: the upstream names every stream's bookkeeping asks for, and the verdict
listeners every request's end tells."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from chunkwatch import naming
from chunkwatch import semconv as sc
from chunkwatch.ledger import Ledger
from chunkwatch.naming import upstream_name
from chunkwatch.outcomes import End, Evidence
from chunkwatch.runtime import Runtime
from chunkwatch.verdict import Verdict


def test_upstream_names_are_looked_up_once_per_url_and_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A runtime names each URL once, with the configured names (as upstream_name does),
    and remembers at most 256 URLs, whatever it is asked."""
    asked: list[str] = []

    def counting(url: str, names: dict[str, str] | None = None) -> str:
        asked.append(url)
        return upstream_name(url, names)

    monkeypatch.setattr(naming, "upstream_name", counting)
    rt = Runtime(registry=CollectorRegistry(), upstreams={"gw.example.com": "Azure GW"})
    try:
        assert rt.upstream_for("https://gw.example.com/openai") == "azure_gw"
        assert rt.upstream_for("https://gw.example.com/openai") == "azure_gw"
        assert rt.upstream_for("http://127.0.0.1:8431") == "127.0.0.1:8431"
        assert asked == ["https://gw.example.com/openai", "http://127.0.0.1:8431"]
        for port in range(1, 1001):
            assert rt.upstream_for(f"http://10.0.0.1:{port}") == f"10.0.0.1:{port}"
        assert len(rt.names.upstream.known) <= 256
    finally:
        rt.close()


def test_open_sets_the_start_evidence_it_is_given_and_keeps_the_defaults_otherwise() -> None:
    """``Runtime.open``'s evidence keywords reach the tally, each way round, and a layer
    that gives none keeps :class:`~chunkwatch.outcomes.Evidence`'s defaults."""
    rt = Runtime(registry=CollectorRegistry())
    try:
        for stream in (True, False):
            t = rt.open(
                sc.GATEWAY,
                ledger=Ledger(),
                watch=False,
                stream_requested=stream,
                terminal_known=stream,
                needs_status=stream,
            )
            assert (t.stream_requested, t.terminal_known, t.needs_status) == (stream,) * 3
        plain = rt.open(sc.SSE, ledger=Ledger(), watch=False)
        evidence = Evidence(layer=sc.SSE, t_start=0)
        for name in ("stream_requested", "terminal_known", "needs_status"):
            assert getattr(plain, name) == getattr(evidence, name), name
    finally:
        rt.close()


def test_verdict_listeners_hear_every_request_and_cannot_break_it() -> None:
    """A listener gets each request's verdict and ledger; one that raises is counted as
    chunkwatch's own error and the others still hear it; a removed one hears no more."""
    registry = CollectorRegistry()
    rt = Runtime(registry=registry)
    heard: list[tuple[str, Ledger]] = []

    def broken(verdict: Verdict, ledger: Ledger, span: object) -> None:
        raise RuntimeError("listener bug")

    def listener(verdict: Verdict, ledger: Ledger, span: object) -> None:
        heard.append((str(verdict), ledger))

    def request(layer_outcome: End) -> Ledger:
        ledger = Ledger()
        t = rt.open(sc.GATEWAY, ledger=ledger, upstream="gw", watch=False)
        t.unit()
        t.finish(layer_outcome)
        assert rt.finish_request(ledger, None) is not None
        return ledger

    try:
        rt.add_verdict_listener(broken)
        rt.add_verdict_listener(listener)
        first = request(End.CLEAN)
        second = request(End.ABRUPT)
        rt.remove_verdict_listener(listener)
        request(End.CLEAN)
        assert heard == [("ok", first), ("truncated@gateway", second)]
        errors = {"layer": sc.HTTP, "stage": "listener"}
        assert registry.get_sample_value(sc.INSTRUMENTATION_ERRORS + "_total", errors) == 3
    finally:
        rt.close()
