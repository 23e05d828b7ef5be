"""``ChunkwatchInstrumentor``: chunkwatch as an OpenTelemetry instrumentor.

Registered under the ``opentelemetry_instrumentor`` entry point, so
``opentelemetry-instrument python app.py`` (auto-instrumentation) installs the
library probes (the rows of :data:`chunkwatch.probes.PROBES` with a module: gateway,
sdk, langgraph). The Flask app's http/sse probes need the app object: call
``chunkwatch.instrument(app)`` in the app, or ``ChunkwatchInstrumentor().instrument(app=app)``.

Keyword arguments are those of :func:`chunkwatch.instrument` (others, which
``opentelemetry-instrument`` may pass to every instrumentor, are ignored); with
none, the configuration comes from the environment (:mod:`chunkwatch.config`).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

__all__ = ["ChunkwatchInstrumentor"]


class ChunkwatchInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    def instrumentation_dependencies(self) -> Collection[str]:
        return ("openai >= 1.0",)

    def _instrument(self, **kwargs: Any) -> None:
        import inspect

        from chunkwatch.instrumentation import instrument

        known = inspect.signature(instrument).parameters
        instrument(**{k: v for k, v in kwargs.items() if k in known})

    def _uninstrument(self, **kwargs: Any) -> None:
        from chunkwatch.instrumentation import uninstrument

        uninstrument(kwargs.get("app"))
