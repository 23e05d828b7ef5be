"""Whether a runtime's spans keep what is written on them, asked before a span starts.

The probes build a span's attributes (a dict per stream, some of them parsed or
redacted) only for a tracer that keeps them: the API's no-op tracer — no SDK, or an
SDK not configured yet — drops them and hands back the current span, so for it the
attributes, the span's name and making it current again are work for nothing. Asked
per stream, not once: a provider set globally later is found by the API's proxy
tracer, and from then on the attributes are written.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace as _trace
from opentelemetry.trace import NoOpTracer, ProxyTracer

__all__ = ["tracing"]


_MISSING = object()


def tracing(rt: Any) -> bool:
    """False when ``rt``'s tracer is the API's no-op one (directly or through the proxy)."""
    tracer = rt.tracer
    if type(tracer) is ProxyTracer:
        # What ProxyTracer._tracer asks, without the property's call: a tracer of the
        # provider set globally (once set, it stays), else the no-op. Private to
        # opentelemetry-api (checked: 1.30 .. 1.45; tests/test_private_internals.py):
        # should a release rename them, every span is written, as with an SDK.
        real = getattr(tracer, "_real_tracer", _MISSING)
        provider = getattr(_trace, "_TRACER_PROVIDER", _MISSING)
        if real is _MISSING or provider is _MISSING:
            return True
        return real is not None or provider is not None
    return type(tracer) is not NoOpTracer
