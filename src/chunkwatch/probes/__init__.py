"""One probe per layer, each hooking one seam of its library (see each module's docstring).

========== ======================================= =====================================
layer      seam                                    unit counted
========== ======================================= =====================================
gateway    httpx2 / httpx transport (response body) SSE ``data:`` events received
sdk        openai ``chat.completions.create``       chunks (content chunks noted)
langgraph  ``astream_events`` / ``astream``         token events or state updates
queue      :class:`~chunkwatch.probes.queue.WatchedQueue`  items got
sse        the WSGI response body                   events written
http       the WSGI app (Flask ``__call__``)        —
========== ======================================= =====================================

:data:`PROBES` is that table, bottom (network) to top (browser), and the one place the
layers' order and roles are written down: the verdict and the guard read the order from
it, ``chunkwatch.instrument()`` installs (and ``uninstrument()`` removes) the probes it
names, ``Deadlines`` watches its ``watched`` rows by default, orphaned streams are
followed at its ``model`` rows. A new layer is a name in :mod:`chunkwatch.semconv`
(``LAYERS`` lists the names in this order; a test checks they agree), its module, and a
row here. Nothing here imports a probe module: the rows name them.
"""

from __future__ import annotations

from typing import NamedTuple

from chunkwatch import semconv as sc

__all__ = ["PROBES", "Probe", "layer_order", "model_layers", "unit_words", "watched_layers"]


class Probe(NamedTuple):
    """One layer's row."""

    layer: str
    module: str | None  # installs it (``instrument`` / ``uninstrument``); None: app-level
    unit: str  # what it counts, in a person's words ("data events")
    watched: bool  # Deadlines' defaults apply to it (first chunk, idle)
    model: bool  # it sees the model's own stream: followed after the client left


PROBES: tuple[Probe, ...] = (
    Probe(sc.GATEWAY, "chunkwatch.probes.gateway", "data events", watched=True, model=True),
    Probe(sc.SDK, "chunkwatch.probes.sdk", "chunks", watched=True, model=True),
    Probe(sc.LANGGRAPH, "chunkwatch.probes.langgraph", "token events", watched=False, model=False),
    Probe(sc.QUEUE, None, "items", watched=False, model=False),
    Probe(sc.SSE, None, "events", watched=False, model=False),
    Probe(sc.HTTP, None, "responses", watched=False, model=False),
    # the browser's beacon, after the response (chunkwatch.js; docs/browser.md)
    Probe(sc.BROWSER, None, "events received", watched=False, model=False),
)


_order: tuple[tuple[Probe, ...], dict[str, int]] = ((), {})


def layer_order() -> dict[str, int]:
    """Each layer's place, bottom (0) to top; a layer not in the table sorts above all.
    (Read at every request's end: built once per table. Do not modify the result.)"""
    global _order
    table, order = _order
    if table is not PROBES:
        _order = (PROBES, {p.layer: i for i, p in enumerate(PROBES)})
        order = _order[1]
    return order


def unit_words(layer: str) -> str:
    """What ``layer`` counts, in words (``"units"`` for a layer not in the table)."""
    return next((p.unit for p in PROBES if p.layer == layer), "units")


def watched_layers() -> frozenset[str]:
    """The layers the watchdog's default deadlines apply to."""
    return frozenset(p.layer for p in PROBES if p.watched)


def model_layers() -> tuple[str, ...]:
    """The layers that see the model's own stream, lowest first."""
    return tuple(p.layer for p in PROBES if p.model)
