"""The Grafana dashboards (dashboards/*.json) and their provisioning, read as data: the current
Grafana dashboard model, the panels on-call needs, queries written only in names the code
emits, exemplars linked to Jaeger, and file provisioning that matches compose.yaml.

That every query returns data from a live Prometheus fed by the real service is
tests/test_prometheus_e2e.py's job.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from chunkwatch import semconv as sc
from chunkwatch.metrics import Metrics
from chunkwatch.outcomes import Outcome

from .prom import DASHBOARDS, ROOT, dashboards, emitted_series, metric_names, panels

# Grafana 12's classic JSON model (apps/dashboard/pkg/migration/schemaversion: 41); newer
# Grafana migrates it forward on load.
SCHEMA_VERSION = 41
# Built-in panel types of current Grafana (React); the Angular ones (graph, singlestat,
# table-old, the old piechart/worldmap plugins) no longer load in Grafana 12.
PANEL_TYPES = {
    "row", "timeseries", "stat", "gauge", "bargauge", "heatmap", "state-timeline",
    "status-history", "table", "text", "barchart", "histogram", "piechart",
}  # fmt: skip
DS_REF = {"type": "prometheus", "uid": "${datasource}"}
# The histograms whose observations carry a trace_id exemplar (metrics.py: stream_finished),
# and the verdict counter: their panels must show exemplars.
EXEMPLAR_METRICS = {
    f"{sc.TIME_TO_FIRST_CHUNK}_bucket",
    f"{sc.STREAM_DURATION}_bucket",
    f"{sc.CHUNK_GAP_MAX}_bucket",
    f"{sc.REQUESTS}_total",
}
FUNNEL = [sc.GATEWAY, sc.SDK, sc.LANGGRAPH, sc.QUEUE, sc.SSE]
_SELECTOR = re.compile(r"((?:chunkwatch|gen_ai)_\w+)\{([^}]*)\}")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


@pytest.fixture(scope="module", params=sorted(dashboards()))
def dash(request: pytest.FixtureRequest) -> dict[str, Any]:
    return dashboards()[request.param]


def _targets(dash: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(p, t) for p in panels(dash) for t in p.get("targets", [])]


def test_there_is_an_overview_dashboard() -> None:
    """dashboards/ holds the overview on-call opens first."""
    assert "chunkwatch-overview.json" in dashboards()


def test_dashboard_follows_the_current_grafana_model(dash: dict[str, Any]) -> None:
    """schemaVersion, a stable uid, no instance id, no `__inputs` (file provisioning does not
    resolve them), current panel types only, unique panel ids, panels inside the 24-column
    grid and not overlapping."""
    assert dash["schemaVersion"] == SCHEMA_VERSION
    assert re.fullmatch(r"[a-z0-9-]{1,40}", dash["uid"])
    assert dash["id"] is None
    assert dash["title"] and dash["time"]["from"].startswith("now-")
    assert "__inputs" not in dash and "__requires" not in dash
    assert "${DS_" not in str(dash)
    nested = [q for p in dash["panels"] if p["type"] == "row" for q in p.get("panels", [])]
    ids = [p["id"] for p in dash["panels"] + nested]
    assert len(ids) == len(set(ids))
    boxes = []
    for p in dash["panels"]:
        assert p["type"] in PANEL_TYPES, p["type"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        boxes.append((p["title"], g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"]))
    for i, (a, ax0, ay0, ax1, ay1) in enumerate(boxes):
        for b, bx0, by0, bx1, by1 in boxes[i + 1 :]:
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, (a, b)


def test_every_panel_and_query_uses_the_datasource_variable(dash: dict[str, Any]) -> None:
    """Every panel and every query refers to Prometheus through `${datasource}` (a datasource
    ref object, not a name string); refIds are unique per panel; every panel says what it shows."""
    for panel in panels(dash):
        assert panel["datasource"] == DS_REF, panel["title"]
        assert panel.get("description"), panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DS_REF, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_datasource_and_upstream_variables(dash: dict[str, Any]) -> None:
    """A `datasource` variable of type datasource (Prometheus), and a multi-value `upstream`
    variable (All = `.*`) read from a metric that has the upstream label."""
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    up = variables["upstream"]
    assert up["type"] == "query" and up["datasource"] == DS_REF
    assert up["multi"] and up["includeAll"] and up["allValue"] == ".*"
    m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", up["definition"])
    assert m and m.group(2) == sc.L_UPSTREAM
    assert sc.L_UPSTREAM in emitted_series()[m.group(1)]
    assert up["query"]["query"] == up["definition"]


def test_queries_use_only_names_the_code_emits(dash: dict[str, Any]) -> None:
    """Every series a query reads is written by chunkwatch's Metrics (or is Prometheus's
    ALERTS); label names are that series' labels; layer/outcome values are in the vocabulary;
    and every series that has an `upstream` label is filtered by the `$upstream` variable."""
    series = emitted_series()
    layers = set(sc.LAYERS) | {sc.NO_LAYER}
    outcomes = {str(o) for o in Outcome}
    for panel, target in _targets(dash):
        expr = target["expr"]
        where = f"{panel['title']} {target['refId']}"
        for name in metric_names(expr):
            assert name in series, (where, name)
        for name, matchers in _SELECTOR.findall(expr):
            found = {label: value for label, _, value in _MATCHER.findall(matchers)}
            assert set(found) <= series[name], (where, name, found)
            if sc.L_UPSTREAM in series[name]:
                assert re.search(r'upstream=~"\$upstream"', matchers), (where, name)
            for v in found.get(sc.L_LAYER, "").split("|"):
                assert not v or v in layers, (where, v)
            for v in found.get(sc.L_OUTCOME, "").split("|"):
                assert not v or v in outcomes, (where, v)
        labels = set().union(*(series[n] for n in metric_names(expr)), {"le"})
        for group in _GROUPING.findall(expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                assert label in labels, (where, label)


def test_the_panels_on_call_needs_are_there() -> None:
    """The overview shows: outcomes by verdict layer; the funnel gateway -> sdk -> langgraph ->
    queue -> sse in that order; time to first chunk per layer; stalls, buffering, truncation;
    open streams; queue wait; SSE disconnects; instrumentation errors; and a Guard row with
    the stream mode and the fallbacks per upstream."""
    dash = dashboards()["chunkwatch-overview.json"]
    exprs = [t["expr"] for _, t in _targets(dash)]

    def shown(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    assert shown(rf"by \((outcome, layer|layer, outcome)\) \(rate\({sc.REQUESTS}_total")
    assert shown(
        rf"histogram_quantile\(0\.95, sum by \(le, layer\) \(rate\({sc.TIME_TO_FIRST_CHUNK}"
    )
    assert shown(rf"{sc.STALLS}_total")
    assert shown(rf'{sc.REQUESTS}_total\{{[^}}]*outcome="buffered"')
    assert shown(rf'{sc.REQUESTS}_total\{{[^}}]*outcome="truncated"')
    for name in (sc.STREAMS_OPEN, sc.QUEUE_WAIT, sc.SSE_DISCONNECTS, sc.INSTRUMENTATION_ERRORS):
        assert shown(name), name
    (funnel,) = [p for p in panels(dash) if p["type"] == "bargauge"]
    layers = [re.search(r'layer="(\w+)"', t["expr"]).group(1) for t in funnel["targets"]]  # type: ignore[union-attr]
    assert layers == FUNNEL
    assert all(f"{sc.CHUNKS}_total" in t["expr"] for t in funnel["targets"])
    top = dash["panels"]
    start = next(i for i, p in enumerate(top) if p["type"] == "row" and p["title"] == "Guard")
    end = next((i for i, p in enumerate(top) if i > start and p["type"] == "row"), len(top))
    guard_exprs = " ".join(t["expr"] for p in top[start + 1 : end] for t in p["targets"])
    assert sc.STREAM_MODE in guard_exprs and f"{sc.FALLBACKS}_total" in guard_exprs
    assert "by (upstream" in guard_exprs


def test_latency_panels_show_exemplars_in_seconds(dash: dict[str, Any]) -> None:
    """Every graph (time series, heatmap) of a histogram or counter that carries trace_id
    exemplars asks for them, and the latency panels are in seconds."""
    for panel, target in _targets(dash):
        names = metric_names(target["expr"])
        if names & EXEMPLAR_METRICS and panel["type"] in ("timeseries", "heatmap"):
            assert target["exemplar"] is True, panel["title"]
        if (
            any(n.endswith("_seconds_bucket") for n in names)
            and "histogram_quantile" in target["expr"]
        ):
            assert panel["fieldConfig"]["defaults"]["unit"] == "s", panel["title"]
        if panel["type"] == "heatmap":
            assert panel["options"]["yAxis"]["unit"] == "s" and target["format"] == "heatmap"


def test_provisioning_links_exemplars_to_jaeger_by_the_label_the_code_writes() -> None:
    """The Prometheus datasource turns the exemplar label chunkwatch writes (read from a real
    Metrics exemplar) into a link to the provisioned Jaeger datasource."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.request_finished(SimpleNamespace(outcome="ok", layer="none"), "up", "ab" * 16)  # type: ignore[arg-type]
    (sample,) = [s for m in registry.collect() for s in m.samples if s.exemplar is not None]
    exemplar_label = next(iter(sample.exemplar.labels))

    doc = yaml.safe_load(
        (DASHBOARDS / "provisioning" / "datasources" / "chunkwatch.yaml").read_text()
    )
    by_type = {d["type"]: d for d in doc["datasources"]}
    (link,) = by_type["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert link["name"] == exemplar_label
    assert link["datasourceUid"] == by_type["jaeger"]["uid"]
    assert doc["apiVersion"] == 1


def test_provisioning_and_compose_mount_the_same_paths() -> None:
    """The dashboard provider reads the directory compose.yaml mounts dashboards/ at, and
    Grafana gets the provisioning directory where it looks for it."""
    provider = yaml.safe_load(
        (DASHBOARDS / "provisioning" / "dashboards" / "chunkwatch.yaml").read_text()
    )
    (prov,) = provider["providers"]
    assert prov["type"] == "file"
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    mounts = dict(
        v.rsplit(":", 1)[0].split(":", 1) for v in compose["services"]["grafana"]["volumes"]
    )
    assert mounts["./dashboards"] == prov["options"]["path"]
    assert mounts["./dashboards/provisioning"] == "/etc/grafana/provisioning"
