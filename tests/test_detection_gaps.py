"""Issue 24, two detection gaps, closed.

1. A stream whose data events carry no completion at all (Azure's prompt-filter results,
   then ``[DONE]``) is ``empty``, the incident's own class, at the gateway, where it was
   ``truncated@sdk``. A normal Azure stream that starts with the same annotation is ``ok``.
2. A data event that is a JSON object but no chunk (``{"message": ...}``) is an error
   delivered in-band: ``error_event``, and what the upstream said (bounded, keys
   redacted) is in the verdict's detail, as it now is for ``event: error`` too.

Real parts: the local upstream (plain and Azure content-filtering), the fault gateway and its
``filter-only`` / ``inband-error`` modes, the openai SDK (sync and async) under chunkwatch's
probes, and the instrumented reference service (Flask, LangGraph, AzureChatOpenAI).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

import chunkwatch
from chunkwatch import semconv as sc
from chunkwatch.ledger import Ledger, Tally
from chunkwatch.outcomes import End, Payload, payload_kind, upstream_text
from chunkwatch.probes._wire import Reader
from chunkwatch.sse import SSEParser
from chunkwatch.verdict import judge
from chunkwatch_lab.fault_gateway import Gateway
from chunkwatch_lab.faults import INBAND_MESSAGE, PROMPT_FILTER_EVENT
from chunkwatch_lab.threaded import Running, start_in_thread
from chunkwatch_lab.upstream import Upstream, answer_tokens

from .helpers import API_KEY, System, instrumented_system

PROMPT = "What did the model say?"
SAID = f'the upstream said "{INBAND_MESSAGE}"'


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def probes() -> Iterator[CollectorRegistry]:
    """chunkwatch's probes on (fresh registry, SDK tracer provider); off afterwards."""
    registry = CollectorRegistry()
    chunkwatch.instrument(registry=registry, tracer_provider=TracerProvider())
    try:
        yield registry
    finally:
        chunkwatch.uninstrument()


@pytest.fixture(scope="module")
def azure_gateway() -> Iterator[Running[Gateway]]:
    """A gateway in front of an Azure-style upstream: every stream starts with a
    prompt-filter chunk (``choices: []``) before the role chunk."""
    with start_in_thread(Upstream(tokens=12, token_delay=0.002, content_filter=True)) as up:
        with start_in_thread(Gateway(up.url)) as gw:
            yield gw


@pytest.fixture(scope="module")
def system() -> Iterator[System]:
    with instrumented_system() as running:
        yield running


_AZURE = {"api_key": "k", "api_version": "2024-10-21", "max_retries": 0, "timeout": 5}
_ARGS: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": PROMPT}],
    "stream": True,
    "stream_options": {"include_usage": True},
}


def _read(gw: Running[Gateway], ledger: Ledger) -> tuple[list[Any], BaseException | None]:
    """Stream one chat call with the real sync SDK inside ``ledger``: chunks, error."""
    chunks: list[Any] = []
    client = openai.AzureOpenAI(azure_endpoint=gw.url, **_AZURE)
    try:
        with chunkwatch.bind(ledger):
            for chunk in client.chat.completions.create(**_ARGS):
                chunks.append(chunk)
    except Exception as err:
        return chunks, err
    finally:
        client.close()
    return chunks, None


def _read_async(gw: Running[Gateway], ledger: Ledger) -> tuple[list[Any], BaseException | None]:
    async def run() -> tuple[list[Any], BaseException | None]:
        chunks: list[Any] = []
        client = openai.AsyncAzureOpenAI(azure_endpoint=gw.url, **_AZURE)
        try:
            with chunkwatch.bind(ledger):
                async for chunk in await client.chat.completions.create(**_ARGS):
                    chunks.append(chunk)
        except Exception as err:
            return chunks, err
        finally:
            await client.close()
        return chunks, None

    return asyncio.run(run())


READERS = pytest.mark.parametrize("read", [_read, _read_async], ids=["sync", "async"])


def _outcomes(ledger: Ledger) -> dict[str, str]:
    return {t.layer: str(t.outcome) for t in ledger.tallies}


# -- the gateway's two new faults, on the wire -----------------------------------------------


def _wire(gw: Running[Gateway]) -> tuple[httpx2.Response, list[Any]]:
    response = httpx2.post(gw.url + "/openai/deployments/d/chat/completions", json=_ARGS)
    parser = SSEParser(collect=True)
    events = parser.feed(response.content) + parser.close()
    return response, events


def test_filter_only_sends_a_prompt_filter_event_and_done(gateway: Running[Gateway]) -> None:
    """filter-only: 200 text/event-stream with Azure's prompt-filter results (``choices: []``)
    and ``[DONE]``, nothing else; the upstream is not called."""
    gateway.server.set_fault("filter-only")
    gateway.server.reset_stats()
    response, events = _wire(gateway)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert [e.data for e in events][1:] == ["[DONE]"]
    assert json.loads(events[0].data) == PROMPT_FILTER_EVENT
    assert gateway.server.stats()["upstream_requests"] == 0


def test_inband_error_sends_n_events_then_a_message_object(gateway: Running[Gateway]) -> None:
    """inband-error: the first ``events`` data events, then ``{"message": ...}`` as a plain
    data event (no ``event: error``, no ``error`` key), no ``[DONE]``, a clean end."""
    gateway.server.set_fault("inband-error", events=2)
    response, events = _wire(gateway)
    assert response.status_code == 200
    assert [e.event for e in events] == ["", "", ""]
    assert [json.loads(e.data).get("choices") is not None for e in events] == [True, True, False]
    assert json.loads(events[-1].data) == {"message": INBAND_MESSAGE}


# -- gap 1: no completion at all is `empty`, at the gateway ------------------------------------


@READERS
def test_filter_only_is_empty_at_the_gateway_not_truncated(
    probes: CollectorRegistry, gateway: Running[Gateway], read: Any
) -> None:
    """The SDK yields the one prompt-filter chunk and ends without error; chunkwatch says the
    model produced nothing: empty@gateway (was truncated@sdk), and the app gets
    StreamEmptyError (was StreamTruncatedError), the error it gets for zero chunks."""
    gateway.server.set_fault("filter-only")
    ledger = Ledger()
    chunks, error = read(gateway, ledger)
    assert len(chunks) == 1 and chunks[0].choices == []
    assert isinstance(error, chunkwatch.StreamEmptyError), repr(error)
    verdict = judge(ledger)
    assert str(verdict) == "empty@gateway"
    assert error.verdict is not None and str(error.verdict) == "empty@gateway"
    assert "1 data events, none with a completion" in verdict.detail
    assert verdict.detail.endswith("the model produced nothing")
    assert _outcomes(ledger) == {"gateway": "empty", "sdk": "empty"}


def test_filter_chunk_then_a_cut_is_empty_not_truncated(
    probes: CollectorRegistry, azure_gateway: Running[Gateway]
) -> None:
    """Azure's stream cut after its first event (the prompt filter; no [DONE]): nothing of
    the model's came, so it is empty@gateway like `zero`, not a truncated answer."""
    azure_gateway.server.set_fault("truncate", events=1)
    try:
        ledger = Ledger()
        chunks, error = _read(azure_gateway, ledger)
    finally:
        azure_gateway.server.set_fault("pass")
    assert len(chunks) == 1 and isinstance(error, chunkwatch.StreamEmptyError)
    verdict = judge(ledger)
    assert str(verdict) == "empty@gateway"
    assert verdict.detail.endswith("the stream ended before the model's first token")


@READERS
def test_azure_stream_with_a_prompt_filter_chunk_first_stays_ok(
    probes: CollectorRegistry, azure_gateway: Running[Gateway], read: Any
) -> None:
    """A healthy Azure content-filtered stream (the prompt-filter annotation, then the
    answer, then usage) is ok at every layer: the annotations are noted, not judged. (A
    guard: this passed before the change and must keep passing.)"""
    azure_gateway.server.set_fault("pass")
    ledger = Ledger()
    chunks, error = read(azure_gateway, ledger)
    assert error is None
    answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert answer == "".join(answer_tokens(PROMPT, 12))
    assert len(chunks) == 16 and chunks[0].choices == []
    assert str(judge(ledger)) == "ok"
    assert _outcomes(ledger) == {"gateway": "ok", "sdk": "ok"}
    (gw,) = ledger.layer(sc.GATEWAY)
    assert (gw.units, gw.annotations) == (16, 0)  # counted as it came, past the first chunk
    (sdk,) = ledger.layer(sc.SDK)
    assert (sdk.units, sdk.annotations) == (16, 2)  # the prompt filter and the usage chunk


# -- gap 2: an object that is no chunk is an error event, and its text is the detail ----------


@READERS
def test_inband_error_is_an_error_event_with_the_upstreams_words(
    probes: CollectorRegistry, gateway: Running[Gateway], read: Any
) -> None:
    """Tokens, then ``{"message": "policy failed: ..."}`` and a clean end: error_event@gateway
    (was truncated@gateway) quoting the upstream; the app, which got a cut answer and no
    error, gets StreamTruncatedError carrying that verdict."""
    gateway.server.set_fault("inband-error", events=3)
    ledger = Ledger()
    chunks, error = read(gateway, ledger)
    assert len(chunks) == 4 and chunks[-1].choices is None  # the SDK passes it on as a chunk
    assert isinstance(error, chunkwatch.StreamTruncatedError), repr(error)
    verdict = judge(ledger)
    assert str(verdict) == "error_event@gateway"
    assert SAID in verdict.detail and SAID in str(error)
    assert _outcomes(ledger) == {"gateway": "error_event", "sdk": "error_event"}


def test_error_events_text_is_in_the_verdict_too(
    probes: CollectorRegistry, gateway: Running[Gateway]
) -> None:
    """``event: error`` with ``{"error": {"message": ...}}`` (the SDK raises APIError and
    closes the body): the verdict now says what the upstream said."""
    gateway.server.set_fault("error-event", events=3)
    ledger = Ledger()
    _, error = _read(gateway, ledger)
    assert type(error) is openai.APIError
    verdict = judge(ledger)
    assert str(verdict) == "error_event@gateway"
    assert f'the upstream said "{error.message}"' in verdict.detail


@READERS
def test_a_stream_iterated_without_a_reference_still_raises(
    probes: CollectorRegistry, gateway: Running[Gateway], read: Any
) -> None:
    """``for chunk in client.chat.completions.create(...)`` holds no reference to the stream:
    when the SDK's own generator ends, the stream is collected. Its tally must still end as
    the stream did (empty here), not ``abandoned``, and the app still gets the error (found
    while closing gap 1: the error was never raised in this, the commonest, idiom)."""
    gateway.server.set_fault("zero")
    ledger = Ledger()
    chunks, error = read(gateway, ledger)
    assert chunks == [] and isinstance(error, chunkwatch.StreamEmptyError), repr(error)
    assert _outcomes(ledger) == {"gateway": "empty", "sdk": "empty"}


# -- the instrumented reference service ------------------------------------------------------


def test_service_names_filter_only_empty_at_the_gateway(system: System) -> None:
    """Through Flask, LangGraph and AzureChatOpenAI: the root span's verdict is
    empty@gateway, and the client is told StreamEmptyError with that verdict."""
    r = system.ask(PROMPT, "filter-only")
    attrs = system.root().attributes or {}
    assert attrs[sc.A_VERDICT] == "empty@gateway"
    assert r.error is not None and r.error["type"] == "StreamEmptyError"
    assert (r.error["layer"], r.error["outcome"]) == ("gateway", "empty")


def test_service_verdict_quotes_the_inband_error(
    system: System, caplog: pytest.LogCaptureFixture
) -> None:
    """inband-error: the root span and the request's log line say error_event@gateway and
    what the upstream said, never the API key; the client's `event: error` names the
    verdict without the upstream's words (they may name its hosts or policies)."""
    caplog.set_level(logging.WARNING, logger="chunkwatch")
    r = system.ask(PROMPT, "inband-error", events=4)
    attrs = system.root().attributes or {}
    assert attrs[sc.A_VERDICT] == "error_event@gateway"
    assert SAID in str(attrs[sc.A_VERDICT_DETAIL])
    assert r.error is not None and r.error["outcome"] == "error_event"
    assert INBAND_MESSAGE not in json.dumps(r.error)
    assert r.error["detail"].startswith("gateway: ")
    line = next(m for m in caplog.messages if "verdict=error_event@gateway" in m)
    assert SAID in line and API_KEY not in line


# -- the rules, on plain data ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        ({"choices": [{"index": 0, "delta": {"content": "hi"}}]}, Payload.COMPLETION),
        (PROMPT_FILTER_EVENT, Payload.ANNOTATION),
        (
            {"id": "x", "object": "chat.completion.chunk", "choices": [], "usage": {}},
            Payload.ANNOTATION,
        ),
        ({"message": "policy failed"}, Payload.ERROR),
        ({"error": {"message": "overloaded"}}, Payload.ERROR),
        ({"detail": "quota"}, Payload.ERROR),
        ({"type": "response.output_text.delta", "delta": "hi"}, Payload.OTHER),  # Responses API
        ([1, 2], Payload.OTHER),
    ],
)
def test_payload_kinds(payload: Any, kind: Payload) -> None:
    """Which data payloads are the model's, annotations, in-band errors, or not ours."""
    assert payload_kind(payload) is kind


@pytest.mark.parametrize(
    ("payload", "said"),
    [
        ({"message": "policy failed"}, "policy failed"),
        ({"error": {"message": "bad\x00 thing\r\nhappened\x1b[31m"}}, "bad thing happened [31m"),
        ({"error": {"code": "content_filter"}}, "content_filter"),
        ({"message": "Authorization: Bearer abc.def-123"}, "Authorization: [redacted] [redacted]"),
        ({"message": "api-key=0123abcd invalid"}, "api-key=[redacted] invalid"),
        ({"message": "key sk-proj-Abc123xyz leaked"}, "key [redacted] leaked"),
        ({"message": "sub 0f1e2d3c4b5a69788796a5b4c3d2e1f0 denied"}, "sub [redacted] denied"),
        ({"reason": "x"}, '{"reason":"x"}'),
        ({"message": "word " * 100}, ("word " * 40)[:199] + "…"),
    ],
)
def test_upstream_text_is_bounded_clean_and_keyless(payload: Any, said: str) -> None:
    """The text an in-band error carries: its message, control characters dropped, anything
    that looks like a key or an Authorization value redacted, at most 200 characters."""
    assert upstream_text(payload) == said


# -- the gateway probe's reader, on plain bytes --------------------------------------------------

ROLE = b'data: {"id":"c","choices": [{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
TOKEN = b'data: {"id":"c","choices": [{"index":0,"delta":{"content":"hi"}}]}\n\n'
FILTER = b"data: " + json.dumps(PROMPT_FILTER_EVENT).encode() + b"\n\n"
MESSAGE = b'data: {"message": "policy failed"}\n\n'
DONE = b"data: [DONE]\n\n"
_SSE: Any = {"status": 200, "content_type": "text/event-stream", "needs_status": True}


def _gateway_reads(*reads: bytes) -> tuple[Tally, Reader]:
    """Feed ``reads`` to the gateway probe's reader, as its body loop does, and end it."""
    tally = Tally(layer="gateway", t_start=time.perf_counter_ns(), terminal_known=True, **_SSE)
    reader = Reader(tally, SSEParser())
    for read in reads:
        if reader.fast is not None:  # the body loop's inlined path
            tally.bytes += len(read)
            tally.units += reader.fast(read)
        else:
            reader.feed(read)
    reader.end(End.CLEAN, last=reads[-1])
    return tally, reader


@pytest.mark.parametrize(
    ("reads", "outcome", "annotations", "said"),
    [
        ((FILTER, DONE), "empty", 1, None),
        ((FILTER + DONE,), "empty", 1, None),
        ((FILTER, ROLE, TOKEN, DONE), "ok", 0, None),
        ((ROLE, TOKEN, MESSAGE), "error_event", 0, "policy failed"),
        ((MESSAGE,), "error_event", 0, "policy failed"),
        ((ROLE, TOKEN, MESSAGE[:20], MESSAGE[20:]), "truncated", 0, None),  # split: unread
        ((ROLE, TOKEN), "truncated", 0, None),
    ],
)
def test_gateway_reader_on_plain_reads(
    reads: tuple[bytes, ...], outcome: str, annotations: int, said: str | None
) -> None:
    """What the gateway probe makes of a body, read by read: annotations only is empty, an
    object that is no chunk in the last read is an error event with its text; an in-band
    error split across two reads is not read (the documented limit: truncated)."""
    tally, _ = _gateway_reads(*reads)
    assert (str(tally.outcome), tally.annotations) == (outcome, annotations)
    assert tally.upstream_said == said


def test_gateway_reader_counts_inline_from_the_first_completion_on() -> None:
    """The kept head ends at the first read with a completion chunk: from there on the body
    loop counts inline (``fast``), with nothing kept."""
    reader = Reader(Tally(layer="gateway", **_SSE), SSEParser())
    reader.feed(FILTER)
    assert reader.fast is None and reader.head == FILTER
    reader.feed(ROLE)
    assert reader.fast is not None and reader.head is None
