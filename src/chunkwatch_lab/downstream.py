"""The gateway's downstream faults: what proxies between the service and the browser do to
an event stream.

A gateway started with ``side="downstream"`` (``chunkwatch gateway --side downstream``)
sits in front of the service and applies its fault to every ``200 text/event-stream``
answer it proxies, whatever the request was; every other answer (the page, ``/healthz``,
a JSON error) passes through unchanged. :data:`DOWNSTREAM_MODES` and
:data:`DOWNSTREAM_PARAMS` are its vocabulary (validated by
:meth:`chunkwatch_lab.faults.FaultSetting.parse`); :data:`DOWNSTREAM_TRANSFORMS` maps each
mode to the :data:`~chunkwatch_lab.faults.Transform` the gateway applies.

Buffers flush bytes, not events, as the real proxies' do (a KB buffer may split an event);
the hops that cut by events cut at event boundaries. No buffer holds more than
:data:`MAX_BUFFER` bytes: past it, it flushes, so a client is never left waiting on a
buffer that only grows. ``docs/gateway.md`` (*Downstream*) names the real configuration
behind each mode and its fix.
"""

from __future__ import annotations

import asyncio
import logging
import re
import zlib
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing

from chunkwatch.sse import SSEParser
from chunkwatch_lab._upstream_pool import Exchange
from chunkwatch_lab.faults import Call, Transform

__all__ = [
    "DOWNSTREAM_MODES",
    "DOWNSTREAM_PARAMS",
    "DOWNSTREAM_TRANSFORMS",
    "MAX_BUFFER",
    "TERMINAL_EVENTS",
]

log = logging.getLogger("chunkwatch.gateway")

DOWNSTREAM_MODES: tuple[str, ...] = (
    "pass",
    "buffer-until-end",
    "buffer-kb",
    "gzip-buffered",
    "idle-timeout",
    "close-after-events",
    "close-after-bytes",
    "drop-terminal",
)
# mode -> {param: default}, as faults.FAULT_PARAMS (bounds: faults._MINIMUM / _MAXIMUM)
DOWNSTREAM_PARAMS: Mapping[str, Mapping[str, int | float]] = {
    "buffer-kb": {"kb": 8},  # nginx sends buffered bytes on in proxy_busy_buffers_size: 8|16 KB
    "gzip-buffered": {"kb": 16},  # about what zlib takes in before it emits, unflushed
    "idle-timeout": {"seconds": 60.0},  # nginx's proxy_read_timeout, AWS ALB's idle timeout
    "close-after-events": {"events": 3},
    "close-after-bytes": {"bytes": 1024},
}
MAX_BUFFER = 8 * 1024 * 1024  # a buffer that reaches this flushes: the client never waits on more
TERMINAL_EVENTS = frozenset({"done", "error"})  # the reference service's last event, one of them

# The end of an SSE block (an event or a comment): a line ending, then an empty line. LF and
# CRLF only: a lone-CR stream is never split and flushes at the end (or at MAX_BUFFER).
_BLANK_LINE = re.compile(rb"\n\r?\n")


async def _buffer_until_end(c: Call, ex: Exchange) -> None:
    """nginx ``proxy_buffering on``: the head at once, the body held until it ends."""
    await _flush_every(c, ex, MAX_BUFFER)


async def _buffer_kb(c: Call, ex: Exchange) -> None:
    """Buffering with full buffers sent on: a burst each time ``kb`` KB have come in."""
    await _flush_every(c, ex, int(c.params["kb"]) * 1024)


async def _flush_every(c: Call, ex: Exchange, size: int) -> None:
    await c.resp.start(200, ex.headers)
    held = bytearray()
    async with aclosing(ex.body()) as body:
        async for piece in body:
            held += piece
            while len(held) >= size:
                await c.resp.write(bytes(held[:size]))
                del held[:size]
    await c.resp.write(bytes(held))
    await c.resp.end()


async def _gzip_buffered(c: Call, ex: Exchange) -> None:
    """A compressor that flushes at its buffer size: ``Content-Encoding: gzip``, a sync flush
    each time ``kb`` KB of the stream came in, the rest at the end. Only for a client that
    accepts gzip (every browser does); for another the stream passes unchanged."""
    if not _accepts_gzip(c.req.header("accept-encoding")):
        await _unchanged(c, ex)
        return
    size = int(c.params["kb"]) * 1024
    drop = {"content-length", "content-encoding", "vary"}
    headers = [(k, v) for k, v in ex.headers if k.lower() not in drop]
    headers += [("Content-Encoding", "gzip"), ("Vary", "Accept-Encoding")]
    await c.resp.start(200, headers)
    gz = zlib.compressobj(wbits=31)  # gzip framing
    held = bytearray()
    async with aclosing(ex.body()) as body:
        async for piece in body:
            held += piece
            if len(held) >= size:
                await c.resp.write(gz.compress(bytes(held)) + gz.flush(zlib.Z_SYNC_FLUSH))
                held.clear()
    await c.resp.write(gz.compress(bytes(held)) + gz.flush())
    await c.resp.end()


async def _unchanged(c: Call, ex: Exchange) -> None:
    await c.resp.start(200, ex.headers)
    async with aclosing(ex.body()) as body:
        async for piece in body:
            await c.resp.write(piece)
    await c.resp.end()


def _accepts_gzip(value: str | None) -> bool:
    names = {token.partition(";")[0].strip().lower() for token in (value or "").split(",")}
    return bool(names & {"gzip", "*"})


async def _idle_timeout(c: Call, ex: Exchange) -> None:
    """The connection cut (no chunk terminator) once no byte came for ``seconds``. The
    wait for the head is the gateway's (a 504 page when it takes longer)."""
    seconds = float(c.params["seconds"])
    await c.resp.start(200, ex.headers)
    async with aclosing(ex.body()) as body:
        while True:
            try:
                piece = await asyncio.wait_for(anext(body), seconds)
            except StopAsyncIteration:
                break
            except TimeoutError:
                log.info("idle-timeout: no byte from the upstream for %s s, cutting", seconds)
                await c.resp.abort()
                return
            await c.resp.write(piece)
    await c.resp.end()


async def _close_after_events(c: Call, ex: Exchange) -> None:
    """A clean end right after the ``events``-th data event (comments pass, uncounted)."""
    limit, sent = int(c.params["events"]), 0
    await c.resp.start(200, ex.headers)
    async with aclosing(_blocks(ex)) as blocks:
        async for out, is_event, _ in blocks:
            if sent >= limit:  # events=0: not even the comments before the first event
                break
            await c.resp.write(out)
            sent += is_event
            if sent >= limit:  # at once, not when the next block comes
                break
    await c.resp.end()


async def _close_after_bytes(c: Call, ex: Exchange) -> None:
    """A clean end after ``bytes`` body bytes, wherever that falls (mid-event too)."""
    left = int(c.params["bytes"])
    await c.resp.start(200, ex.headers)
    async with aclosing(ex.body()) as body:
        async for piece in body:
            await c.resp.write(piece[:left])
            left -= len(piece[:left])
            if not left:
                break
    await c.resp.end()


async def _drop_terminal(c: Call, ex: Exchange) -> None:
    """Every block but the terminal event (``event: done`` / ``event: error``), clean end."""
    await c.resp.start(200, ex.headers)
    async with aclosing(_blocks(ex)) as blocks:
        async for out, _, name in blocks:
            if name not in TERMINAL_EVENTS:
                await c.resp.write(out)
    await c.resp.end()


async def _blocks(ex: Exchange) -> AsyncGenerator[tuple[bytes, bool, str | None], None]:
    """The body as SSE blocks, each as soon as it is complete: ``(bytes, is a data event,
    its event name)``. Whatever is left at the end (or past MAX_BUFFER without a blank
    line) comes as one more block, classified as if it were complete."""
    held = b""
    async with aclosing(ex.body()) as body:
        async for piece in body:
            held += piece
            start = 0
            while (m := _BLANK_LINE.search(held, start)) is not None:
                yield _block(held[start : m.end()])
                start = m.end()
            held = held[start:]
            if len(held) >= MAX_BUFFER:
                yield _block(held)
                held = b""
    if held:
        yield _block(held)


def _block(raw: bytes) -> tuple[bytes, bool, str | None]:
    parser = SSEParser(collect=True, strict_json=False)
    events = parser.feed(raw if raw.endswith(b"\n\n") else raw + b"\n\n")
    if not events:
        return raw, False, None
    return raw, True, events[0].event or "message"


DOWNSTREAM_TRANSFORMS: Mapping[str, Transform | None] = {
    "pass": None,
    "buffer-until-end": _buffer_until_end,
    "buffer-kb": _buffer_kb,
    "gzip-buffered": _gzip_buffered,
    "idle-timeout": _idle_timeout,
    "close-after-events": _close_after_events,
    "close-after-bytes": _close_after_bytes,
    "drop-terminal": _drop_terminal,
}
assert sorted(DOWNSTREAM_TRANSFORMS) == sorted(DOWNSTREAM_MODES)
assert set(DOWNSTREAM_PARAMS) <= set(DOWNSTREAM_MODES)
