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
