"""The shipped Prometheus rules (prometheus/chunkwatch.rules.yml): valid for promtool, unit
tested alert by alert, and written only in names the code emits.

promtool 2.42 (Debian's prometheus package; ``scripts/bootstrap --test`` installs it)
runs here for real; without it these tests fail and say so.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from chunkwatch import semconv as sc
from chunkwatch.outcomes import Outcome

from .prom import (
    MIXIN,
    RULE_TESTS,
    RULES,
    RUNBOOKS,
    binary,
    emitted_series,
    metric_names,
    mixin_config,
)

# The alerts the alerting issue asks for (plus the guard's), with their severity.
EXPECTED_ALERTS = {
    "ChunkwatchEmptyStreams": "critical",
    "ChunkwatchWrongContentType": "critical",
    "ChunkwatchStreamStalls": "warning",
    "ChunkwatchTruncatedStreams": "warning",
    "ChunkwatchBufferedStreams": "warning",
    "ChunkwatchStreamHTTPErrors": "warning",
    "ChunkwatchChunkLoss": "warning",
    "ChunkwatchSlowFirstChunk": "warning",
    "ChunkwatchInstrumentationErrors": "warning",
    "ChunkwatchNoTraffic": "warning",
    "ChunkwatchFallbackEngaged": "warning",
    "ChunkwatchUnlinkedStreams": "warning",
    "ChunkwatchOrphanedStreams": "warning",
    "ChunkwatchDownstreamBuffered": "warning",
    "ChunkwatchDownstreamLoss": "critical",
}
# Alerts with no layer to name, and why.
LAYERLESS_ALERTS = {
    # the model streams of departed clients: the fix is in the app's disconnect handling,
    # not at a layer (the metrics count at gateway, or sdk without the gateway probe)
    "ChunkwatchOrphanedStreams",
}
# Fault alerts that read the request verdict and, for streams no request could be tied to,
# the stream outcome of the layers that see the fault first.
STREAM_BRANCH_ALERTS = {
    "ChunkwatchEmptyStreams": Outcome.EMPTY,
    "ChunkwatchWrongContentType": Outcome.WRONG_CONTENT_TYPE,
    "ChunkwatchTruncatedStreams": Outcome.TRUNCATED,
    "ChunkwatchBufferedStreams": Outcome.BUFFERED,
    "ChunkwatchStreamHTTPErrors": Outcome.HTTP_ERROR,
}
# Recording rules that derive no metric: the layers' order, from semconv.LAYERS.
STATIC_RECORDS = {"layer:chunkwatch_layer_order:static"}
_SELECTOR = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
# A chunkwatch series read straight from the scrape (not a recording rule), with its matchers.
_RAW_SELECTOR = re.compile(r"(?<![\w:])(chunkwatch_\w+)(?![\w:])(\{[^}]*\})?")


def _rules(text: str | None = None) -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text() if text is None else text)
    return [r for g in doc["groups"] for r in g["rules"]]


def _mixin(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(MIXIN), *args], capture_output=True, text=True, timeout=60
    )


def _kept() -> list[str]:
    return list(mixin_config()["labels"])


def _alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in _rules() if "alert" in r}


def _records() -> dict[str, str]:
    return {r["record"]: r["expr"] for r in _rules() if "record" in r}


def _unit_tests() -> list[dict[str, Any]]:
    tests: list[dict[str, Any]] = []
    for path in sorted(RULE_TESTS.glob("*.yml")):
        tests.extend(yaml.safe_load(path.read_text())["tests"])
    return tests


def _github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of ``markdown``."""
    anchors = set()
    for line in markdown.splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_promtool_check_rules_accepts_the_rules() -> None:
    """`promtool check rules` parses every rule and expression."""
    proc = subprocess.run(
        [binary("promtool"), "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_unit_tests_pass() -> None:
    """`promtool test rules` passes every case in prometheus/tests/: each alert fires with its
    exact labels and annotations where it should, and stays silent where it should."""
    files = sorted(str(p) for p in RULE_TESTS.glob("*.yml"))
    assert files
    proc = subprocess.run(
        [binary("promtool"), "test", "rules", *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_expected_alert_exists_with_its_severity() -> None:
    """The alert set is exactly the one asked for, each with its severity label."""
    alerts = _alerts()
    assert {name: a["labels"]["severity"] for name, a in alerts.items()} == EXPECTED_ALERTS


def test_every_alert_says_layer_upstream_value_and_links_its_runbook() -> None:
    """summary, a description naming the layer, the upstream and the value, and an absolute
    runbook_url (mixin.yaml's pattern) to a section of docs/runbooks.md that exists."""
    anchors = _github_anchors(RUNBOOKS.read_text())
    for name, alert in _alerts().items():
        ann = alert["annotations"]
        assert set(ann) == {"summary", "description", "runbook_url"}, name
        desc = ann["description"]
        assert "$labels.layer" in desc or name in LAYERLESS_ALERTS, name
        assert "$labels.upstream" in desc or "all upstreams" in desc, name
        assert "$value" in desc, name
        url = ann["runbook_url"]
        assert url == mixin_config()["runbook_url"].format(anchor=name.lower()), name
        assert url.startswith("https://"), url  # a link Alertmanager and Grafana can open
        anchor = url.rpartition("#")[2]
        assert anchor == name.lower() and anchor in anchors, (name, anchor)


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    """Per alert, a promtool case where it fires with exact labels (severity included) and every
    annotation, and one where it stays silent; the healthy-but-slow case silences all."""
    alerts = _alerts()
    fires: dict[str, list[dict[str, Any]]] = {}
    silent: set[str] = set()
    for case in _unit_tests():
        for check in case.get("alert_rule_test", []):
            if check["exp_alerts"]:
                fires.setdefault(check["alertname"], []).extend(check["exp_alerts"])
            else:
                silent.add(check["alertname"])
    assert set(fires) == set(alerts), set(alerts) - set(fires)
    assert silent == set(alerts), set(alerts) - silent
    for name, expected in fires.items():
        for exp in expected:
            assert exp["exp_labels"]["severity"] == alerts[name]["labels"]["severity"], name
            assert set(exp["exp_annotations"]) == set(alerts[name]["annotations"]), name
    (slow,) = [c for c in _unit_tests() if "healthy but slow" in c["name"]]
    checks = slow["alert_rule_test"]
    assert {c["alertname"] for c in checks if c["exp_alerts"] == []} == set(alerts)


def test_recording_rules_are_named_level_metric_operations() -> None:
    """Recording rules follow `level:metric:operations`; the level lists the labels kept and
    the metric part is a chunkwatch metric (or its histogram buckets). The kept target labels
    (mixin.yaml's `labels`) come first in every aggregation and are left out of the level."""
    kept = _kept()
    series = emitted_series()
    families = set(series) | {re.sub(r"_(total|bucket|sum|count)$", "", s) for s in series}
    for name, expr in _records().items():
        level, metric, ops = name.split(":")
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", level), name
        assert re.fullmatch(r"[a-z0-9_]+", ops), name
        if name in STATIC_RECORDS:
            continue
        assert metric in families, name
        m = re.search(r"\bby \(([^)]*)\)", expr)
        if m:  # an aggregation: the level names exactly the labels it keeps
            by = [x.strip() for x in m.group(1).split(",")]
            assert by[: len(kept)] == kept, name
            assert sorted(by[len(kept) :]) == level.split("_"), name


def test_rules_use_only_names_and_values_the_code_emits() -> None:
    """Every metric a rule reads is one chunkwatch's Metrics writes, under a semconv name; every
    label name is a label the code writes; every layer/outcome value is in semconv / Outcome."""
    series = emitted_series()
    semconv_names = {v for v in vars(sc).values() if isinstance(v, str)}
    records = set(_records())
    all_labels = set().union(*series.values()) | {"alertname", "alertstate"} | set(_kept())
    layers = set(sc.LAYERS) | {sc.NO_LAYER}
    outcomes = {str(o) for o in Outcome}
    for rule in _rules():
        expr = rule["expr"]
        for metric in metric_names(expr, known=records):
            assert metric in series or metric in records, (
                rule.get("record") or rule["alert"],
                metric,
            )
            if metric in series:
                assert re.sub(r"_(total|bucket|sum|count)$", "", metric) in semconv_names, metric
        for label, _, value in _SELECTOR.findall(expr):
            assert label in all_labels, (expr, label)
            values = [v for v in value.split("|") if v and ".+" not in v and ".*" not in v]
            if label == sc.L_LAYER:
                assert set(values) <= layers, (expr, value)
            if label == sc.L_OUTCOME:
                assert set(values) <= outcomes, (expr, value)
        for group in _GROUPING.findall(expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                assert label in all_labels, (expr, label)


def test_layer_order_is_semconv_layers() -> None:
    """The static layer order that picks the lowest stalled / slow layer is semconv.LAYERS."""
    expr = _records()["layer:chunkwatch_layer_order:static"]
    pairs = re.findall(r'vector\((\d+)\),\s*"layer",\s*"(\w+)"', expr)
    assert [layer for _, layer in sorted(pairs, key=lambda p: int(p[0]))] == list(sc.LAYERS)


def test_fault_alerts_also_read_the_gateway_and_sdk_streams() -> None:
    """Each verdict-based fault alert also fires from the per-layer stream outcome ratio of the
    gateway and the sdk (an unlinked stream is in no verdict), keeping the lowest of the two
    layers over the threshold, so it names the layer and merges with the verdict's alert."""
    alerts = _alerts()
    streams = "layer_outcome_upstream:chunkwatch_streams:ratio_rate5m"
    for name, outcome in STREAM_BRANCH_ALERTS.items():
        expr = alerts[name]["expr"]
        assert f'chunkwatch_requests:ratio_rate5m{{outcome="{outcome}"}}' in expr, name
        selector = f'{streams}{{layer=~"{sc.GATEWAY}|{sc.SDK}",outcome="{outcome}"}}'
        assert selector in expr, name
        assert f"bottomk by ({', '.join(_kept())}, upstream) (1," in expr, name


def test_committed_rules_are_the_generators_output() -> None:
    """prometheus/chunkwatch.rules.yml is exactly what prometheus/mixin.py writes from
    mixin.yaml: nobody edited the generated file, nobody forgot to regenerate."""
    proc = _mixin("--check")
    assert proc.returncode == 0, proc.stderr


def test_every_aggregation_keeps_the_target_labels_and_every_series_the_selector() -> None:
    """Every `by` / `on` of every rule keeps job, namespace, cluster (the mixin's labels) —
    except the join with the static layer order, which has only `layer` — and every
    chunkwatch series read from the scrape carries the mixin's selector."""
    kept = ", ".join(_kept())
    selector = mixin_config()["selector"]
    for rule in _rules():
        name, expr = rule.get("record") or rule["alert"], rule["expr"]
        for grouping in re.findall(r"\b(by|on) \(([^)]*)\)", expr):
            if grouping == ("on", "layer"):
                assert "layer:chunkwatch_layer_order:static" in expr, name
                continue
            assert grouping[1].startswith(kept), (name, grouping)
        for metric, matchers in _RAW_SELECTOR.findall(expr):
            assert matchers.startswith("{" + selector), (name, metric, matchers)


def test_a_users_selector_and_labels_reach_every_rule(tmp_path: Path) -> None:
    """`mixin.py --config` with `job="my-llm-api"` and labels [job, namespace]: promtool
    accepts the rules, every scraped series is read with that selector, every aggregation
    keeps exactly those labels, and the runbook links follow the user's pattern."""
    config = tmp_path / "mine.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "selector": 'job="my-llm-api"',
                "labels": ["job", "namespace"],
                "runbook_url": "https://wiki.example.com/llm/chunkwatch#{anchor}",
                "alerts": {"ChunkwatchEmptyStreams": {"threshold": 0.2, "for": "5m"}},
            }
        )
    )
    out = tmp_path / "mine.rules.yml"
    proc = _mixin("--config", str(config), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    check = subprocess.run(
        [binary("promtool"), "check", "rules", str(out)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    rules = _rules(out.read_text())
    for rule in rules:
        for _, matchers in _RAW_SELECTOR.findall(rule["expr"]):
            assert matchers.startswith('{job="my-llm-api"'), (rule, matchers)
        for by in re.findall(r"\bby \(([^)]*)\)", rule["expr"]):
            assert by.startswith("job, namespace, ") and "cluster" not in by, by
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    empty = alerts["ChunkwatchEmptyStreams"]
    assert empty["for"] == "5m" and "> 0.2\n" in empty["expr"]
    assert "> 0.05" not in empty["expr"]
    assert alerts["ChunkwatchStreamStalls"]["for"] == "5m"  # the shipped value, kept
    for name, alert in alerts.items():
        url = alert["annotations"]["runbook_url"]
        assert url == f"https://wiki.example.com/llm/chunkwatch#{name.lower()}"


def test_a_bad_setting_is_refused_with_its_name(tmp_path: Path) -> None:
    """A misspelt alert, a runbook pattern without {anchor}, or a `for` that is not a
    duration stops the generator with a message naming the setting; nothing is written."""
    out = tmp_path / "never.yml"
    cases = {
        "alerts: {ChunkwatchEmpty: {for: 2m}}": "no alert named 'ChunkwatchEmpty'",
        "runbook_url: https://example.com/runbooks": "has no {anchor}",
        "alerts: {ChunkwatchNoTraffic: {for: soon}}": "alerts.ChunkwatchNoTraffic.for",
    }
    for i, (setting, message) in enumerate(cases.items()):
        config = tmp_path / f"bad{i}.yaml"
        config.write_text(setting)
        proc = _mixin("--config", str(config), "--output", str(out))
        assert proc.returncode == 2 and message in proc.stderr, (setting, proc.stderr)
        assert not out.exists()
