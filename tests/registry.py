"""A prometheus_client registry's samples, for tests that compare what two writers expose."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest


def registry_samples(
    registry: CollectorRegistry,
) -> dict[tuple[str, tuple[tuple[str, str], ...]], Any]:
    """Every sample of ``registry`` but ``*_created``: (name, sorted labels) -> (value,
    (exemplar labels, exemplar value) or None)."""
    out = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            ex = None if s.exemplar is None else (dict(s.exemplar.labels), s.exemplar.value)
            out[(s.name, tuple(sorted(s.labels.items())))] = (s.value, ex)
    return out


def assert_plain_openmetrics(registry: CollectorRegistry, trace_id: str) -> None:
    """Valid OpenMetrics without ``*_created`` series, with ``trace_id``'s exemplar."""
    text = generate_latest(registry).decode()
    assert "_created" not in text
    assert f'# {{trace_id="{trace_id}"}} 1.0' in text
    assert text.endswith("# EOF\n")


def family_types(registry: CollectorRegistry) -> dict[str, str]:
    """Each family the registry exposes, by name: its type."""
    return {f.name: f.type for f in registry.collect()}
