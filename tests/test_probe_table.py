"""The ordered probe table (``chunkwatch.probes.PROBES``) is the one place a layer's order
and roles are written: the verdict, the funnel, the guard, ``instrument()`` and the
watchdog's defaults read it, and ``semconv.LAYERS`` names the same layers in its order."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
from opentelemetry.trace import NoOpTracerProvider
from prometheus_client import CollectorRegistry

import chunkwatch
from chunkwatch import probes
from chunkwatch import semconv as sc
from chunkwatch.ledger import Ledger
from chunkwatch.outcomes import End
from chunkwatch.probes import PROBES, Probe
from chunkwatch.verdict import describe, judge
from chunkwatch.watchdog import Deadlines

CACHE = "cache"  # a layer of this test only, between sdk and langgraph
FAKE_MODULE = "chunkwatch_test_cache_probe"


def test_semconv_layers_are_the_table_in_its_order() -> None:
    """Dashboards and rules read ``semconv.LAYERS``: it is the table's layers, in order."""
    assert tuple(p.layer for p in PROBES) == sc.LAYERS


def test_the_table_says_what_is_installed_watched_and_followed() -> None:
    """Today's roles: gateway, sdk and langgraph are installed by ``instrument()``; the
    watchdog watches gateway and sdk by default; orphans follow gateway then sdk."""
    assert [p.layer for p in PROBES if p.module] == [sc.GATEWAY, sc.SDK, sc.LANGGRAPH]
    assert Deadlines().watched == {sc.GATEWAY, sc.SDK}
    assert probes.model_layers() == (sc.GATEWAY, sc.SDK)


@pytest.fixture
def cache_row(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A test-only row ``cache`` (hits; watched; installed by a fake module) above sdk.
    Returns the fake module's calls."""
    calls: list[str] = []
    module: Any = types.ModuleType(FAKE_MODULE)
    module.instrument = lambda rt: calls.append("instrument")
    module.uninstrument = lambda: calls.append("uninstrument")
    monkeypatch.setitem(sys.modules, FAKE_MODULE, module)
    row = Probe(CACHE, FAKE_MODULE, "hits", watched=True, model=False)
    monkeypatch.setattr(probes, "PROBES", (*PROBES[:2], row, *PROBES[2:]))
    return calls


def _ledger_with_faults() -> Ledger:
    """A langgraph error and a cache stream that got nothing (both faults)."""
    ledger = Ledger()
    graph = ledger.open(sc.LANGGRAPH)
    graph.exc_type = "RuntimeError"
    graph.finish(End.ERROR)
    ledger.open(CACHE).finish(End.CLEAN)
    ledger.open(sc.SSE).finish(End.CLEAN)
    return ledger


def test_an_unknown_layer_sorts_above_every_known_one() -> None:
    """Without a row, ``cache`` is judged after every layer of the table."""
    assert str(judge(_ledger_with_faults())) == "error@langgraph"


def test_an_extra_row_drives_the_layer_order(cache_row: list[str]) -> None:
    """With a ``cache`` row above sdk, a fault there is lower than langgraph's: it is the
    verdict, worded in the row's unit, and the funnel lists it in the table's place."""
    ledger = _ledger_with_faults()
    verdict = judge(ledger)
    assert str(verdict) == f"empty@{CACHE}"
    assert describe(ledger.layer(CACHE)[0]).startswith("cache: 0 hits")
    assert list(ledger.funnel()) == [CACHE, sc.LANGGRAPH, sc.SSE]


def test_an_extra_row_is_installed_and_watched(cache_row: list[str]) -> None:
    """``instrument()`` installs the row's module (and ``uninstrument()`` removes it), and
    the watchdog's defaults apply to a watched row."""
    rt = chunkwatch.instrument(registry=CollectorRegistry(), tracer_provider=NoOpTracerProvider())
    try:
        assert CACHE in rt.probed
        assert cache_row == ["instrument"]
        assert CACHE in Deadlines().watched
        assert CACHE in rt.deadlines.watched
    finally:
        chunkwatch.uninstrument()
    assert cache_row == ["instrument", "uninstrument"]
