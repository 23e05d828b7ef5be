"""The stream lifecycle every probe ends through: whichever way a stream ends — run out,
raised, closed, collected — and however many of those reach it, its tally finishes once,
and the wrapped library's errors pass through as the same objects."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from chunkwatch import semconv as sc
from chunkwatch.ledger import Ledger, Tally
from chunkwatch.outcomes import End
from chunkwatch.probes.lifecycle import Ending, aclosing, closing, relay, relay_async
from chunkwatch.runtime import Runtime


class Recorded(Ending):
    """An ending that notes each hook it ran."""

    def __init__(self, tally: Tally, rt: Runtime) -> None:
        super().__init__(tally, rt)
        self.calls: list[str] = []

    def _facts(self, end: End, exc: BaseException | None) -> None:
        assert self.tally.outcome is None  # before the tally finishes
        self.calls.append(f"facts {end}")

    def _ended(self, end: End) -> None:
        assert self.tally.outcome is not None  # after: the outcome is known
        self.calls.append(f"ended {end}")


@pytest.fixture
def rt() -> Iterator[Runtime]:
    runtime = Runtime(registry=CollectorRegistry())
    yield runtime
    runtime.close()


def opened(rt: Runtime) -> Recorded:
    return Recorded(rt.open(sc.SDK, ledger=Ledger(), watch=False), rt)


def streams(rt: Runtime, **labels: str) -> float:
    """``chunkwatch_streams_total`` at the sdk layer, summed over the other labels."""
    return _sum(rt, "chunkwatch_streams_total", layer=sc.SDK, **labels)


def errors(rt: Runtime, stage: str) -> float:
    return _sum(rt, "chunkwatch_instrumentation_errors_total", layer=sc.SDK, stage=stage)


def _sum(rt: Runtime, name: str, **labels: str) -> float:
    return sum(
        s.value
        for metric in rt.metrics.registry.collect()
        for s in metric.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def test_a_stream_read_to_the_end_finishes_once_however_often_it_is_ended_after(
    rt: Runtime,
) -> None:
    """Run out, then closed, then collected: one finish, as ``clean``, the hooks run once
    in order (facts before the tally finishes, ended after)."""
    ending = opened(rt)
    assert list(relay(iter("abc"), ending, lambda _: None)) == ["a", "b", "c"]
    closing(ending, None)
    ending.abandon()
    assert ending.tally.end is End.CLEAN
    assert ending.calls == ["facts clean", "ended clean"]
    assert streams(rt) == 1 and streams(rt, outcome=str(ending.tally.outcome)) == 1


def test_a_relay_closed_early_finishes_as_closed(rt: Runtime) -> None:
    """The consumer closes the generator after one item: ``closed``, once, and the
    source is read no further."""
    ending = opened(rt)
    source = iter("abc")
    gen = relay(source, ending, lambda _: None)
    assert next(gen) == "a"
    gen.close()
    ending.end(End.CLEAN)
    assert ending.tally.end is End.CLOSED and ending.calls == ["facts closed", "ended closed"]
    assert next(source) == "b"
    assert streams(rt) == 1


def test_an_error_of_the_source_passes_through_as_the_same_object(rt: Runtime) -> None:
    """The wrapped library's exception is raised on unchanged; the tally ends as that
    exception says, with its type noted."""
    ending = opened(rt)
    boom = ConnectionResetError("peer went away")

    def source() -> Iterator[str]:
        yield "a"
        raise boom

    with pytest.raises(ConnectionResetError) as raised:
        list(relay(source(), ending, lambda _: None))
    assert raised.value is boom
    assert ending.tally.end is End.ABRUPT and ending.tally.exc_type == "ConnectionResetError"
    assert ending.calls == ["facts abrupt", "ended abrupt"]


def test_a_stream_whose_owner_is_collected_unfinished_is_abandoned(rt: Runtime) -> None:
    """Nothing ended it before its owner went: ``abandoned``; an owner collected after
    the end changes nothing."""

    class Owner:
        pass

    ending, owner = opened(rt), Owner()
    ending.abandon_with(owner)
    del owner
    gc.collect()
    assert ending.tally.end is End.ABANDONED and streams(rt) == 1

    done, owner = opened(rt), Owner()
    done.abandon_with(owner)
    done.end(End.CLEAN)
    del owner
    gc.collect()
    assert done.tally.end is End.CLEAN and done.calls == ["facts clean", "ended clean"]


def test_the_async_relay_ends_the_same_ways(rt: Runtime) -> None:
    """Run out: ``clean``; ``aclose()`` after one item: ``closed``; the source's
    exception: raised on as the same object. Each once."""

    async def source(fail: BaseException | None = None) -> AsyncIterator[int]:
        for i in range(3):
            yield i
        if fail is not None:
            raise fail

    async def run() -> tuple[Recorded, Recorded, Recorded, BaseException]:
        clean, closed, failed = opened(rt), opened(rt), opened(rt)
        assert [i async for i in relay_async(source(), clean, lambda _: None)] == [0, 1, 2]
        gen = relay_async(source(), closed, lambda _: None)
        assert await gen.__anext__() == 0
        await gen.aclose()
        timeout = TimeoutError("read timed out")
        with pytest.raises(TimeoutError) as raised:
            async for _ in relay_async(source(timeout), failed, lambda _: None):
                pass
        assert raised.value is timeout
        return clean, closed, failed, raised.value

    clean, closed, failed, _ = asyncio.run(run())
    assert [e.tally.end for e in (clean, closed, failed)] == [End.CLEAN, End.CLOSED, End.TIMEOUT]
    assert all(len(e.calls) == 2 for e in (clean, closed, failed))
    assert streams(rt) == 3


def test_a_hook_that_raises_is_counted_and_the_tally_still_finishes(rt: Runtime) -> None:
    """Telemetry never breaks the host: a failing hook is counted at stage ``finish``,
    nothing is raised, and the stream is counted all the same."""

    class Broken(Ending):
        def _facts(self, end: End, exc: BaseException | None) -> None:
            raise RuntimeError("span gone")

        def _ended(self, end: End) -> None:
            raise RuntimeError("registry gone")

    ending = Broken(rt.open(sc.SDK, ledger=Ledger(), watch=False), rt)
    assert list(relay(iter("ab"), ending, lambda _: None)) == ["a", "b"]
    assert ending.tally.end is End.CLEAN and streams(rt) == 1
    assert errors(rt, "finish") == 2


def test_a_failing_count_is_counted_and_every_item_still_passes(rt: Runtime) -> None:
    """The per-item callback raising: counted at stage ``chunk``, the item passed on."""
    ending = opened(rt)

    def see(item: str) -> None:
        raise KeyError(item)

    assert list(relay(iter("ab"), ending, see)) == ["a", "b"]
    assert errors(rt, "chunk") == 2 and ending.tally.end is End.CLEAN


def test_a_seam_may_raise_its_own_error_at_the_end_or_in_place_of_one(rt: Runtime) -> None:
    """``clean`` may return an error to raise when the stream ran out, ``fail`` may raise
    another in place of the library's (chained to it); the tally has finished first."""

    class Strict(Recorded):
        def clean(self) -> BaseException | None:
            super().clean()
            return ValueError("no completion")

        def fail(self, exc: BaseException) -> None:
            super().fail(exc)
            raise LookupError("translated") from exc

    ending = Strict(rt.open(sc.SDK, ledger=Ledger(), watch=False), rt)
    with pytest.raises(ValueError, match="no completion"):
        list(relay(iter("a"), ending, lambda _: None))
    assert ending.tally.end is End.CLEAN

    original = KeyError("x")

    def source() -> Iterator[str]:
        raise original
        yield "never"

    failed = Strict(rt.open(sc.SDK, ledger=Ledger(), watch=False), rt)
    with pytest.raises(LookupError) as raised:
        list(relay(source(), failed, lambda _: None))
    assert raised.value.__cause__ is original and failed.tally.end is End.ERROR


def test_a_tally_finished_elsewhere_is_left_as_it_is(rt: Runtime) -> None:
    """The request's end finished a stalled stream as ``timeout``: the probe's own end
    later runs no hook and changes nothing."""
    ending = opened(rt)
    ending.tally.finish(End.TIMEOUT)
    ending.end(End.CLEAN)
    ending.abandon()
    assert ending.tally.end is End.TIMEOUT and ending.calls == []


def test_closing_ends_the_stream_even_when_its_own_close_raises(rt: Runtime) -> None:
    """The wrapped stream's close raising: its error passes on, the stream still ends
    as ``closed``, once (sync and async)."""
    broken = OSError("socket already closed")

    def close() -> None:
        raise broken

    async def aclose() -> None:
        raise broken

    ending, aending = opened(rt), opened(rt)
    with pytest.raises(OSError) as raised:
        closing(ending, close)
    assert raised.value is broken and ending.tally.end is End.CLOSED
    with pytest.raises(OSError):
        asyncio.run(aclosing(aending, aclose))
    assert aending.tally.end is End.CLOSED and aending.calls == ["facts closed", "ended closed"]


def test_a_relay_holds_its_owner_until_it_ends(rt: Runtime) -> None:
    """``owner`` (a stream nothing else holds) is not collected while its relay runs, so
    it is not finished as abandoned before the relay sees the end."""

    class Owner:
        pass

    owner: Any = Owner()
    ending = opened(rt)
    ending.abandon_with(owner)
    gen = relay(iter("ab"), ending, lambda _: None, owner)
    del owner
    gc.collect()
    assert list(gen) == ["a", "b"] and ending.tally.end is End.CLEAN
