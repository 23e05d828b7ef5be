"""What a service tells its client when a stream fails (the ``event: error`` payload):
chunkwatch words it, so nothing internal reaches the client.

The client gets what it can act on and nothing that is the service's business: the
exception's type, a message chunkwatch words itself, the verdict (``layer``,
``outcome``, ``detail``: counts, statuses and timings, never a body, a host, an
address or what the upstream said in-band) and the request's ``trace_id`` to quote.
The exception's own text — which may name internal hosts, ports, or repeat an
upstream's error body — goes to the log (logger ``chunkwatch``, with the trace id) and
to the trace, not to the client.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import trace

from chunkwatch.errors import (
    NO_GENERATIONS,
    StreamEmptyError,
    StreamStalledError,
    StreamTruncatedError,
)
from chunkwatch.ledger import Ledger, current_ledger
from chunkwatch.verdict import judge

__all__ = ["error_payload", "public_message"]

log = logging.getLogger("chunkwatch")

_OURS = (StreamEmptyError, StreamTruncatedError, StreamStalledError)  # worded by chunkwatch


def public_message(exc: BaseException) -> str:
    """A message about ``exc`` fit for a client: chunkwatch's own errors as they are (they
    name a layer and counts), others by kind, never by their text."""
    if isinstance(exc, _OURS):
        return str(getattr(exc, "public_message", None) or exc)  # without upstream words
    if type(exc) is ValueError and str(exc).startswith(NO_GENERATIONS):
        return NO_GENERATIONS  # langchain-core's fixed words: the incident's own message
    if isinstance(exc, TimeoutError) and not str(exc):
        return "the agent run exceeded its deadline"
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return f"the model endpoint answered HTTP {status}"
    name = type(exc).__name__
    if "Timeout" in name:
        return "the model endpoint did not answer in time"
    if "Connection" in name:
        return "the model endpoint could not be reached or dropped the connection"
    return f"the request failed ({name})"


def error_payload(exc: BaseException, ledger: Ledger | None = None) -> dict[str, Any]:
    """``{"type", "message", "trace_id"}`` for ``exc``, plus the verdict (``layer``,
    ``outcome``, ``detail``) when the request's ledger names a layer where the data
    stopped. The exception's text is logged, not returned."""
    if isinstance(exc, TimeoutError) and not str(exc):
        payload: dict[str, Any] = {"type": "timeout"}
    else:
        payload = {"type": type(exc).__name__}
    payload["message"] = public_message(exc)
    ctx = trace.get_current_span().get_span_context()
    trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else None
    ledger = ledger or current_ledger()
    if trace_id is None and ledger is not None and ledger.parent_context is not None:
        parent = trace.get_current_span(ledger.parent_context).get_span_context()
        trace_id = format(parent.trace_id, "032x") if parent.is_valid else None
    if trace_id is not None:
        payload["trace_id"] = trace_id
    log.warning(
        "chunkwatch: the client is told %s; the error was %s: %s (trace_id=%s)",
        payload["type"],
        type(exc).__name__,
        exc,
        trace_id or "-",
    )
    if ledger is None:
        return payload
    try:
        verdict = judge(ledger)
    except Exception:
        return payload
    if not verdict.ok:
        payload.update(verdict.as_dict())
    return payload
