"""Stream tokens and the recent streams they name: the state behind the beacon endpoint.

A stream token is what an SSE response carries in ``X-Chunkwatch-Stream`` and what its
beacon sends back. The server verifies it without storing it::

    v2.<id: 16 random bytes, hex>.<expiry, unix seconds>.<BLAKE2b-128 keyed with the
    secret (RFC 7693's MAC mode) of "id|expiry", hex>

about 80 characters (the beacon contract refuses any over 256). Every SSE response mints
one, so it is made with one hash call: keyed BLAKE2b is a MAC in its own right (HMAC's
two passes guard SHA-2's length extension, which BLAKE2 does not have) and costs a third
of HMAC-SHA256 here (``bench/RESULTS.md``). The secret comes from
``CHUNKWATCH_BEACON_SECRET``; without it, a random one per process — then a beacon
answered by another replica behind the same load balancer is ``forged``, so replicas
share one secret. A token lives :data:`TOKEN_LIFETIME` seconds from the response's
start.

:class:`RecentStreams` keeps a small :class:`StreamRecord` per finished SSE stream, by
token id: at most :data:`MAX_RECORDS`, none older than the token lifetime, the oldest
evicted first. A token that verifies but names no record is a stream this process did
not serve, or one evicted: ``unknown_stream``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any

__all__ = [
    "MAX_RECORDS",
    "TOKEN_LIFETIME",
    "RecentStreams",
    "StreamRecord",
    "TokenError",
    "Tokens",
]

TOKEN_LIFETIME = 600  # seconds: a beacon comes at the stream's end or on page hide
MAX_RECORDS = 10_000  # ~1 KB each: a bound on memory whatever the traffic
MAC_BYTES = 16  # 128 bits, beyond guessing
_VERSION = "v2"  # v1 (HMAC-SHA256, base64) tokens are refused as forged


class TokenError(Exception):
    """A token that does not verify; ``reason`` is ``forged`` or ``expired``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Tokens:
    """Issues and verifies stream tokens with one secret (see the module docstring)."""

    def __init__(
        self, secret: bytes | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        if secret is None:
            env = os.environ.get("CHUNKWATCH_BEACON_SECRET")
            secret = env.encode() if env else secrets.token_bytes(32)
        if len(secret) > hashlib.blake2b.MAX_KEY_SIZE:  # BLAKE2b takes a key of 64 bytes
            secret = hashlib.blake2b(secret).digest()
        self._secret = secret
        self._clock = clock

    def _mac(self, ident: str, expiry: str) -> str:
        message = f"{ident}|{expiry}".encode()
        return blake2b(message, key=self._secret, digest_size=MAC_BYTES).hexdigest()

    def issue(self) -> tuple[str, str, int]:
        """A new token, its id and its expiry (unix seconds)."""
        ident = os.urandom(16).hex()
        expiry = int(self._clock()) + TOKEN_LIFETIME
        token = f"{_VERSION}.{ident}.{expiry}.{self._mac(ident, str(expiry))}"
        return token, ident, expiry

    def verify(self, token: object) -> str:
        """The token's id; :class:`TokenError` if it is not ours or has expired."""
        if not isinstance(token, str) or len(token) > 256 or not token.isascii():
            raise TokenError("forged")
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != _VERSION or not parts[2].isdigit():
            raise TokenError("forged")
        _, ident, expiry, mac = parts
        # Constant time: a timing difference must not reveal how much of a MAC was right.
        if not hmac.compare_digest(mac, self._mac(ident, expiry)):
            raise TokenError("forged")
        if int(expiry) < self._clock():
            raise TokenError("expired")
        return ident


@dataclass(slots=True)
class StreamRecord:
    """What the sse layer saw of one stream, kept for its beacon and the page. Opened when
    the response starts (a beacon may come before the service noticed the stream's end:
    a hop that cut it), filled when the sse tally finished."""

    expiry: int  # the token's: the record goes with it
    events: int = 0  # events written (the sse tally's units)
    first_ms: float | None = None  # first / last event written, ms from the sse start
    last_ms: float | None = None
    gap_ms: float | None = None  # the longest gap between two events written
    terminal: bool = False  # the last event written was a terminal one (done / error)
    parent: Any = None  # the request's OpenTelemetry context: the browser span's parent
    upstream: str = "none"
    funnel: dict[str, int] = field(default_factory=dict)
    verdict: dict[str, Any] | None = None  # Verdict.as_dict(): the client-safe words
    verdict_name: str | None = None  # "ok" or "<outcome>@<layer>"
    browser: dict[str, Any] | None = None  # set once, by the accepted beacon
    finished: bool = False  # the sse layer's facts are in
    claimed: bool = False  # a beacon was accepted: another is a replay
    early: dict[str, Any] | None = None  # a beacon that came before the stream finished


class RecentStreams:
    """Records by token id, bounded in number and age; every method is thread-safe."""

    def __init__(
        self, max_records: int = MAX_RECORDS, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._max = max_records
        self._clock = clock
        self._lock = threading.Lock()
        self._records: OrderedDict[str, StreamRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def add(self, ident: str, record: StreamRecord) -> None:
        with self._lock:
            records = self._records
            records[ident] = record
            while len(records) > self._max:
                records.popitem(last=False)
            self._expire()

    def _expire(self) -> None:
        # Inserted in time order with one lifetime, so the oldest expire first (streams
        # finish out of order, by at most a stream's length: a record may outlive its
        # token by that, never be dropped early).
        now = self._clock()
        records = self._records
        while records:
            first = next(iter(records.values()))
            if first.expiry >= now:
                break
            records.popitem(last=False)

    def get(self, ident: str) -> StreamRecord | None:
        with self._lock:
            record = self._records.get(ident)
            return None if record is None or record.expiry < self._clock() else record

    def claim(self, ident: str, beacon: dict[str, Any]) -> tuple[StreamRecord | None, bool]:
        """For ``beacon``: (None, False) if the stream is unknown; (record, False) if it was
        claimed already (a replay); (record, True) the first time — then, if the stream is
        still open, the beacon is parked on it for :meth:`finish` (``record.early``).
        Atomic: of two beacons for one stream exactly one claims it."""
        with self._lock:
            record = self._records.get(ident)
            if record is None or record.expiry < self._clock():
                return None, False
            if record.claimed:
                return record, False
            record.claimed = True
            if not record.finished:
                record.early = beacon
            return record, True

    def finish(self, ident: str, record: StreamRecord) -> dict[str, Any] | None:
        """The stream's facts are in: ``record`` replaces its open one; a beacon that came
        early is handed back (to be recorded now), and the claim carries over."""
        with self._lock:
            opened = self._records.get(ident)
            if opened is not None:
                record.claimed, record.early = opened.claimed, None
                self._records[ident] = record  # its place in the order (its start) is kept
            else:  # evicted while it ran: kept anew
                self._records[ident] = record
                while len(self._records) > self._max:
                    self._records.popitem(last=False)
            record.finished = True
            return None if opened is None else opened.early


class RateLimit:
    """A token bucket for the whole process: ``rate`` per second, bursts of ``burst``."""

    def __init__(
        self,
        rate: float = 50.0,
        burst: float = 200.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._level, self._at = burst, clock()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            now = self._clock()
            self._level = min(self.burst, self._level + (now - self._at) * self.rate)
            self._at = now
            if self._level < 1:
                return False
            self._level -= 1
            return True
