"""The doctor's report: a table per step for people, JSON for machines.

:meth:`Report.as_dict` is the ``--json`` document; its schema is
``chunkwatch/doctor/schema.json`` (:func:`schema`), documented in ``docs/doctor.md``,
and versioned by ``schema_version`` (:data:`SCHEMA_VERSION`): fields may be added
within a version; a field removed, renamed or changed in meaning bumps it.

Every string that leaves the report passes :func:`redact`, which replaces the API
key (should an endpoint ever echo it) with ``***``; the key itself is never put in.
URLs are shown through :func:`safe_url`: no password, no credential-like query values.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from chunkwatch.doctor.diagnosis import Diagnosis, Step
from chunkwatch.doctor.wording import ms, summarize

if TYPE_CHECKING:
    from chunkwatch.doctor.agent_steps import AppView
    from chunkwatch.doctor.steps import DoctorConfig
    from chunkwatch.doctor.wire_step import Wire

__all__ = ["SCHEMA_VERSION", "Report", "redact", "safe_url", "schema"]

SCHEMA_VERSION = 1
_MIN_SECRET = 4  # shorter "keys" are not searched for: they would mangle the report


def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of :meth:`Report.as_dict`."""
    text = resources.files("chunkwatch.doctor").joinpath("schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def redact(value: Any, secrets: list[str]) -> Any:
    """``value`` with every secret replaced by ``***``, in every string, recursively."""
    secrets = [s for s in secrets if len(s) >= _MIN_SECRET]
    if not secrets:
        return value
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
        return value
    if isinstance(value, dict):
        return {redact(k, secrets): redact(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, secrets) for v in value]
    return value


_SECRET_PARAM = re.compile(r"key|token|secret|sig|code|password|auth", re.IGNORECASE)


def safe_url(url: str) -> str:
    """``url`` without a password in it, and with the values of query parameters that
    look like credentials (``subscription-key``, ``code``, ``sig``, ...) masked."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    query = urlencode(
        [(k, "***" if _SECRET_PARAM.search(k) else v) for k, v in parse_qsl(parts.query, True)],
        safe="*",
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _s(ns: int | None) -> float | None:
    return None if ns is None else round(ns / 1e9, 6)


@dataclass(eq=False)
class Report:
    config: DoctorConfig
    steps: list[Step]
    diagnosis: Diagnosis
    started_at: datetime
    duration: float

    @property
    def exit_code(self) -> int:
        return self.diagnosis.exit_code

    def secrets(self) -> list[str]:
        """The keys, and credentials embedded in the URLs: never shown."""
        targets = [self.config.target]
        if self.config.direct is not None:
            targets.append(self.config.direct)
        found: list[str] = []
        for t in targets:
            parts = urlsplit(t.url)
            found += [t.api_key or "", parts.password or ""]
            found += [v for k, v in parse_qsl(parts.query) if _SECRET_PARAM.search(k)]
        return [s for s in found if s]

    # -- JSON --------------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        from chunkwatch import __version__

        c, d = self.config, self.diagnosis
        t = c.target
        doc = {
            "schema_version": SCHEMA_VERSION,
            "tool": "chunkwatch doctor",
            "version": __version__,
            "started_at": self.started_at.isoformat(timespec="milliseconds"),
            "duration_s": round(self.duration, 3),
            "target": {
                "url": safe_url(t.url),
                "api": t.api,
                "deployment": t.deployment,
                "api_version": t.api_version if t.azure else None,
                "model": t.model,
                "api_key_env": c.api_key_env,
                "api_key_set": bool(t.api_key),
                "timeout_s": c.timeout,
                "total_limit_s": c.total,
                "direct": None
                if c.direct is None
                else {
                    "url": safe_url(c.direct.url),
                    "api_key_env": c.direct_api_key_env or c.api_key_env,
                    "api_key_set": bool(c.direct.api_key),
                },
            },
            "verdict": {
                "label": d.label,
                "outcome": str(d.outcome),
                "layer": d.layer,
                "qualifier": d.qualifier,
                "detail": d.detail,
                "evidence": list(d.evidence),
                "action": d.action,
                "exit_code": d.exit_code,
            },
            "steps": [_step_dict(s) for s in self.steps],
        }
        redacted: dict[str, Any] = redact(doc, self.secrets())
        return redacted

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    # -- the table -----------------------------------------------------------------------------

    def render(self) -> str:
        """The report for people: verdict, evidence, action, then a table per step."""
        doc = self.as_dict()
        v, t = doc["verdict"], doc["target"]
        lines = [f"chunkwatch doctor  {t['url']}  ({self.config.target.describe()})"]
        if t["direct"]:
            lines.append(f"direct endpoint    {t['direct']['url']}")
        if not t["api_key_set"]:
            lines.append(f"no API key: ${t['api_key_env']} is not set")
        lines += ["", f"verdict   {v['label']}", f"          {v['detail']}"]
        lines += [f"action    {v['action']}", "", "evidence"]
        lines += [f"  - {sentence}" for sentence in v["evidence"]]
        for step in doc["steps"]:
            lines += ["", *_step_table(step)]
        lines += ["", f"exit code {v['exit_code']}   ({doc['duration_s']:.1f} s)"]
        return "\n".join(lines) + "\n"


def _step_dict(step: Step) -> dict[str, Any]:
    return {
        "id": step.id,
        "step": step.number,
        "title": step.title,
        "path": step.path,
        "layer": step.layer,
        "outcome": str(step.outcome),
        "detail": step.detail,
        "summary": summarize(step),
        "wire": _wire_dict(step.wire) if step.wire is not None else None,
        "app": _app_dict(step.app) if step.app is not None else None,
    }


def _wire_dict(w: Wire) -> dict[str, Any]:
    t = w.tally
    gaps = w.event_gaps_ns
    return {
        "request": {"stream": w.stream, "stream_options": w.stream_options},
        "status": t.status,
        "reason": w.reason,
        "http_version": w.http_version,
        "headers": {
            "content_type": t.content_type,
            "content_length": t.content_length,
            "transfer_encoding": w.transfer_encoding,
            "content_encoding": t.content_encoding,
            "request_ids": dict(w.request_ids),
        },
        "timings_s": {
            "connected": w.seconds(w.t_connected),
            "request_sent": w.seconds(w.t_sent),
            "headers": w.seconds(t.t_headers),
            "first_byte": w.seconds(w.t_first_byte),
            "first_event": w.seconds(t.t_first) if t.stream_requested else None,
            "last_event": w.seconds(t.t_last) if t.stream_requested else None,
            "end": w.seconds(t.t_end),
        },
        "bytes": t.bytes,
        "reads": w.reads,
        "events": w.events,
        "data_events": t.units if t.stream_requested else 0,
        "comments": t.comments,
        "content_events": t.content_units if t.stream_requested else 0,
        "done": t.terminal_seen,
        "finish_reasons": list(t.finish_reasons),
        "usage": w.usage,
        "error_events": t.error_events,
        "malformed": t.malformed,
        "malformed_why": t.malformed_why,
        "gzip_magic": t.gzip_magic,
        "pending_fields": t.pending_fields,
        "gaps_s": {
            "max_read_gap": _s(w.max_read_gap_ns) if w.reads > 1 else None,
            "max_event_gap": _s(max(gaps)) if gaps else None,
            "median_event_gap": _s(int(statistics.median(gaps))) if gaps else None,
        },
        "end": str(t.end) if t.end is not None else None,
        "stalled": t.stalled,
        "total_limit": w.total_limit,
        "answer_chars": w.answer_chars,
        "api_error": w.api_error,
        "error": w.error,
    }


def _app_dict(v: AppView) -> dict[str, Any]:
    t = v.tally
    return {
        "unit": v.unit,
        "units": t.units,
        "content_units": t.content_units,
        "finish_reasons": list(t.finish_reasons),
        "usage": v.usage,
        "answer_chars": v.answer_chars,
        "timings_s": {
            "first": t.seconds(t.t_first),
            "last": t.seconds(t.t_last),
            "end": t.seconds(t.t_end),
        },
        "max_gap_s": _s(t.max_gap_ns) if t.units > 1 else None,
        "status": t.status,
        "end": str(t.end) if t.end is not None else None,
        "stalled": t.stalled,
        "total_limit": v.total_limit,
        "exception": v.exception,
    }


# -- rendering one step ----------------------------------------------------------------------


def _or_dash(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def _step_table(step: dict[str, Any]) -> list[str]:
    head = f"step {step['step']}  {step['title']}  [path {step['path']}, layer {step['layer']}]"
    rows: list[tuple[str, str]] = []
    if step["wire"] is not None:
        rows = _wire_rows(step["wire"])
    elif step["app"] is not None:
        rows = _app_rows(step["app"])
    rows.append(("outcome", f"{step['outcome']}  ({step['detail']})"))
    width = max(len(k) for k, _ in rows)
    return [f"{head}  ->  {step['outcome']}", *(f"  {k:<{width}}  {v}" for k, v in rows)]


def _wire_rows(w: dict[str, Any]) -> list[tuple[str, str]]:
    req, h, tm, gaps = w["request"], w["headers"], w["timings_s"], w["gaps_s"]
    stream = {True: "stream=true", False: "stream=false", None: "no stream field"}[req["stream"]]
    ids = ", ".join(f"{k}={v}" for k, v in h["request_ids"].items())
    status = "-" if w["status"] is None else f"{w['status']} {w['reason'] or ''}".strip()
    if w["http_version"]:
        status += f"  ({w['http_version']})"
    rows = [
        ("request", stream + (", stream_options" if req["stream_options"] else "")),
        ("status", status),
        ("content-type", _or_dash(h["content_type"])),
        ("content-length", _or_dash(h["content_length"])),
        ("transfer-encoding", _or_dash(h["transfer_encoding"])),
        ("content-encoding", _or_dash(h["content_encoding"])),
        ("request ids", ids or "-"),
        ("connected", ms(tm["connected"])),
        ("time to headers", ms(tm["headers"])),
        ("time to first byte", ms(tm["first_byte"])),
    ]
    if w["request"]["stream"]:
        rows += [
            ("time to first event", ms(tm["first_event"])),
            ("time to last event", ms(tm["last_event"])),
        ]
    rows.append(("ended", f"{_or_dash(w['end'])} after {ms(tm['end'])}"))
    rows.append(("bytes / reads", f"{w['bytes']} / {w['reads']}"))
    if w["request"]["stream"]:
        rows += [
            (
                "events",
                f"{w['data_events']} data ({w['content_events']} with content), "
                f"{w['comments']} comments, {'[DONE]' if w['done'] else 'no [DONE]'}",
            ),
            (
                "gaps",
                f"event median {ms(gaps['median_event_gap'])}, max {ms(gaps['max_event_gap'])}; "
                f"read max {ms(gaps['max_read_gap'])}",
            ),
        ]
    else:
        rows.append(("answer", f"{_or_dash(w['answer_chars'])} characters"))
    rows.append(("finish_reason", ", ".join(w["finish_reasons"]) or "-"))
    rows.append(("usage", "yes" if w["usage"] else "no"))
    problems = []
    if w["error_events"]:
        problems.append(f"{w['error_events']} error events")
    if w["malformed"]:
        problems.append(f"{w['malformed']} malformed ({w['malformed_why']})")
    if w["gzip_magic"]:
        problems.append("gzip body without Content-Encoding")
    if w["pending_fields"]:
        problems.append(f"{w['pending_fields']} undispatched field lines")
    if w["stalled"]:
        problems.append(f"stalled ({w['stalled']})")
    if w["total_limit"]:
        problems.append("total limit reached")
    if problems:
        rows.append(("problems", "; ".join(problems)))
    if w["api_error"]:
        rows.append(("endpoint said", w["api_error"]))
    if w["error"]:
        rows.append(("exception", w["error"]))
    return rows


def _app_rows(a: dict[str, Any]) -> list[tuple[str, str]]:
    tm = a["timings_s"]
    return [
        (a["unit"], f"{a['units']} ({a['content_units']} with content)"),
        ("answer", f"{a['answer_chars']} characters"),
        ("finish_reason", ", ".join(a["finish_reasons"]) or "-"),
        ("usage", "yes" if a["usage"] else "no"),
        ("first / last", f"{ms(tm['first'])} / {ms(tm['last'])}"),
        ("max gap", ms(a["max_gap_s"])),
        ("ended", f"{_or_dash(a['end'])} after {ms(tm['end'])}"),
        ("exception", _or_dash(a["exception"])),
    ]
