"""The verdict: the lowest layer where data stopped or changed, in one sentence.

:func:`judge` reads a :class:`~chunkwatch.ledger.Ledger` bottom-up, in the order of
:data:`chunkwatch.probes.PROBES` (gateway, sdk, langgraph, queue, sse, http):

1. the first stream, lowest layer first, whose outcome is a fault (anything but
   ``ok``, ``disconnected`` and ``abandoned``) is the verdict;
2. otherwise units lost between two layers that count the same unit (gateway data
   events -> sdk chunks -> langgraph token events) is ``lost`` at the upper layer —
   between finished streams only: a stream still open when the client left has units
   in flight;
3. otherwise a client that went away is ``disconnected`` at the layer that noticed it:
   the highest layer below ``http`` that saw it (``sse`` for an event stream);
   ``abandoned`` likewise;
4. otherwise ``ok`` (layer ``none``).

:func:`describe` words one tally's evidence for a person: what was seen, at which
layer, and what it means.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from chunkwatch import semconv as sc
from chunkwatch.outcomes import FAULT_OUTCOMES, End, Outcome
from chunkwatch.probes import layer_order, unit_words

if TYPE_CHECKING:
    from chunkwatch.ledger import Ledger, Tally

__all__ = ["Verdict", "describe", "judge"]

# Enum members as module globals, read per stream (why: chunkwatch.outcomes).
_OK = Outcome.OK


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    layer: str  # a layer name, or "none" when ok
    detail: str  # for logs and spans: may quote what the upstream said in-band
    public_detail: str | None = None  # for clients, when it differs: no upstream words

    @property
    def ok(self) -> bool:
        return self.outcome is _OK

    @property
    def client_detail(self) -> str:
        """The detail fit for a client: counts, statuses and timings, never the upstream's
        own words (they may name its hosts or policies)."""
        return self.detail if self.public_detail is None else self.public_detail

    def __str__(self) -> str:
        return "ok" if self.ok else f"{self.outcome}@{self.layer}"

    def as_dict(self) -> dict[str, Any]:
        """The verdict as a client may see it (``event: error``)."""
        return {"layer": self.layer, "outcome": str(self.outcome), "detail": self.client_detail}


class _Healthy(Verdict):
    """``ok``, its detail (the funnel in words) written when first read: most healthy
    requests are not logged at INFO, traced or watched from a browser, and the words cost
    more than the rest of the verdict. Drawn only once every stream of the request has
    finished, so the words say what they would have said at the verdict. A
    :class:`Verdict` in every other way (``==``, ``hash``, ``repr``, ``replace``)."""

    def __init__(
        self,
        outcome: Outcome = Outcome.OK,
        layer: str = sc.NO_LAYER,
        detail: str | None = None,
        public_detail: str | None = None,
        *,
        ledger: Ledger | None = None,
    ) -> None:
        values = {"outcome": outcome, "layer": layer, "public_detail": public_detail}
        if detail is not None or ledger is None:
            values["detail"] = detail or ""
        self.__dict__.update(values, _ledger=ledger)  # one call: frozen, set as dataclasses do

    @cached_property
    def detail(self) -> str:
        ledger = self.__dict__.pop("_ledger", None)
        return "" if ledger is None else _ok_detail(ledger)

    def _fields(self) -> tuple[Any, ...]:
        return (self.outcome, self.layer, self.detail, self.public_detail)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Verdict):
            return NotImplemented
        return self._fields() == (other.outcome, other.layer, other.detail, other.public_detail)

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return "Verdict(outcome={!r}, layer={!r}, detail={!r}, public_detail={!r})".format(
            *self._fields()
        )


def judge(ledger: Ledger) -> Verdict:
    """The verdict over what ``ledger``'s finished streams saw (the module doc)."""
    # Every request ends here, most of them healthy: one pass finds whether any stream
    # failed or left, and adds up the units of the layers that count the same unit (for
    # the loss check); the layer order is applied only when a stream failed or left.
    fault = gone = False
    gateway = sdk = tokens = -1  # -1: no such stream
    open_layers: set[str] = set()
    for t in ledger.tallies:
        outcome = t.outcome
        layer = t.layer
        if outcome is None:
            open_layers.add(layer)
        elif outcome is not _OK:
            if outcome in FAULT_OUTCOMES:
                fault = True
                break
            gone = True
        if layer == sc.GATEWAY:
            if t.stream_requested:
                gateway = max(gateway, 0) + t.units
        elif layer == sc.SDK:
            if t.stream_requested:
                sdk = max(sdk, 0) + t.units
        elif layer == sc.LANGGRAPH and t.unit_kind == "token":
            tokens = max(tokens, 0) + t.units
    if fault:
        tallies = _bottom_up(ledger)
        t = next(t for t in tallies if t.outcome in FAULT_OUTCOMES)
        detail = describe(t, said=_said(tallies))
        public = describe(t, quote=False)
        return Verdict(
            t.outcome or Outcome.ERROR, t.layer, detail, public if public != detail else None
        )
    if 0 <= sdk < gateway or 0 <= tokens < sdk:  # a pair that passed fewer on: a loss?
        lost = _lost_between_layers(gateway, sdk, tokens, open_layers)
        if lost is not None:
            return lost
    if gone:
        left = [t for t in _bottom_up(ledger) if t.outcome in _GONE]
        below_http = [t for t in left if t.layer != sc.HTTP]
        t = (below_http or left)[-1]
        return Verdict(t.outcome or Outcome.DISCONNECTED, t.layer, describe(t))
    if open_layers or ledger.orphans is not None:  # units may still come: the words now
        return Verdict(_OK, sc.NO_LAYER, _ok_detail(ledger))
    return _Healthy(ledger=ledger)


_GONE = (Outcome.DISCONNECTED, Outcome.ABANDONED)


def _bottom_up(ledger: Ledger) -> list[Tally]:
    """The finished streams, lowest layer first, then by start."""
    order = layer_order()
    return sorted(
        (t for t in ledger.tallies if t.outcome is not None),
        key=lambda t: (order.get(t.layer, len(order)), t.t_start),
    )


def _said(tallies: list[Tally]) -> str | None:
    """What the upstream said in-band, as the lowest layer that read it noted it (the
    gateway reads it off its last read; an SDK that raised on it, off the exception)."""
    return next((t.upstream_said for t in tallies if t.upstream_said is not None), None)


def _lost_between_layers(
    gateway: int, sdk: int, tokens: int, open_layers: set[str]
) -> Verdict | None:
    """Units lost between two layers that count the same unit (gateway data events, sdk
    chunks, langgraph token events; -1: no such stream), between finished streams only."""
    has_gateway, has_sdk, has_tokens = gateway >= 0, sdk >= 0, tokens >= 0
    pairs: list[tuple[str, int, str, int]] = []
    if has_gateway and has_sdk:
        pairs.append((sc.GATEWAY, gateway, sc.SDK, sdk))
    if has_sdk and has_tokens:
        pairs.append((sc.SDK, sdk, sc.LANGGRAPH, tokens))
    for below, n_below, above, n_above in pairs:
        if below in open_layers or above in open_layers:
            continue  # still streaming when the request ended (the client left): in flight
        if n_above < n_below:
            return Verdict(
                Outcome.LOST,
                above,
                f"{above}: passed on {n_above} of the {n_below} units {below} delivered "
                f"— {n_below - n_above} lost between {below} and {above}",
            )
    return None


def _ok_detail(ledger: Ledger) -> str:
    funnel = ", ".join([f"{layer} {n}" for layer, n in ledger.funnel().items()])
    return f"every layer passed its data on ({funnel})" if funnel else "no streams seen"


# -- describing one tally ---------------------------------------------------------------------

_MEANING = {
    (sc.GATEWAY, Outcome.EMPTY): "the stream was dropped before the model's first token",
    (sc.GATEWAY, Outcome.WRONG_CONTENT_TYPE): "a proxy aggregated or replaced the stream",
    (sc.GATEWAY, Outcome.BUFFERED): "a proxy buffers the stream and forwards it at the end",
    (sc.GATEWAY, Outcome.TRUNCATED): "the stream was cut short between the model and here",
    (sc.GATEWAY, Outcome.STALLED): "the upstream accepted the stream and went silent",
    (sc.GATEWAY, Outcome.MALFORMED): "the bytes are not a valid event stream of JSON chunks",
    (sc.GATEWAY, Outcome.ERROR_EVENT): "the upstream reported an error inside the stream",
    (sc.BROWSER, Outcome.STALLED): "a hop between the service and the browser held the stream",
}
# empty, with data events that carry no completion (ended as a stream should, or cut)
_NOTHING = "the upstream answered without a completion: the model produced nothing"
_NOTHING_CUT = "the stream ended before the model's first token"
_GENERIC = {
    Outcome.EMPTY: "no data reached this layer",
    Outcome.TRUNCATED: "the answer is incomplete",
    Outcome.STALLED: "nothing arrived within the deadline",
    Outcome.BUFFERED: "the data arrived in one burst at the end",
    Outcome.WRONG_CONTENT_TYPE: "the response is not an event stream",
    Outcome.HTTP_ERROR: "the request was refused",
    Outcome.MALFORMED: "the data could not be parsed",
    Outcome.ERROR_EVENT: "an error was reported inside the stream",
    Outcome.DISCONNECTED: "the consumer went away before the end",
    Outcome.ABANDONED: "the stream was dropped without being finished or closed",
    Outcome.LOST: "units were dropped at this layer",
    Outcome.ERROR: "an exception ended the stream",
    Outcome.OK: "healthy",
}
_ENDS = {
    End.CLEAN: "closed cleanly",
    End.ABRUPT: "the connection dropped",
    End.TIMEOUT: "timed out",
    End.CLOSED: "closed by the consumer",
    End.ABANDONED: "abandoned",
    End.ERROR: "ended by an error",
}


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def describe(t: Tally, *, said: str | None = None, quote: bool = True) -> str:
    """``"<layer>: <evidence> — <meaning>"`` for one finished tally. An ``error_event``
    quotes what the upstream said (its own note, else ``said``: another layer's)."""
    outcome = t.outcome or Outcome.OK
    unit = t.unit_name or unit_words(t.layer)
    parts: list[str] = []
    if t.status is not None:
        ct = (t.content_type or "no content-type").split(";")[0]
        http = f"HTTP {t.status} {ct}"
        if t.content_length is not None:
            http += f" (Content-Length {t.content_length})"
        parts.append(
            http + (" to a stream request" if outcome is Outcome.WRONG_CONTENT_TYPE else "")
        )
    if t.units_in is not None:
        parts.append(f"{t.units_in} in, {t.units} {unit} out")
    else:
        parts.append(f"{t.units} {unit}")
    if outcome is Outcome.BUFFERED and t.t_first is not None and t.t_last is not None:
        parts.append(
            f"all after {_ms(t.time_to_first)} in one burst "
            f"(spread {(t.t_last - t.t_first) / 1e6:.1f} ms)"
        )
    silent_for = t.silent_for
    if outcome is Outcome.STALLED and silent_for is not None:
        parts.append(f"open and silent for {_ms(silent_for)} when the request ended")
    elif outcome is Outcome.STALLED and t.stalled:
        deadline = t.deadline
        which = "first-chunk" if t.stalled == "first_chunk" else "idle"
        parts.append(
            f"no data within the {which} deadline" + (f" of {deadline:g} s" if deadline else "")
        )
    if outcome is Outcome.MALFORMED:
        if t.gzip_magic:
            parts.append("a gzip body without Content-Encoding")
        elif t.pending_fields and not t.units:
            parts.append("data lines never separated by a blank line")
        elif t.malformed_why:
            parts.append(t.malformed_why)
    if outcome is Outcome.EMPTY and t.units:
        parts.append(f"none with a completion ({t.annotations} prompt-filter or usage only)")
    said = (t.upstream_said or said) if quote else None
    if outcome is Outcome.ERROR_EVENT and said:
        parts.append(f'the upstream said "{said}"')
    if outcome is Outcome.TRUNCATED and t.terminal_known:
        parts.append("no [DONE]" if t.layer == sc.GATEWAY else "no finish_reason")
    if t.exc_type:
        parts.append(f"raised {t.exc_type}")
    if silent_for is None:
        end = _ENDS.get(t.end, "") if t.end is not None else ""
        parts.append(f"{end} after {_ms(t.duration)}".strip())
    if outcome is Outcome.EMPTY and t.units:
        cut = t.layer == sc.GATEWAY and not t.terminal_seen  # no [DONE]: it may have come
        meaning = _NOTHING_CUT if cut else _NOTHING
    else:
        meaning = _MEANING.get((t.layer, outcome)) or _GENERIC[outcome]
    return f"{t.layer}: {', '.join(parts)} — {meaning}"
