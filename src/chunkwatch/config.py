"""chunkwatch's options, from arguments and from the environment.

Every option of :func:`chunkwatch.instrument` can also be set in the environment,
so auto-instrumentation (``opentelemetry-instrument``, which calls the entry point
with no arguments) is configured the same way as code. An argument wins over its
variable; a variable wins over the default.

===================================  ===========================================
variable                             option
===================================  ===========================================
``CHUNKWATCH_UPSTREAMS``             ``upstreams``: ``host[:port]=name`` or
                                     ``URL-prefix=name``, comma-separated
``CHUNKWATCH_FIRST_CHUNK_TIMEOUT``   ``deadlines.first_chunk`` (seconds, 0 = off)
``CHUNKWATCH_IDLE_TIMEOUT``          ``deadlines.idle`` (seconds, 0 = off)
``CHUNKWATCH_SILENT_AT_END``         ``deadlines.silent_at_end`` (seconds, 0 = off)
``CHUNKWATCH_ABORT_STALLED``         ``deadlines.abort`` (1 / 0)
``CHUNKWATCH_CAPTURE_CONTENT``       ``capture_content`` (1 / 0)
``CHUNKWATCH_TRANSLATE_ERRORS``      ``translate_errors`` (1 / 0)
``CHUNKWATCH_METRICS_PATH``          ``metrics_path`` (empty: don't serve)
``CHUNKWATCH_BEACON_PATH``           ``beacon_path`` (empty: no beacon endpoint,
                                     no stream tokens)
===================================  ===========================================

A malformed value is an error that names the variable (``ValueError``), raised by
``instrument()``: a configuration that is silently dropped is worse than none.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from chunkwatch.watchdog import Deadlines, env_flag

__all__ = ["UNSET", "Settings", "parse_upstreams"]

UNSET: Any = object()  # an argument not given (None is a value for metrics_path)


def parse_upstreams(raw: str, *, name: str = "CHUNKWATCH_UPSTREAMS") -> dict[str, str]:
    """``"gw.example.com=azure-gw, 10.0.0.5:8443=internal"`` -> ``{host: name}``."""
    out: dict[str, str] = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.rpartition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{name}: {item!r} is not host[:port]=name")
        out[key.strip()] = value.strip()
    return out


@dataclass(frozen=True)
class Settings:
    """The options of one ``instrument()``: see the module docstring."""

    upstreams: Mapping[str, str] = field(default_factory=dict)
    deadlines: Deadlines = field(default_factory=Deadlines)
    capture_content: bool = False
    translate_errors: bool = True
    metrics_path: str | None = "/metrics"
    beacon_path: str | None = "/chunkwatch/beacon"  # the browser layer's endpoint
    agent_name: str | None = None  # the invoke_agent span's gen_ai.agent.name (None: the graph's)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        upstreams = parse_upstreams(env.get("CHUNKWATCH_UPSTREAMS", ""))
        path = env.get("CHUNKWATCH_METRICS_PATH")
        if path is not None and path and not path.startswith("/"):
            raise ValueError(f"CHUNKWATCH_METRICS_PATH={path!r}: expected a path like /metrics")
        beacon = env.get("CHUNKWATCH_BEACON_PATH")
        if beacon and not beacon.startswith("/"):
            raise ValueError(
                f"CHUNKWATCH_BEACON_PATH={beacon!r}: expected a path like /chunkwatch/beacon"
            )
        return cls(
            upstreams=upstreams,
            deadlines=Deadlines.from_env(env),
            capture_content=env_flag("CHUNKWATCH_CAPTURE_CONTENT", False, env),
            translate_errors=env_flag("CHUNKWATCH_TRANSLATE_ERRORS", True, env),
            metrics_path="/metrics" if path is None else (path or None),
            beacon_path="/chunkwatch/beacon" if beacon is None else (beacon or None),
            agent_name=env.get("CHUNKWATCH_AGENT_NAME") or None,
        )

    def override(self, **given: Any) -> Settings:
        """These settings with every argument that was given (not :data:`UNSET`)."""
        changes = {k: v for k, v in given.items() if v is not UNSET}
        if "upstreams" in changes:
            changes["upstreams"] = dict(changes["upstreams"] or {})
        if "deadlines" in changes and changes["deadlines"] is None:
            changes["deadlines"] = Deadlines()
        return replace(self, **changes)

    def differences(self, other: Settings) -> list[str]:
        """The names of the options that differ from ``other``."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]
