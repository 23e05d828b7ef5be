"""A fleet in one Prometheus: two services, three replicas, one broken gateway.

The shipped rules and dashboard against what users run: many replicas of many services
scraped by one Prometheus. One scenario, run once for the module (about 40 s on 2 cores):

1. one model upstream and three fault gateways in this process; three children serving
   the reference service (each its own process, so its own registry and target), guard,
   deadlines and breaker as in tests/test_prometheus_e2e.py: replicas A and B of job
   chat-api, A behind a ``zero`` gateway (every stream comes back empty), and replica C
   of job batch-api. Every gateway is named ``azure-gw``, so only ``job`` tells the
   services apart; both jobs are in namespace ``llm`` (``labels:`` of the scrape config),
   so only ``job`` filters the dashboard;
2. a real ``prometheus`` scraping them every second as two jobs, with the shipped rules
   time-compressed x30 as in the e2e test; a thread of chat requests per replica;
3. ``ChunkwatchEmptyStreams`` must fire once, for chat-api (both replicas summed), at the
   gateway, for azure-gw — and no alert may ever be pending or firing for batch-api;
4. the recording rules, queried per job, keep the jobs apart and sum the replicas;
5. replica B meets a stall, a buffering and a truncating gateway and both B and C lose a
   client, so that every panel has something to show; then every dashboard query, with
   ``job`` = chat-api and every other variable *All*, must return data, only chat-api's:
   the same result as the query with every selector pinned to ``job="chat-api"``.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from chunkwatch import semconv as sc
from chunkwatch_lab.client import chat
from chunkwatch_lab.fault_gateway import Gateway
from chunkwatch_lab.threaded import Running, start_in_thread
from chunkwatch_lab.upstream import Upstream

from .helpers import API_KEY, open_chat, read_until
from .lab.processes import child, clean_env
from .prom import (
    RULES,
    Prometheus,
    Traffic,
    binary,
    builtin_variables,
    compress_durations,
    dashboards,
    has_data,
    label_values_query,
    panels,
    substitute,
    variable_values,
    wait_for,
)
from .test_prometheus_e2e import (
    ALLOWED_EMPTY,
    EMPTY,
    FACTOR,
    PROMPT,
    RATE_INTERVAL,
)

CHAT, BATCH, NAMESPACE, UPSTREAM = "chat-api", "batch-api", "llm", "azure-gw"
# The reference service on its `chunkwatch serve` server, with its gateway named: `serve`
# has no option for upstream names, and passes `upstreams={}` over CHUNKWATCH_UPSTREAMS.
REPLICA = """
import sys, threading
from chunkwatch_lab.agent import LLMConfig
from chunkwatch_lab.service import ServiceConfig, create_app
from chunkwatch_lab.serving import ServiceThread
llm_url, address, upstream, key = sys.argv[1:5]
config = ServiceConfig(llm=LLMConfig(url=llm_url, api_key=key), upstreams={address: upstream})
print("listening on", ServiceThread(create_app(config)).url, flush=True)
threading.Event().wait()
"""
# the e2e test's deadlines and breaker, through the variables the service reads
SERVE_ENV = {
    "CHUNKWATCH_FIRST_CHUNK_TIMEOUT": "1",
    "CHUNKWATCH_IDLE_TIMEOUT": "1",
    "CHUNKWATCH_ABORT_STALLED": "1",
    "CHUNKWATCH_BREAKER_FAILURES": "3",
    "CHUNKWATCH_BREAKER_WINDOW": "60",
    "CHUNKWATCH_BREAKER_COOLDOWN": "2",
}
_SELECTOR = re.compile(r"(?<![\w:])(chunkwatch_\w+|ALERTS)(?![\w:])(?:\{([^}]*)\})?")


@dataclass
class Replica:
    name: str
    job: str
    gateway: Running[Gateway]
    url: str = ""
    traffic: Traffic | None = None

    @property
    def target(self) -> str:
        return self.url.removeprefix("http://")


@dataclass
class Fleet:
    prom: Prometheus
    replicas: dict[str, Replica]
    t_start: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)
    seen: list[dict[str, Any]] = field(default_factory=list)  # every alert polled, any state
    firing: list[dict[str, Any]] = field(default_factory=list)
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    empty_instances: set[str] = field(default_factory=set)
    variables: dict[str, list[str]] = field(default_factory=dict)  # name -> values offered
    has_job_variable: bool = False
    panel_data: dict[tuple[str, str], int] = field(default_factory=dict)
    panel_jobs: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    panel_leaks: list[tuple[str, str]] = field(default_factory=list)
    panel_errors: dict[tuple[str, str], str] = field(default_factory=dict)


def _serve(stack: ExitStack, replica: Replica, workdir: Path) -> None:
    """Start the service for ``replica`` (its URL is read once it listens)."""
    gw = replica.gateway
    log = workdir / f"serve-{replica.name}.log"
    cmd = [sys.executable, "-c", REPLICA, gw.url, f"127.0.0.1:{gw.port}", UPSTREAM, API_KEY]
    env = clean_env(**SERVE_ENV)
    stack.enter_context(child(cmd, env, log))


def _listening(workdir: Path, name: str, timeout: float = 30.0) -> str:
    log = workdir / f"serve-{name}.log"
    found, _ = wait_for(
        lambda: re.search(r"listening on (http://\S+)", log.read_text(errors="replace")),
        timeout=timeout,
        every=0.1,
    )
    assert found, f"replica {name} did not start:\n{log.read_text(errors='replace')[-2000:]}"
    return found.group(1)


def _lose_a_client(url: str) -> None:
    """A client that reads two tokens and hangs up (a disconnect, an orphaned stream)."""
    with open_chat(url, PROMPT) as sock:
        read_until(sock, b"event: token", 2)


def _pin(expr: str, job: str) -> str:
    """``expr`` with ``job="<job>"`` added to every series selector: what the query should
    return if it reads only that job."""

    def pinned(m: re.Match[str]) -> str:
        inner = m.group(2)
        return f'{m.group(1)}{{job="{job}"' + (f",{inner}}}" if inner else "}")

    return _SELECTOR.sub(pinned, expr)


def _canonical(result: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(s, sort_keys=True) for s in result)


def _query(prom: Prometheus, target: dict[str, Any], expr: str, start: float, end: float) -> Any:
    if target.get("instant"):
        return prom.api("query", query=expr, time=end)["result"]
    return prom.api("query_range", query=expr, start=start, end=end, step=1.0)["result"]


def _query_dashboards(fleet: Fleet) -> None:
    end = time.time() - 2  # every sample up to here is stored: both queries see the same
    chosen = {"job": CHAT, **builtin_variables(fleet.t_start, end, RATE_INTERVAL)}
    for dash in dashboards().values():
        variables = variable_values(dash, chosen)
        templating = dash.get("templating", {}).get("list", [])
        fleet.has_job_variable = any(v["name"] == "job" for v in templating)
        for var in templating:
            if var["type"] == "query":
                match, label = label_values_query(substitute(var["definition"], variables))
                values = fleet.prom.label_values(label, match or "{__name__=~'.+'}")
                fleet.variables[var["name"]] = sorted(values)
        for panel in panels(dash):
            for target in panel.get("targets", []):
                key = (panel["title"], target["refId"])
                expr = substitute(target["expr"], variables)
                try:
                    got = _query(fleet.prom, target, expr, fleet.t_start, end)
                    want = _query(fleet.prom, target, _pin(expr, CHAT), fleet.t_start, end)
                except AssertionError as err:
                    fleet.panel_errors[key] = str(err)
                    continue
                fleet.panel_data[key] = has_data(got)
                fleet.panel_jobs[key] = {s["metric"]["job"] for s in got if "job" in s["metric"]}
                if _canonical(got) != _canonical(want):
                    fleet.panel_leaks.append(key)


def _watch_alerts(fleet: Fleet, until: float) -> None:
    while time.monotonic() < until:
        fleet.seen.extend(fleet.prom.alerts())
        time.sleep(0.25)


def _scenario(fleet: Fleet) -> None:
    prom, t0 = fleet.prom, time.monotonic()
    for job in (CHAT, BATCH):
        ratio = f'layer_outcome_upstream:chunkwatch_requests:ratio_rate5m{{job="{job}"}}'
        ready, _ = wait_for(partial(prom.query, ratio), timeout=30)
        assert ready, f"the recording rules never saw {job}:\n{prom.log_tail()}"
    fleet.timings["rules see both jobs"] = time.monotonic() - t0

    def empty_firing() -> bool:
        alerts = prom.alerts()
        fleet.seen.extend(alerts)
        return any(a["labels"]["alertname"] == EMPTY and a["state"] == "firing" for a in alerts)

    fired, _ = wait_for(empty_firing, timeout=45)
    fleet.timings[f"{EMPTY} firing"] = time.monotonic() - t0
    assert fired, f"{EMPTY} never fired:\n{prom.log_tail()}"
    _watch_alerts(fleet, time.monotonic() + 3.0)  # anything else that would fire with it
    fleet.firing = [a for a in prom.alerts() if a["state"] == "firing"]

    for name in (
        "layer_outcome_upstream:chunkwatch_requests:ratio_rate5m",
        "layer_outcome_upstream:chunkwatch_streams:ratio_rate5m",
    ):
        for job in (CHAT, BATCH):
            fleet.records[f'{name}{{job="{job}"}}'] = prom.query(f'{name}{{job="{job}"}}')
    recorded = (
        '{__name__=~"[a-z_]+:chunkwatch_[a-z0-9_]+:[a-z0-9_]+",'
        '__name__!="layer:chunkwatch_layer_order:static"'
    )
    fleet.records["recorded without job"] = prom.query(recorded + ',job=""}')
    fleet.records["recorded with instance"] = prom.query(recorded + ',instance!=""}')
    fleet.empty_instances = {
        s["metric"]["instance"]
        for s in prom.query(
            f'sum by (instance) (chunkwatch_requests_total{{job="{CHAT}",outcome="empty"}}) > 0'
        )
    }

    b, c = fleet.replicas["B"], fleet.replicas["C"]
    assert b.traffic is not None
    with b.traffic.lock:  # B's own requests wait while it meets each fault once
        for fault, params in (
            ("stall", {"limit": 5.0}),
            ("buffer", {}),
            ("truncate", {"events": 4}),
        ):
            b.gateway.server.set_fault(fault, **params)
            chat(b.url, PROMPT, timeout=20)
        b.gateway.server.set_fault("pass")
        _lose_a_client(b.url)
    _lose_a_client(c.url)
    # until B's new verdicts are in six scrapes: the queries end 2 s ago, and a rate over
    # $__rate_interval needs two samples in it
    toured = f'chunkwatch_requests_total{{job="{CHAT}",outcome=~"buffered|truncated"}}'

    def scraped() -> bool:
        fleet.seen.extend(prom.alerts())
        return len(prom.query(f"count_over_time({toured}[30s]) >= 6")) >= 2

    wait_for(scraped, timeout=20)
    _query_dashboards(fleet)
    fleet.timings["scenario"] = time.monotonic() - t0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    binary("prometheus")
    workdir = tmp_path_factory.mktemp("fleet")
    rules = workdir / RULES.name
    rules.write_text(compress_durations(RULES.read_text(), FACTOR))
    t0 = time.monotonic()
    with ExitStack() as stack:
        up = stack.enter_context(start_in_thread(Upstream(tokens=12, token_delay=0.03)))
        replicas = {
            name: Replica(name, job, stack.enter_context(start_in_thread(Gateway(up.url))))
            for name, job in (("A", CHAT), ("B", CHAT), ("C", BATCH))
        }
        replicas["A"].gateway.server.set_fault("zero")
        for replica in replicas.values():  # all three start at once
            _serve(stack, replica, workdir)
        for replica in replicas.values():
            replica.url = _listening(workdir, replica.name)
            chat(replica.url, PROMPT, timeout=30)  # counters exist before the first scrape
        for name in ("B", "C"):
            _lose_a_client(replicas[name].url)  # so do the disconnect and orphan series
        scrape_configs = [
            {
                "job_name": job,
                "static_configs": [
                    {
                        "targets": [r.target for r in replicas.values() if r.job == job],
                        "labels": {"namespace": NAMESPACE},
                    }
                ],
            }
            for job in (CHAT, BATCH)
        ]
        prom = Prometheus(workdir, [], [rules], scrape_configs=scrape_configs)
        prom.start()
        stack.callback(prom.stop)
        for replica in replicas.values():
            replica.traffic = Traffic(replica.url, PROMPT)
            replica.traffic.start()
            stack.callback(replica.traffic.halt)
        result = Fleet(prom, replicas)
        result.timings["start-up"] = time.monotonic() - t0
        _scenario(result)
        yield result


def test_empty_streams_page_once_for_the_broken_job(fleet: Fleet) -> None:
    """One replica of chat-api behind a `zero` gateway: ChunkwatchEmptyStreams fires exactly
    once — for job chat-api in namespace llm, at the gateway, for azure-gw — with both
    replicas summed into it (no instance label), not once per replica."""
    empty = [a for a in fleet.firing if a["labels"]["alertname"] == EMPTY]
    assert len(empty) == 1, empty
    labels = empty[0]["labels"]
    assert labels["job"] == CHAT and labels["namespace"] == NAMESPACE
    assert labels["layer"] == sc.GATEWAY and labels["upstream"] == UPSTREAM
    assert labels["outcome"] == "empty" and labels["severity"] == "critical"
    assert "instance" not in labels
    assert {a["labels"].get("job") for a in fleet.firing} == {CHAT}


def test_the_healthy_job_never_alerts(fleet: Fleet) -> None:
    """batch-api, healthy, behind a gateway of the same upstream name: no alert for it is
    ever pending or firing, while chat-api's fires."""
    assert fleet.seen, "no alert was ever seen"
    assert [a for a in fleet.seen if a["labels"].get("job") == BATCH] == []


def test_recording_rules_keep_jobs_apart_and_sum_replicas(fleet: Fleet) -> None:
    """Queried per job, the verdict and stream ratios of chat-api show the empty streams at
    the gateway and batch-api's none (its client that left is its only other verdict);
    every recorded series names its job and none an instance (replicas summed), while the
    raw series say which replica failed."""
    verdicts = "layer_outcome_upstream:chunkwatch_requests:ratio_rate5m"
    chat_outcomes = {
        (s["metric"]["outcome"], s["metric"]["layer"])
        for s in fleet.records[f'{verdicts}{{job="{CHAT}"}}']
    }
    assert ("empty", sc.GATEWAY) in chat_outcomes, chat_outcomes
    batch = fleet.records[f'{verdicts}{{job="{BATCH}"}}']
    assert {s["metric"]["outcome"] for s in batch} <= {"ok", "disconnected"}, batch
    assert any(s["metric"]["outcome"] == "ok" for s in batch), batch
    streams = "layer_outcome_upstream:chunkwatch_streams:ratio_rate5m"
    chat_streams = fleet.records[f'{streams}{{job="{CHAT}"}}']
    assert any(s["metric"]["outcome"] == "empty" for s in chat_streams), chat_streams
    batch_streams = fleet.records[f'{streams}{{job="{BATCH}"}}']
    assert {s["metric"]["outcome"] for s in batch_streams} <= {"ok", "disconnected"}
    assert fleet.records["recorded without job"] == []
    assert fleet.records["recorded with instance"] == []
    assert fleet.empty_instances == {fleet.replicas["A"].target}


def test_dashboard_variables_offer_the_fleet(fleet: Fleet) -> None:
    """The dashboard has a `job` variable; with job = chat-api its query variables offer
    both jobs, chat-api's two instances (where an `instance` variable exists), the
    namespace and the upstream."""
    assert fleet.has_job_variable, "the dashboard has no `job` variable"
    assert fleet.variables["job"] == sorted([CHAT, BATCH])
    expected = {
        "instance": sorted(fleet.replicas[n].target for n in ("A", "B")),
        "namespace": [NAMESPACE],
        "upstream": [UPSTREAM],
    }
    for name, values in expected.items():
        if name in fleet.variables:
            assert fleet.variables[name] == values, name


def test_every_dashboard_query_returns_chat_api_data_only(fleet: Fleet) -> None:
    """Every panel target, with job = chat-api and the other variables All, runs, returns
    data (but for ALLOWED_EMPTY, which must stay empty), no series of batch-api, and exactly
    what the same query returns with every selector pinned to job="chat-api"."""
    assert fleet.has_job_variable, "the dashboard has no `job` variable"
    assert fleet.panel_errors == {}
    empty = sorted(k for k, n in fleet.panel_data.items() if n == 0 and k[0] not in ALLOWED_EMPTY)
    assert empty == [], f"panels without data: {empty}"
    stale = sorted({t for (t, _), n in fleet.panel_data.items() if n and t in ALLOWED_EMPTY})
    assert stale == [], f"these panels have data now: {stale}"
    leaking = {k: jobs for k, jobs in fleet.panel_jobs.items() if jobs - {CHAT}}
    assert leaking == {}, f"panels showing other jobs: {leaking}"
    assert fleet.panel_leaks == [], f"panels reading other jobs: {fleet.panel_leaks}"


def test_fleet_timings(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    """How long each step took (printed): the scenario fits the ~60 s budget of a 2-core box."""
    with capsys.disabled():
        steps = ", ".join(f"{k} {v:.1f} s" for k, v in fleet.timings.items())
        print(f"\n[fleet, rules time-compressed x{FACTOR}] {steps}")
    assert fleet.timings[f"{EMPTY} firing"] < 45
