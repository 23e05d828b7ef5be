"""What a service tells its client when a stream fails: the ``event: error`` payload."""

from __future__ import annotations

from typing import Any

from chunkwatch.ledger import Ledger, current_ledger

__all__ = ["error_payload"]


def error_payload(exc: BaseException, ledger: Ledger | None = None) -> dict[str, Any]:
    """``{"type", "message"}`` for ``exc``, plus the verdict (``layer``, ``outcome``,
    ``detail``) when the request's ledger names a layer where the data stopped."""
    if isinstance(exc, TimeoutError) and not str(exc):
        payload: dict[str, Any] = {
            "type": "timeout",
            "message": "the agent run exceeded its deadline",
        }
    else:
        payload = {"type": type(exc).__name__, "message": str(exc) or repr(exc)}
    ledger = ledger or current_ledger()
    if ledger is None:
        return payload
    try:
        verdict = ledger.verdict()
    except Exception:
        return payload
    if not verdict.ok:
        payload.update(verdict.as_dict())
    return payload
