"""What the doctor's measurements mean: the verdict over its steps.

Pure logic over :class:`Step` results; no I/O (the sentences and the action are
worded by :mod:`chunkwatch.doctor.wording`). Each step carries a classified
:class:`~chunkwatch.ledger.Tally` (see :mod:`chunkwatch.doctor.wire_step` and
:mod:`chunkwatch.doctor.agent_steps`), so the outcomes here are the probes' outcomes.

:func:`diagnose` reads the application's path bottom-up, as
:func:`chunkwatch.verdict.judge` reads a ledger:

1. the first fault (anything but ``ok``) of the streaming request on the wire
   (layer ``gateway``), then through the openai SDK (``sdk``), then through LangGraph
   (``langgraph``) is the verdict; else a failing non-streaming control is, at
   ``gateway`` (qualifier ``non-streaming requests only``); else ``ok``.
2. With ``--direct``: when the direct endpoint fails too (its streaming request, else
   its control), the verdict is the direct endpoint's outcome at layer ``model`` —
   the model endpoint is at fault, not the gateway; when it works, the verdict stays
   at the gateway path's layer and the evidence says the direct path streams fine.
3. An ``http_error`` at ``gateway`` is qualified by the bisection: ``stream_options
   rejected`` (the request without ``stream_options`` succeeds), ``stream rejected``
   (only the request without ``stream`` succeeds), or ``not stream-specific``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chunkwatch import semconv as sc
from chunkwatch.doctor.wording import OK_ACTION, action, ms, summarize
from chunkwatch.ledger import Tally
from chunkwatch.outcomes import Outcome
from chunkwatch.verdict import describe

if TYPE_CHECKING:
    from chunkwatch.doctor.agent_steps import AppView
    from chunkwatch.doctor.wire_step import Wire

__all__ = [
    "EXIT_CODES",
    "MODEL",
    "STEP_IDS",
    "Diagnosis",
    "Step",
    "diagnose",
]

MODEL = sc.MODEL  # the doctor's verdict layer when the direct endpoint fails too

# Exit status per verdict outcome: 0 ok, 1 the doctor itself failed, 2 bad usage.
EXIT_CODES: dict[Outcome, int] = {
    Outcome.OK: 0,
    Outcome.EMPTY: 10,
    Outcome.TRUNCATED: 11,
    Outcome.STALLED: 12,
    Outcome.BUFFERED: 13,
    Outcome.WRONG_CONTENT_TYPE: 14,
    Outcome.HTTP_ERROR: 15,
    Outcome.MALFORMED: 16,
    Outcome.ERROR_EVENT: 17,
    Outcome.DISCONNECTED: 18,
    Outcome.ABANDONED: 19,
    Outcome.LOST: 20,
    Outcome.ERROR: 21,
}
EXIT_INTERNAL = 1
EXIT_USAGE = 2

STEP_IDS = (
    "control",
    "stream",
    "without_stream_options",
    "without_stream",
    "sdk",
    "langgraph",
    "direct_control",
    "direct_stream",
)
_APP_PATH = ("stream", "sdk", "langgraph")  # bottom-up


@dataclass(eq=False)
class Step:
    """One measurement: a raw request (``wire``) or an application layer (``app``)."""

    id: str
    number: int
    title: str
    path: str  # "gateway" (the URL the application calls) or "direct"
    wire: Wire | None = None
    app: AppView | None = None

    @property
    def tally(self) -> Tally:
        if self.wire is not None:
            return self.wire.tally
        assert self.app is not None
        return self.app.tally

    @property
    def outcome(self) -> Outcome:
        return self.tally.outcome or Outcome.OK

    @property
    def layer(self) -> str:
        return self.tally.layer

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK

    @property
    def detail(self) -> str:
        return describe(self.tally)


@dataclass(frozen=True)
class Diagnosis:
    outcome: Outcome
    layer: str  # gateway, sdk, langgraph, model, or "none" when ok
    qualifier: str | None
    detail: str
    evidence: tuple[str, ...]
    action: str

    @property
    def label(self) -> str:
        """``ok``, ``empty@gateway``, ``http_error@gateway (stream_options rejected)``."""
        if self.outcome is Outcome.OK:
            return "ok"
        label = f"{self.outcome}@{self.layer}"
        return f"{label} ({self.qualifier})" if self.qualifier else label

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.outcome]


def diagnose(steps: Sequence[Step], *, direct: bool = False) -> Diagnosis:
    """The verdict over one doctor run (see the module doc)."""
    by = {s.id: s for s in steps}
    control = by.get("control")
    deciding = next((by[i] for i in _APP_PATH if i in by and not by[i].ok), None)
    qualifier = None
    if deciding is None and control is not None and not control.ok:
        deciding, qualifier = control, "non-streaming requests only"
    direct_fault = next(
        (by[i] for i in ("direct_stream", "direct_control") if i in by and not by[i].ok), None
    )
    evidence = [summarize(s) for s in steps]
    if deciding is None:
        if direct_fault is not None:
            evidence.append(
                "The direct endpoint fails but the application's path works: the gateway "
                "routes around it, or the direct URL is not the model behind this gateway."
            )
        return Diagnosis(Outcome.OK, sc.NO_LAYER, None, _ok_detail(by), tuple(evidence), OK_ACTION)
    outcome, layer, detail = deciding.outcome, deciding.layer, deciding.detail
    if direct_fault is not None:
        evidence.append(
            f"The direct endpoint fails too ({direct_fault.outcome}): the model endpoint "
            f"itself is at fault, not the gateway; through the gateway the application "
            f"sees {deciding.outcome} at {deciding.layer}."
        )
        outcome, layer, detail = direct_fault.outcome, MODEL, direct_fault.detail
        qualifier = None
    elif direct:
        evidence.append(
            "The direct endpoint answers correctly, streaming and non-streaming: the fault "
            "lies between the gateway and the model."
        )
    if outcome is Outcome.HTTP_ERROR and layer == sc.GATEWAY and deciding.id == "stream":
        qualifier = _bisected(by)
    words = action(
        outcome,
        layer,
        qualifier,
        control_ok=control is not None and control.ok,
        direct=direct,
        at_model=layer == MODEL,
    )
    return Diagnosis(outcome, layer, qualifier, detail, tuple(evidence), words)


def _bisected(by: dict[str, Step]) -> str:
    without_options, without_stream = by.get("without_stream_options"), by.get("without_stream")
    if without_options is not None and _answered(without_options):
        return "stream_options rejected"
    if without_stream is not None and _answered(without_stream):
        return "stream rejected"
    return "not stream-specific"


def _answered(step: Step) -> bool:
    status = step.tally.status
    return status is not None and status < 400


def _ok_detail(by: dict[str, Step]) -> str:
    stream = by.get("stream")
    if stream is None:
        return "no streaming request was made"
    t = stream.tally
    reasons = ", ".join(dict.fromkeys(t.finish_reasons)) or "none"
    return (
        f"gateway: HTTP {t.status}, {t.units} data events over {ms(t.duration)}, [DONE], "
        f"finish_reason {reasons}; the openai SDK and LangGraph passed the answer on"
    )
