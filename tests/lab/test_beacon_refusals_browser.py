"""Hostile beacons from a real page (Debian's Chromium, headless): after a real streamed
answer, whose beacon chunkwatch.js sent and the service recorded as the `browser` layer,
the page's own JavaScript posts a forged, a replayed, an oversized and two malformed
beacons to the same-origin endpoint with ``fetch``. Each is refused with its documented
4xx (src/chunkwatch/browser.py, docs/browser.md), none is a 500, each is counted once in
``chunkwatch_beacons_refused_total{reason}`` on the service's ``/metrics``, and the
browser layer still counts the one real stream once. tests/test_browser_endpoint.py
pins the same refusals with an HTTP client, one by one."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import httpx2
import pytest
from playwright.sync_api import Request
from prometheus_client.parser import text_string_to_metric_families

from chunkwatch import semconv as sc

from ..helpers import System, instrumented_system

if TYPE_CHECKING:
    from .browser import Tab

pytest_plugins = ("tests.lab.browser",)

OpenTab = Callable[[str], "Tab"]
PROMPT = "Is this beacon mine?"
REFUSED = "chunkwatch_beacons_refused"

# Runs in the page: the beacon chunkwatch.js sent (its exact body) made hostile five ways,
# each posted with fetch to the page's own beacon endpoint (the meta tag app.js reads), in
# order; the status and JSON answer of each.
SEND_HOSTILE = """async (sent) => {
  const endpoint = document.querySelector('meta[name="chunkwatch-beacon"]').content;
  const beacon = JSON.parse(sent);
  const [v, ident, expiry, mac] = beacon.token.split('.');
  const tampered = (mac[0] === '0' ? '1' : '0') + mac.slice(1);  // hex or base64
  const bodies = {
    forged: JSON.stringify({...beacon, token: [v, ident, expiry, tampered].join('.')}),
    replayed: sent,
    too_large: sent + ' '.repeat(2048),
    not_json: sent.slice(0, -1),
    outside_vocabulary: JSON.stringify({...beacon, end: 'exploded'}),
  };
  const out = {};
  for (const [name, body] of Object.entries(bodies)) {
    const r = await fetch(endpoint, {
      method: 'POST', body, headers: {'Content-Type': 'text/plain;charset=utf-8'},
    });
    out[name] = {status: r.status, answer: await r.json()};
  }
  return out;
}"""
# what each one must get: (status, the refusal's reason)
EXPECTED = {
    "forged": (403, "forged"),
    "replayed": (409, "replayed"),
    "too_large": (413, "too_large"),
    "not_json": (400, "malformed"),
    "outside_vocabulary": (400, "malformed"),
}


@pytest.fixture(scope="module")
def system() -> Iterator[System]:
    with instrumented_system(tokens=8, token_delay=0.01) as system:
        yield system


def refusals(url: str) -> dict[str, float]:
    """``chunkwatch_beacons_refused_total`` by reason, read from the service's /metrics."""
    text = httpx2.get(url + "/metrics", timeout=10).text
    return {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(text)
        if family.name == REFUSED
        for s in family.samples
        if s.name == REFUSED + "_total"
    }


def expected_console_errors(tab: Tab, statuses: list[int]) -> None:
    """Take Chromium's console error for each refused fetch ("Failed to load resource: the
    server responded with a status of 403 (Forbidden)") off the tab's errors, which fail
    the test at teardown; any other error stays."""
    pattern = re.compile(r"console: Failed to load resource: .* status of (\d{3}) ")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # console messages come after evaluate() returned
        seen = [e for e in tab.errors if pattern.match(e)]
        if len(seen) >= len(statuses):
            break
        time.sleep(0.02)
    assert sorted(int(m[1]) for e in seen if (m := pattern.match(e))) == statuses
    tab.errors[:] = [e for e in tab.errors if e not in seen]


def test_hostile_beacons_from_the_page_are_refused_and_counted_once_each(
    system: System, open_tab: OpenTab
) -> None:
    """forged 403, replayed 409, oversized 413, not JSON and an `end` outside the closed
    vocabulary 400 `malformed`; never a 500; the refusal counter rises by exactly one per
    refusal; the page's real beacon is still the browser layer's only stream."""
    tab = open_tab(system.service.url)
    sent: list[str] = []

    def on_request(request: Request) -> None:
        if request.resource_type == "ping" and request.url.endswith("/chunkwatch/beacon"):
            sent.append(request.post_data or "")

    tab.page.on("request", on_request)
    tab.open()
    tab.ask(PROMPT)
    assert tab.wait_for_state("done") == "done"
    deadline = time.monotonic() + 10
    while not system.capture.streams(sc.BROWSER) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert system.capture.streams(sc.BROWSER) == {"ok": 1.0}
    (beacon,) = sent  # chunkwatch.js's own, by sendBeacon: accepted
    assert json.loads(beacon)["events"] == 9  # 8 tokens and `done`
    before = refusals(system.service.url)

    got: dict[str, dict[str, Any]] = tab.evaluate(SEND_HOSTILE, beacon)

    assert {k: (v["status"], v["answer"]["error"]) for k, v in got.items()} == EXPECTED
    assert all(v["status"] < 500 for v in got.values())
    after = refusals(system.service.url)
    rose = {r: after.get(r, 0.0) - before.get(r, 0.0) for r in after}
    assert {r: n for r, n in rose.items() if n} == {
        "forged": 1.0,
        "replayed": 1.0,
        "too_large": 1.0,
        "malformed": 2.0,
    }
    assert system.capture.streams(sc.BROWSER) == {"ok": 1.0}
    assert sent == [beacon]  # sendBeacon's, once: the page's fetches are not beacons
    expected_console_errors(tab, sorted(status for status, _ in EXPECTED.values()))
