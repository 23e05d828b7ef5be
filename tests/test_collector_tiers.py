"""The two-tier collector (otel-collector-lb.yaml in front of otel-collector-sampling.yaml),
read as data: current names and complete wiring in both; the load-balancing tier routes
every span by trace id to the sampling tier's OTLP/gRPC port; the sampling tier samples and
aggregates exactly as the one-tier otel-collector.yaml does, on names chunkwatch emits; and
compose's `two-tier` profile runs both with the mounts and names the configs expect.

No collector binary runs in the test suite (see tests/test_collector.py).
"""

from __future__ import annotations

from typing import Any

import yaml

from chunkwatch import semconv as sc

from .prom import ROOT
from .test_collector import (
    VERSION,
    check_current_names,
    check_decision_timing,
    check_span_metrics_before_sampling,
    check_wiring,
    config,
    matched_attributes,
)

LB = ROOT / "otel-collector-lb.yaml"
SAMPLING = ROOT / "otel-collector-sampling.yaml"
CONFIG_IN_IMAGE = "/etc/otelcol-contrib/config.yaml"


def _compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "compose.yaml").read_text()))


def _load_balancing(cfg: dict[str, Any]) -> dict[str, Any]:
    (exporter,) = [e for n, e in cfg["exporters"].items() if n.split("/")[0] == "load_balancing"]
    return dict(exporter)


def test_both_tiers_name_the_release_and_use_current_component_names() -> None:
    """Each file names the otelcol-contrib release it targets (the one compose runs) and uses
    only current component types."""
    for path in (LB, SAMPLING):
        assert f"otelcol-contrib v{VERSION}" in path.read_text().split("\n\n", 1)[0], path
        check_current_names(config(path))


def test_both_tiers_are_wired_to_defined_components() -> None:
    """Every pipeline of either tier references defined components, uses all of them, and
    starts with memory_limiter where data enters; both expose the health_check extension."""
    for path in (LB, SAMPLING):
        cfg = config(path)
        check_wiring(cfg)
        assert cfg["extensions"]["health_check"]["endpoint"] == "0.0.0.0:13133", path


def test_load_balancing_tier_takes_otlp_and_only_routes() -> None:
    """Tier 1 receives OTLP like the one-tier collector (services need no change) and does
    nothing but route: one traces pipeline, OTLP in, load_balancing out, no sampler."""
    cfg = config(LB)
    assert cfg["receivers"]["otlp"] == config()["receivers"]["otlp"]
    (pipeline,) = cfg["service"]["pipelines"].values()
    assert pipeline["receivers"] == ["otlp"]
    assert [e.split("/")[0] for e in pipeline["exporters"]] == ["load_balancing"]
    assert "tail_sampling" not in cfg.get("processors", {})


def test_load_balancing_routes_by_trace_id_to_the_sampling_tiers_grpc_port() -> None:
    """routing_key traceID; the resolver's port is the sampling tier's OTLP/gRPC receiver port
    (the exporter speaks OTLP/gRPC); the DNS name is the compose service of that tier."""
    lb = _load_balancing(config(LB))
    assert lb["routing_key"] == "traceID"
    assert "otlp" in lb["protocol"]
    assert "endpoint" not in lb["protocol"]["otlp"]  # the resolver fills it in
    (kind,) = lb["resolver"]
    assert kind in ("dns", "k8s", "static"), kind
    grpc = config(SAMPLING)["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    grpc_port = int(grpc.rsplit(":", 1)[1])
    resolver = lb["resolver"][kind]
    if kind == "dns":
        assert resolver["port"] == grpc_port
        assert resolver["hostname"] in _compose()["services"]
    elif kind == "k8s":
        assert resolver["ports"] == [grpc_port]
    else:
        assert all(int(h.rsplit(":", 1)[1]) == grpc_port for h in resolver["hostnames"])


def test_sampling_tier_samples_and_aggregates_as_the_one_tier_collector() -> None:
    """Tier 2 computes span metrics before sampling, keeps the same traces (same policies)
    with the same span-metrics dimensions and decision timing as otel-collector.yaml, so
    going to two tiers changes where spans are judged, not how."""
    one, two = config(), config(SAMPLING)
    check_span_metrics_before_sampling(two)
    check_decision_timing(two["processors"]["tail_sampling"])
    assert two["processors"]["tail_sampling"] == one["processors"]["tail_sampling"]
    assert two["connectors"] == one["connectors"]
    assert two["exporters"] == one["exporters"]
    assert two["service"]["pipelines"] == one["service"]["pipelines"]


def test_every_attribute_a_tier_reads_is_one_chunkwatch_emits() -> None:
    """Every span attribute a sampling policy reads or span_metrics aggregates by, in either
    tier, is a name in chunkwatch.semconv (the module, not a copy); the load-balancing tier
    reads none (it routes by trace id alone)."""
    names = {v for v in vars(sc).values() if isinstance(v, str)}
    assert matched_attributes(config(LB)) == set()
    keys = matched_attributes(config(SAMPLING))
    assert keys <= names, keys - names
    assert {sc.A_OUTCOME, sc.A_LAYER, sc.A_VERDICT} <= keys


def test_compose_two_tier_profile_runs_both_tiers() -> None:
    """`docker compose --profile two-tier` mounts each tier's file where the image reads its
    config, runs the release the files target, publishes nothing beyond loopback, and sends
    nothing from the lb tier before the sampling tier has started."""
    services = _compose()["services"]
    for name, path in (("otel-collector-lb", LB), ("otel-collector-sampling", SAMPLING)):
        svc = services[name]
        assert svc["profiles"] == ["two-tier"], name
        assert svc["image"] == f"otel/opentelemetry-collector-contrib:{VERSION}", name
        assert f"./{path.name}:{CONFIG_IN_IMAGE}:ro" in svc["volumes"], name
        assert f"--config={CONFIG_IN_IMAGE}" in svc["command"], name
    assert "otel-collector-sampling" in services["otel-collector-lb"]["depends_on"]
    assert services["otel-collector-sampling"]["deploy"]["replicas"] >= 2
