"""End to end: a downstream fault, seen by real browsers, paged by a real Prometheus.

One scenario, run once for the module (about 30 s on 2 cores):

1. the instrumented reference service (guard off) streaming from a local model endpoint,
   behind ``chunkwatch gateway --side downstream`` in ``buffer-until-end`` (nginx's
   ``proxy_buffering on``): the service writes its events over 0.4 s, its users get them
   in one burst at the end;
2. headless Chromium (Debian's, tests/lab/browser.py) loading the chat page through that
   gateway again and again, each time asking one question: the page's chunkwatch.js sends
   its beacon through the gateway, and the service records the ``browser`` layer
   ``buffered`` while its own ``sse`` layer says ``ok``;
3. a real ``prometheus`` scraping the service's ``/metrics`` every second and evaluating
   ``prometheus/chunkwatch.rules.yml`` every second — the shipped rules with every window
   and ``for`` divided by :data:`FACTOR` (5m -> 5s, for 10m -> 10s), nothing else changed;
4. ``ChunkwatchDownstreamBuffered`` must fire for ``layer="browser"``, and no other alert
   may ever be pending or firing: the service itself is healthy;
5. every dashboard panel about the browser layer, variables substituted as Grafana would,
   must return the browser's series from that Prometheus.

The buffering fault, not a cut: its only symptom is the browser's, so the alert under test
is the only one that can fire (a cut also makes the service's sse layer see its client
leave), and the browser's verdict is one outcome, never "truncated or lost".
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from playwright.sync_api import Browser

from chunkwatch import semconv as sc
from chunkwatch.testing import Capture

from .helpers import downstream_system
from .prom import (
    RULES,
    Prometheus,
    binary,
    builtin_variables,
    compress_durations,
    dashboards,
    has_data,
    mixin_config,
    panels,
    shipped_rules,
    substitute,
    variable_values,
)

pytest_plugins = ("tests.lab.browser",)

FACTOR = 60  # 5m windows -> 5s, for: 10m -> 10s, for: 5m -> 5s
RATE_INTERVAL = "4s"  # Grafana's $__rate_interval with a 1 s scrape interval: 4 x scrape
JOB = "chunkwatch"  # tests/prom.py's Prometheus scrapes the service as this job
TOKENS = 20  # written 20 ms apart: a 0.4 s spread, twice what "buffered" needs
TOKEN_DELAY = 0.02
PROMPT = "Why does the answer come all at once?"
ALERT = "ChunkwatchDownstreamBuffered"
READY = 'layer_outcome_upstream:chunkwatch_streams:ratio_rate5m{layer="browser"}'
FIRE_WITHIN = 30.0  # seconds after Prometheus started; about 15 on 2 cores
AFTER_FIRING = 2.0  # seconds of browsing after it fired: anything firing with it shows
# The panels the browser layer is shown in, by title: each must have the browser's series.
BROWSER_PANELS = {
    "Browser streams by outcome",
    "Time to first token as users see it, p95 (browser vs model)",
}


@dataclass
class Run:
    prom: Prometheus
    capture: Capture
    t_start: float = field(default_factory=time.time)
    states: list[str] = field(default_factory=list)  # the page's end state, per question
    firing_after: float | None = None
    firing: list[dict[str, Any]] = field(default_factory=list)
    ready_after: float | None = None  # the recording rules first saw the browser layer
    ready_at: float | None = None  # (unix time): alerts are noted from evaluations after it
    active: dict[str, set[str]] = field(default_factory=dict)  # alertname -> states seen
    panel_results: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    rule_health: dict[str, str] = field(default_factory=dict)  # rule name -> health: lastError

    def browser_streams(self) -> float:
        return sum(self.capture.streams(sc.BROWSER).values())


def _ask(browser: Browser, url: str, run: Run) -> None:
    """Load the page at ``url`` in a fresh context, ask one question, and wait until the
    service recorded the page's beacon (so closing the context loses none)."""
    from .lab.browser import tab_on  # the plugin pytest loaded (see pytest_plugins)

    before = run.browser_streams()
    with tab_on(browser, url) as tab:
        tab.open()
        tab.ask(PROMPT)
        run.states.append(tab.wait_for_state("done", "error", "stopped"))
        deadline = time.monotonic() + 5
        while run.browser_streams() == before and time.monotonic() < deadline:
            time.sleep(0.02)


def _watch(run: Run) -> list[dict[str, Any]]:
    """The active alerts, noted from the rules' evaluations after they saw the browser
    layer: before the first scrape, ChunkwatchNoTraffic's `absent(...)` holds, and its
    pending state stays listed until its rule is evaluated again (later than the
    recording rule's on a loaded machine)."""
    alerts = run.prom.alerts()
    if run.ready_at is None:
        return alerts
    for name, states in run.prom.alert_states(evaluated_after=run.ready_at).items():
        run.active.setdefault(name, set()).update(states)
    return alerts


def _query_browser_panels(run: Run) -> None:
    now = time.time()
    chosen = {"job": JOB, **builtin_variables(run.t_start, now, RATE_INTERVAL)}
    for dash in dashboards().values():
        variables = variable_values(dash, chosen)
        for panel in panels(dash):
            for target in panel.get("targets", []):
                if sc.BROWSER not in target["expr"] and sc.BROWSER not in panel["title"].lower():
                    continue
                expr = substitute(target["expr"], variables)
                if target.get("instant"):
                    result = run.prom.query(expr)
                else:
                    result = run.prom.query_range(expr, run.t_start, now, 1.0)
                run.panel_results[(panel["title"], target["refId"])] = result


def _scenario(run: Run, browser: Browser, url: str) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < FIRE_WITHIN:
        _ask(browser, url, run)
        if any(a["labels"]["alertname"] == ALERT and a["state"] == "firing" for a in _watch(run)):
            run.firing_after = time.monotonic() - t0
            break
        # noted from the next question on (a second later: the alerts evaluated once more)
        if run.ready_after is None and run.prom.query(READY):
            run.ready_after, run.ready_at = time.monotonic() - t0, time.time()
    t1 = time.monotonic()
    while run.firing_after is not None and time.monotonic() - t1 < AFTER_FIRING:
        _ask(browser, url, run)
        _watch(run)
    run.firing = [a for a in _watch(run) if a["state"] == "firing"]
    _query_browser_panels(run)
    run.rule_health = run.prom.rule_health()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, chromium: Browser) -> Iterator[Run]:
    binary("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    rules = workdir / RULES.name
    rules.write_text(compress_durations(RULES.read_text(), FACTOR))
    with downstream_system(tokens=TOKENS, token_delay=TOKEN_DELAY) as (_, service, gw, cap):
        gw.server.set_fault("buffer-until-end")
        prom = Prometheus(workdir, [service.url.removeprefix("http://")], [rules])
        result = Run(prom, cap)
        _ask(chromium, gw.url, result)  # the browser's series exist before the first scrape
        prom.start()
        try:
            _scenario(result, chromium, gw.url)
            yield result
        finally:
            prom.stop()


def test_the_service_is_healthy_and_every_browser_got_the_answer(run: Run) -> None:
    """Behind the buffering hop every page got its whole answer (state `done`), the
    service's own verdicts are all ok, and every beacon was recorded as `buffered`."""
    assert run.states and set(run.states) == {"done"}, run.states
    verdicts = run.capture.verdicts
    assert len(verdicts) == len(run.states) and all(v.ok for v in verdicts)
    assert run.capture.streams(sc.BROWSER) == {"buffered": float(len(run.states))}


def test_buffering_hop_fires_downstream_buffered_for_the_browser_layer(run: Run) -> None:
    """ChunkwatchDownstreamBuffered fires for layer browser, outcome buffered, the
    upstream the service's sse layer streamed from and the scraped job, as a warning with
    its runbook."""
    assert run.firing_after is not None, (
        f"{ALERT} never fired in {FIRE_WITHIN:g} s ({len(run.states)} questions; "
        f"active: {run.active}):\n{run.prom.log_tail()}"
    )
    (alert,) = [a for a in run.firing if a["labels"]["alertname"] == ALERT]
    labels, annotations = alert["labels"], alert["annotations"]
    (verdict, *_) = run.capture.verdicts
    (upstream,) = {t.upstream for t in verdict.ledger.tallies if t.layer == sc.SSE}
    assert labels == {
        "alertname": ALERT,
        "job": JOB,
        "layer": sc.BROWSER,
        "outcome": "buffered",
        "upstream": upstream,
        "severity": "warning",
    }
    assert "(buffered@browser)" in annotations["description"]
    assert annotations["runbook_url"] == mixin_config()["runbook_url"].format(anchor=ALERT.lower())


def test_no_other_alert_is_ever_pending_or_firing(run: Run) -> None:
    """Only the browser sees the fault: once the rules see traffic, no other alert
    (ChunkwatchDownstreamLoss, the service's and the model's own) is pending or firing at
    any time of the run."""
    assert run.ready_after is not None, f"the rules never saw the browser layer: {READY}"
    assert set(run.active) == {ALERT}, run.active


def test_every_rule_evaluates_without_error(run: Run) -> None:
    """Every shipped rule was loaded and evaluated by the live Prometheus without error."""
    assert set(run.rule_health) == shipped_rules()
    assert {n: h for n, h in run.rule_health.items() if h != "ok: "} == {}


def test_every_browser_panel_returns_the_browsers_series(run: Run) -> None:
    """Every dashboard panel about the browser layer (its query or title says `browser`),
    variables substituted, returns data from the live Prometheus, and a series of the
    browser layer among it: the streams by outcome show `buffered`."""
    titles = {title for title, _ in run.panel_results}
    assert titles >= BROWSER_PANELS, f"panels not found by title: {BROWSER_PANELS - titles}"
    for key, result in run.panel_results.items():
        browser = [s for s in result if s["metric"].get("layer") == sc.BROWSER]
        assert has_data(browser), f"{key}: no browser series with data in {result}"
    outcomes = {
        s["metric"].get("outcome")
        for (title, _), result in run.panel_results.items()
        if title == "Browser streams by outcome"
        for s in result
        if has_data([s])
    }
    assert outcomes == {"buffered"}


def test_transition_timing(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    """How long the alert took (printed): within the compressed `for` plus a few scrapes."""
    with capsys.disabled():
        print(
            f"\n[prometheus downstream, rules time-compressed x{FACTOR}] buffer-until-end -> "
            f"rules see the browser {run.ready_after and round(run.ready_after, 1)} s, {ALERT} "
            f"firing {run.firing_after and round(run.firing_after, 1)} s after Prometheus "
            f"started; {len(run.states)} questions from Chromium"
        )
    assert run.firing_after is not None and run.firing_after < FIRE_WITHIN
