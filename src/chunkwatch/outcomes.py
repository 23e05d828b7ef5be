"""The outcome vocabulary and the rules that give every stream exactly one outcome.

Pure logic: no I/O, no library imports. A probe collects :class:`Evidence`
(a :class:`~chunkwatch.ledger.Tally` is one) and :func:`classify` names what it
means. The doctor uses the same rules on the evidence it reads off the wire.

Outcomes (also used as ``error.type`` on spans and as the ``outcome`` label):

=====================  ==========================================================
``ok``                 the stream delivered data and ended as it should
``empty``              2xx event-stream, zero data events (clean or dropped end), or
                       data events none of which carries a completion (only Azure
                       prompt-filter results or usage): the model produced nothing
``truncated``          data, then the end came without ``[DONE]`` / ``finish_reason``,
                       or the connection dropped after data
``stalled``            a first-chunk or idle deadline passed while the stream was open
``buffered``           every event arrived in one burst at the end
``wrong_content_type`` a stream request answered with JSON, HTML or other non-SSE
``http_error``         HTTP status >= 400
``malformed``          bytes that do not parse: invalid JSON data, events without
                       blank lines, a gzip body without Content-Encoding
``error_event``        an ``event: error``, a JSON ``{"error": ...}`` event, or a JSON
                       object that is not a chunk (``{"message": ...}``): an error
                       delivered inside the stream
``disconnected``       the consumer (ultimately the client) went away before the end
``abandoned``          the stream was garbage-collected without being finished or closed
``lost``               a layer passed on fewer units than it received from below
``error``              any other exception
=====================  ==========================================================

The rules, applied in this order (the first that matches wins):

1. ``http_error``: ``status >= 400``.
2. ``wrong_content_type``: a stream was requested, 2xx, and the media type is not
   ``text/event-stream``.
3. ``malformed``: gzip magic bytes, a payload that does not parse, field lines never
   dispatched (no blank lines) with no event seen, or a parse error was raised.
4. ``error_event``: at least one error event.
5. ``stalled``: the watchdog fired, or the stream ended in a timeout.
   An HTTP layer that got no response at all (refused, reset) is ``error`` here
   (``disconnected`` if its consumer cancelled it).
6. ``abandoned`` / ``disconnected``: the consumer dropped / closed the stream before
   its end (a stream whose terminal marker was already seen is not cut short).
7. ``empty`` / ``truncated``: ``StreamEmptyError`` / ``StreamTruncatedError`` ended it.
8. ``error``: any other exception ended it (not a timeout, drop or parse error).
9. ``empty``: zero units, or only units without a completion (``annotations``), ended
   cleanly or dropped.
10. ``truncated``: the connection dropped after data, or the layer knows a terminal
    marker (``[DONE]``, ``finish_reason``) and saw none.
11. ``lost``: the layer knows how many units it received and passed on fewer.
12. ``buffered``: at least ``BUFFER_MIN_UNITS`` units, the wait for the first one was
    at least ``BUFFER_MIN_WAIT`` and at least 80 % of the whole stream, and the rest
    arrived at memory speed: spread <= max(50 ms, 5 % of the total) and under
    ``BUFFER_MAX_MEAN_GAP`` per unit. A real model's tokens are milliseconds apart;
    a store-and-forward proxy's are microseconds apart, after a long silence.
    Or, where the layer knows how long the layer below took to pass the same units
    (``spread_below``: the browser, against the sse layer's writes): the first unit
    waited at least ``BUFFER_MIN_WAIT``, the layer below spread its units over at least
    ``BUFFER_MIN_WAIT``, and this layer received them within a tenth of that
    (``BUFFER_RELATIVE_SPREAD``) — written over seconds, arrived in one burst. A
    browser's reader hands events to the page's own work between them, so its absolute
    gaps are not memory speed; the ratio still is a burst.
13. ``ok``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "BUFFER_MAX_MEAN_GAP",
    "BUFFER_MIN_UNITS",
    "BUFFER_MIN_WAIT",
    "BUFFER_RELATIVE_SPREAD",
    "FAULT_OUTCOMES",
    "End",
    "Evidence",
    "Outcome",
    "Payload",
    "classify",
    "end_for_exception",
    "payload_kind",
    "upstream_text",
]


class Outcome(StrEnum):
    OK = "ok"
    EMPTY = "empty"
    TRUNCATED = "truncated"
    STALLED = "stalled"
    BUFFERED = "buffered"
    WRONG_CONTENT_TYPE = "wrong_content_type"
    HTTP_ERROR = "http_error"
    MALFORMED = "malformed"
    ERROR_EVENT = "error_event"
    DISCONNECTED = "disconnected"
    ABANDONED = "abandoned"
    LOST = "lost"
    ERROR = "error"


# Outcomes that say something broke at this layer (not a consequence of a consumer
# going away, and not healthy).
FAULT_OUTCOMES = frozenset(Outcome) - {Outcome.OK, Outcome.DISCONNECTED, Outcome.ABANDONED}


class End(StrEnum):
    """How a stream ended."""

    CLEAN = "clean"  # end of body / iterator exhausted
    ABRUPT = "abrupt"  # connection dropped: reset, missing chunk terminator, short body
    TIMEOUT = "timeout"  # a read or deadline timeout
    CLOSED = "closed"  # the consumer closed it before the end
    ABANDONED = "abandoned"  # garbage-collected without end or close
    ERROR = "error"  # another exception


# The members classify and end_for_exception read, as module globals: on CPython 3.11 a
# member read through its class (``End.CLEAN``) goes through ``EnumType.__getattr__``'s slot,
# ~20 times the cost of a global; classify reads a dozen a stream (bench/RESULTS.md, "Enum
# members").
_CLEAN, _ABRUPT, _TIMEOUT, _CLOSED = End.CLEAN, End.ABRUPT, End.TIMEOUT, End.CLOSED
_ABANDONED_END, _ERROR_END = End.ABANDONED, End.ERROR
_OK, _EMPTY, _TRUNCATED, _STALLED = Outcome.OK, Outcome.EMPTY, Outcome.TRUNCATED, Outcome.STALLED
_BUFFERED, _HTTP_ERROR, _MALFORMED = Outcome.BUFFERED, Outcome.HTTP_ERROR, Outcome.MALFORMED
_ERROR_EVENT, _DISCONNECTED = Outcome.ERROR_EVENT, Outcome.DISCONNECTED
_ABANDONED, _LOST, _ERROR = Outcome.ABANDONED, Outcome.LOST, Outcome.ERROR
_WRONG_CONTENT_TYPE = Outcome.WRONG_CONTENT_TYPE

BUFFER_MIN_UNITS = 3
BUFFER_MIN_WAIT = 0.2  # seconds: a shorter stream cannot look "buffered" to a person
BUFFER_MAX_MEAN_GAP = 0.001  # seconds per unit: memory speed, not model speed
BUFFER_RELATIVE_SPREAD = 0.1  # of the layer below's spread: one burst, not a stream

_SECOND = 1_000_000_000

# Exception class names (anywhere in the MRO) and what they say about the end of a
# stream. Names, not imports: this module stays free of the libraries it judges.
_TIMEOUT_NAMES = frozenset(
    {"TimeoutException", "APITimeoutError", "TimeoutError", "StreamChunkTimeoutError"}
)
_ABRUPT_NAMES = frozenset(
    {
        "RemoteProtocolError",
        "ReadError",
        "NetworkError",
        "APIConnectionError",
        "ConnectionError",
        "IncompleteRead",
        "ProtocolError",
    }
)
_MALFORMED_NAMES = frozenset({"JSONDecodeError", "UnicodeDecodeError", "DecodingError"})
_CLOSED_NAMES = frozenset({"CancelledError", "GeneratorExit", "ClientDisconnected"})
_EMPTY_NAMES = frozenset({"StreamEmptyError"})
_TRUNCATED_NAMES = frozenset({"StreamTruncatedError"})


def end_for_exception(exc: BaseException) -> End:
    """What an exception raised while reading says about how the stream ended."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & _CLOSED_NAMES:
        return _CLOSED
    if names & _TIMEOUT_NAMES:
        return _TIMEOUT
    if names & _ABRUPT_NAMES:
        return _ABRUPT
    return _ERROR_END


def is_parse_error(exc_type: str | None) -> bool:
    return exc_type in _MALFORMED_NAMES


@dataclass(slots=True)
class Evidence:
    """What a layer saw of one stream. Times are ``perf_counter_ns`` values."""

    layer: str
    t_start: int = 0
    t_first: int | None = None
    t_last: int | None = None
    t_end: int | None = None
    units: int = 0  # units passed on (data events, chunks, token events, items)
    units_in: int | None = None  # units received from below, where the layer knows
    status: int | None = None
    content_type: str | None = None
    stream_requested: bool = True
    needs_status: bool = False  # an HTTP layer: no status means no response at all
    terminal_known: bool = False  # the layer can see a terminal marker
    terminal_seen: bool = False  # [DONE] or a finish_reason
    error_events: int = 0
    annotations: int = 0  # units that carry no completion (prompt-filter results, usage)
    malformed: int = 0
    gzip_magic: bool = False
    pending_fields: int = 0
    stalled: str | None = None  # "first_chunk" or "idle" when the watchdog fired
    end: End | None = None
    exc_type: str | None = None  # class name of the exception that ended it
    # The time the layer below took to pass the same units (ns), where it is known (the
    # browser: the sse layer's first-to-last event written): rule 12's relative form.
    spread_below: int | None = None


class Payload(StrEnum):
    """What one decoded ``data:`` payload of a chat-completions stream is."""

    COMPLETION = "completion"  # a chunk with choices: the model speaking
    ANNOTATION = "annotation"  # a chunk with ``choices: []``: prompt-filter results, usage
    ERROR = "error"  # not a chunk: {"error": ...}, {"message": ...}, delivered in-band
    OTHER = "other"  # not a JSON object, or a typed event of another API ("type", "object")


def payload_kind(obj: object) -> Payload:
    """The kind of one decoded ``data:`` payload (see :class:`Payload`)."""
    if not isinstance(obj, dict):
        return Payload.OTHER
    if obj.get("error") is not None:
        return Payload.ERROR
    choices = obj.get("choices")
    if isinstance(choices, list):
        return Payload.COMPLETION if choices else Payload.ANNOTATION
    if "choices" in obj or "type" in obj or "object" in obj:
        return Payload.OTHER  # a Responses / Anthropic event, or an odd chunk: not ours to judge
    return Payload.ANNOTATION if "usage" in obj else Payload.ERROR


UPSTREAM_TEXT_MAX = 200  # characters of an in-band error's text kept for the verdict

_SECRETS = (  # what looks like a credential, in text an upstream chose to send
    re.compile(r"(?i)\b(bearer|basic)\s+[^\s,;\"']+"),
    re.compile(
        r"(?i)\b(authorization|api[-_ ]?key|subscription[-_ ]?key|access[-_ ]?token"
        r"|secret|password|token)([\"']?\s*[:=]\s*[\"']?)[^\s,;\"'}]+"
    ),
    re.compile(r"\bsk-[A-Za-z0-9_-]{6,}"),
    re.compile(r"(?=[A-Za-z+/_=-]*[0-9])[A-Za-z0-9+/_=-]{32,}"),  # opaque tokens: keys, signatures
)


def _first(obj: dict[str, object], keys: tuple[str, ...], default: object) -> object:
    return next((obj[k] for k in keys if obj.get(k)), default)


def upstream_text(obj: object, limit: int = UPSTREAM_TEXT_MAX) -> str:
    """The text of an in-band error, fit for a log line: ``error.message`` (or ``message``,
    ``detail``, else the JSON itself), control characters dropped, anything that looks
    like a key or an Authorization value replaced by ``[redacted]``, at most ``limit``
    characters. Upstream text, never a prompt; bounded, so it can go on a span."""
    text: object = obj
    if isinstance(obj, dict):
        error = obj.get("error")
        if isinstance(error, dict):
            text = _first(error, ("message", "detail", "msg", "code", "type"), error)
        elif isinstance(error, str) and error:
            text = error
        else:
            text = _first(obj, ("message", "detail", "msg"), obj)
    if not isinstance(text, str):
        text = json.dumps(text, separators=(",", ":"), default=str)
    text = " ".join("".join(c if c.isprintable() else " " for c in text[: 8 * limit]).split())
    text = _SECRETS[0].sub(r"\1 [redacted]", text)
    text = _SECRETS[1].sub(r"\1\2[redacted]", text)
    for pattern in _SECRETS[2:]:
        text = pattern.sub("[redacted]", text)
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_buffered(ev: Evidence) -> bool:
    if ev.units < BUFFER_MIN_UNITS or ev.t_first is None or ev.t_last is None:
        return False
    end = ev.t_end if ev.t_end is not None else ev.t_last
    total = end - ev.t_start
    wait = ev.t_first - ev.t_start
    spread = ev.t_last - ev.t_first
    if total <= 0 or wait < BUFFER_MIN_WAIT * _SECOND or wait < 0.8 * total:
        return False
    if spread > max(0.05 * _SECOND, 0.05 * total):
        return False
    return spread / (ev.units - 1) <= BUFFER_MAX_MEAN_GAP * _SECOND


def is_burst_of_below(ev: Evidence) -> bool:
    """Rule 12's relative form: units the layer below spread over time arrived at once."""
    below = ev.spread_below
    if below is None or ev.units < BUFFER_MIN_UNITS or ev.t_first is None or ev.t_last is None:
        return False
    if below < BUFFER_MIN_WAIT * _SECOND or ev.t_first - ev.t_start < BUFFER_MIN_WAIT * _SECOND:
        return False
    return ev.t_last - ev.t_first <= BUFFER_RELATIVE_SPREAD * below


def classify(ev: Evidence) -> Outcome:
    """The one outcome of a stream, by the rules in this module's docstring."""
    status = ev.status
    if status is not None and status >= 400:
        return _HTTP_ERROR
    if (
        ev.stream_requested
        and status is not None
        and 200 <= status < 300
        and _media_type(ev.content_type) != "text/event-stream"
    ):
        return _WRONG_CONTENT_TYPE
    exc = ev.exc_type
    if (
        ev.gzip_magic
        or ev.malformed
        or (exc is not None and exc in _MALFORMED_NAMES)  # is_parse_error, inlined
        or (ev.pending_fields and ev.units == 0)
    ):
        return _MALFORMED
    if ev.error_events:
        return _ERROR_EVENT
    end = ev.end
    if ev.stalled or end is _TIMEOUT:
        return _STALLED
    if ev.needs_status and status is None:  # no response: refused, reset, cancelled
        return _DISCONNECTED if end is _CLOSED else _ERROR
    cut_short = not ev.terminal_seen
    if cut_short:
        if end is _ABANDONED_END:
            return _ABANDONED
        if end is _CLOSED:
            return _DISCONNECTED
    if exc is not None:
        if exc in _EMPTY_NAMES:
            return _EMPTY
        if exc in _TRUNCATED_NAMES:
            return _TRUNCATED
    if end is _ERROR_END:  # an exception not classified above
        return _ERROR
    if ev.units <= ev.annotations:  # no unit at all, or none with a completion
        return _EMPTY
    if cut_short and (end is _ABRUPT or ev.terminal_known):
        return _TRUNCATED
    if ev.units_in is not None and ev.units < ev.units_in:
        return _LOST
    if ev.units >= BUFFER_MIN_UNITS and (  # most streams: too few to judge
        is_buffered(ev) or (ev.spread_below is not None and is_burst_of_below(ev))
    ):
        return _BUFFERED
    return _OK
