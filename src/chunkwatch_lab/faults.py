"""The gateway's fault modes: what each one does to a streaming request.

:data:`FAULT_MODES` lists the modes and :data:`FAULT_PARAMS` their parameters (the
downstream side's: :mod:`chunkwatch_lab.downstream`); :class:`FaultSetting` is a validated
mode with its parameters; :func:`inject` answers one request as its mode does. Modes that
transform the stream hand the gateway a :data:`Transform` to apply to the upstream's
``200 text/event-stream`` answer (the gateway's :data:`Proxy` forwards, and owns every other
outcome); the others answer without the upstream. :func:`aggregate` (the ``json`` mode's
logic) and :func:`openai_error` live in the I/O-free :mod:`chunkwatch_lab._bodies` (re-exported).
``docs/gateway.md`` has every mode on the wire and what the openai SDK makes of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from chunkwatch.sse import Event, format_comment, format_event
from chunkwatch_lab._bodies import (
    BLOCK_PAGE,
    NGINX_TITLES,
    aggregate,
    nginx_page,
    openai_error,
    status_body,
)
from chunkwatch_lab._http import Request, Responder
from chunkwatch_lab._upstream_pool import Exchange

__all__ = [
    "FAULT_MODES",
    "FAULT_PARAMS",
    "INBAND_MESSAGE",
    "PROMPT_FILTER_EVENT",
    "Call",
    "FaultSetting",
    "Proxy",
    "Transform",
    "aggregate",
    "inject",
    "openai_error",
]

log = logging.getLogger("chunkwatch.gateway")

# fmt: off
FAULT_MODES: tuple[str, ...] = (
    "pass", "zero", "zero-abrupt", "done-only", "json", "html", "buffer", "buffer-late",
    "truncate", "truncate-abrupt", "stall", "stall-headers", "keepalive-only", "trickle",
    "status", "reject-stream-options", "malformed", "no-blank-lines", "error-event",
    "gzip-stripped", "filter-only", "inband-error",
)
# fmt: on

# mode -> {param: default}; the type of the default is the type of the parameter.
FAULT_PARAMS: Mapping[str, Mapping[str, int | float]] = {
    "truncate": {"events": 3},
    "truncate-abrupt": {"events": 3},
    "error-event": {"events": 3},
    "inband-error": {"events": 3},
    "stall": {"limit": 60.0},
    "stall-headers": {"limit": 60.0},
    "keepalive-only": {"interval": 1.0, "limit": 60.0},
    "trickle": {"bytes": 7, "delay": 0.2},
    "status": {"status": 502},
}
_MINIMUM = {"events": 0, "limit": 0.001, "interval": 0.001, "bytes": 1, "delay": 0.0, "status": 400}
_MINIMUM |= {"kb": 1, "seconds": 0.001}  # the downstream modes' (chunkwatch_lab.downstream)
_MAXIMUM = {"status": 599, "kb": 8192}  # kb: no buffer holds more than 8 MiB

_SSE_HEADERS = [("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache")]
_HTML = [("Content-Type", "text/html; charset=utf-8")]
# what inband-error sends after its events: an object that is not a chunk, and no [DONE]
INBAND_MESSAGE = "policy failed: the response was blocked by the gateway's content policy"
_SAFE = {"filtered": False, "severity": "safe"}
# Azure's first stream event with content filtering on: the prompt's results, no choice
PROMPT_FILTER_EVENT = {
    "id": "",
    "object": "",
    "created": 0,
    "model": "",
    "choices": [],
    "prompt_filter_results": [
        {
            "prompt_index": 0,
            "content_filter_results": dict.fromkeys(
                ("hate", "self_harm", "sexual", "violence"), _SAFE
            ),
        }
    ],
}


@dataclass(frozen=True)
class FaultSetting:
    """A fault mode and its parameters (all of them, defaults filled in)."""

    mode: str = "pass"
    params: Mapping[str, int | float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"fault": self.mode, **self.params}

    @classmethod
    def parse(
        cls,
        mode: object,
        params: Mapping[str, object],
        modes: Sequence[str] = FAULT_MODES,
        table: Mapping[str, Mapping[str, int | float]] = FAULT_PARAMS,
    ) -> FaultSetting:
        """Validate ``mode`` and ``params`` against ``modes`` and their parameter ``table``
        (a downstream gateway passes its own); ValueError says what is wrong and what is valid."""
        if mode not in modes:
            raise ValueError(f"unknown fault mode {mode!r}; valid modes: {', '.join(modes)}")
        assert isinstance(mode, str)
        spec = table.get(mode, {})
        unknown = sorted(set(params) - set(spec))
        if unknown:
            allowed = ", ".join(spec) or "none"
            raise ValueError(
                f"fault {mode!r} takes no parameter {unknown}; its parameters: {allowed}"
            )
        values = {
            name: _param(name, params.get(name, default), default) for name, default in spec.items()
        }
        return cls(mode, values)


def _param(name: str, value: object, default: int | float) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"parameter {name!r} must be a number, not {value!r}")
    if not math.isfinite(value):  # NaN slips past every comparison; an endless hold spins
        raise ValueError(f"parameter {name!r} must be a finite number, not {value!r}")
    if isinstance(default, int) and not float(value).is_integer():
        raise ValueError(f"parameter {name!r} must be an integer, not {value!r}")
    number: int | float = int(value) if isinstance(default, int) else float(value)
    low, high = _MINIMUM.get(name, 0), _MAXIMUM.get(name)
    if number < low or (high is not None and number > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"parameter {name!r} must be {bounds}, not {value!r}")
    return number


@dataclass(slots=True)
class Call:
    """One stream request under a fault, and the gateway's way to forward it upstream."""

    req: Request
    resp: Responder
    setting: FaultSetting
    proxy: Proxy

    @property
    def params(self) -> Mapping[str, int | float]:
        return self.setting.params


# A Transform writes the client's answer from the upstream's 200 text/event-stream one; the
# gateway's Proxy forwards call.req upstream and applies one (None: pass the answer unchanged).
Transform = Callable[[Call, Exchange], Awaitable[None]]
Answer = Callable[[Call], Awaitable[None]]
Proxy = Callable[[Call, Transform | None], Awaitable[None]]


async def inject(call: Call) -> None:
    """Answer ``call`` as its fault mode does. Raises ClientGone if the client left."""
    mode = call.setting.mode
    if mode in _ANSWERS:
        await _ANSWERS[mode](call)
    else:
        await call.proxy(call, _TRANSFORMS[mode])


# -- the faults that transform the upstream's stream -----------------------------------------


async def _json(c: Call, ex: Exchange) -> None:
    await c.resp.send_json(200, aggregate([event async for event in ex.events()]))


async def _buffer(c: Call, ex: Exchange) -> None:
    await c.resp.send(200, ex.headers, await ex.read_all())


async def _buffer_late(c: Call, ex: Exchange) -> None:
    await c.resp.start(200, ex.headers)
    await c.resp.write(await ex.read_all())
    await c.resp.end()


async def _trickle(c: Call, ex: Exchange) -> None:
    size, delay = int(c.params["bytes"]), float(c.params["delay"])
    await c.resp.start(200, ex.headers)
    first = True
    async for piece in ex.body():
        for i in range(0, len(piece), size):
            if not first:
                await asyncio.sleep(delay)
            first = False
            await c.resp.write(piece[i : i + size])
    await c.resp.end()


async def _gzip(c: Call, ex: Exchange) -> None:
    gz = zlib.compressobj(wbits=31)  # gzip framing, flushed per piece: it still streams
    await c.resp.start(200, ex.headers)
    async for piece in ex.body():
        await c.resp.write(gz.compress(piece) + gz.flush(zlib.Z_SYNC_FLUSH))
    await c.resp.write(gz.flush())
    await c.resp.end()


async def _events(
    c: Call, ex: Exchange, encode: Callable[[Event], bytes], limit: int | None = None
) -> None:
    """Start an SSE response and write the upstream's events through ``encode``; with
    ``limit``, stop after that many events or before the final one, whichever is first."""
    await c.resp.start(200, ex.headers)
    sent = 0
    async with aclosing(ex.events()) as events:
        async for event in events:
            if limit is not None and (sent >= limit or _is_final(event)):
                return
            await c.resp.write(encode(event))
            sent += 1


def _same(event: Event) -> bytes:
    return format_event(event.data, event.event or None, event.id)


def _cut_short(event: Event) -> bytes:
    """A JSON object cut in the middle, as a proxy with a line limit would leave it."""
    if event.data == "[DONE]":
        return _same(event)
    return format_event(event.data[: max(1, len(event.data) // 2)].rstrip("}") or "{")


async def _truncate(c: Call, ex: Exchange) -> None:
    await _events(c, ex, _same, int(c.params["events"]))
    await c.resp.end()


async def _truncate_abrupt(c: Call, ex: Exchange) -> None:
    await _events(c, ex, _same, int(c.params["events"]))
    await c.resp.abort()


async def _error_event(c: Call, ex: Exchange) -> None:
    n = int(c.params["events"])
    await _events(c, ex, _same, n)
    message = (
        f"The model stream was interrupted after {n} events: upstream connection reset "
        "(fault injected by chunkwatch gateway)."
    )
    error = openai_error(message, "server_error", code="stream_interrupted")
    await c.resp.write(format_event(json.dumps(error), event="error"))
    await c.resp.end()


async def _inband_error(c: Call, ex: Exchange) -> None:
    await _events(c, ex, _same, int(c.params["events"]))
    await c.resp.write(format_event(json.dumps({"message": INBAND_MESSAGE})))
    await c.resp.end()


async def _malformed(c: Call, ex: Exchange) -> None:
    await _events(c, ex, _cut_short)
    await c.resp.end()


async def _no_blank_lines(c: Call, ex: Exchange) -> None:
    await _events(c, ex, lambda event: _same(event)[:-1])  # without the blank line
    await c.resp.end()


def _is_final(event: Event) -> bool:
    """``[DONE]``, a chunk with a finish_reason, or the usage chunk."""
    if event.data == "[DONE]":
        return True
    try:
        obj = json.loads(event.data)
    except ValueError:
        return False
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list):
        return False
    if not choices:
        return bool(obj.get("usage"))
    return any(isinstance(choice, dict) and choice.get("finish_reason") for choice in choices)


# -- the faults that answer without the upstream ---------------------------------------------


async def _zero(c: Call) -> None:
    await c.resp.start(200, _SSE_HEADERS)
    await c.resp.end()


async def _zero_abrupt(c: Call) -> None:
    await c.resp.start(200, _SSE_HEADERS)
    await c.resp.abort()


async def _done_only(c: Call) -> None:
    await c.resp.start(200, _SSE_HEADERS, body=format_event("[DONE]"))
    await c.resp.end()


async def _filter_only(c: Call) -> None:
    body = format_event(json.dumps(PROMPT_FILTER_EVENT)) + format_event("[DONE]")
    await c.resp.start(200, _SSE_HEADERS, body=body)
    await c.resp.end()


async def _html(c: Call) -> None:
    await c.resp.send(200, _HTML, BLOCK_PAGE.encode())


async def _stall(c: Call) -> None:
    await c.resp.start(200, _SSE_HEADERS)
    await _stall_headers(c)


async def _stall_headers(c: Call) -> None:
    if not await c.resp.hold(float(c.params["limit"])):
        await c.resp.abort()


async def _keepalive_only(c: Call) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + float(c.params["limit"])
    interval = float(c.params["interval"])
    await c.resp.start(200, _SSE_HEADERS, body=format_comment("keepalive"))
    while (left := deadline - loop.time()) > 0:
        if await c.resp.hold(min(interval, left)):
            return  # the client went away
        if deadline - loop.time() > 0:
            await c.resp.write(format_comment("keepalive"))
    await c.resp.end()


async def _status(c: Call) -> None:
    status = int(c.params["status"])
    if status in NGINX_TITLES:
        await c.resp.send(status, _HTML, nginx_page(status).encode())
        return
    retry = [("Retry-After", "1")] if status == 429 else []
    await c.resp.send_json(status, status_body(status), retry)


async def _reject_stream_options(c: Call) -> None:
    try:
        has_options = "stream_options" in json.loads(c.req.body)
    except (ValueError, TypeError):
        has_options = False
    if not has_options:
        await c.proxy(c, None)
        return
    message = "Unrecognized request argument supplied: stream_options"
    await c.resp.send_json(400, openai_error(message, "invalid_request_error"))


_TRANSFORMS: dict[str, Transform | None] = {
    "pass": None,
    "json": _json,
    "buffer": _buffer,
    "buffer-late": _buffer_late,
    "truncate": _truncate,
    "truncate-abrupt": _truncate_abrupt,
    "trickle": _trickle,
    "malformed": _malformed,
    "no-blank-lines": _no_blank_lines,
    "error-event": _error_event,
    "gzip-stripped": _gzip,
    "inband-error": _inband_error,
}
_ANSWERS: dict[str, Answer] = {
    "zero": _zero,
    "zero-abrupt": _zero_abrupt,
    "done-only": _done_only,
    "html": _html,
    "stall": _stall,
    "stall-headers": _stall_headers,
    "keepalive-only": _keepalive_only,
    "status": _status,
    "reject-stream-options": _reject_stream_options,
    "filter-only": _filter_only,
}
assert sorted([*_TRANSFORMS, *_ANSWERS]) == sorted(FAULT_MODES)
