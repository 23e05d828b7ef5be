"""The beacon endpoint: the server side of ``chunkwatch.js`` (docs/browser.md).

Usage: ``chunkwatch.instrument(app)`` serves it at ``/chunkwatch/beacon``
(``beacon_path=`` / ``CHUNKWATCH_BEACON_PATH``; ``None`` or empty: off, and SSE responses
carry no stream token). The http probe asks :class:`Beacons` for a token per
``text/event-stream`` response to a browser (:func:`from_browser`;
``X-Chunkwatch-Stream``) and hands it the finished stream; the endpoint then takes one
beacon per stream and records the ``browser`` layer (:mod:`chunkwatch.browser_layer`).

Configuration:

* ``CHUNKWATCH_BEACON_SECRET`` — the MAC key of stream tokens. Replicas behind one load
  balancer must share it (a beacon may reach another replica than the stream; it then
  answers ``unknown_stream``, not ``forged``). Unset: random per process.
* ``CHUNKWATCH_BEACON_ORIGINS`` — comma-separated origins (``https://app.example.com``)
  allowed besides the service's own; their requests get CORS headers, and SSE responses
  expose ``X-Chunkwatch-Stream`` to them. Unset: same-origin only.

The endpoint is hostile input. ``POST {path}``: rate limit, origin, size (≤ 1 KiB, told
by ``Content-Length``: 413 without reading more), the contract's exact fields and types,
the token (MAC, expiry), the record (unknown: 404; already claimed: 409). ``GET
{path}/<token>``: the funnel and verdict of that request, for the holder of its token.
Every refusal is a 4xx ``{"error": reason}`` and ``chunkwatch_beacons_refused_total
{reason}``, ``reason`` from :data:`chunkwatch.semconv.BEACON_REFUSALS`: nothing a client
sends becomes a label value. The rate limit is one bucket for the process: a limit per
client address would need to know which proxies to trust for ``X-Forwarded-For``, and
one taken from an untrusted header is a limit an attacker chooses.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from chunkwatch import semconv as sc
from chunkwatch.browser_layer import ENDS, record_browser
from chunkwatch.browser_token import RateLimit, RecentStreams, StreamRecord, TokenError, Tokens
from chunkwatch.ledger import Ledger
from chunkwatch.runtime import Runtime
from chunkwatch.verdict import Verdict

__all__ = ["MAX_BODY", "STREAM_HEADER", "Beacons", "Refused", "parse_beacon"]

log = logging.getLogger("chunkwatch")

STREAM_HEADER = "X-Chunkwatch-Stream"
# Only a browser sends beacons, and every browser sends Sec-Fetch-Mode with a fetch (or, for a
# POST, Origin): a response to any other client gets no token, and costs nothing here. A
# client that is not a browser and keeps the contract asks with X-Chunkwatch-Beacon.
_FROM_BROWSER = ("HTTP_SEC_FETCH_MODE", "HTTP_ORIGIN", "HTTP_X_CHUNKWATCH_BEACON")


def from_browser(environ: dict[str, Any]) -> bool:
    """Whether the request's SSE response gets a stream token (see ``_FROM_BROWSER``)."""
    return not environ.keys().isdisjoint(_FROM_BROWSER)  # one C call, not a generator


MAX_BODY = 1024  # bytes: chunkwatch.js's beacons stay under 512
MAX_EVENTS = 10_000_000
MAX_MS = 3_600_000.0  # an hour: no stream the browser layer judges is longer
TERMINAL_EVENTS = (b"done", b"error")  # chunkwatch.js's default `terminal` option
# field -> (types allowed, may be null): the contract v1, in its order
FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "v": ((int,), False),
    "token": ((str,), False),
    "events": ((int,), False),
    "first_byte_ms": ((int, float), True),
    "first_event_ms": ((int, float), True),
    "gap_max_ms": ((int, float), True),
    "terminal": ((bool,), False),
    "end": ((str,), False),
    "duration_ms": ((int, float), False),
}
_STATUS = {
    "too_large": "413 Content Too Large",
    "malformed": "400 Bad Request",
    "forged": "403 Forbidden",
    "expired": "403 Forbidden",
    "origin": "403 Forbidden",
    "unknown_stream": "404 Not Found",
    "replayed": "409 Conflict",
    "rate_limited": "429 Too Many Requests",
}


class Refused(Exception):
    """A refused beacon: ``reason`` (closed set) and what a person can act on."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def parse_beacon(body: bytes) -> dict[str, Any]:
    """The beacon in ``body``, checked against the contract; :class:`Refused` otherwise."""
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise Refused("malformed", "the body is not JSON") from err
    if not isinstance(obj, dict):
        raise Refused("malformed", "the body is not a JSON object")
    extra = sorted(set(obj) - set(FIELDS))
    if extra:
        raise Refused("malformed", f"unknown field {extra[0][:40]!r}")
    for name, (types, nullable) in FIELDS.items():
        if name not in obj:
            raise Refused("malformed", f"{name}: missing")
        value = obj[name]
        if value is None and nullable:
            continue
        # bool is an int in Python: only `terminal` may be one
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise Refused("malformed", f"{name}: wrong type")
        if isinstance(value, float) and not math.isfinite(value):
            raise Refused("malformed", f"{name}: not finite")
    if obj["v"] != 1:
        raise Refused("malformed", "v: only version 1 is understood")
    if not 0 <= obj["events"] <= MAX_EVENTS:
        raise Refused("malformed", f"events: outside 0..{MAX_EVENTS}")
    for name in ("first_byte_ms", "first_event_ms", "gap_max_ms", "duration_ms"):
        if obj[name] is not None and not 0 <= obj[name] <= MAX_MS:
            raise Refused("malformed", f"{name}: outside 0..{MAX_MS:.0f} ms")
    if obj["end"] not in ENDS:
        raise Refused("malformed", "end: not clean, abrupt, closed or error")
    return obj


def terminal_written(last_chunk: bytes) -> bool:
    """The last chunk the sse layer wrote holds a terminal event (``event: done`` /
    ``event: error``, chunkwatch.js's default terminal names). Looked at once, at the
    stream's end: the per-event loop does nothing for it."""
    for line in last_chunk[-4096:].splitlines():
        if line.startswith(b"event:") and line[6:].strip() in TERMINAL_EVENTS:
            return True
    return False


class Beacons:
    """One service's stream tokens, recent streams and beacon endpoint."""

    def __init__(
        self,
        path: str = "/chunkwatch/beacon",
        *,
        origins: Iterable[str] | None = None,
        tokens: Tokens | None = None,
        streams: RecentStreams | None = None,
        rate: RateLimit | None = None,
    ) -> None:
        self.path = path.rstrip("/")
        if origins is None:
            origins = os.environ.get("CHUNKWATCH_BEACON_ORIGINS", "").split(",")
        self.origins = frozenset(o.strip().rstrip("/").lower() for o in origins if o.strip())
        self.tokens = tokens or Tokens()
        self.streams = streams or RecentStreams()
        self.rate = rate or RateLimit()
        # Requests whose verdict waits for model streams their departed client left running
        # (chunkwatch.orphans): the record gets it from a verdict listener, added once one
        # such request was seen (until then no request pays for the call).
        self._awaiting: weakref.WeakKeyDictionary[Ledger, StreamRecord] = (
            weakref.WeakKeyDictionary()
        )
        self._awaiting_lock = threading.Lock()
        self._listening: Runtime | None = None

    # -- the http probe's side --------------------------------------------------------------

    def stream_headers(self, headers: list[tuple[str, str]]) -> str:
        """Add the stream token (and its CORS exposure) to an SSE response's headers."""
        token, ident, expiry = self.tokens.issue()
        self.streams.add(ident, StreamRecord(expiry))  # open: a beacon may beat its end
        headers.append((STREAM_HEADER, token))
        if self.origins:
            headers.append(("Access-Control-Expose-Headers", STREAM_HEADER))
        return token

    def stream_ended(
        self,
        rt: Runtime,
        token: str,
        ledger: Ledger,
        verdict: Verdict | None,
        *,
        terminal: bool,
    ) -> None:
        """Keep the record of a finished SSE stream (its sse tally, funnel, verdict); a
        beacon that came before it finished is recorded now."""
        _, ident, expiry, _ = token.split(".")
        sse = next((t for t in reversed(ledger.tallies) if t.layer == sc.SSE), None)
        if sse is None:
            return
        first = sse.t_first
        last = sse.t_last
        record = StreamRecord(
            expiry=int(expiry),
            events=sse.units,
            first_ms=None if first is None else (first - sse.t_start) / 1e6,
            last_ms=None if last is None else (last - sse.t_start) / 1e6,
            gap_ms=sse.max_gap_ns / 1e6,
            terminal=terminal,
            parent=ledger.parent_context,
            upstream=sse.upstream,
            funnel=ledger.funnel(),
            verdict=None if verdict is None else verdict.as_dict(),
            verdict_name=None if verdict is None else str(verdict),
        )
        if verdict is None:
            with self._awaiting_lock:
                self._awaiting[ledger] = record
            if self._listening is not rt:
                self._listening = rt
                rt.add_verdict_listener(self._verdict_drawn)
        early = self.streams.finish(ident, record)
        if early is not None:
            record_browser(rt, record, early)

    def _verdict_drawn(self, verdict: Verdict, ledger: Ledger, span: Any) -> None:
        if not self._awaiting:
            return
        with self._awaiting_lock:
            record = self._awaiting.pop(ledger, None)
        if record is not None:
            record.verdict, record.verdict_name = verdict.as_dict(), str(verdict)

    # -- the endpoint -----------------------------------------------------------------------

    def handles(self, path: str) -> bool:
        return path == self.path or path.startswith(self.path + "/")

    def __call__(
        self, rt: Runtime, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> list[bytes]:
        cors: list[tuple[str, str]] = []
        try:
            origin = self._origin(environ)
            if origin:
                cors = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
            if not self.rate.allow():
                raise Refused("rate_limited", "too many beacons: try later")
            method = environ.get("REQUEST_METHOD", "GET")
            path = environ.get("PATH_INFO", "")
            if method == "POST" and path == self.path:
                self._accept(rt, environ)
                start_response("204 No Content", [("Cache-Control", "no-store"), *cors])
                return []
            if method == "GET" and path != self.path:
                body = self._report(path[len(self.path) + 1 :])
                return _json(start_response, "200 OK", body, cors)
            raise Refused("malformed", f"{method} {self.path}: expected POST, or GET …/<token>")
        except Refused as refused:
            try:
                rt.metrics.beacons_refused.labels(refused.reason).inc()
            except Exception:
                rt.bookkeeping_error(sc.BROWSER, "refused")
            body = {"error": refused.reason, "detail": refused.detail}
            return _json(start_response, _STATUS[refused.reason], body, cors)
        except Exception:  # ours: never a 500 for a beacon, never the host's problem
            rt.bookkeeping_error(sc.BROWSER, "beacon")
            return _json(start_response, "400 Bad Request", {"error": "malformed"}, cors)

    def _origin(self, environ: dict[str, Any]) -> str | None:
        """The request's ``Origin`` when another allowed one (CORS); refused if not allowed."""
        origin: str | None = environ.get("HTTP_ORIGIN")
        if origin is None:  # not a browser's cross-site request (they all send Origin)
            return None
        norm = origin.strip().rstrip("/").lower()
        # The service's own host, or the one a reverse proxy says the browser asked for
        # (X-Forwarded-Host: a proxy that rewrites Host, nginx's default, sets it when told
        # to). A browser cannot put that header on another site's beacon (sendBeacon sets
        # none; fetch would need a preflight this endpoint never answers), and a client that
        # is not a browser can send any Origin anyway: the check is against other sites'
        # pages, the token against everyone.
        forwarded = (environ.get("HTTP_X_FORWARDED_HOST") or "").split(",")[0]
        hosts = {(environ.get("HTTP_HOST") or "").lower(), forwarded.strip().lower()} - {""}
        if urlsplit(norm).netloc in hosts:
            return None  # same origin: no CORS headers needed
        if norm in self.origins:
            return origin.strip()
        raise Refused("origin", "this origin may not send beacons (CHUNKWATCH_BEACON_ORIGINS)")

    def _accept(self, rt: Runtime, environ: dict[str, Any]) -> None:
        try:
            length = int(environ.get("CONTENT_LENGTH") or "")
        except ValueError as err:
            raise Refused("malformed", "a Content-Length is required") from err
        if length > MAX_BODY:
            raise Refused("too_large", f"the body is over {MAX_BODY} bytes")
        if length < 0:
            raise Refused("malformed", "a Content-Length is required")
        body = environ["wsgi.input"].read(length)
        beacon = parse_beacon(body)
        ident = self._verify(beacon["token"])
        record, first = self.streams.claim(ident, beacon)
        if record is None:
            raise Refused("unknown_stream", "no stream of this process has this token")
        if not first:
            raise Refused("replayed", "this stream's beacon was received already")
        if record.early is None:  # else recorded when the stream finishes (it still runs)
            record_browser(rt, record, beacon)

    def _verify(self, token: object) -> str:
        try:
            return self.tokens.verify(token)
        except TokenError as err:
            raise Refused(err.reason, f"the stream token is {err.reason}") from err

    def _report(self, token: str) -> dict[str, Any]:
        ident = self._verify(token)
        record = self.streams.get(ident)
        if record is None:
            raise Refused("unknown_stream", "no stream of this process has this token")
        return {
            "funnel": record.funnel,
            "verdict": record.verdict,
            "browser": record.browser,
            "sse": {"events": record.events, "terminal": record.terminal},
        }


def _json(
    start_response: Callable[..., Any],
    status: str,
    body: dict[str, Any],
    extra: list[tuple[str, str]],
) -> list[bytes]:
    data = json.dumps(body, separators=(",", ":")).encode()
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(data))),
        ("Cache-Control", "no-store"),
        *extra,
    ]
    start_response(status, headers)
    return [data]
