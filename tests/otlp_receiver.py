"""An in-test OTLP/HTTP trace receiver: what a collector or Jaeger receives, decoded.

Usage::

    with OTLPReceiver() as receiver:            # serving on a loopback port
        exporter = OTLPSpanExporter(endpoint=receiver.url)   # .../v1/traces
        ...
        spans = receiver.spans()                # every WireSpan received so far

It accepts ``POST /v1/traces`` (protobuf, gzip or not), decodes each
``ExportTraceServiceRequest`` with opentelemetry-proto and keeps it; the request path
and content type are kept too, so a test can check what the exporter sent.
"""

from __future__ import annotations

import gzip
import http.server
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from chunkwatch import semconv as sc

__all__ = ["OTLPReceiver", "WireSpan", "decode_spans", "value"]


class OTLPReceiver(http.server.ThreadingHTTPServer):
    """POST /v1/traces: decode and keep every ExportTraceServiceRequest.

    ``with OTLPReceiver() as r`` serves it in a daemon thread and shuts it down on exit;
    ``start()`` / ``stop()`` do the same by hand."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[ExportTraceServiceRequest] = []
        self.paths: list[str] = []
        self.lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """The base URL, as ``OTEL_EXPORTER_OTLP_ENDPOINT`` takes it."""
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def url(self) -> str:
        """The traces URL, as ``OTLPSpanExporter(endpoint=...)`` takes it."""
        return self.endpoint + "/v1/traces"

    def spans(self) -> list[WireSpan]:
        """Every span received so far, decoded."""
        with self.lock:
            requests = list(self.requests)
        return decode_spans(requests)

    def start(self) -> OTLPReceiver:
        self._thread = threading.Thread(
            target=self.serve_forever, name="otlp-receiver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(5)
            self._thread = None
        self.server_close()

    def __enter__(self) -> OTLPReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: OTLPReceiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(body)
        with self.server.lock:
            self.server.requests.append(msg)
            self.server.paths.append(f"{self.path} {self.headers.get('Content-Type')}")
        out = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: Any) -> None:
        pass


def value(v: AnyValue) -> Any:
    """The Python value of an OTLP ``AnyValue`` (arrays as tuples)."""
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(value(x) for x in v.array_value.values)
    return getattr(v, kind) if kind else None


@dataclass
class WireSpan:
    """One span as it arrived, with its attributes and its resource's, decoded."""

    span: Span
    attrs: dict[str, Any]
    resource: dict[str, Any]

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_id(self) -> str:
        """The parent span's id in hex, ``""`` for a root."""
        return self.span.parent_span_id.hex()

    @property
    def layer(self) -> str:
        """The ``chunkwatch.layer`` attribute (``"None"`` on other tools' spans)."""
        return str(self.attrs.get(sc.A_LAYER))

    @property
    def kind(self) -> str:
        """``CLIENT``, ``SERVER``, ``INTERNAL`` ..."""
        return str(Span.SpanKind.Name(self.span.kind)).removeprefix("SPAN_KIND_")

    def describe(self) -> str:
        return f"{self.span.name!r} {self.kind} layer={self.layer} id={self.span_id}"


def decode_spans(requests: Iterable[ExportTraceServiceRequest]) -> list[WireSpan]:
    """Every span of these export requests, in the order they arrived."""
    out = []
    for req in requests:
        for rs in req.resource_spans:
            resource = {a.key: value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for span in ss.spans:
                    attrs = {a.key: value(a.value) for a in span.attributes}
                    out.append(WireSpan(span, attrs, resource))
    return out
