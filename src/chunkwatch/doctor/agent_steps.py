"""Step 4 of the doctor, the agent steps: the streaming request as the application makes it.

:func:`through_sdk` streams with the openai SDK (``AsyncAzureOpenAI`` /
``AsyncOpenAI``, ``stream_options`` included, no retries), counting chunks.
:func:`through_langgraph` runs a one-node LangGraph graph whose node calls
``await model.ainvoke(messages)`` on an ``AzureChatOpenAI`` / ``ChatOpenAI``, read with
``astream_events(version="v2")`` — the pattern that turns an empty stream into
langchain-core's ``ValueError: No generations found in stream.`` — counting
``on_chat_model_stream`` events.

Each records a :class:`~chunkwatch.ledger.Tally` (layer ``sdk`` / ``langgraph``,
classified by :func:`chunkwatch.outcomes.classify` like the probes' tallies; the
empty-stream ``ValueError`` is judged as the langgraph probe judges it) and an
:class:`AppView`: what the application is handed — units, answer length, usage,
and the exception, if any, as the application would see it.

Deadlines as in :mod:`chunkwatch.doctor.wire_step` (the raw requests): the first unit
within ``timeout`` seconds, each next one within ``timeout`` of the previous, ``total``
at most.
``AzureChatOpenAI`` has no HTTP timeout by default, so where the doctor gives up
the application may wait much longer; the view notes that.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx2

from chunkwatch import semconv as sc
from chunkwatch.doctor.progress import Progress
from chunkwatch.doctor.target import PROMPT, Target
from chunkwatch.errors import NO_GENERATIONS
from chunkwatch.ledger import Tally
from chunkwatch.outcomes import End, Payload, end_for_exception, payload_kind, upstream_text

__all__ = ["AppView", "through_langgraph", "through_sdk"]

_now = time.perf_counter_ns
_NO_KEY = "chunkwatch-doctor-no-key"  # the SDK insists on a key; the endpoint decides
T = TypeVar("T")


@dataclass(slots=True, eq=False)
class AppView:
    """What one application layer was handed. ``tally`` holds the classified evidence."""

    tally: Tally
    unit: str  # "chunks" or "token events"
    usage: bool = False
    answer_chars: int = 0
    exception: str | None = None  # "Type: message", as the application would catch it
    total_limit: bool = False


class _Deadline:
    """The next-unit deadline of one stream (see the module doc)."""

    def __init__(self, tally: Tally, timeout: float, total: float) -> None:
        self.tally = tally
        self.timeout_ns = int(timeout * 1e9)
        self.end_ns = tally.t_start + int(total * 1e9)
        self.by_total = False

    def left(self) -> float:
        t = self.tally
        deadline = (t.t_last if t.t_last is not None else t.t_start) + self.timeout_ns
        self.by_total = self.end_ns < deadline
        return max(0.0, min(deadline, self.end_ns) - _now()) / 1e9

    async def within(self, awaitable: Awaitable[T]) -> T:
        return await asyncio.wait_for(awaitable, self.left())

    def expired(self, view: AppView) -> End:
        if self.by_total:
            view.total_limit = True
        else:
            self.tally.stalled = "first_chunk" if self.tally.t_first is None else "idle"
        return End.TIMEOUT


def _exception_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def _built(build: Callable[..., Any], *args: Any) -> tuple[Any, Exception | None]:
    """``build(*args)``, or the exception it raised (the step reports it as its end)."""
    try:
        return build(*args), None
    except Exception as exc:
        return None, exc


def _failed(view: AppView, exc: BaseException) -> End:
    tally = view.tally
    tally.exc_type = type(exc).__name__
    view.exception = _exception_text(exc)
    status = getattr(exc, "status_code", None)  # openai.APIStatusError
    if isinstance(status, int):
        tally.status = status
    return end_for_exception(exc)


# -- the openai SDK ------------------------------------------------------------------------


def _sdk_client(target: Target, total: float) -> Any:
    import openai

    key = target.api_key or _NO_KEY
    if target.azure:
        return openai.AsyncAzureOpenAI(
            azure_endpoint=target.url,
            azure_deployment=target.deployment,
            api_version=target.api_version,
            api_key=key,
            timeout=total,
            max_retries=0,
        )
    return openai.AsyncOpenAI(base_url=target.url, api_key=key, timeout=total, max_retries=0)


async def through_sdk(
    target: Target, *, timeout: float, total: float, progress: Progress, label: str
) -> AppView:
    """Stream the doctor's request through the openai SDK and count the chunks."""
    client, setup_error = _built(_sdk_client, target, total)  # before the clock starts
    tally = Tally(layer=sc.SDK, t_start=_now(), stream_requested=True, terminal_known=True)
    tally.deadline = timeout
    tally.facts["waits"] = "the openai SDK's default read timeout"
    view = AppView(tally, "chunks")
    clock = _Deadline(tally, timeout, total)
    stream: Any = None
    end = End.CLEAN
    try:
        if setup_error is not None:
            raise setup_error
        progress.waiting(f"{label}: the response")
        stream = await clock.within(
            client.chat.completions.create(
                model=target.sdk_model,
                messages=[{"role": "user", "content": PROMPT}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        chunks = stream.__aiter__()
        while True:
            progress.waiting(f"{label}: chunk {tally.units + 1}")
            try:
                chunk = await clock.within(chunks.__anext__())
            except StopAsyncIteration:
                break
            _see_chunk(view, chunk)
    except TimeoutError:
        end = clock.expired(view)
    except Exception as exc:
        end = _failed(view, exc)
    finally:
        progress.done()
        with contextlib.suppress(Exception):
            if stream is not None:
                await asyncio.wait_for(stream.close(), 2.0)
        with contextlib.suppress(Exception):
            if client is not None:
                await asyncio.wait_for(client.close(), 2.0)
    tally.finish(end)
    return view


def _see_chunk(view: AppView, chunk: Any) -> None:
    tally = view.tally
    tally.unit()
    if not chunk.choices:  # not the model's: as the sdk probe reads it (_sdk_stream)
        dump = getattr(chunk, "model_dump", None)
        fields = dump(exclude_unset=True) if dump is not None else None
        kind = payload_kind(fields)
        if chunk.choices is not None or kind is Payload.ANNOTATION:  # choices: [], usage
            tally.annotations += 1
        elif kind is Payload.ERROR:  # {"message": ...}: an error sent in-band
            tally.error_events += 1
            if tally.upstream_said is None:
                tally.upstream_said = upstream_text(fields)
    for choice in chunk.choices or []:
        delta = choice.delta
        if delta is not None and (delta.content or delta.tool_calls):
            tally.content_units += 1
            view.answer_chars += len(delta.content or "")
        if choice.finish_reason:
            tally.finish_reasons.append(choice.finish_reason)
            tally.terminal_seen = True
    if getattr(chunk, "usage", None) is not None:
        view.usage = True


# -- LangGraph -----------------------------------------------------------------------------


def _chat_model(target: Target, http_client: httpx2.AsyncClient) -> Any:
    """The chat model as a service builds it. The doctor's own HTTP client (closed after
    the step) keeps langchain-openai from caching one across event loops; with a client
    given, ``stream_usage`` must be set to keep AzureChatOpenAI's default of sending
    ``stream_options``."""
    from langchain_openai import AzureChatOpenAI, ChatOpenAI
    from pydantic import SecretStr

    key = SecretStr(target.api_key or _NO_KEY)
    if target.azure:
        return AzureChatOpenAI(
            azure_endpoint=target.url,
            azure_deployment=target.deployment,
            api_version=target.api_version,
            model=target.model,
            api_key=key,
            max_retries=0,
            stream_usage=True,
            http_async_client=http_client,
        )
    return ChatOpenAI(
        base_url=target.url,
        model=target.model or "",
        api_key=key,
        max_retries=0,
        stream_usage=True,
        http_async_client=http_client,
    )


def _graph_for(target: Target, http_client: httpx2.AsyncClient) -> Any:
    return _graph(_chat_model(target, http_client))


def _graph(model: Any) -> Any:
    from langgraph.graph import END, START, MessagesState, StateGraph

    async def call_model(state: MessagesState) -> dict[str, list[Any]]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("model", call_model)
    graph.add_edge(START, "model")
    graph.add_edge("model", END)
    return graph.compile()


async def through_langgraph(
    target: Target, *, timeout: float, total: float, progress: Progress, label: str
) -> AppView:
    """Run a one-node graph under ``astream_events`` and count its token events."""
    from langchain_core.messages import HumanMessage

    http_client = httpx2.AsyncClient(timeout=httpx2.Timeout(total))
    graph, setup_error = _built(_graph_for, target, http_client)  # before the clock starts
    tally = Tally(layer=sc.LANGGRAPH, t_start=_now(), stream_requested=True)
    tally.deadline, tally.unit_kind, tally.unit_name = timeout, "token", "token events"
    tally.facts["waits"] = "AzureChatOpenAI"
    view = AppView(tally, "token events")
    clock = _Deadline(tally, timeout, total)
    events: Any = None
    end = End.CLEAN
    empty = False
    try:
        if setup_error is not None:
            raise setup_error
        events = graph.astream_events({"messages": [HumanMessage(PROMPT)]}, version="v2")
        while True:
            progress.waiting(f"{label}: token event {tally.units + 1}")
            try:
                event = await clock.within(events.__anext__())
            except StopAsyncIteration:
                break
            _see_event(view, event)
    except TimeoutError:
        end = clock.expired(view)
    except Exception as exc:
        end = _failed(view, exc)
        if type(exc) is ValueError and NO_GENERATIONS in str(exc):
            # judged as the langgraph probe judges it: an empty stream, not "some error"
            tally.exc_type = "StreamEmptyError"
            empty = True
    finally:
        progress.done()
        with contextlib.suppress(Exception):
            if events is not None:
                await asyncio.wait_for(events.aclose(), 2.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(http_client.aclose(), 2.0)
    tally.finish(end)
    if empty:
        tally.exc_type = "ValueError"  # what the application catches, for describe()
    return view


def _see_event(view: AppView, event: dict[str, Any]) -> None:
    kind = event.get("event")
    data = event.get("data") or {}
    if kind == "on_chat_model_stream":
        view.tally.unit()
        chunk = data.get("chunk")
        if chunk is not None and (getattr(chunk, "content", None) or chunk.tool_call_chunks):
            view.tally.content_units += 1
    elif kind == "on_chat_model_end":
        message = data.get("output")
        content = getattr(message, "content", None)
        view.answer_chars = len(content) if isinstance(content, str) else 0
        meta = getattr(message, "response_metadata", None) or {}
        reason = meta.get("finish_reason")
        if reason:
            view.tally.finish_reasons.append(str(reason))
        if getattr(message, "usage_metadata", None):
            view.usage = True
