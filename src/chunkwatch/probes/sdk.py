"""The ``sdk`` probe: what the openai SDK handed to the application.

Seam: ``openai.resources.chat.completions.Completions.create`` and
``AsyncCompletions.create`` — every chat call, streaming or not. The span
``chat {model}`` (kind CLIENT, GenAI semantic conventions) is current while the
request is sent, so the ``gateway`` span is its child, and ends with the stream.
For ``stream=True`` the returned ``Stream`` / ``AsyncStream`` is watched: the
unit is a chunk; content-bearing chunks, finish reasons and usage are noted. The
SDK's own stream is given a counting subclass (its ``__iter__``/``__next__``,
``__aiter__``/``__anext__`` count as they pass chunks on: no generator layer is
added); a stream of a subclass or another type has its iterator wrapped. Both read
the SDK's private ``_iterator``, checked first: where it is not as checked, the
stream is counted through public API and an instrumentation error is counted
(stage ``private:Stream._iterator``; details and versions:
:mod:`chunkwatch.probes._sdk_stream`).

Finalizes exactly once: iterator exhausted (``clean``), an exception (the same
exception object propagates), ``close()`` (``closed``), or garbage-collected
unfinished (``abandoned``).

A stream that ends cleanly with no completion (zero chunks, or only chunks without
choices: prompt-filter annotations, usage) raises
:class:`chunkwatch.StreamEmptyError` (a ``ValueError``) carrying the verdict,
where the bare SDK would end silently (``translate_errors=False`` turns this
off). Every other SDK error passes through unchanged.

Content: prompts and completions are recorded only with ``capture_content=True``
(then truncated to 1000 characters).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from chunkwatch import semconv as sc
from chunkwatch.ledger import Ledger, Tally, bind, current_ledger
from chunkwatch.outcomes import End
from chunkwatch.patching import patch, unpatch
from chunkwatch.probes._sdk_stream import (
    _adoptive_classes,
    _Chunks,
    _watch_async,
    _watch_public,
    _watch_sync,
)
from chunkwatch.runtime import Runtime, active, extra_span_attributes
from chunkwatch.spans import tracing

__all__ = ["instrument", "uninstrument"]

_OWNER = "chunkwatch.sdk"
_DEFAULT_PORTS = {"https": 443, "http": 80}
_NOTHING = nullcontext()  # reusable: it holds no state


def _provider(client: Any) -> str:
    """The GenAI provider of a client, by its class (known once per class)."""
    cls = type(client)
    provider = _PROVIDERS.get(cls)
    if provider is None:
        azure = client is not None and "Azure" in cls.__name__
        provider = sc.GEN_AI_PROVIDER_AZURE if azure else sc.GEN_AI_PROVIDER_OPENAI
        if len(_PROVIDERS) < 64:  # client classes are few; a bound in case they are made
            _PROVIDERS[cls] = provider
    return provider


_PROVIDERS: dict[type, str] = {}


# id(base URL) -> (the URL, the runtime's names, its upstream label): a client's base URL is
# one object for its life, and str() of an httpx URL costs more than the rest of _open.
_UPSTREAMS: dict[int, tuple[Any, Any, str]] = {}


def _upstream_of(rt: Runtime, base_url: Any) -> str:
    known = _UPSTREAMS.get(id(base_url))
    if known is not None and known[0] is base_url and known[1] is rt.names:
        return known[2]
    upstream = rt.upstream_for(str(base_url or "unknown"))
    if len(_UPSTREAMS) >= 64:  # clients come and go: keep a few
        _UPSTREAMS.clear()
    _UPSTREAMS[id(base_url)] = (base_url, rt.names, upstream)  # holds the URL: its id stays
    return upstream


def _base_url(client: Any) -> Any:
    """The client's base URL: its ``_base_url`` (private to openai's ``BaseClient``), the
    object its ``base_url`` property returns (checked with openai 3.54.0:
    tests/test_private_internals.py). The property imports a module of the SDK on every
    read (bench/RESULTS.md, "fourth pass"); another client's is read through it."""
    own = getattr(client, "__dict__", None)
    base_url = own.get("_base_url") if own is not None else None
    return base_url if base_url is not None else getattr(client, "base_url", None)


def _open(rt: Runtime, resource: Any, kwargs: dict[str, Any]) -> Tally:
    client = getattr(resource, "_client", None)
    model = str(kwargs.get("model") or getattr(client, "_azure_deployment", None) or "unknown")
    stream = bool(kwargs.get("stream"))
    provider = _provider(client)
    base_url = _base_url(client)
    upstream = _upstream_of(rt, base_url)
    rt.provider = provider  # the agent spans of later requests name it at their start
    ledger = rt.ledger(sc.SDK)
    if not tracing(rt):  # the no-op tracer: no span, no attributes, no prompt to read
        return _open_tally(rt, ledger, upstream, None, stream, (provider, model))
    attrs: dict[str, Any] = {
        sc.GEN_AI_OPERATION_NAME: "chat",
        sc.GEN_AI_PROVIDER_NAME: provider,
        sc.GEN_AI_REQUEST_MODEL: model,
        sc.GEN_AI_REQUEST_STREAM: stream,
        sc.A_UPSTREAM: upstream,
    }
    host = getattr(base_url, "host", None)  # an httpx URL: the model endpoint (or gateway)
    if host:
        attrs[sc.SERVER_ADDRESS] = host
        port = getattr(base_url, "port", None) or _DEFAULT_PORTS.get(
            getattr(base_url, "scheme", "")
        )
        if port:
            attrs[sc.SERVER_PORT] = port
    attrs.update(extra_span_attributes())
    prompt = rt.content(_last_user_text(kwargs.get("messages")))
    if prompt is not None:
        attrs[sc.A_PROMPT] = prompt
    span = rt.start_span(
        f"chat {model}", sc.SDK, kind=SpanKind.CLIENT, attributes=attrs, ledger=ledger
    )
    return _open_tally(rt, ledger, upstream, span, stream, (provider, model))


def _open_tally(
    rt: Runtime, ledger: Ledger, upstream: str, span: Any, stream: bool, genai: tuple[str, str]
) -> Tally:
    tally = rt.open(
        sc.SDK,
        ledger=ledger,
        upstream=upstream,
        span=span,
        stream_requested=stream,
        terminal_known=stream,
        watch=stream,  # deadlines are for streams: a buffered answer takes the whole generation
    )
    tally.genai = genai
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


def _sending(tally: Tally) -> AbstractContextManager[Any] | None:
    """What is made current while the request is sent (None: nothing, as mostly): the
    sdk span, so that the gateway span is its child (the no-op tracer's is current
    already); and outside a request (or after it ended) the call's own ledger, so that
    the gateway tally lands beside this one and the verdict sees both."""
    span = tally.span
    if span is not None and span is trace.get_current_span():
        span = None
    current = current_ledger()
    own = tally.ledger if current is None or current.closed else None
    if span is None and own is None:
        return None
    return _made_current(span, own)


@contextmanager
def _made_current(span: Any, ledger: Ledger | None) -> Iterator[None]:
    """:func:`_sending`'s span and ledger (either may be None), current for the block."""
    with (
        (
            _NOTHING
            if span is None
            else trace.use_span(
                span, end_on_exit=False, record_exception=False, set_status_on_exception=False
            )
        ),
        _NOTHING if ledger is None else bind(ledger),
    ):
        yield


def _start(rt: Runtime | None, resource: Any, kwargs: dict[str, Any]) -> Tally | None:
    """The call's tally (None: not instrumented, or bookkeeping failed)."""
    if rt is None:
        return None
    try:
        return _open(rt, resource, kwargs)
    except Exception:
        rt.bookkeeping_error(sc.SDK, "open")
        return None


def _received(
    rt: Runtime,
    tally: Tally,
    result: Any,
    stream_cls: type,
    adopted: type,
    watch: Any,
    gap: str | None,
) -> None:
    """Watch a returned stream (through public API only where the SDK's private iterator
    is not as checked: ``gap``); finish a returned response now."""
    if isinstance(result, stream_cls):
        try:
            if gap is None:
                _adopt(result, _Chunks(rt, tally), stream_cls, adopted, watch)
            else:
                _watch_public(result, _Chunks(rt, tally), gap)
        except Exception:
            rt.bookkeeping_error(sc.SDK, "wrap")
    else:
        _finish_response(rt, tally, result)


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


def iterator_gap(cls: type) -> str | None:
    """None when ``cls`` (the SDK's ``Stream`` or ``AsyncStream``) passes on its
    ``_iterator`` in its own iteration methods, as checked; else the stage to count."""
    for name in (
        ("__anext__", "__aiter__") if hasattr(cls, "__anext__") else ("__next__", "__iter__")
    ):
        code = getattr(getattr(cls, name, None), "__code__", None)
        if code is None or "_iterator" not in code.co_names:
            return f"private:{cls.__name__}._iterator"
    return None


def _adopt(stream: Any, chunks: _Chunks, base: type, adopted: type, wrap: Any) -> None:
    """Count ``stream``: give it the counting subclass, or (a subclass of the SDK's own
    class, or another type) wrap its iterator."""
    if type(stream) is base and "_iterator" in vars(stream):
        setattr(stream, "_chunkwatch", chunks)  # noqa: B010 (mypy narrows the type to object)
        stream.__class__ = adopted  # its __del__ ends it abandoned (a finalizer costs more)
    else:
        wrap(stream, chunks)


def _make_async(original: Any) -> Any:
    import openai

    adopted = _adoptive_classes()[0]
    gap = iterator_gap(openai.AsyncStream)

    async def create(self: Any, *args: Any, **kwargs: Any) -> Any:
        rt = active()
        tally = _start(rt, self, kwargs)
        if rt is None or tally is None:
            return await original(self, *args, **kwargs)
        try:
            sending = _sending(tally)  # the sdk span and the ledger current, where they are not
            if sending is None:
                result = await original(self, *args, **kwargs)
            else:
                with sending:
                    result = await original(self, *args, **kwargs)
        except BaseException as exc:
            _Chunks(rt, tally).fail(exc)
            raise
        _received(rt, tally, result, openai.AsyncStream, adopted, _watch_async, gap)
        return result

    return create


def _make_sync(original: Any) -> Any:
    import openai

    adopted = _adoptive_classes()[1]
    gap = iterator_gap(openai.Stream)

    def create(self: Any, *args: Any, **kwargs: Any) -> Any:
        rt = active()
        tally = _start(rt, self, kwargs)
        if rt is None or tally is None:
            return original(self, *args, **kwargs)
        try:
            sending = _sending(tally)  # (as in the async create)
            if sending is None:
                result = original(self, *args, **kwargs)
            else:
                with sending:
                    result = original(self, *args, **kwargs)
        except BaseException as exc:
            _Chunks(rt, tally).fail(exc)
            raise
        _received(rt, tally, result, openai.Stream, adopted, _watch_sync, gap)
        return result

    return create


def instrument(runtime: Runtime | None = None) -> None:
    """Patch ``Completions.create`` and ``AsyncCompletions.create``. Idempotent."""
    from openai.resources.chat.completions import completions as mod

    patch(_OWNER, mod.AsyncCompletions, "create", _make_async)
    patch(_OWNER, mod.Completions, "create", _make_sync)


def uninstrument() -> None:
    unpatch(_OWNER)
