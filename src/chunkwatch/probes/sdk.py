"""The ``sdk`` probe: what the openai SDK handed to the application.

Seam: ``openai.resources.chat.completions.Completions.create`` and
``AsyncCompletions.create`` — every chat call, streaming or not. The span
``chat {model}`` (kind CLIENT, GenAI semantic conventions) is current while the
request is sent, so the ``gateway`` span is its child, and ends with the stream.
For ``stream=True`` the returned ``Stream`` / ``AsyncStream`` is watched: the
unit is a chunk; content-bearing chunks, finish reasons and usage are noted. The
SDK's own stream is given a counting subclass (its ``__iter__``/``__next__``,
``__aiter__``/``__anext__`` count as they pass chunks on: no generator layer is
added); a stream of a subclass or another type has its iterator wrapped.

Finalizes exactly once: iterator exhausted (``clean``), an exception (the same
exception object propagates), ``close()`` (``closed``), or garbage-collected
unfinished (``abandoned``).

A stream that ends cleanly with zero chunks raises
:class:`chunkwatch.StreamEmptyError` (a ``ValueError``) carrying the verdict,
where the bare SDK would end silently (``translate_errors=False`` turns this
off). Every other SDK error passes through unchanged.

Content: prompts and completions are recorded only with ``capture_content=True``
(then truncated to 1000 characters).
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from chunkwatch import semconv as sc
from chunkwatch.errors import StreamEmptyError, StreamTruncatedError
from chunkwatch.ledger import Tally, bind, current_ledger
from chunkwatch.outcomes import End, Outcome, end_for_exception
from chunkwatch.probes._patch import patch, unpatch
from chunkwatch.runtime import Runtime, active, extra_span_attributes, trace_id_of

__all__ = ["instrument", "uninstrument"]

_OWNER = "chunkwatch.sdk"


def _provider(resource: Any) -> str:
    client = getattr(resource, "_client", None)
    name = type(client).__name__ if client is not None else ""
    return sc.GEN_AI_PROVIDER_AZURE if "Azure" in name else sc.GEN_AI_PROVIDER_OPENAI


def _open(rt: Runtime, resource: Any, kwargs: dict[str, Any]) -> Tally:
    client = getattr(resource, "_client", None)
    model = str(kwargs.get("model") or getattr(client, "_azure_deployment", None) or "unknown")
    stream = bool(kwargs.get("stream"))
    provider = _provider(resource)
    upstream = rt.upstream_for(str(getattr(client, "base_url", "") or "unknown"))
    attrs: dict[str, Any] = {
        sc.GEN_AI_OPERATION_NAME: "chat",
        sc.GEN_AI_PROVIDER_NAME: provider,
        sc.GEN_AI_REQUEST_MODEL: model,
        sc.GEN_AI_REQUEST_STREAM: stream,
        sc.A_UPSTREAM: upstream,
    }
    attrs.update(extra_span_attributes())
    prompt = rt.content(_last_user_text(kwargs.get("messages")))
    if prompt is not None:
        attrs[sc.A_PROMPT] = prompt
    span = rt.start_span(f"chat {model}", sc.SDK, kind=SpanKind.CLIENT, attributes=attrs)
    tally = rt.open(
        sc.SDK,
        upstream=upstream,
        span=span,
        stream_requested=stream,
        terminal_known=stream,
        watch=stream,  # deadlines are for streams: a buffered answer takes the whole generation
    )
    tally.facts["genai"] = (provider, model)
    return tally


def _last_user_text(messages: Any) -> str | None:
    try:
        for msg in reversed(list(messages or [])):
            if msg.get("role") == "user":
                content = msg.get("content")
                return content if isinstance(content, str) else str(content)
    except Exception:
        return None
    return None


class _Chunks:
    """Per-stream state: counts chunks, notes finish reasons and usage, finishes once."""

    __slots__ = ("__weakref__", "rt", "tally", "text")

    def __init__(self, rt: Runtime, tally: Tally) -> None:
        self.rt = rt
        self.tally = tally
        self.text: list[str] | None = [] if rt.capture_content else None

    def see(self, chunk: Any) -> None:
        tally = self.tally
        tally.unit()
        choices = chunk.choices
        if choices:
            choice = choices[0]
            delta = choice.delta
            if delta is not None and (delta.content or delta.tool_calls):
                tally.content_units += 1
                if self.text is not None and delta.content:
                    self.text.append(delta.content)
            reason = choice.finish_reason
            if reason is not None:
                if reason not in tally.finish_reasons:  # bounded: no growth per chunk
                    tally.finish_reasons.append(reason)
                tally.terminal_seen = True
        if chunk.usage is not None:
            tally.facts["usage"] = chunk.usage
        if tally.units == 1:
            tally.facts["response"] = (chunk.id, chunk.model)

    def end(self, end: End, exc: BaseException | None = None) -> None:
        tally = self.tally
        if tally.finished:
            return
        if exc is not None:
            tally.exc_type = type(exc).__name__
            status = getattr(exc, "status_code", None)  # openai.APIStatusError
            if isinstance(status, int):
                tally.status = status
        _span_facts(self.rt, tally, "".join(self.text) if self.text is not None else None)
        tally.finish(end)
        _genai_metrics(self.rt, tally)

    def exhausted(self) -> ValueError | None:
        """The stream ran out: finish it (once) and return the error to raise, if any."""
        if self.tally.finished:
            return None
        self.end(End.CLEAN)
        return self.end_error()

    def end_error(self) -> ValueError | None:
        """The error a cleanly ended stream raises: zero chunks, or cut before its end."""
        tally = self.tally
        if not self.rt.translate_errors or tally.exc_type or not tally.stream_requested:
            return None
        ledger = tally.ledger
        if not tally.units:
            return StreamEmptyError(ledger.verdict() if ledger is not None else None)
        if tally.outcome is Outcome.TRUNCATED:
            return StreamTruncatedError(ledger.verdict() if ledger else None, tally.units)
        return None


def _span_facts(rt: Runtime, tally: Tally, completion: str | None) -> None:
    span = tally.span
    if span is None:
        return
    attrs: dict[str, Any] = {sc.A_CONTENT_CHUNKS: tally.content_units}
    if tally.finish_reasons:
        attrs[sc.GEN_AI_RESPONSE_FINISH_REASONS] = tally.finish_reasons
    if tally.time_to_first is not None and tally.stream_requested:
        attrs[sc.GEN_AI_RESPONSE_TTFC] = tally.time_to_first
    response = tally.facts.get("response")
    if response is not None:
        attrs[sc.GEN_AI_RESPONSE_ID], attrs[sc.GEN_AI_RESPONSE_MODEL] = response
    usage = tally.facts.get("usage")
    if usage is not None:
        attrs[sc.GEN_AI_USAGE_INPUT_TOKENS] = usage.prompt_tokens
        attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS] = usage.completion_tokens
    text = rt.content(completion)
    if text is not None:
        attrs[sc.A_COMPLETION] = text
    span.set_attributes(attrs)


def _genai_metrics(rt: Runtime, tally: Tally) -> None:
    try:
        provider, model = tally.facts["genai"]
        error = "" if tally.outcome == "ok" else str(tally.outcome)
        ex = rt.metrics.exemplar(trace_id_of(tally.span))
        rt.metrics.genai_duration.labels("chat", provider, model, error).observe(
            tally.duration, exemplar=ex
        )
        if tally.time_to_first is not None and tally.stream_requested:
            rt.metrics.genai_ttfc.labels("chat", provider, model).observe(
                tally.time_to_first, exemplar=ex
            )
    except Exception:
        rt.bookkeeping_error(sc.SDK, "metrics")


def _finish_response(rt: Runtime, tally: Tally, result: Any) -> None:
    """A non-stream response: one unit, finish reasons and usage from the body."""
    chunks = _Chunks(rt, tally)
    try:
        tally.unit()
        for choice in getattr(result, "choices", None) or []:
            if choice.finish_reason:
                tally.finish_reasons.append(choice.finish_reason)
            message = getattr(choice, "message", None)
            if message is not None and (message.content or message.tool_calls):
                tally.content_units += 1
                if chunks.text is not None and message.content:
                    chunks.text.append(message.content)
        if getattr(result, "usage", None) is not None:
            tally.facts["usage"] = result.usage
        if hasattr(result, "id"):
            tally.facts["response"] = (result.id, result.model)
    except Exception:
        rt.bookkeeping_error(sc.SDK, "response")
    chunks.end(End.CLEAN)


async def _counted_async(inner: Any, chunks: _Chunks) -> AsyncIterator[Any]:
    """``inner``'s chunks, counted as they pass; finishes the tally once."""
    see = chunks.see
    try:
        async for chunk in inner:
            try:
                see(chunk)
            except Exception:
                chunks.rt.bookkeeping_error(sc.SDK, "chunk")
            yield chunk
    except GeneratorExit:
        chunks.end(End.CLOSED)
        raise
    except BaseException as exc:
        chunks.end(end_for_exception(exc), exc)
        raise
    error = chunks.exhausted()
    if error is not None:
        raise error


def _counted_sync(inner: Any, chunks: _Chunks) -> Iterator[Any]:
    """The sync twin of :func:`_counted_async`."""
    see = chunks.see
    try:
        for chunk in inner:
            try:
                see(chunk)
            except Exception:
                chunks.rt.bookkeeping_error(sc.SDK, "chunk")
            yield chunk
    except GeneratorExit:
        chunks.end(End.CLOSED)
        raise
    except BaseException as exc:
        chunks.end(end_for_exception(exc), exc)
        raise
    error = chunks.exhausted()
    if error is not None:
        raise error


def _watch_async(stream: Any, chunks: _Chunks) -> None:
    """A stream of another type: a counting generator in front of its iterator."""
    stream._iterator = _counted_async(stream._iterator, chunks)
    original_close = stream.close

    async def close() -> None:
        try:
            await original_close()
        finally:
            chunks.end(End.CLOSED)

    stream.close = close
    weakref.finalize(stream, _abandon, chunks)


def _watch_sync(stream: Any, chunks: _Chunks) -> None:
    stream._iterator = _counted_sync(stream._iterator, chunks)
    original_close = stream.close

    def close() -> None:
        try:
            original_close()
        finally:
            chunks.end(End.CLOSED)

    stream.close = close
    weakref.finalize(stream, _abandon, chunks)


def _adoptive_classes() -> tuple[type, type]:
    """Subclasses of the SDK's ``AsyncStream`` and ``Stream`` that count in the SDK's own
    pass-through (``__aiter__``/``__anext__``, ``__iter__``/``__next__``). A returned
    stream of exactly the SDK's class is given one (``__class__``): no generator layer is
    added in front of its iterator, which the service resumes and suspends per chunk."""
    import openai

    class WatchedAsyncStream(openai.AsyncStream):  # type: ignore[type-arg]
        _chunkwatch: _Chunks

        async def __anext__(self) -> Any:
            chunks = self._chunkwatch
            try:
                chunk = await self._iterator.__anext__()
            except StopAsyncIteration:
                error = chunks.exhausted()
                if error is None:
                    raise
            except BaseException as exc:
                chunks.end(end_for_exception(exc), exc)
                raise
            else:
                try:
                    chunks.see(chunk)
                except Exception:
                    chunks.rt.bookkeeping_error(sc.SDK, "chunk")
                return chunk
            raise error

        def __aiter__(self) -> AsyncIterator[Any]:  # in place of the SDK's pass-through
            return _counted_async(self._iterator, self._chunkwatch)

        async def close(self) -> None:
            try:
                await super().close()
            finally:
                self._chunkwatch.end(End.CLOSED)

    class WatchedStream(openai.Stream):  # type: ignore[type-arg]
        _chunkwatch: _Chunks

        def __next__(self) -> Any:
            chunks = self._chunkwatch
            try:
                chunk = self._iterator.__next__()
            except StopIteration:
                error = chunks.exhausted()
                if error is None:
                    raise
            except BaseException as exc:
                chunks.end(end_for_exception(exc), exc)
                raise
            else:
                try:
                    chunks.see(chunk)
                except Exception:
                    chunks.rt.bookkeeping_error(sc.SDK, "chunk")
                return chunk
            raise error

        def __iter__(self) -> Iterator[Any]:
            return _counted_sync(self._iterator, self._chunkwatch)

        def close(self) -> None:
            try:
                super().close()
            finally:
                self._chunkwatch.end(End.CLOSED)

    return WatchedAsyncStream, WatchedStream


def _adopt(stream: Any, chunks: _Chunks, base: type, adopted: type, wrap: Any) -> None:
    """Count ``stream``: give it the counting subclass, or (a subclass of the SDK's own
    class, or another type) wrap its iterator."""
    if type(stream) is base:
        setattr(stream, "_chunkwatch", chunks)  # noqa: B010 (mypy narrows the type to object)
        stream.__class__ = adopted
        weakref.finalize(stream, _abandon, chunks)
    else:
        wrap(stream, chunks)


def _current(tally: Tally) -> AbstractContextManager[Any]:
    """The sdk span as the current span while the request is sent (same frame in and out)."""
    if tally.span is None:
        return nullcontext()
    return trace.use_span(
        tally.span, end_on_exit=False, record_exception=False, set_status_on_exception=False
    )


def _ledger_of(tally: Tally) -> AbstractContextManager[Any]:
    """Outside a request, the call's own ledger is current while it is sent, so the
    gateway tally lands beside this one and the verdict sees both."""
    if current_ledger() is not None:
        return nullcontext()
    return bind(tally.ledger)


def _abandon(chunks: _Chunks) -> None:
    chunks.end(End.ABANDONED)


def _start(rt: Runtime | None, resource: Any, kwargs: dict[str, Any]) -> Tally | None:
    """The call's tally (None: not instrumented, or bookkeeping failed)."""
    if rt is None:
        return None
    try:
        return _open(rt, resource, kwargs)
    except Exception:
        rt.bookkeeping_error(sc.SDK, "open")
        return None


def _sending(tally: Tally) -> AbstractContextManager[Any]:
    """While the request is sent: the sdk span is current, and the call's ledger too."""
    stack = ExitStack()
    stack.enter_context(_current(tally))
    stack.enter_context(_ledger_of(tally))
    return stack


def _received(
    rt: Runtime, tally: Tally, result: Any, stream_cls: type, adopted: type, watch: Any
) -> None:
    """Watch a returned stream; finish a returned response now."""
    if isinstance(result, stream_cls):
        try:
            _adopt(result, _Chunks(rt, tally), stream_cls, adopted, watch)
        except Exception:
            rt.bookkeeping_error(sc.SDK, "wrap")
    else:
        _finish_response(rt, tally, result)


def _make_async(original: Any) -> Any:
    import openai

    adopted = _adoptive_classes()[0]

    async def create(self: Any, *args: Any, **kwargs: Any) -> Any:
        rt = active()
        tally = _start(rt, self, kwargs)
        if rt is None or tally is None:
            return await original(self, *args, **kwargs)
        try:
            with _sending(tally):
                result = await original(self, *args, **kwargs)
        except BaseException as exc:
            _Chunks(rt, tally).end(end_for_exception(exc), exc)
            raise
        _received(rt, tally, result, openai.AsyncStream, adopted, _watch_async)
        return result

    return create


def _make_sync(original: Any) -> Any:
    import openai

    adopted = _adoptive_classes()[1]

    def create(self: Any, *args: Any, **kwargs: Any) -> Any:
        rt = active()
        tally = _start(rt, self, kwargs)
        if rt is None or tally is None:
            return original(self, *args, **kwargs)
        try:
            with _sending(tally):
                result = original(self, *args, **kwargs)
        except BaseException as exc:
            _Chunks(rt, tally).end(end_for_exception(exc), exc)
            raise
        _received(rt, tally, result, openai.Stream, adopted, _watch_sync)
        return result

    return create


def instrument(runtime: Runtime | None = None) -> None:
    """Patch ``Completions.create`` and ``AsyncCompletions.create``. Idempotent."""
    from openai.resources.chat.completions import completions as mod

    patch(_OWNER, mod.AsyncCompletions, "create", _make_async)
    patch(_OWNER, mod.Completions, "create", _make_sync)


def uninstrument() -> None:
    unpatch(_OWNER)
