"""The ``langgraph`` probe: what the graph's stream handed to the application.

Seam: ``Pregel.astream_events`` (v1/v2) and ``Pregel.astream`` of compiled
graphs. The outermost call per task is watched (a nested call — a subgraph, or
``astream_events`` running ``astream`` underneath — passes through), as the
span ``invoke_agent {graph}``; the model and HTTP spans of its nodes are its
children. Units: ``on_chat_model_stream`` events under ``astream_events``
(``unit=token``); items under ``astream`` (``unit`` = the stream mode, e.g.
``updates``).

Every event of a graph run passes through the counting generator, a few hundred
a 200-token answer. Under ``astream_events`` v2 it takes the place of
langchain-core's own pass-through (``Runnable._astream_events_v1_v2``, patched on
``Pregel`` only), which re-yields the v2 event stream unchanged and closes it, as
the counting generator does: the chain the service resumes per event is as deep as
the bare one. A langchain-core without that pass-through gets the generator in
front of ``Pregel.astream_events`` instead.

That pass-through and ``_astream_events_implementation_v2`` (the v2 event stream it
re-yields, in ``langchain_core.tracers.event_stream``) are private to langchain-core;
checked with langchain-core 1.7.2 and langgraph 1.2.22 on CPython 3.11.7, and checked
at ``instrument()`` (:func:`_pass_through_gap`: both exist, ``Pregel.astream_events``
reaches ``Runnable.astream_events``, which calls the pass-through, and they take the
arguments passed on). The saving is the
generator layer per event (``bench/probe_instructions.py``, "langgraph"). Where they
are not as checked, ``astream_events`` is wrapped, and every stream so watched counts
``chunkwatch_instrumentation_errors_total{layer="langgraph",stage="private:..."}``.

Error translation: langgraph and langchain-core raise
``ValueError("No generations found in stream.")`` when a node's model call was
streamed and the provider yielded zero chunks; the probe raises
:class:`chunkwatch.StreamEmptyError` from it (a ``ValueError`` subclass, chained
to the original, carrying the verdict). Every other exception passes through
unchanged, as the same object.
"""

from __future__ import annotations

import contextvars
import inspect
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from chunkwatch import semconv as sc
from chunkwatch.errors import NO_GENERATIONS, StreamEmptyError
from chunkwatch.ledger import Tally, current_ledger
from chunkwatch.ledger import _current as _current_ledger_var
from chunkwatch.outcomes import End
from chunkwatch.patching import patch, unpatch
from chunkwatch.probes.lifecycle import Ending
from chunkwatch.runtime import Runtime, active
from chunkwatch.spans import tracing
from chunkwatch.verdict import judge

__all__ = ["instrument", "translate", "uninstrument"]

_OWNER = "chunkwatch.langgraph"
_inside: contextvars.ContextVar[bool] = contextvars.ContextVar("chunkwatch_in_graph", default=False)
_TOKEN_EVENT = "on_chat_model_stream"
_now = time.perf_counter_ns


def is_empty_stream_error(exc: BaseException) -> bool:
    """langchain-core's ``ValueError("No generations found in stream.")``."""
    return type(exc) is ValueError and NO_GENERATIONS in str(exc)


def translate(exc: BaseException, tally: Tally | None = None) -> BaseException:
    """``StreamEmptyError`` for langchain-core's empty-stream ``ValueError``, else ``exc``."""
    if is_empty_stream_error(exc):
        ledger = tally.ledger if tally is not None else None
        return StreamEmptyError(judge(ledger) if ledger is not None else None)
    return exc


class _GraphEnding(Ending):
    """The graph stream's ending: langchain-core's empty-stream ``ValueError`` is
    recorded as ``StreamEmptyError``, and raised as one once the tally finished (the
    verdict it carries includes this layer)."""

    __slots__ = ()
    rt: Runtime

    def _facts(self, end: End, exc: BaseException | None) -> None:
        tally = self.tally
        if exc is not None and is_empty_stream_error(exc):
            tally.exc_type = "StreamEmptyError"
        span, ledger = tally.span, tally.ledger
        if span is not None and ledger is not None and span.is_recording():
            # the provider of the model calls this run made (at its start, only the last
            # one seen in this process was known)
            made = next((t.genai[0] for t in ledger.tallies if t.genai is not None), None)
            if made is not None:
                span.set_attribute(sc.GEN_AI_PROVIDER_NAME, made)

    def fail(self, exc: BaseException) -> None:
        super().fail(exc)  # first: the verdict the translated error carries has this layer
        if self.rt.translate_errors and is_empty_stream_error(exc):
            raise translate(exc, self.tally) from exc


def _agent_attributes(rt: Runtime, graph: Any, config: Any) -> dict[str, Any]:
    """The invoke_agent span's attributes (GenAI agent spans, v1.41): its name — the
    configured one, else the run's ``run_name``, else the graph's (``compile(name=...)``;
    LangGraph's default is "LangGraph") — the conversation (the LangGraph thread), and
    the provider of the model calls, as far as it is known when the run starts."""
    config = config if isinstance(config, dict) else {}
    name = rt.agent_name or config.get("run_name") or getattr(graph, "name", None) or "LangGraph"
    attrs: dict[str, Any] = {
        sc.GEN_AI_OPERATION_NAME: "invoke_agent",
        sc.GEN_AI_AGENT_NAME: str(name),
    }
    configurable = config.get("configurable")
    thread = configurable.get("thread_id") if isinstance(configurable, dict) else None
    if thread is not None:
        attrs[sc.GEN_AI_CONVERSATION_ID] = str(thread)
    if rt.provider is not None:
        attrs[sc.GEN_AI_PROVIDER_NAME] = rt.provider
    return attrs


async def _watch(
    inner: Any, rt: Runtime, graph: Any, unit: str, config: Any = None
) -> AsyncIterator[Any]:
    ledger = rt.ledger(sc.LANGGRAPH)
    if tracing(rt):
        attrs = _agent_attributes(rt, graph, config)
        name = f"{sc.SPAN_AGENT} {attrs[sc.GEN_AI_AGENT_NAME]}"
        span = rt.start_span(name, sc.LANGGRAPH, attributes=attrs, ledger=ledger)
    else:  # the no-op tracer: no span (its would be the request's, which adds nothing)
        span = None
    own = ledger is not current_ledger()  # outside a request: this run's own ledger
    tally = rt.open(sc.LANGGRAPH, ledger=ledger, span=span)
    tally.unit_kind = unit
    tally.unit_name = "token events" if unit == "token" else f"{unit} items"
    tokens = unit == "token"
    inside = _inside.set(True)
    bound = _current_ledger_var.set(tally.ledger) if own else None
    # The no-op tracer's span is the current one already: nothing to make current.
    attached = None
    if span is not None and span is not trace.get_current_span():
        attached = otel_context.attach(trace.set_span_in_context(span))
    try:
        # Not lifecycle.relay_async: every event of the run passes here, and a call per
        # event (relay's callback) was ~450 of this probe's ~1 900 instructions a unit
        # (bench/RESULTS.md), so the counter is inlined; the end is the shared Ending's.
        with _GraphEnding(tally, rt):
            async for item in inner:
                if not tokens or item["event"] == _TOKEN_EVENT:
                    now = _now()  # Tally.unit, inlined (bench/probe_instructions.py)
                    last = tally.t_last
                    if last is None:
                        tally.t_first = now
                    elif now - last > tally.max_gap_ns:
                        tally.max_gap_ns = now - last
                    tally.t_last = now
                    tally.units += 1
                yield item
    finally:
        close = getattr(inner, "aclose", None)  # the graph's own stream ends with ours
        if close is not None:
            await close()
        _restore(attached, span)
        try:
            _inside.reset(inside)
            if bound is not None:
                _current_ledger_var.reset(bound)
        except ValueError:  # finalized in another context: nothing of ours is set there
            pass


def _restore(token: Any, span: Any) -> None:
    """Detach our span only in the context that attached it (no 'Failed to detach')."""
    if token is None or trace.get_current_span() is not span:
        return
    otel_context.detach(token)


def _pass_through_gap() -> str | None:
    """What of langchain-core's private v1/v2 pass-through is not as checked (None: all
    is), as a ``stage`` label."""
    try:
        from langchain_core.runnables.base import Runnable
        from langchain_core.tracers.event_stream import _astream_events_implementation_v2
    except ImportError:
        return "private:_astream_events_implementation_v2"
    from langgraph.pregel import Pregel

    through = getattr(Runnable, "_astream_events_v1_v2", None)
    if not callable(through) or not _calls(Runnable, "_astream_events_v1_v2"):
        return "private:Runnable._astream_events_v1_v2"
    own = Pregel.astream_events is not Runnable.astream_events  # langgraph's: then super()'s
    if own and not _calls(Pregel, "astream_events"):
        return "private:Runnable._astream_events_v1_v2"
    try:
        passed = inspect.signature(through).parameters
        read = inspect.signature(_astream_events_implementation_v2).parameters
    except (TypeError, ValueError):
        return "private:Runnable._astream_events_v1_v2"
    if not {"input", "config", "version"} <= passed.keys() or "config" not in read:
        return "private:Runnable._astream_events_v1_v2"
    return None


def _calls(cls: type, name: str) -> bool:
    """``cls.astream_events``'s code names ``name`` (a call of it, as read at 1.x)."""
    code = getattr(getattr(cls, "astream_events", None), "__code__", None)
    return name in getattr(code, "co_names", ())


def _v2_event_stream() -> Callable[..., Any] | None:
    """langchain-core's v2 event stream, when its ``Runnable`` passes it through
    ``_astream_events_v1_v2`` as checked (:func:`_pass_through_gap`): what the counting
    generator reads."""
    if _pass_through_gap() is not None:
        return None
    from langchain_core.tracers.event_stream import _astream_events_implementation_v2

    return _astream_events_implementation_v2


def _make_pass_through(events_v2: Callable[..., Any]) -> Callable[[Any], Any]:
    def make(original: Any) -> Any:
        def _astream_events_v1_v2(
            self: Any, input: Any, config: Any = None, *, version: str = "v2", **kwargs: Any
        ) -> Any:
            rt = active()
            if rt is None or version not in ("v1", "v2") or _inside.get():
                return original(self, input, config, version=version, **kwargs)
            if version == "v1":  # deprecated: warned about and run by langchain-core
                return _watch(
                    original(self, input, config, version=version, **kwargs),
                    rt,
                    self,
                    "token",
                    config,
                )
            inner = events_v2(self, input, config=config, **kwargs)
            return _watch(inner, rt, self, "token", config)

        return _astream_events_v1_v2

    return make


def _make_astream_events(gap: str | None) -> Callable[[Any], Any]:
    """``astream_events`` wrapped; ``gap``: the pass-through it stands in for is not as
    checked, counted per stream watched (None: there is none to take the place of)."""

    def make(original: Any) -> Any:
        def astream_events(
            self: Any, input: Any, config: Any = None, *, version: str = "v2", **kwargs: Any
        ) -> Any:
            inner = original(self, input, config, version=version, **kwargs)
            rt = active()
            if rt is None or version not in ("v1", "v2") or _inside.get():
                return inner
            if gap is not None:
                rt.bookkeeping_error(sc.LANGGRAPH, gap)
            return _watch(inner, rt, self, "token", config)

        return astream_events

    return make


def _make_astream(original: Any) -> Any:
    def astream(self: Any, input: Any, config: Any = None, **kwargs: Any) -> Any:
        inner = original(self, input, config, **kwargs)
        rt = active()
        if rt is None or _inside.get():
            return inner
        mode = kwargs.get("stream_mode") or "values"
        unit = mode if isinstance(mode, str) else "+".join(mode)
        return _watch(inner, rt, self, unit, config)

    return astream


def instrument(runtime: Runtime | None = None) -> None:
    """Patch ``Pregel``'s event pass-through (or ``astream_events``) and ``astream``.
    Idempotent."""
    from langgraph.pregel import Pregel

    events_v2 = _v2_event_stream()
    if events_v2 is not None:
        patch(
            _OWNER, Pregel, "_astream_events_v1_v2", _make_pass_through(events_v2), inherited=True
        )
    else:
        patch(_OWNER, Pregel, "astream_events", _make_astream_events(_pass_through_gap()))
    patch(_OWNER, Pregel, "astream", _make_astream)


def uninstrument() -> None:
    unpatch(_OWNER)
