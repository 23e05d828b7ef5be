"""A ledger's tallies are made without the dataclass ``__init__`` (it is the per-request
cost of six streams): what it makes is what ``Tally(...)`` makes, field by field."""

from __future__ import annotations

from dataclasses import fields

from chunkwatch.ledger import Ledger, Tally


def test_a_ledger_tally_is_the_dataclass_tally() -> None:
    """Every field is its default unless given, and mutable defaults are not shared."""
    ledger = Ledger()
    made = ledger.open("sdk", upstream="azure")
    expected = Tally(
        layer="sdk", t_start=made.t_start, upstream="azure", on_finish=None, ledger=ledger
    )
    assert {f.name: getattr(made, f.name) for f in fields(Tally)} == {
        f.name: getattr(expected, f.name) for f in fields(Tally)
    }
    other = ledger.open("gateway", stream_requested=False)
    assert other.facts is not made.facts and other.finish_reasons is not made.finish_reasons
    assert (other.stream_requested, other.upstream) == (False, "azure")
    assert ledger.tallies == [made, other]


def test_the_funnel_is_bottom_up_whatever_order_the_streams_opened_in() -> None:
    """Units per layer, lowest layer first, for any opening order (a request opens its
    streams top-down); layers outside the probe table come last, in the order seen."""
    import itertools

    from chunkwatch.probes import layer_order

    layers = ["gateway", "sdk", "langgraph", "queue", "sse", "http"]
    for opened in itertools.permutations([*layers[:4], "custom", "other"]):
        ledger = Ledger()
        for n, layer in enumerate(opened, start=1):
            ledger.open(layer).units = n
            ledger.open(layer).units = 1  # two streams of a layer add up
        funnel = ledger.funnel()
        known = [x for x in funnel if x in layer_order()]
        assert known == sorted(known, key=layer_order().__getitem__)
        assert list(funnel)[4:] == [x for x in opened if x not in layer_order()]
        assert funnel == {layer: n + 1 for n, layer in enumerate(opened, start=1)}
