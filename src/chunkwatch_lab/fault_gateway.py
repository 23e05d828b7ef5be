"""``chunkwatch gateway``: a reverse proxy that injects the faults real gateways commit.

Usage::

    chunkwatch gateway --upstream http://127.0.0.1:8400 --port 8401 --fault pass
    curl -X PUT localhost:8401/_chaos -d '{"fault": "truncate", "events": 3}'
    curl localhost:8401/_chaos/stats

    # in-process (tests, ``chunkwatch demo``):
    gw = start_in_thread(Gateway(upstream.url))
    gw.server.set_fault("zero")

Every request is forwarded to the upstream (path and query kept; hop-by-hop headers
dropped; header values are never logged) over kept-alive connections. A healthy
gateway forwards a streamed body chunk by chunk as it arrives, without buffering.
An unreachable upstream is a 502 with an OpenAI-style error naming it; an upstream
that drops a stream gets the client's connection dropped too.

Its side is fixed when it starts. ``side="upstream"`` (the default, ``--side upstream``:
between the service and the model API): faults apply only to requests whose JSON body
has ``"stream": true``; everything else passes through healthy, as in real incidents
where only streaming breaks. ``side="downstream"`` (``--side downstream``: in front of
the service, the browser talking to it): the faults of :mod:`chunkwatch_lab.downstream`
(:data:`~chunkwatch_lab.downstream.DOWNSTREAM_MODES`) apply to every ``200
text/event-stream`` answer, whatever the request; every other answer passes. Each side
takes its own modes: a mode of the other side is a ValueError (a 400 on the chaos API).
Modes that transform the stream call the upstream and apply only to a
``200 text/event-stream`` answer (an upstream error passes through unchanged);
the others answer without calling the upstream. The modes, their parameters and
behaviours live in :mod:`chunkwatch_lab.faults` (re-exported here:
:data:`FAULT_MODES`, :data:`FAULT_PARAMS`, :class:`FaultSetting`,
:func:`aggregate`) and are listed in ``docs/gateway.md``.

Chaos API (never forwarded):

* ``GET /_chaos`` -> ``{"fault": MODE, ...params}`` (defaults filled in).
* ``PUT /_chaos`` with ``{"fault": MODE, ...params}`` sets it; an unknown mode or
  a bad parameter is a 400 whose JSON lists the valid modes, and the previous
  setting stays.
* ``GET /_chaos/stats`` -> ``{"requests": {MODE: n}, "stream_requests": n,
  "non_stream_requests": n, "upstream_requests": n, "upstream_connections": n,
  "open_connections": n}`` (``open_connections``: client connections open now);
  ``requests`` counts each proxied request under the mode it received (a
  non-stream request is always ``pass``; downstream, "stream" means an SSE answer),
  and ``side`` says which side the gateway is on. ``DELETE /_chaos/stats`` resets them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from chunkwatch_lab._bodies import nginx_page
from chunkwatch_lab._http import ClientGone, HTTPError, HTTPServer, Request, Responder
from chunkwatch_lab._upstream_pool import Exchange, UpstreamPool
from chunkwatch_lab.downstream import DOWNSTREAM_MODES, DOWNSTREAM_PARAMS, DOWNSTREAM_TRANSFORMS
from chunkwatch_lab.faults import (
    FAULT_MODES,
    FAULT_PARAMS,
    Call,
    FaultSetting,
    Transform,
    aggregate,
    inject,
    openai_error,
)
from chunkwatch_lab.threaded import run_until_signal

__all__ = [
    "FAULT_MODES",
    "FAULT_PARAMS",
    "FaultSetting",
    "Gateway",
    "add_gateway_parser",
    "aggregate",
    "main",
    "run_gateway",
]

log = logging.getLogger("chunkwatch.gateway")

SIDES = ("upstream", "downstream")
_VOCABULARY = {
    "upstream": (FAULT_MODES, FAULT_PARAMS),
    "downstream": (DOWNSTREAM_MODES, DOWNSTREAM_PARAMS),
}
_ALL_MODES = tuple(dict.fromkeys((*FAULT_MODES, *DOWNSTREAM_MODES)))


class Gateway:
    """The fault-injecting reverse proxy. ``set_fault`` may be called from any thread."""

    def __init__(
        self,
        upstream: str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        side: str = "upstream",
        fault: str = "pass",
        **params: int | float,
    ) -> None:
        if side not in SIDES:
            raise ValueError(f"side must be one of {', '.join(SIDES)}, not {side!r}")
        self.upstream = upstream
        self.side = side
        self.modes, self._table = _VOCABULARY[side]
        self._pool = UpstreamPool(upstream)
        self._http = HTTPServer(self._handle, host, port)
        self._lock = threading.Lock()
        self._setting = self._parse(fault, params)
        self._counts = _zero_counts(self.modes)

    @property
    def port(self) -> int:
        return self._http.port

    @property
    def url(self) -> str:
        return f"http://{self._http.host}:{self.port}"

    @property
    def fault(self) -> FaultSetting:
        return self._setting

    def set_fault(self, mode: str, **params: int | float) -> FaultSetting:
        """Switch the fault for requests that arrive from now on. Raises ValueError."""
        setting = self._parse(mode, params)
        with self._lock:
            self._setting = setting
        log.info("fault set: %s", setting.as_dict())
        return setting

    def _parse(self, mode: object, params: Mapping[str, object]) -> FaultSetting:
        """The setting, validated against this side's modes; a mode of the other side is
        named as such, so that a user who started the wrong side is told how to fix it."""
        other = SIDES[1 - SIDES.index(self.side)]
        if mode not in self.modes and mode in _VOCABULARY[other][0]:
            raise ValueError(
                f"fault {mode!r} is a fault of the {other} side and this gateway is on the "
                f"{self.side} side (start it with --side {other}); valid modes: "
                f"{', '.join(self.modes)}"
            )
        return FaultSetting.parse(mode, params, self.modes, self._table)

    def stats(self) -> dict[str, Any]:
        """What ``GET /_chaos/stats`` answers (see the module doc)."""
        with self._lock:
            counts = dict(self._counts)
            requests = dict(counts.pop("requests"))
        return {
            "requests": requests,
            **counts,
            "upstream_requests": self._pool.requests,
            "upstream_connections": self._pool.opened,
            "open_connections": self._http.open_connections,
            "side": self.side,
        }

    def reset_stats(self) -> None:
        with self._lock:
            self._counts = _zero_counts(self.modes)
        self._pool.requests = self._pool.opened = 0

    async def start(self) -> None:
        await self._http.start()

    async def stop(self) -> None:
        await self._http.stop()
        self._pool.close()

    # -- request handling

    async def _handle(self, req: Request, resp: Responder) -> None:
        if req.path == "/_chaos" or req.path.startswith("/_chaos/"):
            await self._chaos(req, resp)
            return
        if self.side == "downstream":
            await self._downstream(req, resp)
            return
        stream = _is_stream(req.body)
        with self._lock:
            setting = self._setting if stream else FaultSetting()
            self._counts["requests"][setting.mode] += 1
            self._counts["stream_requests" if stream else "non_stream_requests"] += 1
        log.debug("%s %s stream=%s fault=%s", req.method, req.path, stream, setting.mode)
        await inject(Call(req, resp, setting, self._proxy))

    async def _downstream(self, req: Request, resp: Responder) -> None:
        """In front of the service: the fault applies to a ``200 text/event-stream`` answer
        (``_proxy`` counts it once the answer's head says so); any other answer passes."""
        with self._lock:
            setting = self._setting
        log.debug("%s %s side=downstream fault=%s", req.method, req.path, setting.mode)
        # As a reverse proxy set up for it does (nginx: proxy_set_header X-Forwarded-Host
        # $host): the service learns the host the browser asked for, which the pool's
        # rewritten Host hides (the beacon endpoint's same-origin check reads it).
        host = next((v for k, v in req.headers if k.lower() == "host"), None)
        if host is not None and all(k.lower() != "x-forwarded-host" for k, _ in req.headers):
            req = replace(req, headers=[*req.headers, ("X-Forwarded-Host", host)])
        transform = DOWNSTREAM_TRANSFORMS[setting.mode]
        await self._proxy(Call(req, resp, setting, self._proxy), transform)

    def _count(self, mode: str, *, stream: bool) -> None:
        with self._lock:
            self._counts["requests"][mode] += 1
            self._counts["stream_requests" if stream else "non_stream_requests"] += 1

    async def _proxy(self, c: Call, transform: Transform | None) -> None:
        """Forward ``c.req`` upstream; a ``200 text/event-stream`` answer goes through
        ``transform`` (None: unchanged), any other answer passes through unchanged."""
        # nginx's proxy_read_timeout covers the wait for the head too: a 504 page after it
        head_timeout = c.params["seconds"] if c.setting.mode == "idle-timeout" else None
        try:
            ex = await asyncio.wait_for(self._pool.forward(c.req), head_timeout)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, HTTPError) as err:
            if isinstance(err, TimeoutError) and head_timeout is not None:
                self._count(c.setting.mode, stream=False)  # the fault answered, SSE or not
                await c.resp.send(504, [("Content-Type", "text/html")], nginx_page(504).encode())
                return
            if self.side == "downstream":
                self._count("pass", stream=False)
            message = f"chunkwatch gateway got no answer from the upstream: {err!r}"
            await self._bad_gateway(c.resp, message)
            return
        if self.side == "downstream":  # before the answer: a client may read stats after it
            self._count(c.setting.mode if ex.is_sse else "pass", stream=ex.is_sse)
        try:
            await (transform(c, ex) if transform is not None and ex.is_sse else _pass(c.resp, ex))
        except ClientGone:
            raise
        except (ConnectionError, asyncio.IncompleteReadError) as err:
            if c.resp.started:
                log.info("the upstream dropped the stream, dropping the client too: %s", err)
                await c.resp.abort()
            else:
                await self._bad_gateway(c.resp, f"the upstream dropped the connection: {err}")
        finally:
            ex.release()

    async def _bad_gateway(self, resp: Responder, message: str) -> None:
        message = f"{message} (upstream {self.upstream})"
        log.warning("%s", message)
        await resp.send_json(502, openai_error(message, "upstream_error", code="bad_gateway"))

    async def _chaos(self, req: Request, resp: Responder) -> None:
        if req.path == "/_chaos" and req.method == "GET":
            await resp.send_json(200, self.fault.as_dict())
        elif req.path == "/_chaos" and req.method == "PUT":
            try:
                body = json.loads(req.body)
                if not isinstance(body, dict) or "fault" not in body:
                    raise ValueError('the body must be a JSON object with a "fault" key')
                mode = body.pop("fault")
                setting = self._parse(mode, body)
            except ValueError as err:
                await resp.send_json(400, _chaos_error(str(err), self.modes))
                return
            self.set_fault(setting.mode, **setting.params)
            await resp.send_json(200, setting.as_dict())
        elif req.path == "/_chaos/stats" and req.method in ("GET", "DELETE"):
            if req.method == "DELETE":
                self.reset_stats()
            await resp.send_json(200, self.stats())
        elif req.path in ("/_chaos", "/_chaos/stats"):
            allow = "GET, PUT" if req.path == "/_chaos" else "GET, DELETE"
            message = f"{req.method} is not allowed on {req.path}; use {allow}"
            await resp.send_json(405, _chaos_error(message, self.modes), [("Allow", allow)])
        else:
            message = f"no chaos endpoint {req.path}; use /_chaos or /_chaos/stats"
            await resp.send_json(404, _chaos_error(message, self.modes))


async def _pass(resp: Responder, ex: Exchange) -> None:
    """Healthy: the upstream's answer, each piece written as soon as it arrives."""
    framing, length = ex.head.framing, ex.head.length
    content_length = length if framing == "length" else (0 if framing == "none" else None)
    await resp.start(ex.head.status, ex.headers, content_length=content_length)
    async for piece in ex.body():
        await resp.write(piece)
    await resp.end()


def _zero_counts(modes: Sequence[str]) -> dict[str, Any]:
    return {
        "requests": dict.fromkeys(modes, 0),
        "stream_requests": 0,
        "non_stream_requests": 0,
    }


def _chaos_error(message: str, modes: Sequence[str]) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": "invalid_chaos_request",
            "valid_modes": list(modes),
        }
    }


def _is_stream(body: bytes) -> bool:
    if b'"stream"' not in body:
        return False
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(obj, dict) and obj.get("stream") is True


# -- command line --------------------------------------------------------------------------


def add_gateway_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``gateway`` subcommand to an argparse subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "gateway",
        help="run a reverse proxy that injects streaming faults",
        description="A reverse proxy that forwards streams chunk by chunk and injects the faults "
        "real gateways commit; switch them while it runs with PUT /_chaos. --side upstream "
        '(default): in front of the model API, faults on requests with "stream": true. '
        "--side downstream: in front of the service, faults on every text/event-stream answer.",
    )
    p.add_argument("--upstream", required=True, metavar="URL", help="where to forward requests")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8401, help="port (default 8401; 0 picks a free one)")
    p.add_argument(
        "--side",
        default="upstream",
        choices=SIDES,
        help="upstream (default): between the service and the model API; downstream: between "
        "the browser and the service",
    )
    p.add_argument(
        "--fault",
        default="pass",
        choices=_ALL_MODES,
        metavar="MODE",
        help=f"fault mode (default pass). upstream: {', '.join(FAULT_MODES)}. "
        f"downstream: {', '.join(DOWNSTREAM_MODES)}",
    )
    p.add_argument(
        "--events",
        type=int,
        help="truncate*, error-event, inband-error, close-after-events: data events before the "
        "cut (3)",
    )
    p.add_argument("--limit", type=float, help="stall*, keepalive-only: seconds held open (60)")
    p.add_argument("--interval", type=float, help="keepalive-only: seconds between comments (1)")
    p.add_argument(
        "--bytes", type=int, help="trickle: bytes per write (7); close-after-bytes: bytes (1024)"
    )
    p.add_argument("--delay", type=float, help="trickle: seconds between writes (0.2)")
    p.add_argument("--status", type=int, help="status: the HTTP status (502)")
    p.add_argument("--kb", type=int, help="buffer-kb (8), gzip-buffered (16): the buffer's KB")
    p.add_argument("--seconds", type=float, help="idle-timeout: the idle timeout (60)")
    p.set_defaults(func=run_gateway, _gateway_parser=p)
    return p


def gateway_from_args(args: argparse.Namespace) -> Gateway:
    """A :class:`Gateway` from parsed arguments; ValueError names a bad combination."""
    tables = (FAULT_PARAMS, DOWNSTREAM_PARAMS)
    names = {name for table in tables for spec in table.values() for name in spec}
    params = {n: getattr(args, n) for n in sorted(names) if getattr(args, n, None) is not None}
    side = getattr(args, "side", "upstream")
    return Gateway(args.upstream, args.host, args.port, side=side, fault=args.fault, **params)


def run_gateway(args: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM; exit status 0 (2 for a bad fault or upstream URL)."""
    try:
        server = gateway_from_args(args)
    except ValueError as err:
        parser = getattr(args, "_gateway_parser", None)
        if parser is not None:
            parser.error(str(err))
        print(f"chunkwatch gateway: {err}", file=sys.stderr)
        return 2
    return asyncio.run(run_until_signal(server, "gateway"))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m chunkwatch_lab.fault_gateway --upstream URL [...]``."""
    parser = argparse.ArgumentParser(prog="python -m chunkwatch_lab.fault_gateway")
    add_gateway_parser(parser.add_subparsers(dest="command", required=True))
    return run_gateway(parser.parse_args(["gateway", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
