"""The queue probe on its own: a ``queue.Queue`` whose hooks keep the tally."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry

import chunkwatch
from chunkwatch import semconv as sc
from chunkwatch.ledger import Ledger
from chunkwatch.runtime import Runtime


class Observed:
    def __init__(self, rt: Runtime, registry: CollectorRegistry, exporter: InMemorySpanExporter):
        self.rt, self.registry, self.exporter = rt, registry, exporter

    def sample(self, name: str, **labels: str) -> float:
        total = 0.0
        for metric in self.registry.collect():
            for s in metric.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total


@pytest.fixture
def observed() -> Iterator[Observed]:
    registry, exporter = CollectorRegistry(), InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    rt = chunkwatch.instrument(registry=registry, tracer_provider=provider)
    try:
        yield Observed(rt, registry, exporter)
    finally:
        chunkwatch.uninstrument()


def produce(items: chunkwatch.WatchedQueue[int], n: int) -> None:
    """``n`` items from another thread, as the agent loop does."""

    def run() -> None:
        for i in range(n):
            items.put(i)
        items.producer_done()

    t = threading.Thread(target=run)
    t.start()
    t.join()


def test_everything_put_and_got_is_ok_with_linked_spans(observed: Observed) -> None:
    items: chunkwatch.WatchedQueue[int] = chunkwatch.WatchedQueue(Ledger())
    assert isinstance(items, queue.Queue)
    produce(items, 5)
    assert [items.get(timeout=1) for _ in range(5)] == [0, 1, 2, 3, 4]
    items.consumer_done(complete=True)

    tally = items.tally
    assert tally is not None
    assert (str(tally.outcome), tally.units, tally.units_in) == ("ok", 5, 5)
    assert observed.sample("chunkwatch_streams_total", layer="queue", outcome="ok") == 1
    assert observed.sample("chunkwatch_chunks_total", layer="queue") == 5
    spans = {s.name: s for s in observed.exporter.get_finished_spans()}
    publish, receive = spans[sc.SPAN_QUEUE_PUBLISH], spans[sc.SPAN_QUEUE_RECEIVE]
    assert (publish.kind, receive.kind) == (SpanKind.PRODUCER, SpanKind.CONSUMER)
    assert [link.context.span_id for link in receive.links] == [publish.context.span_id]
    assert publish.attributes is not None and receive.attributes is not None
    assert publish.attributes["chunkwatch.chunks"] == 5
    assert receive.attributes["chunkwatch.chunks"] == 5
    assert receive.attributes["chunkwatch.outcome"] == "ok"
    assert publish.attributes[sc.MESSAGING_OPERATION_NAME] == "send"
    assert receive.attributes[sc.MESSAGING_OPERATION_NAME] == "receive"


def test_items_left_behind_by_a_complete_reader_are_lost(observed: Observed) -> None:
    items: chunkwatch.WatchedQueue[int] = chunkwatch.WatchedQueue(Ledger())
    produce(items, 5)
    for _ in range(3):
        items.get(timeout=1)
    items.consumer_done(complete=True)
    assert items.tally is not None
    assert (str(items.tally.outcome), items.tally.units, items.tally.units_in) == ("lost", 3, 5)


def test_a_reader_that_leaves_early_is_disconnected_and_later_puts_are_not_queued(
    observed: Observed,
) -> None:
    items: chunkwatch.WatchedQueue[int] = chunkwatch.WatchedQueue(Ledger())
    items.put(1)
    items.put(2)
    assert items.get(timeout=1) == 1
    items.consumer_done(complete=False)
    assert items.tally is not None and str(items.tally.outcome) == "disconnected"
    depth = items.qsize()
    items.put(3)  # the agent still running after the client went away
    assert items.qsize() == depth


def test_depth_high_water_mark_and_wait_are_measured(observed: Observed) -> None:
    items: chunkwatch.WatchedQueue[int] = chunkwatch.WatchedQueue(Ledger())
    for i in range(7):
        items.put(i)
    for _ in range(3):
        items.get()
    items.put(7)  # depth 5 now: the mark stays 7
    while not items.empty():
        items.get()
    items.consumer_done(complete=True)
    assert observed.sample("chunkwatch_queue_depth_max_sum") == 7
    assert observed.sample("chunkwatch_queue_depth_max_count") == 1
    assert observed.sample("chunkwatch_queue_wait_seconds_sum") > 0


def test_a_bookkeeping_failure_loses_no_item(
    observed: Observed, monkeypatch: pytest.MonkeyPatch
) -> None:
    items: chunkwatch.WatchedQueue[str] = chunkwatch.WatchedQueue(Ledger())
    items.put("kept")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bookkeeping broke")

    monkeypatch.setattr(observed.rt, "open", broken)
    assert items.get(timeout=1) == "kept"
    items.put("also kept")
    assert items.get(timeout=1) == "also kept"
    errors = observed.sample("chunkwatch_instrumentation_errors_total", layer="queue", stage="get")
    assert errors == 1
    items.producer_done()
    items.consumer_done(complete=True)  # no tally to finish: counted, and nothing raised
    finish = observed.sample(
        "chunkwatch_instrumentation_errors_total", layer="queue", stage="finish"
    )
    assert finish == 1


def test_uninstrumented_it_is_a_plain_queue() -> None:
    assert chunkwatch.runtime.active() is None
    items: chunkwatch.WatchedQueue[int] = chunkwatch.WatchedQueue(None)
    items.put(1)
    items.put(2)
    assert (items.qsize(), items.get(), items.get()) == (2, 1, 2)
    with pytest.raises(queue.Empty):
        items.get(timeout=0.01)
    items.producer_done()
    items.consumer_done(complete=True)
    assert items.tally is None
