"""End to end: the shipped alert rules and dashboard in a real Prometheus fed by the real service.

One scenario, run once for the module (about 45 s on 2 cores):

1. the instrumented reference system (upstream, fault gateway, Flask + LangGraph +
   openai SDK) on loopback, with the guard on (its breaker opens after 3 fallbacks and
   probes again after 2 s), and a thread sending one chat request after another;
2. a real ``prometheus`` on a free loopback port scraping its ``/metrics`` every
   second (OpenMetrics, exemplar storage on) and evaluating
   ``prometheus/chunkwatch.rules.yml`` every second — the shipped rules with every
   window and ``for`` divided by :data:`FACTOR` (5m -> 10s, for 2m -> 4s), nothing
   else changed;
3. healthy traffic: no alert may be pending or firing;
4. the gateway switched to ``zero`` at runtime: ``ChunkwatchEmptyStreams`` must fire
   with ``layer="gateway"`` — although the guard serves every user without streaming —
   and, besides it, only ``ChunkwatchFallbackEngaged`` (reason ``empty@gateway``);
5. the gateway healed: both must resolve;
6. one request each of ``stall``, ``buffer``, ``truncate`` and a client disconnect,
   then every dashboard panel's query (variables substituted as Grafana would) runs
   against the live Prometheus over the whole run and must return data, the latency
   panels' exemplars must carry trace ids of traces the service produced, and the
   ``upstream`` variable's query must list the upstream.

How many seconds each transition took is printed and recorded in docs/operations.md.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from chunkwatch import semconv as sc
from chunkwatch.guard import BreakerConfig
from chunkwatch_lab.client import chat

from .helpers import System, instrumented_system
from .prom import (
    DASHBOARDS,
    RULES,
    Prometheus,
    Traffic,
    binary,
    builtin_variables,
    compress_durations,
    dashboards,
    has_data,
    label_values_query,
    mixin_config,
    shipped_rules,
    substitute,
    variable_values,
    wait_for,
)
from .prom import panels as all_panels

FACTOR = 30  # 5m windows -> 10s, for: 2m -> 4s
RATE_INTERVAL = "4s"  # Grafana's $__rate_interval with a 1 s scrape interval: 4 x scrape
UPSTREAM = "test-gw"  # tests/helpers.py names the gateway so
JOB = "chunkwatch"  # tests/prom.py's Prometheus scrapes the service as this job
PROMPT = "Which layer dropped the data?"
EMPTY = "ChunkwatchEmptyStreams"
HEALTHY_WATCH = 6.0  # seconds of healthy traffic with no pending/firing alert (> every `for`/30)

# Panels whose queries run against the live Prometheus but may return no data in this run,
# and why. Strict both ways: a listed panel that does return data fails the test, so that
# this list only ever shrinks.
ALLOWED_EMPTY = {
    "Instrumentation errors by layer and stage": (
        "chunkwatch_instrumentation_errors_total has a sample only after chunkwatch's own "
        "bookkeeping failed; a healthy run has none"
    ),
    "Browser streams by outcome": (
        "the browser layer is counted from chunkwatch.js's beacon and this run's client is "
        "not a browser; tests/test_prometheus_downstream.py runs this panel with Chromium"
    ),
}
# The guard: a fallback per broken call; after 3 the breaker opens; a probe every 2 s.
BREAKER = BreakerConfig(failures=3, window=60.0, cooldown=2.0)
GUARD_ALERT = "ChunkwatchFallbackEngaged"


@dataclass
class Run:
    prom: Prometheus
    system: System
    t_start: float = field(default_factory=time.time)
    healthy_alerts: list[str] = field(default_factory=list)  # "name: states" while healthy
    healthy_ready: bool = False
    pending_after: float | None = None
    firing_after: float | None = None
    guard_firing_after: float | None = None
    firing: list[dict[str, Any]] = field(default_factory=list)
    resolved_after: float | None = None
    guard_resolved_after: float | None = None
    panel_data: dict[tuple[str, str], int] = field(default_factory=dict)  # (title, refId) -> n
    panel_errors: dict[tuple[str, str], str] = field(default_factory=dict)
    exemplars: dict[tuple[str, str], list[dict[str, str]]] = field(default_factory=dict)
    upstream_values: list[str] = field(default_factory=list)
    trace_ids: set[str] = field(default_factory=set)
    rule_health: dict[str, str] = field(default_factory=dict)  # rule name -> health: lastError


def _first_seen(
    prom: Prometheus,
    t0: float,
    wanted: dict[str, tuple[str, str | None]],
    *,
    present: bool,
    timeout: float,
) -> dict[str, float]:
    """Seconds since ``t0`` until each wanted (alertname, state or any) was first active
    (``present``) or first gone (not ``present``); polled together, every 0.25 s."""
    seen: dict[str, float] = {}
    while len(seen) < len(wanted) and time.monotonic() - t0 < timeout:
        alerts = prom.alerts()
        now = time.monotonic() - t0
        for key, (name, state) in wanted.items():
            active = any(
                a["labels"]["alertname"] == name and state in (None, a["state"]) for a in alerts
            )
            if key not in seen and active == present:
                seen[key] = now
        time.sleep(0.25)
    return seen


def _disconnect(url: str) -> None:
    """A client that reads two tokens and goes away (the sse probe counts a disconnect)."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"message": PROMPT}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        got = b""
        while got.count(b"event: token") < 2:
            chunk = sock.recv(4096)
            if not chunk:
                break
            got += chunk


def _query_panels(run: Run) -> None:
    now = time.time()
    chosen = {
        "upstream": UPSTREAM,
        "job": JOB,
        **builtin_variables(run.t_start, now, RATE_INTERVAL),
    }
    for dash in dashboards().values():
        variables = variable_values(dash, chosen)
        for panel in all_panels(dash):
            for target in panel.get("targets", []):
                key = (panel["title"], target["refId"])
                expr = substitute(target["expr"], variables)
                try:
                    if target.get("instant"):
                        result = run.prom.query(expr)
                    else:
                        result = run.prom.query_range(expr, run.t_start, now, 1.0)
                    run.panel_data[key] = has_data(result)
                    if target.get("exemplar"):
                        run.exemplars[key] = [
                            ex["labels"]
                            for series in run.prom.exemplars(expr, run.t_start, now)
                            for ex in series["exemplars"]
                        ]
                except AssertionError as err:
                    run.panel_errors[key] = str(err)
        for var in dash["templating"]["list"]:
            if var["type"] == "query" and var["name"] == "upstream":
                match, label = label_values_query(substitute(var["definition"], variables))
                run.upstream_values = run.prom.label_values(label, match or "{__name__=~'.+'}")


def _scenario(run: Run, traffic: Traffic) -> None:
    prom, gw = run.prom, run.system.gateway.server

    # healthy: wait until the recording rules see traffic, let start-up settle, then watch
    ready, _ = wait_for(
        lambda: prom.query(
            'layer_outcome_upstream:chunkwatch_requests:ratio_rate5m{outcome="ok",'
            f'upstream="{UPSTREAM}"}}'
        ),
        timeout=30,
    )
    run.healthy_ready = bool(ready)
    ready_at = time.time()  # alerts from evaluations after it: no state left from start-up
    time.sleep(2.0)
    t_end = time.monotonic() + HEALTHY_WATCH
    while time.monotonic() < t_end:
        states = prom.alert_states(evaluated_after=ready_at)
        run.healthy_alerts.extend(f"{name}: {', '.join(sorted(s))}" for name, s in states.items())
        time.sleep(0.5)

    # the incident: the gateway drops every stream, switched while running
    t0 = time.monotonic()
    gw.set_fault("zero")
    seen = _first_seen(
        prom,
        t0,
        {"pending": (EMPTY, None), "firing": (EMPTY, "firing"), "guard": (GUARD_ALERT, "firing")},
        present=True,
        timeout=60,
    )
    run.pending_after, run.firing_after = seen.get("pending"), seen.get("firing")
    run.guard_firing_after = seen.get("guard")
    time.sleep(2.0)  # anything else that was going to fire with them
    run.firing = [a for a in prom.alerts() if a["state"] == "firing"]

    # healed
    t0 = time.monotonic()
    gw.set_fault("pass")
    seen = _first_seen(
        prom, t0, {"empty": (EMPTY, None), "guard": (GUARD_ALERT, None)}, present=False, timeout=90
    )
    run.resolved_after, run.guard_resolved_after = seen.get("empty"), seen.get("guard")

    # one of each remaining kind of trouble, so that every panel has something to show
    with traffic.lock:
        gw.set_fault("stall", limit=5.0)  # 1 s first-chunk deadline, then the guard's fallback
        chat(run.system.service.url, PROMPT, timeout=20)
        gw.set_fault("buffer")
        chat(run.system.service.url, PROMPT, timeout=20)
        gw.set_fault("truncate", events=4)
        chat(run.system.service.url, PROMPT, timeout=20)
        gw.set_fault("pass")
        _disconnect(run.system.service.url)
    time.sleep(4.0)  # a few scrapes and rule evaluations
    _query_panels(run)
    run.trace_ids = {
        format(s.context.trace_id, "032x") for s in run.system.exporter.get_finished_spans()
    }
    run.rule_health = prom.rule_health()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    binary("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    rules = workdir / RULES.name
    rules.write_text(compress_durations(RULES.read_text(), FACTOR))
    with instrumented_system(guard=True, breaker=BREAKER) as system:
        for _ in range(2):  # counters exist before the first scrape
            chat(system.service.url, PROMPT, timeout=30)
        _disconnect(system.service.url)  # so do the orphaned-stream series
        time.sleep(0.5)  # the departed client's model stream stops, then is counted
        prom = Prometheus(workdir, [system.service.url.removeprefix("http://")], [rules])
        prom.start()
        traffic = Traffic(system.service.url, PROMPT)
        traffic.start()
        try:
            result = Run(prom, system)
            _scenario(result, traffic)
            yield result
        finally:
            traffic.halt()
            prom.stop()


def test_healthy_traffic_fires_no_alert(run: Run) -> None:
    """With healthy traffic scraped and every rule evaluated, no alert is pending or firing."""
    assert run.healthy_ready, f"the recording rules never saw traffic:\n{run.prom.log_tail()}"
    assert run.healthy_alerts == []


def test_every_rule_evaluates_without_error(run: Run) -> None:
    """Every shipped recording and alerting rule was loaded and evaluated by the live
    Prometheus without an error (a rule that errors, e.g. on a many-to-many match, never
    fires)."""
    assert set(run.rule_health) == shipped_rules()
    assert {n: h for n, h in run.rule_health.items() if h != "ok: "} == {}


def test_zero_gateway_fires_empty_streams_at_the_gateway(run: Run) -> None:
    """Gateway switched to `zero`: ChunkwatchEmptyStreams fires for layer gateway and the
    upstream, critical, with its runbook — while the guard serves users without streaming —
    and the only other alert firing is the guard's, for reason empty@gateway (one page, at
    the right layer; one warning saying the guard works around it)."""
    assert run.firing_after is not None, "ChunkwatchEmptyStreams never fired"
    (alert,) = [a for a in run.firing if a["labels"]["alertname"] == EMPTY]
    labels, annotations = alert["labels"], alert["annotations"]
    assert labels["layer"] == sc.GATEWAY
    assert labels["upstream"] == UPSTREAM
    assert labels["outcome"] == "empty"
    assert labels["severity"] == "critical"
    assert "at layer gateway" in annotations["description"]
    assert labels["job"] == JOB  # the rules keep the scrape job: Alertmanager routes on it
    runbook = mixin_config()["runbook_url"].format(anchor="chunkwatchemptystreams")
    assert annotations["runbook_url"] == runbook
    assert {a["labels"]["alertname"] for a in run.firing} == {EMPTY, GUARD_ALERT}
    (guard,) = [a for a in run.firing if a["labels"]["alertname"] == GUARD_ALERT]
    assert guard["labels"]["reason"] == "empty@gateway"
    assert guard["labels"]["layer"] == sc.GATEWAY
    assert guard["labels"]["upstream"] == UPSTREAM


def test_alerts_resolve_after_the_gateway_heals(run: Run) -> None:
    """Gateway back to `pass`: the guard's probe closes the breaker, and both alerts leave
    Prometheus's active alerts."""
    assert run.firing_after is not None, "ChunkwatchEmptyStreams never fired"
    assert run.resolved_after is not None, "ChunkwatchEmptyStreams did not resolve in 90 s"
    assert run.guard_resolved_after is not None, f"{GUARD_ALERT} did not resolve in 90 s"


def test_transition_timings(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    """The seconds each transition took (printed; docs/operations.md quotes them): fast enough
    for the compressed clock (10 s windows, `for` 4 s), generous for a loaded 2-core box."""
    with capsys.disabled():
        print(
            f"\n[prometheus e2e, rules time-compressed x{FACTOR}] zero -> EmptyStreams pending "
            f"{run.pending_after and round(run.pending_after, 1)} s, firing "
            f"{run.firing_after and round(run.firing_after, 1)} s, {GUARD_ALERT} firing "
            f"{run.guard_firing_after and round(run.guard_firing_after, 1)} s; pass -> "
            f"EmptyStreams resolved {run.resolved_after and round(run.resolved_after, 1)} s, "
            f"{GUARD_ALERT} resolved "
            f"{run.guard_resolved_after and round(run.guard_resolved_after, 1)} s"
        )
    assert run.firing_after is not None and run.firing_after < 45
    assert run.resolved_after is not None and run.resolved_after < 60


def test_every_dashboard_panel_returns_data(run: Run) -> None:
    """Every target of every panel, variables substituted, is valid PromQL for the live
    Prometheus and returns data over the run — except the panels in ALLOWED_EMPTY, which
    must run and return nothing (so the list cannot go stale)."""
    assert run.panel_errors == {}
    titles = {title for title, _ in run.panel_data}
    assert set(ALLOWED_EMPTY) <= titles, "ALLOWED_EMPTY names a panel that does not exist"
    empty = sorted(key for key, n in run.panel_data.items() if n == 0)
    unexpected = [key for key in empty if key[0] not in ALLOWED_EMPTY]
    assert unexpected == [], f"panels without data: {unexpected}"
    stale = sorted({t for (t, _), n in run.panel_data.items() if n and t in ALLOWED_EMPTY})
    assert stale == [], f"these panels have data now: remove them from ALLOWED_EMPTY: {stale}"


def test_latency_exemplars_link_to_real_traces(run: Run) -> None:
    """Each exemplar-enabled target gets exemplars from Prometheus whose label is the one the
    Grafana datasource links to Jaeger with, holding trace ids of traces the service made."""
    provisioning = yaml.safe_load(
        (DASHBOARDS / "provisioning" / "datasources" / "chunkwatch.yaml").read_text()
    )
    (prometheus_ds,) = [d for d in provisioning["datasources"] if d["type"] == "prometheus"]
    (link,) = prometheus_ds["jsonData"]["exemplarTraceIdDestinations"]
    assert run.exemplars, "no panel has exemplars enabled"
    for key, exemplars in run.exemplars.items():
        assert exemplars, f"{key}: no exemplars"
        ids = {ex[link["name"]] for ex in exemplars}
        assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), ids
        assert ids <= run.trace_ids, f"{key}: exemplars of unknown traces"


def test_upstream_variable_lists_the_upstream(run: Run) -> None:
    """The dashboard's `upstream` variable query, run against the live Prometheus, offers the
    configured upstream name."""
    assert UPSTREAM in run.upstream_values
