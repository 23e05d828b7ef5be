"""The ``sdk`` probe's stream half: what one SDK call handed over, counted chunk by chunk.

:class:`_Chunks` is the per-call state (counts, finish reasons, usage) and its
:class:`~chunkwatch.probes.lifecycle.Ending` (finishing once). A returned ``Stream`` /
``AsyncStream`` of exactly the SDK's class is given a counting subclass
(:func:`_adoptive_classes`), whose ``__iter__``/``__aiter__`` return the counting
generator (:func:`~chunkwatch.probes.lifecycle.relay`) in place of the SDK's own
pass-through; a stream of any other type has the same generator put in front of its
iterator (:func:`_watch_sync`, :func:`_watch_async`).

A chunk without choices is never one of the model's tokens: ``choices: []`` (Azure's
prompt-filter results, the usage chunk) is counted as an annotation, and a stream of
nothing else is ``empty`` (:class:`chunkwatch.StreamEmptyError`); a payload with no
``choices`` at all (``{"message": ...}``, which the SDK passes on as a chunk) is an error
delivered in-band: ``error_event``, its text noted for the verdict, and a stream it cut
short (no ``finish_reason``) raises :class:`chunkwatch.StreamTruncatedError`.

Private internals of the SDK (checked with openai 3.54.0, CPython 3.11.7): the counting
subclass (given by ``__class__``) and the wrapper read and replace ``Stream._iterator``
/ ``AsyncStream._iterator``, the generator ``__iter__``/``__next__`` pass on: no layer
in front of it per chunk (the saving: ``bench/probe_instructions.py``, "sdk"). Checked
first (``sdk.iterator_gap``: the SDK's methods read it; per stream: the stream has one);
if not as checked, :func:`_watch_public` counts the stream over its class's public
``__iter__``/``__aiter__``, and an instrumentation error ``private:...`` is counted.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import Any

from chunkwatch import semconv as sc
from chunkwatch.errors import StreamEmptyError, StreamTruncatedError
from chunkwatch.ledger import Tally
from chunkwatch.outcomes import (
    End,
    Outcome,
    Payload,
    payload_kind,
    upstream_text,
)
from chunkwatch.probes.lifecycle import Ending, aclosing, closing, relay, relay_async
from chunkwatch.runtime import Runtime
from chunkwatch.verdict import judge

_now = time.perf_counter_ns
# Enum members as module globals, read per stream (why: chunkwatch.outcomes).
_CLEAN, _OK, _EMPTY = End.CLEAN, Outcome.OK, Outcome.EMPTY
_TRUNCATED, _ERROR_EVENT = Outcome.TRUNCATED, Outcome.ERROR_EVENT


class _Chunks(Ending):
    """Per-stream state: counts chunks, notes finish reasons and usage, finishes once."""

    __slots__ = ("__weakref__", "text")
    rt: Runtime

    def __init__(self, rt: Runtime, tally: Tally) -> None:
        super().__init__(tally, rt)
        self.text: list[str] | None = [] if rt.capture_content else None

    def see(self, chunk: Any) -> None:
        tally = self.tally
        now = _now()  # Tally.unit, inlined (bench/probe_instructions.py)
        last = tally.t_last
        if last is None:
            tally.t_first = now
        elif now - last > tally.max_gap_ns:
            tally.max_gap_ns = now - last
        tally.t_last = now
        tally.units += 1
        choices = chunk.choices  # None: the payload was not a chunk (the SDK fills no field)
        if not choices:  # no completion: an annotation (prompt filter, usage), or an error
            self._no_choice(chunk, choices)  # (this way round the model's chunks jump no more)
        else:
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

    def _no_choice(self, chunk: Any, choices: Any) -> None:
        """A chunk without choices (never one of the model's tokens): ``choices: []``
        (Azure's prompt-filter results, the usage chunk) is an annotation; an object with
        no ``choices`` at all (``{"message": ...}``) is an error the upstream sent in-band."""
        tally = self.tally
        if choices is not None:  # choices: [] (the SDK raised already for an "error" key)
            tally.annotations += 1
            return
        dump = getattr(chunk, "model_dump", None)
        fields = dump(exclude_unset=True) if dump is not None else {}
        kind = payload_kind(fields)
        if kind is Payload.ANNOTATION:
            tally.annotations += 1
        elif kind is Payload.ERROR:
            tally.error_events += 1
            if tally.upstream_said is None:
                tally.upstream_said = upstream_text(fields)

    def _facts(self, end: End, exc: BaseException | None) -> None:
        tally = self.tally
        if exc is not None:
            status = getattr(exc, "status_code", None)  # openai.APIStatusError
            if isinstance(status, int):
                tally.status = status
            elif type(exc).__name__ == "APIError":  # the SDK's own: an error event in-band
                body = getattr(exc, "body", None)
                said = {"error": body} if isinstance(body, dict) else {"message": str(exc)}
                tally.upstream_said = upstream_text(said)
        _span_facts(self.rt, tally, "".join(self.text) if self.text is not None else None)

    def _ended(self, end: End) -> None:
        _genai_metrics(self.rt, self.tally)

    def clean(self) -> ValueError | None:
        """The stream ran out: finish it (once) and return the error to raise, if any."""
        if self.tally.finished:
            return None
        self.end(_CLEAN)
        return self.end_error()

    def end_error(self) -> ValueError | None:
        """The error a cleanly ended stream raises: no completion (zero chunks, or chunks
        without choices), or cut before its end (no finish_reason; an in-band error
        without one too: the upstream's text is in the verdict)."""
        tally = self.tally
        if not self.rt.translate_errors or tally.exc_type or not tally.stream_requested:
            return None
        ledger = tally.ledger
        outcome = tally.outcome
        cut = outcome is _TRUNCATED or (outcome is _ERROR_EVENT and not tally.terminal_seen)
        if outcome is _EMPTY or (cut and outcome is _ERROR_EVENT and not tally.content_units):
            return StreamEmptyError(judge(ledger) if ledger is not None else None)
        if cut:
            return StreamTruncatedError(judge(ledger) if ledger else None, tally.units)
        return None


def _span_facts(rt: Runtime, tally: Tally, completion: str | None) -> None:
    span = tally.span
    if span is None or not span.is_recording():  # unsampled, or the no-op tracer's
        return
    attrs: dict[str, Any] = {sc.A_CONTENT_CHUNKS: tally.content_units}
    if tally.finish_reasons:
        attrs[sc.GEN_AI_RESPONSE_FINISH_REASONS] = tally.finish_reasons
    if tally.time_to_first is not None and tally.stream_requested:
        attrs[sc.GEN_AI_RESPONSE_TTFC] = tally.time_to_first
    response = tally.facts.get("response")
    if response is not None and response[0] is not None:  # None: the first was no chunk
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
    if tally.genai is None:  # not opened by the sdk probe's _open: no GenAI labels
        return
    try:
        provider, model = tally.genai
        usage = tally.facts.get("usage")
        tokens = (None, None) if usage is None else (usage.prompt_tokens, usage.completion_tokens)
        start, t_first, t_end = tally.t_start, tally.t_first, tally.t_end  # the tally's
        # time_to_first and duration, without their two calls (a finished tally has t_end)
        first = (t_first - start) / 1e9 if tally.stream_requested and t_first is not None else None
        duration = tally.duration if t_end is None else (t_end - start) / 1e9
        error = None if tally.outcome is _OK else str(tally.outcome)
        ledger = tally.ledger  # Runtime.trace_id, without its call once the request's is known
        if ledger is not None and ledger.trace_known:
            trace_id = ledger.trace_id
        else:
            trace_id = rt.trace_id(tally)
        rt.metrics.genai.record(("chat", provider, model), error, duration, first, tokens, trace_id)
    except Exception:
        rt.bookkeeping_error(sc.SDK, "metrics")


_PUBLIC: dict[type, type] = {}  # a stream class -> its publicly counted subclass


def _watch_public(stream: Any, chunks: _Chunks, gap: str) -> None:
    """Count ``stream`` with public API only (its private iterator is not as checked:
    ``gap`` is counted): a subclass passes on a counting generator over its class's own
    ``__iter__``/``__aiter__`` (one generator layer more), and ``close`` finishes."""
    chunks.rt.bookkeeping_error(sc.SDK, gap)
    cls = type(stream)
    if hasattr(cls, "__anext__"):
        counted: Any = relay_async(cls.__aiter__(stream), chunks, chunks.see)
    else:
        counted = relay(cls.__iter__(stream), chunks, chunks.see)
    made = _PUBLIC.get(cls) or _PUBLIC.setdefault(cls, _public_class(cls))
    setattr(stream, "_chunkwatch", chunks)  # noqa: B010 (mypy narrows the type to object)
    setattr(stream, "_chunkwatch_iter", counted)  # noqa: B010
    stream.__class__ = made
    chunks.abandon_with(stream)


def _public_class(cls: type) -> type:
    if hasattr(cls, "__anext__"):

        async def anext_(self: Any) -> Any:
            return await self._chunkwatch_iter.__anext__()

        async def aclose(self: Any) -> None:
            await aclosing(self._chunkwatch, partial(cls.close, self))  # type: ignore[attr-defined]

        ns: dict[str, Any] = {"__anext__": anext_, "__aiter__": _own_iter, "close": aclose}
    else:

        def next_(self: Any) -> Any:
            return self._chunkwatch_iter.__next__()

        def close(self: Any) -> None:
            closing(self._chunkwatch, partial(cls.close, self))  # type: ignore[attr-defined]

        ns = {"__next__": next_, "__iter__": _own_iter, "close": close}
    return type(f"Watched{cls.__name__}", (cls,), {**ns, "__module__": __name__})


def _own_iter(self: Any) -> Any:
    return self._chunkwatch_iter


def _watch_async(stream: Any, chunks: _Chunks) -> None:
    """A stream of another type: a counting generator in front of its iterator."""
    if "_iterator" not in vars(stream):
        _watch_public(stream, chunks, "private:AsyncStream._iterator")
        return
    stream._iterator = relay_async(stream._iterator, chunks, chunks.see)
    stream.close = partial(aclosing, chunks, stream.close)
    chunks.abandon_with(stream)


def _watch_sync(stream: Any, chunks: _Chunks) -> None:
    if "_iterator" not in vars(stream):
        _watch_public(stream, chunks, "private:Stream._iterator")
        return
    stream._iterator = relay(stream._iterator, chunks, chunks.see)
    stream.close = partial(closing, chunks, stream.close)
    chunks.abandon_with(stream)


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
                error = chunks.clean()
                if error is None:
                    raise
            except BaseException as exc:
                chunks.fail(exc)
                raise
            else:
                try:
                    chunks.see(chunk)
                except Exception:
                    chunks.rt.bookkeeping_error(sc.SDK, "chunk")
                return chunk
            raise error

        def __aiter__(self) -> AsyncIterator[Any]:  # in place of the SDK's pass-through
            # The stream lives as long as the relay: in ``for chunk in ...create(...)``
            # nothing else holds it, and it would be collected (and finished as
            # ``abandoned``) when its ``__stream__`` ends, before the relay sees the end.
            chunks = self._chunkwatch
            return relay_async(self._iterator, chunks, chunks.see, self)

        async def close(self) -> None:
            await aclosing(self._chunkwatch, super().close)

        def __del__(self) -> None:  # collected before it ended: abandoned (else a no-op)
            self._chunkwatch.abandon()

    class WatchedStream(openai.Stream):  # type: ignore[type-arg]
        _chunkwatch: _Chunks

        def __next__(self) -> Any:
            chunks = self._chunkwatch
            try:
                chunk = self._iterator.__next__()
            except StopIteration:
                error = chunks.clean()
                if error is None:
                    raise
            except BaseException as exc:
                chunks.fail(exc)
                raise
            else:
                try:
                    chunks.see(chunk)
                except Exception:
                    chunks.rt.bookkeeping_error(sc.SDK, "chunk")
                return chunk
            raise error

        def __iter__(self) -> Iterator[Any]:  # the stream lives as long: see __aiter__
            chunks = self._chunkwatch
            return relay(self._iterator, chunks, chunks.see, self)

        def close(self) -> None:
            closing(self._chunkwatch, super().close)

        def __del__(self) -> None:
            self._chunkwatch.abandon()

    return WatchedAsyncStream, WatchedStream
