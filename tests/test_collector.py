"""The OpenTelemetry Collector config (otel-collector.yaml), read as data: current component
names, every pipeline wired to defined components, span metrics computed before tail
sampling, a sampling policy that keeps every failed stream, and only attribute names that
chunkwatch emits (checked against chunkwatch.semconv, and on the wire in test_otlp.py).

No collector binary runs in the test suite; compose.yaml runs one for people with Docker.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from chunkwatch import semconv as sc

from .prom import ROOT

CONFIG = ROOT / "otel-collector.yaml"
VERSION = "0.144.0"  # the collector release the config targets (its header says so)
# Component types of otelcol-contrib >= 0.144, by kind; and names that were renamed.
CURRENT = {
    "receivers": {"otlp"},
    "processors": {"memory_limiter", "tail_sampling", "batch"},
    "exporters": {"otlp_grpc", "otlp_http", "prometheus", "prometheusremotewrite", "debug"},
    "connectors": {"spanmetrics", "forward"},
    "extensions": {"health_check"},
}
RENAMED = {"otlp": "otlp_grpc", "otlphttp": "otlp_http", "logging": "debug", "jaeger": "otlp_grpc"}
# connector type -> (the pipeline type it exports from, the pipeline type it receives into)
CONNECTS = {"spanmetrics": ("traces", "metrics"), "forward": (None, None)}


def config() -> dict[str, Any]:
    return dict(yaml.safe_load(CONFIG.read_text()))


def _type(component: str) -> str:
    return component.split("/", 1)[0]


def _policies(policies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tail-sampling policies, sub-policies of `and` / `composite` / `not` / `drop` flattened."""
    out = []
    for p in policies:
        out.append(p)
        for key in ("and_sub_policy", "composite_sub_policy", "drop_sub_policy"):
            out.extend(_policies(p.get(p["type"], {}).get(key, [])))
        if p["type"] == "not":
            out.extend(_policies([p["not"]["not_sub_policy"]]))
    return out


def matched_attributes(cfg: dict[str, Any] | None = None) -> set[str]:
    """Every span attribute key the config samples on or aggregates by."""
    cfg = cfg or config()
    keys: set[str] = set()
    for p in _policies(cfg["processors"]["tail_sampling"]["policies"]):
        t = p["type"]
        if t in ("string_attribute", "numeric_attribute", "boolean_attribute"):
            keys.add(p[t]["key"])
        elif t == "ottl_condition":
            for cond in p[t].get("span", []) + p[t].get("spanevent", []):
                keys |= set(re.findall(r'attributes\["([^"]+)"\]', cond))
    for name, connector in cfg["connectors"].items():
        if _type(name) == "spanmetrics":
            keys |= {d["name"] for d in connector.get("dimensions", [])}
    return keys


def test_config_names_the_collector_release_it_targets() -> None:
    """The header says which otelcol-contrib release the file is written for, and compose.yaml
    runs that release."""
    header = CONFIG.read_text().split("\n\n", 1)[0]
    assert f"otelcol-contrib v{VERSION}" in header
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    image = compose["services"]["otel-collector"]["image"]
    assert image == f"otel/opentelemetry-collector-contrib:{VERSION}"


def test_components_use_current_names() -> None:
    """Every component is of a current type; none uses a pre-0.144 name (`otlp` exporter,
    `otlphttp`, `logging`, `jaeger`)."""
    cfg = config()
    for kind, allowed in CURRENT.items():
        for name in cfg.get(kind, {}):
            assert _type(name) in allowed, (kind, name)
            if kind == "exporters":
                assert _type(name) not in RENAMED, (name, RENAMED.get(_type(name)))


def test_every_pipeline_references_defined_components() -> None:
    """Each pipeline's receivers, processors and exporters are defined (connectors count as
    both); every defined component is used; each connector joins pipelines of the right types."""
    cfg = config()
    service = cfg["service"]
    connectors = set(cfg["connectors"])
    used: set[str] = set()
    as_exporter: dict[str, set[str]] = {}
    as_receiver: dict[str, set[str]] = {}
    for pipeline, spec in service["pipelines"].items():
        ptype = pipeline.split("/", 1)[0]
        assert ptype in ("traces", "metrics", "logs"), pipeline
        for r in spec["receivers"]:
            assert r in cfg["receivers"] or r in connectors, (pipeline, r)
            as_receiver.setdefault(r, set()).add(ptype)
        for p in spec.get("processors", []):
            assert p in cfg["processors"], (pipeline, p)
        for e in spec["exporters"]:
            assert e in cfg["exporters"] or e in connectors, (pipeline, e)
            as_exporter.setdefault(e, set()).add(ptype)
        used |= set(spec["receivers"]) | set(spec.get("processors", [])) | set(spec["exporters"])
    for ext in service.get("extensions", []):
        assert ext in cfg["extensions"], ext
    defined = set(cfg["receivers"]) | set(cfg["processors"]) | set(cfg["exporters"]) | connectors
    assert defined - used == set(), "defined but never used"
    assert set(cfg.get("extensions", {})) == set(service.get("extensions", []))
    for name in connectors:
        src, dst = CONNECTS[_type(name)]
        assert as_exporter.get(name) and as_receiver.get(name), name
        if src:
            assert as_exporter[name] == {src} and as_receiver[name] == {dst}, name
        else:
            assert as_exporter[name] == as_receiver[name], name


def test_otlp_receiver_listens_on_4317_and_4318() -> None:
    """OTLP over gRPC on 4317 and over HTTP on 4318, reachable from other containers."""
    protocols = config()["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"


def test_memory_limiter_comes_first_where_data_enters() -> None:
    """Every pipeline fed by a receiver (not a connector) starts with memory_limiter."""
    cfg = config()
    for pipeline, spec in cfg["service"]["pipelines"].items():
        if any(r in cfg["receivers"] for r in spec["receivers"]):
            assert spec["processors"][0] == "memory_limiter", pipeline


def test_span_metrics_see_every_span_before_sampling() -> None:
    """The pipeline that feeds spanmetrics takes spans straight from OTLP and samples nothing;
    tail sampling runs only after the hand-off, in the pipeline that exports to Jaeger."""
    cfg = config()
    pipelines = cfg["service"]["pipelines"]
    spanmetrics = [c for c in cfg["connectors"] if _type(c) == "spanmetrics"]
    (feeding,) = [p for p, s in pipelines.items() if set(spanmetrics) & set(s["exporters"])]
    assert pipelines[feeding]["receivers"] == ["otlp"]
    assert not any(_type(p) == "tail_sampling" for p in pipelines[feeding]["processors"])
    jaeger = [e for e in cfg["exporters"] if _type(e) in ("otlp_grpc", "otlp_http")]
    (to_jaeger,) = [p for p, s in pipelines.items() if set(jaeger) & set(s["exporters"])]
    assert "tail_sampling" in pipelines[to_jaeger]["processors"]
    (hand_off,) = pipelines[to_jaeger]["receivers"]
    assert hand_off in pipelines[feeding]["exporters"]
    assert cfg["connectors"][spanmetrics[0]]["exemplars"]["enabled"] is True


def test_tail_sampling_keeps_every_failed_stream_and_a_share_of_healthy_ones() -> None:
    """Policies (any keeps a trace): a span whose chunkwatch.outcome is set and not ok, a span
    with status ERROR, and a probabilistic share of the rest."""
    policies = {p["type"]: p for p in config()["processors"]["tail_sampling"]["policies"]}
    (cond,) = policies["ottl_condition"]["ottl_condition"]["span"]
    assert cond == f'attributes["{sc.A_OUTCOME}"] != nil and attributes["{sc.A_OUTCOME}"] != "ok"'
    assert policies["status_code"]["status_code"]["status_codes"] == ["ERROR"]
    assert 0 < policies["probabilistic"]["probabilistic"]["sampling_percentage"] < 100


def test_matched_attributes_are_names_chunkwatch_emits() -> None:
    """Every attribute the config samples on or aggregates by is a name in chunkwatch.semconv
    (the constants module, not a copy); the outcome and the layer are among them."""
    names = {v for v in vars(sc).values() if isinstance(v, str)}
    keys = matched_attributes()
    assert keys <= names, keys - names
    assert {sc.A_OUTCOME, sc.A_LAYER, sc.A_UPSTREAM} <= keys


def test_exports_go_to_jaeger_over_otlp_and_to_prometheus() -> None:
    """Traces leave over OTLP/gRPC to Jaeger's 4317; span metrics are served on the port the
    shipped Prometheus config scrapes."""
    cfg = config()
    (jaeger,) = [e for n, e in cfg["exporters"].items() if _type(n) == "otlp_grpc"]
    assert jaeger["endpoint"].endswith(":4317")
    port = cfg["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    prom = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    targets = [
        t for job in prom["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    ]
    assert f"otel-collector:{port}" in targets
