"""``chunkwatch serve`` with some probes left out, to attribute the pipeline's overhead.

    python bench/_serve_without.py gateway,sdk serve --llm-url URL ...

Layers: ``gateway``, ``sdk``, ``langgraph`` (the library probes) and ``app`` (the
http, sse and queue probes on the Flask app). Used by ``bench/pipeline.py
--without``; not a supported configuration of the service.
"""

from __future__ import annotations

import sys
from typing import Any

from chunkwatch.cli import main
from chunkwatch.integrations import flask as flask_integration
from chunkwatch.probes import gateway, langgraph, sdk


def _off(*args: Any, **kwargs: Any) -> None:
    return None


def leave_out(layers: set[str]) -> None:
    unknown = layers - {"gateway", "sdk", "langgraph", "app"}
    if unknown:
        raise SystemExit(f"unknown layers: {sorted(unknown)}")
    for name, module in (("gateway", gateway), ("sdk", sdk), ("langgraph", langgraph)):
        if name in layers:
            module.instrument = _off  # type: ignore[assignment]
    if "app" in layers:
        flask_integration.instrument_app = _off  # type: ignore[assignment]


if __name__ == "__main__":
    leave_out({x for x in sys.argv[1].split(",") if x})
    sys.exit(main(sys.argv[2:]))
