"""The Grafana dashboards (dashboards/*.json) and their provisioning, read as data: the current
Grafana dashboard model (round-tripped through Grafana's generated one, grafana-foundation-sdk),
the panels on-call needs, queries written only in names the code emits and filtered by the
fleet variables (job, namespace, instance), links from failing series to their traces in
Jaeger and from panels to their alerts' runbooks, exemplars linked to Jaeger, and file
provisioning that matches compose.yaml.

That every query returns data from a live Prometheus fed by the real service is
tests/test_prometheus_e2e.py's job.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models import dashboard as grafana
from grafana_foundation_sdk.models import prometheus as grafana_prometheus
from prometheus_client import CollectorRegistry

from chunkwatch import semconv as sc
from chunkwatch.metrics import Metrics
from chunkwatch.outcomes import Outcome

from .prom import (
    DASHBOARDS,
    MIXIN_CONFIG,
    ROOT,
    RULES,
    RUNBOOKS,
    dashboards,
    emitted_series,
    metric_names,
    panels,
)

# Grafana 12's classic JSON model (apps/dashboard/pkg/migration/schemaversion: 41); newer
# Grafana migrates it forward on load. grafana-foundation-sdk's newest model (Grafana 11.6)
# defaults to the same version.
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
# The fleet variables, in the order they narrow each other, and the matcher each puts on a
# series. Prometheus attaches these labels to every scraped series (target labels), so
# they are not in the code's label names. Recording rules sum replicas: their series keep
# job and namespace, not instance.
FLEET = ("job", "namespace", "instance")
TARGET_LABELS = frozenset(FLEET) | {"cluster"}
RECORDED_FLEET = ("job", "namespace")
# The runbook URL pattern of the rules generator's settings (MIXIN_CONFIG) when they do not
# say: the dashboards link the same runbooks.
RUNBOOK_URL = "https://github.com/chunkwatch/chunkwatch/blob/main/docs/runbooks.md#{anchor}"
# A failing series links to a Jaeger search for its traces by the span attributes that hold
# the same outcome and layer as the series' labels: the request's verdict on the root span,
# a stream's outcome on the span of its layer.
TRACE_TAGS = {
    f"{sc.REQUESTS}_total": (sc.A_VERDICT_OUTCOME, sc.A_VERDICT_LAYER),
    f"{sc.STREAMS}_total": (sc.A_OUTCOME, sc.A_LAYER),
}
# Every series a query reads, with the matchers written on it (`name` alone: none).
_SERIES = re.compile(r"(?<![\w:])(\w+:\w+:\w+|(?:chunkwatch|gen_ai)_\w+)(?![\w:])(\{[^}]*\})?")
_ALERTS = re.compile(r"\bALERTS\{([^}]*)\}")
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


def test_datasource_fleet_and_upstream_variables(dash: dict[str, Any]) -> None:
    """A `datasource` variable of type datasource (Prometheus); then `job`, `namespace`,
    `instance` and `upstream`: multi-value query variables (All = `.*`) on it, each listing its
    own label of a series that has it, for the values chosen in the variables before it (so
    a namespace list shows only the chosen jobs' namespaces)."""
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert list(variables) == ["datasource", *FLEET, "upstream"]
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    series = emitted_series()
    for i, name in enumerate([*FLEET, "upstream"]):
        var = variables[name]
        assert var["type"] == "query" and var["datasource"] == DS_REF, name
        assert var["multi"] and var["includeAll"] and var["allValue"] == ".*", name
        assert var["query"]["query"] == var["definition"], name
        m = re.fullmatch(r"label_values\((\w+)(?:\{([^}]*)\})?,\s*(\w+)\)", var["definition"])
        assert m and m.group(3) == name, var["definition"]
        assert name in series[m.group(1)] | TARGET_LABELS, var["definition"]
        chained = {label: value for label, _, value in _MATCHER.findall(m.group(2) or "")}
        assert chained == {f: f"${f}" for f in FLEET[:i]}, (name, chained)


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
            assert set(found) <= series[name] | TARGET_LABELS, (where, name, found)
            if sc.L_UPSTREAM in series[name]:
                assert re.search(r'upstream=~"\$upstream"', matchers), (where, name)
            for v in found.get(sc.L_LAYER, "").split("|"):
                assert not v or v in layers, (where, v)
            for v in found.get(sc.L_OUTCOME, "").split("|"):
                assert not v or v in outcomes, (where, v)
        labels = set().union(*(series[n] for n in metric_names(expr)), {"le"}, TARGET_LABELS)
        for group in _GROUPING.findall(expr):
            for label in _labels(group):
                assert label in labels, (where, label)


def _labels(group: str) -> list[str]:
    return [x.strip() for x in group.split(",") if x.strip()]


def _recorded() -> set[str]:
    """The series the shipped recording rules write."""
    doc = yaml.safe_load(RULES.read_text())
    return {r["record"] for g in doc["groups"] for r in g["rules"] if "record" in r}


def test_every_query_filters_by_the_fleet_variables(dash: dict[str, Any]) -> None:
    """Every chunkwatch / GenAI series a query (or a variable) reads is narrowed to the chosen
    jobs, namespaces and instances; a recording rule's series, which sum replicas, to the
    chosen jobs and namespaces; and the firing-alerts count to the chosen jobs and namespaces
    (alerts are built on recording rules)."""
    recorded = _recorded()
    exprs = [(f"{p['title']} {t['refId']}", t["expr"]) for p, t in _targets(dash)]
    exprs += [(v["name"], v["definition"]) for v in dash["templating"]["list"] if "definition" in v]
    seen = 0
    for where, expr in exprs:
        for name, braces in _SERIES.findall(expr):
            found = {label: (op, v) for label, op, v in _MATCHER.findall(braces)}
            is_record = ":" in name
            assert not is_record or name in recorded, (where, name)
            want: tuple[str, ...] = RECORDED_FLEET if is_record else FLEET
            if where in FLEET:  # a variable is narrowed by the variables before it only
                want = FLEET[: FLEET.index(where)]
            for label in want:
                assert found.get(label) == ("=~", f"${label}"), (where, name, label)
            assert not is_record or "instance" not in found, (where, name)
            seen += 1
        for matchers in _ALERTS.findall(expr):
            found = {label: (op, v) for label, op, v in _MATCHER.findall(matchers)}
            for label in RECORDED_FLEET:
                assert found.get(label) == ("=~", f"${label}"), (where, "ALERTS", label)
    assert seen


def test_graphs_that_compare_layers_or_upstreams_keep_jobs_apart(dash: dict[str, Any]) -> None:
    """In every graph (time series, state timeline), an aggregation by layer, upstream or
    bucket (a p95) also keeps `job`, and the legend names the job: a p95 or a rate summed
    over two services describes neither, and a series must say which service a click on it
    searches traces of. The stats, the funnel and the heatmap sum the selection on purpose."""
    for panel, target in _targets(dash):
        if panel["type"] not in ("timeseries", "state-timeline"):
            continue
        groups = [_labels(g) for g in _GROUPING.findall(target["expr"])]
        kept = [g for g in groups if {sc.L_LAYER, sc.L_UPSTREAM, "le"} & set(g)]
        for group in kept:
            assert "job" in group, (panel["title"], group)
        if kept:
            assert "{{job}}" in target["legendFormat"], panel["title"]


def test_the_panels_on_call_needs_are_there() -> None:
    """The overview shows: outcomes by verdict layer; the funnel gateway -> sdk -> langgraph ->
    queue -> sse in that order; time to first chunk per layer; stalls, buffering, truncation;
    open streams; queue wait; SSE disconnects; instrumentation errors; and a Guard row with
    the stream mode and the fallbacks per upstream."""
    dash = dashboards()["chunkwatch-overview.json"]
    exprs = [t["expr"] for _, t in _targets(dash)]

    def shown(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    assert shown(rf"by \(job, (outcome, layer|layer, outcome)\) \(rate\({sc.REQUESTS}_total")
    assert shown(
        rf"histogram_quantile\(0\.95, sum by \(le, job, layer\) \(rate\({sc.TIME_TO_FIRST_CHUNK}"
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
    assert "by (job, upstream" in guard_exprs


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


def _provisioned() -> dict[str, dict[str, Any]]:
    """The provisioned datasources (a file of provisioning apiVersion 1), by type."""
    doc = yaml.safe_load(
        (DASHBOARDS / "provisioning" / "datasources" / "chunkwatch.yaml").read_text()
    )
    assert doc["apiVersion"] == 1
    return {d["type"]: d for d in doc["datasources"]}


def test_failing_series_link_to_their_traces_in_jaeger(dash: dict[str, Any]) -> None:
    """Every graph of requests or streams per outcome and layer (the verdict panels) links
    each series to a search, in Grafana's Explore on the provisioned Jaeger datasource, for
    the traces of the series' service (its job) whose span holds the series' outcome and
    layer, over the dashboard's time range; the link reads only labels every series has."""
    jaeger = _provisioned()["jaeger"]["uid"]
    linked = 0
    for panel in panels(dash):
        names = set().union(*(metric_names(t["expr"]) for t in panel["targets"])) & set(TRACE_TAGS)
        groups = [set(_labels(g)) for t in panel["targets"] for g in _GROUPING.findall(t["expr"])]
        links = panel.get("fieldConfig", {}).get("defaults", {}).get("links", [])
        if not (names and groups and all({"job", "outcome", "layer"} <= g for g in groups)):
            assert not links, panel["title"]
            continue
        (name,) = names
        (link,) = links
        url = urllib.parse.urlsplit(link["url"])
        params = urllib.parse.parse_qs(url.query)
        assert (url.scheme, url.path, params["schemaVersion"]) == ("", "/explore", ["1"])
        assert link["targetBlank"] is True
        (pane,) = json.loads(params["panes"][0]).values()
        assert pane["datasource"] == jaeger
        assert pane["range"] == {"from": "${__from}", "to": "${__to}"}
        (query,) = pane["queries"]
        assert query["datasource"] == {"type": "jaeger", "uid": jaeger}
        assert (query["queryType"], query["service"]) == ("search", "${__field.labels.job}")
        outcome, layer = TRACE_TAGS[name]
        tags = dict(pair.split("=", 1) for pair in query["tags"].split())  # Grafana's logfmt
        assert tags == {outcome: "${__field.labels.outcome}", layer: "${__field.labels.layer}"}
        for label in re.findall(r"\$\{__field\.labels\.(\w+)\}", link["url"] + link["title"]):
            assert all(label in g for g in groups), (panel["title"], label)
        linked += 1
    assert linked or dash["uid"] != "chunkwatch-overview"


def _runbook_pattern() -> str:
    """The runbook URL pattern the rules are generated with: prometheus/mixin.yaml's
    `runbook_url` where the generator's settings exist, else its default."""
    if MIXIN_CONFIG.exists():
        return str(yaml.safe_load(MIXIN_CONFIG.read_text()).get("runbook_url", RUNBOOK_URL))
    return RUNBOOK_URL


def _runbook_anchors() -> set[str]:
    """The anchors GitHub gives docs/runbooks.md's headings."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", RUNBOOKS.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def _alerts() -> dict[str, tuple[set[str], str]]:
    """Each shipped alert: the chunkwatch series it reads, through the recording rules it
    reads, and its runbook_url."""
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    records = {r["record"]: r["expr"] for r in rules if "record" in r}

    def reads(expr: str) -> set[str]:
        names = metric_names(expr)
        return set().union(*(reads(records[n]) if n in records else {n} for n in names))

    return {
        r["alert"]: (reads(r["expr"]), r["annotations"]["runbook_url"])
        for r in rules
        if "alert" in r
    }


def test_panels_link_the_runbooks_of_their_alerts(dash: dict[str, Any]) -> None:
    """A panel's runbook links are absolute URLs made from the rules' own runbook pattern,
    each the same URL as its alert's runbook_url, to a section docs/runbooks.md has; and
    every alert that reads a series the dashboard shows is linked from a panel."""
    pattern = _runbook_pattern()
    assert urllib.parse.urlsplit(pattern).scheme == "https" and "{anchor}" in pattern
    alerts = _alerts()
    anchors = _runbook_anchors()
    by_url = {pattern.format(anchor=name.lower()): name for name in alerts}
    linked = set()
    for panel in panels(dash):
        for link in panel.get("links", []):
            assert link["url"] in by_url, (panel["title"], link["url"])
            name = by_url[link["url"]]
            assert link["url"] == alerts[name][1], (name, "the rules link another runbook")
            assert urllib.parse.urlsplit(link["url"]).fragment in anchors, name
            assert (link["title"], link["targetBlank"]) == (f"Runbook: {name}", True)
            linked.add(name)
    shown = set().union(*(metric_names(t["expr"]) for _, t in _targets(dash)))
    unlinked = {name for name, (reads, _) in alerts.items() if reads & shown} - linked
    assert unlinked == set()


def _lost(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """The paths of `ours`' values that `theirs` does not hold unchanged (added keys are
    fine: defaults the model writes out)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return [
            p
            for key, value in ours.items()
            for p in (
                _lost(value, theirs[key], f"{path}.{key}") if key in theirs else [f"{path}.{key}"]
            )
        ]
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        return [
            p
            for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
            for p in _lost(a, b, f"{path}[{i}]")
        ]
    return [] if ours == theirs else [path]


def test_dashboard_round_trips_through_grafanas_model(dash: dict[str, Any]) -> None:
    """Decoded into grafana-foundation-sdk's dashboard model (generated from Grafana's own
    schema) and encoded back, the dashboard keeps every value it sets but two the model has
    no place for: `id: null` (unset; Grafana assigns it) and the variables' `definition`
    (the editor's display copy of `query.query`, which is kept). Every panel decodes to its
    plugin's options, every query to a Prometheus query, and the schema version is the
    model's own."""
    register_default_plugins()
    model = grafana.Dashboard.from_json(json.loads(json.dumps(dash)))
    assert model.schema_version == SCHEMA_VERSION == grafana.Dashboard().schema_version
    for panel in model.panels or []:
        if isinstance(panel, grafana.Panel):
            assert not isinstance(panel.options, dict), panel.type_val
            for target in panel.targets or []:
                assert isinstance(target, grafana_prometheus.Dataquery), panel.title
    back = json.loads(json.dumps(model, cls=JSONEncoder))
    definitions = [
        f".templating.list[{i}].definition"
        for i, v in enumerate(dash["templating"]["list"])
        if "definition" in v
    ]
    assert _lost(dash, back) == [".id", *definitions]


def test_provisioning_links_exemplars_to_jaeger_by_the_label_the_code_writes() -> None:
    """The Prometheus datasource turns the exemplar label chunkwatch writes (read from a real
    Metrics exemplar) into a link to the provisioned Jaeger datasource."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.request_finished(SimpleNamespace(outcome="ok", layer="none"), "up", "ab" * 16)  # type: ignore[arg-type]
    (sample,) = [s for m in registry.collect() for s in m.samples if s.exemplar is not None]
    assert sample.exemplar is not None
    exemplar_label = next(iter(sample.exemplar.labels))

    by_type = _provisioned()
    (link,) = by_type["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert link["name"] == exemplar_label
    assert link["datasourceUid"] == by_type["jaeger"]["uid"]


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
