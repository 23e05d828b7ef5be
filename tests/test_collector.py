"""The OpenTelemetry Collector config (otel-collector.yaml), read as data: current component
names, every pipeline wired to defined components, span metrics computed before tail
sampling, a sampling policy that keeps every failed stream, a decision window that outlasts
the longest stream, and only attribute names that chunkwatch emits (checked against
chunkwatch.semconv, and on the wire in test_otlp.py).

The helpers take a parsed config, so tests/test_collector_tiers.py applies the same checks
to the two-tier configs. No collector binary runs in the test suite; compose.yaml runs one
for people with Docker.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from chunkwatch import orphans
from chunkwatch import semconv as sc
from chunkwatch_lab.service import ServiceConfig

from .prom import ROOT

CONFIG = ROOT / "otel-collector.yaml"
VERSION = "0.160.0"  # the collector release the configs target (their headers say so)
# Component types of otelcol-contrib >= 0.160, by kind (lower_snake_case since the rename of
# opentelemetry-collector#14396 / -contrib#45339).
CURRENT = {
    "receivers": {"otlp"},
    "processors": {"memory_limiter", "tail_sampling", "batch"},
    "exporters": {
        "otlp_grpc",
        "otlp_http",
        "prometheus",
        "prometheus_remote_write",
        "debug",
        "load_balancing",
    },
    "connectors": {"span_metrics", "forward"},
    "extensions": {"health_check"},
}
# Old names, still loaded as deprecated aliases (or gone), by kind. `otlp` is only an old name
# for the exporter: the receiver is still `otlp`.
RENAMED = {
    "exporters": {
        "otlp": "otlp_grpc",
        "otlphttp": "otlp_http",
        "logging": "debug",
        "jaeger": "otlp_grpc",
        "loadbalancing": "load_balancing",
        "prometheusremotewrite": "prometheus_remote_write",
    },
    "connectors": {"spanmetrics": "span_metrics", "servicegraph": "service_graph"},
}
# connector type -> (the pipeline type it exports from, the pipeline type it receives into)
CONNECTS = {"span_metrics": ("traces", "metrics"), "forward": (None, None)}
BSP_SCHEDULE_DELAY = 5.0  # seconds: the OTel SDK's default OTEL_BSP_SCHEDULE_DELAY


def config(path: Path = CONFIG) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


def _type(component: str) -> str:
    return component.split("/", 1)[0]


def seconds(duration: str) -> float:
    """A collector duration (`330s`, `10s`, `1m30s`, `500ms`) in seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


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
    for name, processor in cfg.get("processors", {}).items():
        if _type(name) != "tail_sampling":
            continue
        for p in _policies(processor["policies"]):
            t = p["type"]
            if t in ("string_attribute", "numeric_attribute", "boolean_attribute"):
                keys.add(p[t]["key"])
            elif t == "ottl_condition":
                for cond in p[t].get("span", []) + p[t].get("spanevent", []):
                    keys |= set(re.findall(r'attributes\["([^"]+)"\]', cond))
    for name, connector in cfg.get("connectors", {}).items():
        if _type(name) == "span_metrics":
            keys |= {d["name"] for d in connector.get("dimensions", [])}
    return keys


def check_current_names(cfg: dict[str, Any]) -> None:
    for kind, allowed in CURRENT.items():
        for name in cfg.get(kind, {}):
            assert _type(name) not in RENAMED.get(kind, {}), (kind, name)
            assert _type(name) in allowed, (kind, name)


def check_wiring(cfg: dict[str, Any]) -> None:
    """Each pipeline's receivers, processors and exporters are defined (connectors count as
    both); every defined component is used; each connector joins pipelines of the right
    types; memory_limiter comes first wherever data enters from a receiver."""
    service = cfg["service"]
    connectors = set(cfg.get("connectors", {}))
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
        if any(r in cfg["receivers"] for r in spec["receivers"]):
            assert spec["processors"][0] == "memory_limiter", pipeline
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


def check_span_metrics_before_sampling(cfg: dict[str, Any]) -> None:
    """The pipeline that feeds span_metrics takes spans straight from OTLP and samples
    nothing; tail sampling runs only after the hand-off, in the pipeline that exports to
    Jaeger."""
    pipelines = cfg["service"]["pipelines"]
    span_metrics = [c for c in cfg["connectors"] if _type(c) == "span_metrics"]
    (feeding,) = [p for p, s in pipelines.items() if set(span_metrics) & set(s["exporters"])]
    assert pipelines[feeding]["receivers"] == ["otlp"]
    assert not any(_type(p) == "tail_sampling" for p in pipelines[feeding]["processors"])
    jaeger = [e for e in cfg["exporters"] if _type(e) in ("otlp_grpc", "otlp_http")]
    (to_jaeger,) = [p for p, s in pipelines.items() if set(jaeger) & set(s["exporters"])]
    assert "tail_sampling" in pipelines[to_jaeger]["processors"]
    (hand_off,) = pipelines[to_jaeger]["receivers"]
    assert hand_off in pipelines[feeding]["exporters"]
    assert cfg["connectors"][span_metrics[0]]["exemplars"]["enabled"] is True


def check_decision_timing(tail: dict[str, Any]) -> None:
    """The sampler's clock and memory suit long streams (the reasoning is in the config)."""
    wait = seconds(tail["decision_wait"])
    after_root = seconds(tail["decision_wait_after_root_received"])
    rate = tail["expected_new_traces_per_sec"]
    # The root (request) span ends last, as late as the agent run's deadline after the first
    # span, and is exported up to a batch delay after that.
    request_timeout = next(
        f.default for f in dataclasses.fields(ServiceConfig) if f.name == "request_timeout"
    )
    assert isinstance(request_timeout, float)
    assert wait >= request_timeout + BSP_SCHEDULE_DELAY, (wait, request_timeout)
    # Once the root is in, a short grace (at least one batch delay), far below decision_wait.
    assert BSP_SCHEDULE_DELAY <= after_root <= wait / 10, after_root
    # Room for every trace that may be waiting at once, else traces are evicted undecided.
    assert tail["num_traces"] >= rate * wait, (tail["num_traces"], rate * wait)
    # Decisions outlive the traces' data, and cover a model stream that ends up to
    # orphans.WAIT after its client left, even when every trace is kept.
    cache = tail["decision_cache"]
    for size in (cache["sampled_cache_size"], cache["non_sampled_cache_size"]):
        assert size >= 2 * tail["num_traces"], cache
        assert size >= rate * (orphans.WAIT + after_root), cache


def test_config_names_the_collector_release_it_targets() -> None:
    """The header says which otelcol-contrib release the file is written for, and compose.yaml
    runs that release."""
    header = CONFIG.read_text().split("\n\n", 1)[0]
    assert f"otelcol-contrib v{VERSION}" in header
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    image = compose["services"]["otel-collector"]["image"]
    assert image == f"otel/opentelemetry-collector-contrib:{VERSION}"


def test_components_use_current_names() -> None:
    """Every component is of a current type; none uses a pre-rename name (`spanmetrics`, the
    `otlp` exporter, `otlphttp`, `logging`, `jaeger`, `loadbalancing`)."""
    check_current_names(config())


def test_every_pipeline_references_defined_components() -> None:
    """Each pipeline's receivers, processors and exporters are defined and every defined one
    is used; connectors join pipelines of the right types; memory_limiter comes first where
    data enters."""
    check_wiring(config())


def test_otlp_receiver_listens_on_4317_and_4318() -> None:
    """OTLP over gRPC on 4317 and over HTTP on 4318, reachable from other containers."""
    protocols = config()["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"


def test_span_metrics_see_every_span_before_sampling() -> None:
    """span_metrics is fed from OTLP directly; tail sampling runs only on the way to Jaeger."""
    check_span_metrics_before_sampling(config())


def test_tail_sampling_keeps_every_failed_stream_and_a_share_of_healthy_ones() -> None:
    """Policies (any keeps a trace): a span whose chunkwatch.outcome is set and not ok, a span
    with status ERROR, and a probabilistic share of the rest."""
    policies = {p["type"]: p for p in config()["processors"]["tail_sampling"]["policies"]}
    (cond,) = policies["ottl_condition"]["ottl_condition"]["span"]
    assert cond == f'attributes["{sc.A_OUTCOME}"] != nil and attributes["{sc.A_OUTCOME}"] != "ok"'
    assert policies["status_code"]["status_code"]["status_codes"] == ["ERROR"]
    assert 0 < policies["probabilistic"]["probabilistic"]["sampling_percentage"] < 100


def test_decisions_wait_for_the_root_span_of_a_long_stream() -> None:
    """decision_wait outlasts the agent run's deadline (ServiceConfig.request_timeout) plus a
    batch delay, since the request span ends last; a trace whose root arrived is decided a
    short grace later; num_traces holds every trace that may be waiting; the decision caches
    outlive the traces and a late orphaned stream."""
    check_decision_timing(config()["processors"]["tail_sampling"])


def test_matched_attributes_are_names_chunkwatch_emits() -> None:
    """Every attribute the config samples on or aggregates by is a name in chunkwatch.semconv
    (the constants module, not a copy); the outcome, the layer and the verdict are among
    them."""
    names = {v for v in vars(sc).values() if isinstance(v, str)}
    keys = matched_attributes()
    assert keys <= names, keys - names
    assert {sc.A_OUTCOME, sc.A_LAYER, sc.A_UPSTREAM, sc.A_VERDICT} <= keys


def test_exports_go_to_jaeger_over_otlp_and_to_prometheus() -> None:
    """Traces leave over OTLP/gRPC to Jaeger's 4317; span metrics are served on the port the
    shipped Prometheus config scrapes, with Prometheus' suffixes."""
    cfg = config()
    (jaeger,) = [e for n, e in cfg["exporters"].items() if _type(n) == "otlp_grpc"]
    assert jaeger["endpoint"].endswith(":4317")
    port = cfg["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    assert cfg["exporters"]["prometheus"]["translation_strategy"] == (
        "UnderscoreEscapingWithSuffixes"
    )
    prom = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    targets = [
        t
        for job in prom["scrape_configs"]
        for c in job.get("static_configs", [])
        for t in c["targets"]
    ]
    assert f"otel-collector:{port}" in targets
