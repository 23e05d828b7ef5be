"""``/lab/faults``: the chat page's switch for the demo's two fault gateways.

Only ``chunkwatch demo --serve`` turns it on (``ServiceConfig.lab_gateways``); a service
started any other way has no such route (a 404), because switching faults is a lab's
business, never a deployed service's.

* ``GET /lab/faults`` → ``{"sides": {"upstream": {"fault": MODE, ...params, "modes":
  [...]}, "downstream": {...}}}``: each gateway's current setting (its ``GET /_chaos``)
  and the modes its side takes.
* ``PUT /lab/faults`` with ``Content-Type: application/json`` and ``{"side": SIDE,
  "fault": MODE, ...params}`` → that side's gateway's ``PUT /_chaos`` with ``{"fault":
  MODE, ...params}``; its answer (200 and the new setting, or its 400 naming the bad
  parameter) is passed through with ``"side"`` added.

Safety, because the page is a browser's and the gateways' chaos API has no
authentication: the gateways' addresses come from the service's configuration, never
from a request, and must be ``http://`` on loopback (checked when the blueprint is made);
the path called is always ``/_chaos``. ``side`` must be one of the two, ``fault`` one of
that side's modes (checked here, before any call), parameters are the gateway's to check.
A PUT must be JSON (another site's form cannot send that without the service's CORS
consent, which it never gives) and at most :data:`MAX_BODY` bytes. A gateway that does
not answer is a 502 naming the side, never a 500.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Response, jsonify, request

from chunkwatch_lab.downstream import DOWNSTREAM_MODES
from chunkwatch_lab.faults import FAULT_MODES

__all__ = ["MAX_BODY", "MODES", "blueprint"]

MODES: Mapping[str, tuple[str, ...]] = {"upstream": FAULT_MODES, "downstream": DOWNSTREAM_MODES}
MAX_BODY = 4096  # a side, a mode and a few numbers
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}
_TIMEOUT = 5.0  # loopback: a gateway that takes longer is stuck, and the page says so


def _check_gateways(gateways: Mapping[str, str]) -> dict[str, str]:
    """The side → base URL table, each an ``http://`` loopback URL; ValueError otherwise."""
    if set(gateways) != set(MODES):
        raise ValueError(f"lab gateways must name exactly the sides {sorted(MODES)}")
    checked = {}
    for side, url in gateways.items():
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname not in _LOOPBACK or parts.path not in ("", "/"):
            raise ValueError(f"the {side} gateway must be http:// on loopback, not {url!r}")
        checked[side] = f"http://{parts.netloc}"
    return checked


def _error(status: int, message: str, kind: str = "invalid_lab_request") -> Response:
    resp = jsonify({"error": {"type": kind, "message": message}})
    resp.status_code = status
    return resp


def _chaos(base: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """Call the gateway's ``/_chaos`` (GET, or PUT ``body``): its status and JSON."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        base + "/_chaos",
        data=data,
        method="GET" if body is None else "PUT",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=_TIMEOUT) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:  # the gateway's own 400: its message is the point
        with err:
            return err.code, json.loads(err.read())


def blueprint(gateways: Mapping[str, str]) -> Blueprint:
    """The ``/lab/faults`` routes over ``gateways`` (side → base URL, loopback only)."""
    bases = _check_gateways(gateways)
    bp = Blueprint("chunkwatch_lab_faults", __name__)

    @bp.get("/lab/faults")
    def current() -> Response:
        sides: dict[str, Any] = {}
        for side, base in bases.items():
            try:
                _, setting = _chaos(base)
            except (OSError, ValueError) as err:
                return _error(502, f"the {side} gateway did not answer: {err}", "bad_gateway")
            sides[side] = {**setting, "modes": list(MODES[side])}
        return jsonify({"sides": sides})

    @bp.put("/lab/faults")
    def switch() -> Response:
        if request.mimetype != "application/json":
            return _error(415, "send the fault as JSON (Content-Type: application/json)")
        if (request.content_length or 0) > MAX_BODY:
            return _error(413, f"the body is over {MAX_BODY} bytes")
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return _error(400, 'the body must be a JSON object: {"side": ..., "fault": ...}')
        side = body.pop("side", None)
        if side not in MODES:
            return _error(400, f"side must be one of {', '.join(MODES)}, not {side!r}")
        fault = body.get("fault")
        if fault not in MODES[side]:
            modes = ", ".join(MODES[side])
            return _error(400, f"{fault!r} is not a fault of the {side} side; its modes: {modes}")
        try:
            status, answer = _chaos(bases[side], body)
        except (OSError, ValueError) as err:
            return _error(502, f"the {side} gateway did not answer: {err}", "bad_gateway")
        resp = jsonify({"side": side, **answer})
        resp.status_code = status if status in (200, 400) else 502
        return resp

    return bp
