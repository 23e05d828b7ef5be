"""The doctor's words: one plain sentence per step, and the action for a verdict.

Pure functions over the steps' classified evidence (no I/O). :func:`summarize` says
what one step saw; :func:`action` says what the endpoint does, whether
non-streaming works, and what to change.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from chunkwatch import semconv as sc
from chunkwatch.ledger import Tally
from chunkwatch.outcomes import End, Outcome

if TYPE_CHECKING:
    from chunkwatch.doctor.agent_steps import AppView
    from chunkwatch.doctor.diagnosis import Step
    from chunkwatch.doctor.wire_step import Wire

__all__ = ["OK_ACTION", "action", "ms", "summarize"]


# -- evidence: one plain sentence per step ---------------------------------------------------


def ms(seconds: float | None) -> str:
    """``12 ms``, ``12.3 s``, or ``-``."""
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


_END_WORDS = {
    End.CLEAN: "closed cleanly",
    End.ABRUPT: "the connection dropped",
    End.TIMEOUT: "the doctor gave up",
    End.CLOSED: "closed by the doctor",
    End.ABANDONED: "abandoned",
    End.ERROR: "ended by an error",
}


def summarize(step: Step) -> str:
    """One plain sentence: what this step saw."""
    head = f"Step {step.number}, {step.title}"
    if step.wire is not None:
        return f"{head}: {_wire_sentence(step, step.wire)}"
    assert step.app is not None
    return f"{head}: {_app_sentence(step.app)}"


def _wire_sentence(step: Step, wire: Wire) -> str:
    t = wire.tally
    if t.status is None:
        if t.end is End.TIMEOUT:
            return f"no response headers within {ms(wire.seconds(t.t_end))}."
        return f"no response: {wire.error or 'the connection failed'}."
    ct = (t.content_type or "no content-type").split(";")[0].strip()
    framing = []
    if t.content_length is not None:
        framing.append(f"Content-Length {t.content_length}")
    if wire.transfer_encoding:
        framing.append(wire.transfer_encoding)
    if t.content_encoding:
        framing.append(f"Content-Encoding {t.content_encoding}")
    http = f"HTTP {t.status} {ct}" + (f" ({', '.join(framing)})" if framing else "")
    http += f", headers after {ms(wire.seconds(t.t_headers))}"
    ended = f"{_END_WORDS.get(t.end, 'ended') if t.end else 'ended'} after {ms(t.duration)}"
    if t.status >= 400:
        said = f': "{wire.api_error}"' if wire.api_error else ""
        return f"{http}{said}; {ended}."
    if not t.stream_requested:
        if t.malformed:
            return f"{http}, but the body is not a JSON completion; {ended}."
        if not t.units:
            return f"{http}, but no answer in the completion; {ended}."
        reasons = f" (finish_reason {', '.join(t.finish_reasons)})" if t.finish_reasons else ""
        return f"{http}, an answer of {wire.answer_chars or 0} characters{reasons}; {ended}."
    if not wire.is_sse:
        what = (
            f"a complete answer of {wire.answer_chars} characters in one body"
            if wire.answer_chars
            else (f'"{wire.api_error}"' if wire.api_error else f"{t.bytes} bytes")
        )
        return f"{http} to a stream request: {what}, no events; {ended}."
    parts = [http]
    counts = f"{t.units} data events, {t.comments} comments"
    if t.units:
        first, last = wire.seconds(t.t_first), wire.seconds(t.t_last)
        counts += f" (first after {ms(first)}, last after {ms(last)})"
    parts.append(counts)
    parts.append("[DONE]" if t.terminal_seen else "no [DONE]")
    reasons = ", ".join(dict.fromkeys(t.finish_reasons))
    parts.append(f"finish_reason {reasons}" if reasons else "no finish_reason")
    if t.error_events:
        parts.append(f'an error event: "{wire.api_error or "no message"}"')
    if t.malformed or t.gzip_magic or (t.pending_fields and not t.units):
        parts.append(_malformed_words(t))
    if t.stalled:
        which = "first" if t.stalled == "first_chunk" else "next"
        parts.append(f"no {which} data event within {t.deadline or 0:g} s")
    if wire.total_limit:
        parts.append("still streaming at the doctor's total limit")
    gaps = wire.event_gaps_ns
    if len(gaps) >= 2:
        parts.append(
            f"event gaps median {ms(statistics.median(gaps) / 1e9)}, max {ms(max(gaps) / 1e9)}"
        )
    return f"{', '.join(parts)}; {ended}."


def _malformed_words(t: Tally) -> str:
    if t.gzip_magic:
        return "a gzip-compressed body without Content-Encoding"
    if t.pending_fields and not t.units:
        return "data lines never followed by the blank line that ends an event"
    why = t.malformed_why
    return f"{t.malformed} malformed payloads ({why})" if why else "malformed payloads"


def _app_sentence(view: AppView) -> str:
    t = view.tally
    unit = view.unit
    parts = [f"{t.units} {unit}"]
    if t.units:
        parts.append(f"an answer of {view.answer_chars} characters")
        reasons = ", ".join(dict.fromkeys(t.finish_reasons))
        parts.append(f"finish_reason {reasons}" if reasons else "no finish_reason")
    if view.exception:
        sentence = f"{', '.join(parts)}, then after {ms(t.duration)} {view.exception}"
    else:
        sentence = f"{', '.join(parts)} and no exception after {ms(t.duration)}"
    if t.end is End.TIMEOUT:
        if view.total_limit:
            sentence += " (still streaming at the doctor's total limit)"
        else:
            sentence += (
                f" (the doctor gave up: nothing for {t.deadline or 0:g} s; "
                f"{_WAITS.get(str(t.facts.get('waits')), _WAITS['AzureChatOpenAI'])})"
            )
    seen = _app_sees(view)
    return f"{sentence} — {seen}."


_WAITS = {
    "AzureChatOpenAI": "AzureChatOpenAI sets no timeout, so the application waits until the "
    "endpoint closes",
    "the openai SDK's default read timeout": "the openai SDK's default read timeout is 600 s "
    "between bytes, and keepalive comments reset it",
}


def _app_sees(view: AppView) -> str:
    t = view.tally
    if t.end is End.TIMEOUT:
        return "the application hangs"
    if view.exception and t.outcome is Outcome.EMPTY:
        return "the application gets an error that names no cause"
    if view.exception:
        return "the application gets an exception" + (" after part of an answer" if t.units else "")
    if not t.content_units:
        return "the application gets an empty answer and no error"
    if t.layer == sc.SDK and not t.terminal_seen:
        return "the application gets a cut-off answer and no error"
    return "the application gets the answer"


# -- actions ---------------------------------------------------------------------------------

OK_ACTION = "Nothing to do: the endpoint streams the way the application expects."
_GUARD = "or run the service with the guard in updates mode meanwhile"
# outcome -> (what the endpoint does, with {who}; what to do about it)
_ACTIONS: dict[Outcome, tuple[str, str]] = {
    Outcome.EMPTY: (
        "{who} accepts stream=true but forwards no events",
        "enable SSE pass-through (e.g. disable response buffering) on the gateway, " + _GUARD,
    ),
    Outcome.BUFFERED: (
        "{who} holds the whole stream and releases it in one burst at the end",
        "disable response buffering for text/event-stream on the gateway (nginx "
        "`proxy_buffering off` or `X-Accel-Buffering: no`; Azure API Management without "
        "`buffer-response`); answers arrive, only without token streaming",
    ),
    Outcome.WRONG_CONTENT_TYPE: (
        "{who} answers stream=true with a body that is not text/event-stream",
        "exempt the chat completions route from response transformation, content inspection "
        "and caching on the gateway, " + _GUARD,
    ),
    Outcome.TRUNCATED: (
        "{who} cuts the stream before its end",
        "raise the gateway's read / idle timeouts and response size limits for streaming "
        "routes (e.g. nginx `proxy_read_timeout`, the load balancer's idle timeout)",
    ),
    Outcome.STALLED: (
        "{who} accepts the request and then sends no data",
        "check the gateway's route and timeouts to the model; give the client a timeout "
        "(AzureChatOpenAI has none by default) or chunkwatch deadlines with abort=True so a "
        "stall fails fast, " + _GUARD,
    ),
    Outcome.MALFORMED: (
        "{who} sends bytes that are not a valid event stream of JSON chunks",
        "turn off compression, rewriting and re-chunking of text/event-stream responses on "
        "the gateway",
    ),
    Outcome.ERROR_EVENT: (
        "{who} reports an error inside the stream",
        "read the error event's message: retry, or check the model's health and quota",
    ),
    Outcome.HTTP_ERROR: (
        "{who} refuses the request",
        "check the URL, deployment, api-version and API key (401/403/404) and quotas (429)",
    ),
    Outcome.ERROR: (
        "{who} could not be reached or answered nothing",
        "check the URL, DNS, TLS, proxies and firewalls between here and the endpoint",
    ),
}
_HTTP_QUALIFIED = {
    "stream_options rejected": (
        "the gateway (or the API version behind it) rejects the stream_options field that "
        "AzureChatOpenAI sends with every streaming request",
        "let the gateway pass stream_options through or use an api-version that accepts it; "
        "meanwhile build AzureChatOpenAI with stream_usage=False (no stream_options, no token "
        "usage in streams)",
    ),
    "stream rejected": (
        "the gateway refuses streaming requests",
        "allow stream=true in the gateway's policy for the chat completions route, " + _GUARD,
    ),
    "non-streaming requests only": (
        "the gateway refuses non-streaming requests while streaming works",
        "the application's streaming path works; fix the gateway's policy before relying on "
        "the guard's updates mode, which sends non-streaming requests",
    ),
}


def action(
    outcome: Outcome,
    layer: str,
    qualifier: str | None,
    *,
    control_ok: bool,
    direct: bool,
    at_model: bool = False,
) -> str:
    """What to do about ``outcome`` at ``layer``. ``at_model``: the direct endpoint fails
    too; ``control_ok``: the non-streaming control worked; ``direct``: it was probed."""
    if at_model:
        what = _ACTIONS.get(outcome, ("{who} fails", ""))[0].format(who="the model endpoint")
        return (
            f"{what}, called directly as well as through the gateway: the gateway is not the "
            "cause; take it up with the model endpoint's owner (deployment status, quota, "
            f"api-version), {_GUARD.removeprefix('or ')}"
        )
    if layer in (sc.SDK, sc.LANGGRAPH):
        library = "the openai SDK" if layer == sc.SDK else "LangGraph / langchain-openai"
        return (
            f"the wire is healthy but {library} ends with {outcome}: check the library versions "
            "and how the application reads the stream (docs/faults.md lists known behaviours)"
        )
    if outcome is Outcome.HTTP_ERROR and qualifier in _HTTP_QUALIFIED:
        what, fix = _HTTP_QUALIFIED[qualifier]
    else:
        what, fix = _ACTIONS.get(outcome, ("{who} fails", "see docs/outcomes.md"))
        what = what.format(who="the gateway")
    if qualifier == "non-streaming requests only":
        return f"{what}: {fix}"
    if outcome is Outcome.HTTP_ERROR and qualifier == "not stream-specific":
        return f"{what} with or without streaming: {fix}"
    clause = "non-streaming works" if control_ok else "non-streaming fails too"
    hint = (
        "" if direct else " (run again with --direct MODEL_URL to tell the gateway from the model)"
    )
    return f"{what}; {clause}: {fix}{hint}"
