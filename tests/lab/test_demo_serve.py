"""`chunkwatch demo --serve` as a user runs it: a child process that prints the page's URL,
the page in Debian's Chromium (headless, loopback only), its fault panel switching the
demo's gateways on either side, the lab route's refusals, and a clean stop on Ctrl-C.

One demo process serves the whole module (its story takes seconds); the tests that switch
a fault put it back to ``pass`` before they end, and the last test stops the process.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from chunkwatch_lab import lab_faults
from chunkwatch_lab.agent import LLMConfig
from chunkwatch_lab.service import ServiceConfig, create_app

from .processes import clean_env, stop_group

if TYPE_CHECKING:  # imported by pytest as a plugin (so its asserts are rewritten)
    from .browser import Tab

pytest_plugins = ("tests.lab.browser",)

OpenTab = Callable[[str], "Tab"]
START_BOUND = 60.0  # the story (about 7 s) and the start of four servers
STOP_BOUND = 8.0  # demo.STOP_BOUND per part, and the interpreter's exit


@dataclass
class Demo:
    proc: subprocess.Popen[str]
    url: str
    lines: list[str]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """`python -m chunkwatch demo --serve --port P`, started once for the module; its output
    up to the page's URL, on P. 16 tokens 40 ms apart: an answer long enough to see stream."""
    log = tmp_path_factory.mktemp("demo") / "out.log"
    port = _free_port()
    cmd = [sys.executable, "-m", "chunkwatch", "demo", "--serve", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--tokens", "16", "--token-delay", "0.04"],
        env=clean_env(PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        url = _read_url(proc, lines, log)
        assert url == f"http://127.0.0.1:{port}"  # --port is the page's
        yield Demo(proc, url, lines)
    finally:
        stop_group(proc, signal.SIGKILL)  # only if the last test did not stop it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _read_url(proc: subprocess.Popen[str], lines: list[str], log: Path) -> str:
    deadline = time.monotonic() + START_BOUND
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        found = re.search(r"^page: (http://127\.0\.0\.1:\d+)/", "".join(lines), re.M)
        if found and line.startswith("Ctrl-C"):  # the last line before it serves
            return found.group(1)
        if time.monotonic() > deadline:
            break
    log.write_text("".join(lines))
    pytest.fail(f"no page URL within {START_BOUND} s:\n{''.join(lines)}")


def _call(url: str, method: str = "GET", body: Any = None, **headers: str) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **headers} if data is not None else headers
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def _switch(tab: Tab, side: str, fault: str) -> None:
    """Switch ``side``'s gateway to ``fault`` with the page's own controls."""
    tab.page.get_by_label(re.compile(f"^{side.capitalize()} side")).select_option(fault)
    tab.page.get_by_role("button", name=f"Apply {side}").click()
    tab.page.wait_for_function(
        "([side, fault]) => document.getElementById(`fault-now-${side}`).textContent === fault",
        arg=[side, fault],
    )


def test_serve_prints_the_url_and_the_page_shows_both_gateways(
    demo: Demo, open_tab: OpenTab
) -> None:
    """The story is told first, then the four parts and the page's URL (the downstream
    gateway's) with how to stop; the page loads with its fault panel showing both sides
    healthy and every mode of each side to choose from."""
    text = "".join(demo.lines)
    assert "verdict: empty@gateway" in text  # the story, before the page
    assert f"downstream side: browser -> gateway -> service\n\npage: {demo.url}/" in text
    assert "Ctrl-C stops everything." in text
    tab = open_tab(demo.url)
    tab.open()
    panel = tab.page.get_by_role("region", name="Break a gateway")
    panel.wait_for(state="visible")
    assert tab.text("#fault-now-upstream") == "pass"
    assert tab.text("#fault-now-downstream") == "pass"
    options = tab.page.locator("#fault-upstream option").all_inner_texts()
    assert {"pass", "zero", "truncate"} <= set(options)
    options = tab.page.locator("#fault-downstream option").all_inner_texts()
    assert {"pass", "buffer-until-end", "idle-timeout"} <= set(options)


def test_upstream_zero_from_the_page_turns_the_next_answer_into_the_verdict(
    demo: Demo, open_tab: OpenTab
) -> None:
    """Upstream `zero` switched on the page: the next answer fails, the page says where the
    data stopped and its funnel stops at the gateway (0 units, empty); `pass` again: the
    next answer comes whole."""
    tab = open_tab(demo.url)
    tab.open()
    _switch(tab, "upstream", "zero")
    tab.ask("Where did it stop?")
    assert tab.wait_for_state("done", "error", "stopped") == "error"
    assert "at the gateway layer (empty)" in tab.text("#error")
    # the funnel, from the service's report of the request: the data stopped at the gateway
    tab.page.wait_for_selector("body[data-browser-outcome]", state="attached")
    assert tab.text('tr[data-layer="gateway"]').split() == ["gateway", "0", "empty"]
    _switch(tab, "upstream", "pass")
    tab.ask("And now?")
    assert tab.wait_for_state("done", "error", "stopped") == "done"
    assert tab.text("#answer")


def test_downstream_buffering_from_the_page_makes_the_answer_arrive_at_once(
    demo: Demo, open_tab: OpenTab
) -> None:
    """Healthy, 16 tokens 40 ms apart appear over most of their 640 ms; with the downstream
    gateway on `buffer-until-end` (nginx's proxy_buffering), switched on the page, the same
    answer appears in one go at the end, and the service's browser layer says `buffered`."""
    tab = open_tab(demo.url)
    tab.open()
    spreads = []
    for fault in ("pass", "buffer-until-end"):
        _switch(tab, "downstream", fault)
        from .browser import record_answer_changes  # the plugin's module

        record_answer_changes(tab)
        tab.ask("Stream it, please.")
        assert tab.wait_for_state("done", "error", "stopped") == "done"
        changes = [c for c in tab.evaluate("window.changes") if c[1] > 0]
        spreads.append(changes[-1][0] - changes[0][0])
        outcome = "ok" if fault == "pass" else "buffered"  # the service's browser layer
        tab.page.wait_for_function(
            "(outcome) => document.body.dataset.browserOutcome === outcome", arg=outcome
        )
    _switch(tab, "downstream", "pass")
    healthy, buffered = spreads
    assert healthy >= 300, spreads
    assert buffered <= 50, spreads


def test_the_lab_route_refuses_what_is_not_a_fault_of_a_side(demo: Demo) -> None:
    """A bad side, a mode of neither or of the other side, a bad parameter (the gateway's
    own 400, passed through), a body that is not JSON: each a 4xx, and the setting stays."""
    url = demo.url + "/lab/faults"
    bad = [
        ({"side": "sideways", "fault": "zero"}, 400, "side must be one of"),
        ({"side": "upstream", "fault": "explode"}, 400, "not a fault of the upstream side"),
        ({"side": "upstream", "fault": "buffer-until-end"}, 400, "not a fault of the upstream"),
        ({"side": "downstream", "fault": "zero"}, 400, "not a fault of the downstream side"),
        ({"side": "upstream", "fault": "truncate", "events": -1}, 400, "must be at least 0"),
        ({"side": "upstream", "fault": "zero", "url": "http://x/"}, 400, "takes no parameter"),
        (["upstream", "zero"], 400, "must be a JSON object"),
    ]
    for body, status, words in bad:
        got, answer = _call(url, "PUT", body)
        assert (got, words in answer["error"]["message"]) == (status, True), (body, answer)
    got, answer = _call(url, "PUT", b"side=upstream&fault=zero", **{"Content-Type": "text/plain"})
    assert got == 415, answer
    got, answer = _call(url)
    assert got == 200
    assert {side: s["fault"] for side, s in answer["sides"].items()} == {
        "upstream": "pass",
        "downstream": "pass",
    }


def test_the_lab_route_is_absent_from_a_service_the_demo_did_not_start() -> None:
    """A reference service configured as `chunkwatch serve` configures it has no
    /lab/faults (404 to GET and PUT) and says so to the page's panel in /healthz; the
    route's gateways must be http:// on loopback."""
    app = create_app(ServiceConfig(llm=LLMConfig(url="http://127.0.0.1:9"), instrument=False))
    try:
        client = app.test_client()
        assert client.get("/lab/faults").status_code == 404
        assert (
            client.put("/lab/faults", json={"side": "upstream", "fault": "zero"}).status_code == 404
        )
        assert "lab" not in client.get("/healthz").get_json()
    finally:
        app.extensions["chunkwatch.chat"].loop.close()
    with pytest.raises(ValueError, match="loopback"):
        lab_faults.blueprint({"upstream": "http://10.0.0.1:80", "downstream": "http://[::1]:1"})
    with pytest.raises(ValueError, match="loopback"):
        lab_faults.blueprint({"upstream": "file:///etc", "downstream": "http://127.0.0.1:1"})


def test_ctrl_c_stops_the_demo_cleanly_and_soon(demo: Demo) -> None:
    """SIGINT (Ctrl-C), with an answer still streaming: the demo stops every part and exits
    0 within the bound, saying so."""
    _call(demo.url + "/lab/faults", "PUT", {"side": "upstream", "fault": "stall"})
    req = urllib.request.Request(
        demo.url + "/chat",
        data=b'{"message": "hold on"}',
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as held:
        held.read(1)  # the stream is open (the service's `: open` comment)
        started = time.monotonic()
        demo.proc.send_signal(signal.SIGINT)
        rest, _ = demo.proc.communicate(timeout=STOP_BOUND)
    took = time.monotonic() - started
    assert demo.proc.returncode == 0, rest
    assert "stopping" in rest and "stopped in" in rest, rest
    assert took < STOP_BOUND
