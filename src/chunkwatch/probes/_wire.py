"""What came over the wire from a gateway: response headers and body bytes, into a tally.

The gateway probe's reading half: :func:`note_headers` records status and the
headers that matter (never Authorization or api-key: only the names listed here
are read), and :class:`Reader` reads the body with the library's one body reader,
:class:`chunkwatch.wire.WireReader` (Content-Encoding, SSE framing in counting mode,
annotations and in-band errors once per stream: the rules are documented there and
shared with the doctor), and finalizes the tally once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from chunkwatch import semconv as sc
from chunkwatch.ledger import Tally
from chunkwatch.outcomes import End
from chunkwatch.probes.lifecycle import Ending
from chunkwatch.runtime import Runtime
from chunkwatch.sse import SSEParser
from chunkwatch.wire import WireReader, record

__all__ = ["Reader", "note_headers"]


_NOTED = frozenset(
    (
        "content-type",
        "content-length",
        "content-encoding",
        "transfer-encoding",
        *sc.REQUEST_ID_HEADERS,
    )
)


# of the noted headers, those also recorded under their HTTP semantic-convention names
_SEMCONV_HEADERS = ("content-type", "content-length", "content-encoding", "transfer-encoding")


_NOTED_RAW = {name.encode(): name for name in _NOTED}


def _noted(headers: Any) -> dict[str, str]:
    """The values of the noted headers, by lower-case name, repeated ones joined with ", "
    (as ``headers[name]`` gives them), in one pass over the raw bytes: an httpx
    ``Headers`` lookup scans every header, and its ``multi_items`` decodes every name and
    value (asking the headers' encoding each time). A noted value is decoded alone; one
    that is not ASCII is decoded as httpx decodes it (its one encoding for all headers)."""
    noted: dict[str, str] = {}
    for raw_name, raw_value in headers.raw:
        name = _NOTED_RAW.get(raw_name.lower())
        if name is not None:
            try:
                value = raw_value.decode("ascii")
            except UnicodeDecodeError:
                value = raw_value.decode(headers.encoding)
            noted[name] = f"{noted[name]}, {value}" if name in noted else value
    return noted


def note_headers(rt: Runtime, tally: Tally, response: Any) -> SSEParser | None:
    """Record status and headers; return the parser for the body (None: not an event stream)."""
    tally.t_headers = time.perf_counter_ns()
    headers = _noted(response.headers)
    tally.status = response.status_code
    tally.content_type = headers.get("content-type")
    cl = headers.get("content-length")
    tally.content_length = int(cl) if cl and cl.isdigit() else None
    tally.content_encoding = headers.get("content-encoding")
    span = tally.span
    if span is not None and span.is_recording():  # else nobody reads them (_span_facts)
        tally.facts["span_attributes"] = _header_facts(tally, headers)
    if not tally.stream_requested:
        return None
    return SSEParser()


def _header_facts(tally: Tally, headers: dict[str, str]) -> dict[str, Any]:
    """The response's head, as the model call's span attributes."""
    facts: dict[str, Any] = {
        sc.HTTP_RESPONSE_STATUS_CODE: tally.status,
        "chunkwatch.http.content_type": tally.content_type or "",
        "chunkwatch.http.transfer_encoding": headers.get("transfer-encoding", ""),
    }
    if tally.content_length is not None:
        facts["chunkwatch.http.content_length"] = tally.content_length
    if tally.content_encoding:
        facts["chunkwatch.http.content_encoding"] = tally.content_encoding
    for name in sc.REQUEST_ID_HEADERS:
        if name in headers:
            facts[f"chunkwatch.http.{name.replace('-', '_')}"] = headers[name][:128]
    for name in _SEMCONV_HEADERS:  # http.response.header.<name>: string[] (HTTP semconv)
        if name in headers:
            facts[sc.HTTP_RESPONSE_HEADER_PREFIX + name] = (headers[name][:256],)
    return facts


class Reader(Ending):
    """The probe's side of :class:`chunkwatch.wire.WireReader`: bytes and the first byte's
    time into the tally, the evidence into it at the end, and the tally finished once
    (:class:`~chunkwatch.probes.lifecycle.Ending`).

    ``fast`` is the wire reader's counter once it offers one (an event stream, not
    compressed, first completion chunk seen): the bodies then inline :meth:`feed`."""

    __slots__ = ("_last", "fast", "wire")

    def __init__(self, tally: Tally, parser: SSEParser | None) -> None:
        super().__init__(tally)
        self.wire = WireReader(tally.content_encoding, parser=parser)
        self.fast: Callable[[bytes], int] | None = None
        self._last = b""

    @property
    def head(self) -> bytes | None:
        """The body kept while no completion chunk has come (None: counting as it comes)."""
        return self.wire.head

    def feed(self, chunk: bytes) -> None:
        tally = self.tally
        if not tally.bytes:
            tally.facts["t_first_byte"] = time.perf_counter_ns()
        tally.bytes += len(chunk)
        wire = self.wire
        new = wire.feed(chunk)
        if new:
            tally.unit(new)
        self.fast = wire.fast

    def end(self, end: End, exc: BaseException | None = None, last: bytes = b"") -> None:
        """Finish the tally (once); ``last`` is the last read of the body: in counting
        mode an in-band error is read off it."""
        self._last = last
        super().end(end, exc)

    def _facts(self, end: End, exc: BaseException | None) -> None:
        tally = self.tally
        wire = self.wire
        if wire.parser is not None:
            try:
                record(wire.close(self._last if self.fast is not None else None), tally)
            except Exception:
                self.bookkeeping_error("payloads")
        elif tally.status is not None and tally.bytes:
            tally.unit()  # a whole non-stream response is one unit
        self._span_facts()

    def _span_facts(self) -> None:
        tally = self.tally
        span = tally.span
        if span is None or not span.is_recording():  # unsampled, or the no-op tracer's
            return
        attrs = dict(tally.facts.get("span_attributes", {}))
        attrs[sc.A_BYTES] = tally.bytes
        attrs[sc.HTTP_RESPONSE_BODY_SIZE] = tally.bytes
        attrs[sc.A_DONE] = tally.terminal_seen
        attrs[sc.A_COMMENTS] = tally.comments
        if tally.t_headers is not None:
            attrs["chunkwatch.time_to_headers"] = (tally.t_headers - tally.t_start) / 1e9
        first_byte = tally.facts.get("t_first_byte")
        if first_byte is not None:
            attrs["chunkwatch.time_to_first_byte"] = (first_byte - tally.t_start) / 1e9
        span.set_attributes(attrs)
