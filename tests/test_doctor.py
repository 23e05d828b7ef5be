"""`chunkwatch doctor` against real servers on loopback: every gateway fault named as the
instrumented service names it, the direct endpoint telling gateway from model, the key
kept secret, the JSON schema, the exit codes, the progress line, and the CLI run as a
subprocess.

Real parts only: the local upstream, the fault-injecting gateway, httpx2, the openai
SDK, langchain-openai and LangGraph.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx2
import jsonschema
import pytest
from prometheus_client import CollectorRegistry

from chunkwatch import cli
from chunkwatch.doctor import EXIT_CODES, SCHEMA_VERSION, Progress, Step, Target, diagnose, schema
from chunkwatch.doctor.agent_steps import AppView
from chunkwatch.doctor.report import safe_url
from chunkwatch.doctor.wire_step import Wire, WireBody, measure, new_client
from chunkwatch.ledger import Tally
from chunkwatch.outcomes import End, Outcome, end_for_exception
from chunkwatch.probes._wire import Reader, note_headers
from chunkwatch.runtime import Runtime
from chunkwatch.verdict import describe
from chunkwatch_lab.fault_gateway import FAULT_MODES, Gateway
from chunkwatch_lab.threaded import Running, start_in_thread
from chunkwatch_lab.upstream import Upstream

from .test_instrumentation import EXPECTED as SERVICE_VERDICTS

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "doctor.md"
KEY_ENV = "CHUNKWATCH_DOCTOR_TEST_KEY"
API_KEY = "sk-doctor-SECRET-0123456789abcdef"
DEPLOYMENT = "gpt-4o-mini"
STALL = {"stall", "stall-headers", "keepalive-only"}
STALL_TIMEOUT = 0.8  # --timeout for the stall modes: each of 3 streaming steps waits this
TIMEOUT = 10.0  # --timeout otherwise: generous, so a busy machine never looks stalled

# mode -> (gateway params, the doctor's verdict label)
EXPECTED: dict[str, tuple[dict[str, Any], str]] = {
    "pass": ({}, "ok"),
    "zero": ({}, "empty@gateway"),
    "zero-abrupt": ({}, "empty@gateway"),
    "done-only": ({}, "empty@gateway"),
    "json": ({}, "wrong_content_type@gateway"),
    "html": ({}, "wrong_content_type@gateway"),
    "buffer": ({}, "buffered@gateway"),
    "buffer-late": ({}, "buffered@gateway"),
    "truncate": ({"events": 4}, "truncated@gateway"),
    "truncate-abrupt": ({"events": 4}, "truncated@gateway"),
    "stall": ({"limit": 5.0}, "stalled@gateway"),
    "stall-headers": ({"limit": 5.0}, "stalled@gateway"),
    "keepalive-only": ({"interval": 0.2, "limit": 5.0}, "stalled@gateway"),
    "trickle": ({"bytes": 400, "delay": 0.02}, "ok"),
    "status": ({"status": 429}, "http_error@gateway (stream rejected)"),
    "reject-stream-options": ({}, "http_error@gateway (stream_options rejected)"),
    "malformed": ({}, "malformed@gateway"),
    "no-blank-lines": ({}, "malformed@gateway"),
    "error-event": ({"events": 4}, "error_event@gateway"),
    "gzip-stripped": ({}, "malformed@gateway"),
    "filter-only": ({}, "empty@gateway"),
    "inband-error": ({"events": 4}, "error_event@gateway"),
}


# -- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[Running[Upstream]]:
    """6 tokens 45 ms apart: a stream long enough (> 0.2 s) for a buffer to show."""
    with start_in_thread(Upstream(tokens=6, token_delay=0.045)) as up:
        yield up


@pytest.fixture(scope="module")
def gateway(upstream: Running[Upstream]) -> Iterator[Running[Gateway]]:
    with start_in_thread(Gateway(upstream.url)) as gw:
        yield gw


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, API_KEY)


def doctor(
    capsys: pytest.CaptureFixture[str], url: str, *args: str, timeout: float = TIMEOUT
) -> tuple[int, dict[str, Any], str]:
    """Run ``chunkwatch doctor URL ... --json`` in-process: (exit code, report, stderr)."""
    argv = ["doctor", url, "--deployment", DEPLOYMENT, "--api-key-env", KEY_ENV]
    argv += [*args, "--timeout", str(timeout), "--json"]
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert API_KEY not in out and API_KEY not in err
    report = json.loads(out)
    validate(report)
    return code, report, err


def steps_of(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {step["id"]: step for step in report["steps"]}


def validate(instance: Any) -> None:
    """Validate against the doctor's JSON Schema (draft 2020-12), with jsonschema."""
    jsonschema.Draft202012Validator(schema()).validate(instance)


def test_every_fault_mode_has_the_service_verdict() -> None:
    """The table covers exactly the gateway's modes, and each expected verdict is the one
    the instrumented service draws for that mode (docs/outcomes.md, "Every gateway fault,
    named"); the doctor only adds the bisection's qualifier."""
    assert set(EXPECTED) == set(FAULT_MODES)
    for mode, (_, label) in EXPECTED.items():
        assert label.split(" (")[0] == SERVICE_VERDICTS[mode][1], mode


@pytest.mark.parametrize("mode", FAULT_MODES)
def test_doctor_names_every_gateway_fault(
    gateway: Running[Gateway], capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    """Per mode: the verdict label, the exit code of its class, the wire step's own outcome,
    a JSON report valid against the schema, and no API key anywhere in the output."""
    params, label = EXPECTED[mode]
    gateway.server.set_fault(mode, **params)
    try:
        code, report, _ = doctor(
            capsys, gateway.url, timeout=STALL_TIMEOUT if mode in STALL else TIMEOUT
        )
    finally:
        gateway.server.set_fault("pass")
    verdict = report["verdict"]
    outcome = Outcome(verdict["outcome"])
    assert verdict["label"] == label, verdict
    assert code == verdict["exit_code"] == EXIT_CODES[outcome]
    steps = steps_of(report)
    assert steps["control"]["outcome"] == "ok"  # faults hit streaming requests only
    assert steps["stream"]["outcome"] == str(outcome)
    assert steps["stream"]["wire"]["request"] == {"stream": True, "stream_options": True}
    assert {"sdk", "langgraph"} <= set(steps)
    bisected = {"without_stream_options", "without_stream"} <= set(steps)
    assert bisected == (outcome is Outcome.HTTP_ERROR)
    assert verdict["evidence"] and verdict["action"]
    if outcome is Outcome.OK:
        assert verdict["layer"] == "none"
    else:
        assert verdict["layer"] == "gateway"
        assert verdict["detail"].startswith("gateway: ")


def test_incident_verdict_evidence_and_action(
    gateway: Running[Gateway], capsys: pytest.CaptureFixture[str]
) -> None:
    """`zero`, the seed incident, read by a person: the table names the verdict, says the
    stream had 0 data events while non-streaming worked, shows the SDK's silent empty
    answer and LangGraph's `No generations found`, and gives the pass-through action."""
    gateway.server.set_fault("zero")
    try:
        code = cli.main(
            ["doctor", gateway.url, "--deployment", DEPLOYMENT, "--api-key-env", KEY_ENV]
        )
    finally:
        gateway.server.set_fault("pass")
    out = capsys.readouterr().out
    assert code == EXIT_CODES[Outcome.EMPTY]
    assert "verdict   empty@gateway" in out
    assert "gateway: HTTP 200 text/event-stream, 0 data events, closed cleanly" in out
    assert (
        "the gateway accepts stream=true but forwards no events; non-streaming works: enable "
        "SSE pass-through (e.g. disable response buffering) on the gateway, or run the "
        "service with the guard in updates mode meanwhile" in out
    )
    assert "Step 4, openai SDK stream: 0 chunks and no exception" in out
    assert "ValueError: No generations found in stream." in out
    for n in (1, 2, 4):
        assert f"\nstep {n}  " in out  # a table per step
    assert re.search(r"\n  transfer-encoding +chunked\n", out)


def test_stream_options_bisection_is_reported(
    gateway: Running[Gateway], capsys: pytest.CaptureFixture[str]
) -> None:
    """A gateway that rejects `stream_options`: step 2 is HTTP 400, the request without
    `stream_options` streams fine (the field that flips it), and the action names
    AzureChatOpenAI's stream_usage=False as the stopgap."""
    gateway.server.set_fault("reject-stream-options")
    try:
        _, report, _ = doctor(capsys, gateway.url)
    finally:
        gateway.server.set_fault("pass")
    steps = steps_of(report)
    assert steps["stream"]["wire"]["status"] == 400
    assert "stream_options" in (steps["stream"]["wire"]["api_error"] or "")
    assert steps["without_stream_options"]["outcome"] == "ok"
    assert steps["without_stream_options"]["wire"]["request"]["stream_options"] is False
    assert steps["without_stream"]["wire"]["request"]["stream"] is None
    assert report["verdict"]["qualifier"] == "stream_options rejected"
    assert "stream_usage=False" in report["verdict"]["action"]


def test_healthy_gateway_with_slow_tokens_is_ok(capsys: pytest.CaptureFixture[str]) -> None:
    """Tokens 0.3 s apart through a healthy gateway: ok (exit 0), not buffered or stalled;
    the measured event gaps show the model's pace."""
    with (
        start_in_thread(Upstream(tokens=3, token_delay=0.3)) as up,
        start_in_thread(Gateway(up.url)) as gw,
    ):
        code, report, _ = doctor(capsys, gw.url, timeout=5.0)
    assert (code, report["verdict"]["label"]) == (0, "ok")
    wire = steps_of(report)["stream"]["wire"]
    assert wire["gaps_s"]["max_event_gap"] >= 0.25
    assert wire["done"] and wire["finish_reasons"] == ["stop"]
    assert all(step["outcome"] == "ok" for step in report["steps"])


# -- the doctor and the gateway probe read the same bytes the same way ----------------------

REPLAYED = [mode for mode in FAULT_MODES if mode not in STALL]  # a stall is no bytes to replay
_TIMED = {"buffer", "buffer-late"}  # buffered is a matter of timing: replayed, it streams


def _recorded(gw: Running[Gateway], mode: str) -> tuple[httpx2.Response, list[bytes], Any]:
    """The doctor's streaming request through the gateway in ``mode``: the response (head),
    its body's reads as the transport yields them, and the exception that ended it."""
    gw.server.set_fault(mode, **EXPECTED[mode][0])
    target = Target(gw.url, deployment=DEPLOYMENT, api_key=API_KEY)
    reads: list[bytes] = []
    error: Exception | None = None
    try:
        with httpx2.Client(timeout=TIMEOUT) as client:
            request = client.build_request(
                "POST",
                target.chat_url,
                content=target.body(stream=True, stream_options=True),
                headers=target.headers(),
            )
            response = client.send(request, stream=True)
            try:
                reads.extend(response.iter_raw())
            except httpx2.HTTPError as exc:
                error = exc
            finally:
                response.close()
    finally:
        gw.server.set_fault("pass")
    return response, reads, error


def _gateway_tally() -> Tally:
    """A gateway tally of a stream request, opened as the probe and the doctor open it."""
    return Tally(
        layer="gateway",
        t_start=time.perf_counter_ns(),
        stream_requested=True,
        terminal_known=True,
        needs_status=True,
    )


def _through_probe(response: httpx2.Response, reads: list[bytes], error: Any) -> Tally:
    """The reads through the gateway probe's reader, as its body loop reads them: fed
    until the reader offers its counter, then counted inline, the last read at the end."""
    tally = _gateway_tally()
    reader = Reader(tally, note_headers(Runtime(registry=CollectorRegistry()), tally, response))
    count = reader.fast
    for piece in reads:
        if count is not None:
            tally.bytes += len(piece)
            n = count(piece)
            if n:
                tally.unit(n)
        else:
            reader.feed(piece)
            count = reader.fast
    end = End.CLEAN if error is None else end_for_exception(error)
    reader.end(end, error, reads[-1] if reads else b"")
    return tally


def _through_doctor(response: httpx2.Response, reads: list[bytes], error: Any) -> Tally:
    """The same reads through the doctor's wire step, as :func:`measure` reads them."""
    tally = _gateway_tally()
    body = WireBody(Wire(tally, True, True))
    body.headers(response)
    for piece in reads:
        body.feed(piece)
    body.close()
    if error is not None:
        tally.exc_type = type(error).__name__
    tally.finish(End.CLEAN if error is None else end_for_exception(error))
    return tally


def _untimed(detail: str) -> str:
    return re.sub(r"\d+(\.\d+)? (ms|s)\b", "T", detail)


@pytest.mark.parametrize("mode", REPLAYED)
def test_doctor_and_gateway_probe_agree_on_the_same_bytes(
    gateway: Running[Gateway], mode: str
) -> None:
    """Per fault mode, one recorded response (head and reads) through the gateway probe's
    reader and through the doctor's wire step: the same outcome, the same evidence and
    the same detail (timings aside); and the outcome is the mode's verdict, but for the
    modes whose verdict is a matter of timing (``buffer``: replayed, it streams)."""
    response, reads, error = _recorded(gateway, mode)
    probe, doctor = _through_probe(response, reads, error), _through_doctor(response, reads, error)
    assert probe.outcome is doctor.outcome, mode
    evidence = ("units", "annotations", "error_events", "malformed", "gzip_magic", "terminal_seen")
    assert [getattr(probe, k) for k in evidence] == [getattr(doctor, k) for k in evidence]
    for fact in ("malformed_why", "upstream_said"):
        assert getattr(probe, fact) == getattr(doctor, fact), (mode, fact)
    assert _untimed(describe(probe)) == _untimed(describe(doctor)), mode
    if mode not in _TIMED:
        label = "ok" if probe.outcome is Outcome.OK else f"{probe.outcome}@gateway"
        assert label == EXPECTED[mode][1].split(" (")[0], mode


def _step(step_id: str, layer: str, end: End = End.CLEAN, **evidence: Any) -> Step:
    """A finished step from plain evidence (the rules need no network)."""
    tally = Tally(layer=layer, t_start=time.perf_counter_ns(), **evidence)
    tally.finish(end)
    if layer == "gateway":
        return Step(step_id, 1, step_id, "gateway", wire=Wire(tally, True, True))
    return Step(step_id, 4, step_id, "gateway", app=AppView(tally, "chunks"))


def test_verdict_rules_on_plain_evidence() -> None:
    """The verdict reads the application's path bottom-up: a healthy wire with an SDK that
    ends without finish_reason is truncated@sdk; a healthy streaming path with a refused
    control is http_error@gateway (non-streaming requests only); all healthy is ok."""
    sse = {"status": 200, "content_type": "text/event-stream", "needs_status": True}
    wire_ok = _step("stream", "gateway", units=5, terminal_known=True, terminal_seen=True, **sse)
    control_ok = _step("control", "gateway", units=1, status=200, stream_requested=False)
    refused = _step("control", "gateway", status=403, stream_requested=False)
    sdk_cut = _step("sdk", "sdk", units=3, terminal_known=True)
    sdk_ok = _step("sdk", "sdk", units=5, terminal_known=True, terminal_seen=True)
    graph_ok = _step("langgraph", "langgraph", units=6)

    d = diagnose([control_ok, wire_ok, sdk_cut, graph_ok])
    assert (d.label, d.exit_code) == ("truncated@sdk", EXIT_CODES[Outcome.TRUNCATED])
    assert d.action.startswith("the wire is healthy but the openai SDK ends with truncated")
    d = diagnose([refused, wire_ok, sdk_ok, graph_ok])
    assert d.label == "http_error@gateway (non-streaming requests only)"
    assert d.action.startswith("the gateway refuses non-streaming requests")
    d = diagnose([control_ok, wire_ok, sdk_ok, graph_ok])
    assert (d.label, d.layer, d.exit_code) == ("ok", "none", 0)


# -- --direct: gateway or model? -------------------------------------------------------------


def test_direct_endpoint_clears_the_model(
    upstream: Running[Upstream], gateway: Running[Gateway], capsys: pytest.CaptureFixture[str]
) -> None:
    """Gateway `zero`, the model behind it healthy: the verdict stays empty@gateway, steps
    1-2 run against the direct endpoint and pass, and the evidence says the fault lies
    between the gateway and the model."""
    gateway.server.set_fault("zero")
    try:
        code, report, _ = doctor(capsys, gateway.url, "--direct", upstream.url)
    finally:
        gateway.server.set_fault("pass")
    assert (code, report["verdict"]["label"]) == (EXIT_CODES[Outcome.EMPTY], "empty@gateway")
    steps = steps_of(report)
    assert steps["direct_control"]["outcome"] == steps["direct_stream"]["outcome"] == "ok"
    assert steps["direct_stream"]["path"] == "direct"
    assert report["target"]["direct"]["url"] == upstream.url
    assert any("between the gateway and the model" in s for s in report["verdict"]["evidence"])


def test_direct_endpoint_failing_too_blames_the_model(
    upstream: Running[Upstream], capsys: pytest.CaptureFixture[str]
) -> None:
    """A healthy gateway in front of a model endpoint that itself answers empty streams
    (here a second gateway in `zero` mode plays the model): the verdict is empty@model,
    and the action says the gateway is not the cause."""
    with (
        start_in_thread(Gateway(upstream.url, fault="zero")) as model,
        start_in_thread(Gateway(model.url)) as front,
    ):
        code, report, _ = doctor(capsys, front.url, "--direct", model.url)
    verdict = report["verdict"]
    assert (code, verdict["label"]) == (EXIT_CODES[Outcome.EMPTY], "empty@model")
    assert verdict["layer"] == "model"
    assert "the gateway is not the cause" in verdict["action"]
    assert steps_of(report)["direct_stream"]["outcome"] == "empty"


# -- other endpoints and inputs ----------------------------------------------------------------


def test_openai_compatible_endpoint(
    gateway: Running[Gateway], capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --deployment the URL is an OpenAI-compatible base URL (`.../v1`) called with
    --model: healthy is ok, and `done-only` is empty@gateway there too."""
    argv = ["doctor", gateway.url + "/v1", "--model", "gpt-4o-mini", "--api-key-env", KEY_ENV]
    assert cli.main([*argv, "--json", "--timeout", str(TIMEOUT)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["target"]["api"] == "openai" and report["verdict"]["label"] == "ok"
    gateway.server.set_fault("done-only")
    try:
        assert cli.main([*argv, "--timeout", str(TIMEOUT)]) == EXIT_CODES[Outcome.EMPTY]
    finally:
        gateway.server.set_fault("pass")
    assert "verdict   empty@gateway" in capsys.readouterr().out


def test_unreachable_endpoint_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing listening: every step fails fast without a response, the verdict is
    error@gateway and the action is about reaching the endpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: refused from then on
    code, report, _ = doctor(capsys, f"http://127.0.0.1:{port}", timeout=5.0)
    assert (code, report["verdict"]["label"]) == (EXIT_CODES[Outcome.ERROR], "error@gateway")
    assert steps_of(report)["stream"]["wire"]["status"] is None
    assert "could not be reached" in report["verdict"]["action"]


class _EchoKey(BaseHTTPRequestHandler):
    """A careless gateway: refuses every request and echoes the key it was sent."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        body = json.dumps(
            {"error": {"message": f"invalid subscription key {self.headers.get('api-key')}"}}
        ).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_api_key_is_sent_but_never_printed(capsys: pytest.CaptureFixture[str]) -> None:
    """The key from the named variable reaches the endpoint (it echoes it back in every
    error), yet the table and the JSON show `***` in its place; the JSON names only the
    variable. The refusal is not stream-specific: http_error@gateway, exit 15."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoKey)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        code, report, _ = doctor(capsys, url)  # asserts the key is in neither stream
        table_code = cli.main(["doctor", url, "--deployment", DEPLOYMENT, "--api-key-env", KEY_ENV])
        out, err = capsys.readouterr()
    finally:
        server.shutdown()
        server.server_close()
    assert code == table_code == EXIT_CODES[Outcome.HTTP_ERROR]
    assert report["verdict"]["label"] == "http_error@gateway (not stream-specific)"
    assert steps_of(report)["control"]["wire"]["api_error"] == "invalid subscription key ***"
    assert report["target"]["api_key_env"] == KEY_ENV and report["target"]["api_key_set"]
    assert "invalid subscription key ***" in out
    assert API_KEY not in out + err


def test_urls_keep_their_query_and_hide_credentials() -> None:
    """A URL may carry a gateway's query (e.g. a subscription key): the request keeps it,
    beside api-version; the report shows neither a password nor credential-like values."""
    target = Target("https://gw.example.com/llm?subscription-key=s3cr3t", deployment="d")
    assert target.chat_url == (
        "https://gw.example.com/llm/openai/deployments/d/chat/completions"
        "?subscription-key=s3cr3t&api-version=2024-10-21"
    )
    assert safe_url("https://u:pw@gw.example.com/v1?code=abc&region=eu") == (
        "https://u:***@gw.example.com/v1?code=***&region=eu"
    )


def test_missing_model_without_deployment_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An OpenAI-compatible URL needs --model: argparse's usage error, exit status 2, and
    nothing is sent."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["doctor", "http://127.0.0.1:9/v1"])
    assert exc.value.code == 2
    assert "--model is required" in capsys.readouterr().err


# -- bounds and progress -----------------------------------------------------------------------


def test_total_limit_ends_a_stream_that_keeps_flowing() -> None:
    """A stream whose events never pause for --timeout but outlast 10 x --timeout is ended
    at the total limit (end timeout, stalled), so the doctor returns in bounded time."""

    async def run(url: str) -> Any:
        async with new_client(5.0) as client:
            return await measure(
                client,
                Target(url, deployment=DEPLOYMENT),
                stream=True,
                stream_options=True,
                timeout=0.2,
                total=1.0,
                progress=Progress(None),
                label="test",
            )

    with start_in_thread(Upstream(tokens=40, token_delay=0.05)) as up:
        wire = asyncio.run(run(up.url))
    t = wire.tally
    assert wire.total_limit and t.stalled is None
    assert t.outcome is Outcome.STALLED and str(t.end) == "timeout"
    assert 0 < t.units < 43 and t.duration < 3.0


def test_progress_line_shows_a_slow_wait() -> None:
    """No line for a short wait; a line once a wait passes `after`, repeated every `every`
    seconds in a log, redrawn in place (and erased at the end) on a terminal."""
    log = io.StringIO()
    progress = Progress(log, after=1.0, every=5.0, tty=False)
    progress.waiting("step 2: the first event")
    start = progress._since
    progress.check(start + 0.5)
    assert log.getvalue() == ""
    progress.check(start + 1.2)
    progress.check(start + 2.0)
    assert log.getvalue() == "chunkwatch doctor: waiting for step 2: the first event ... 1.2 s\n"
    progress.check(start + 6.5)
    assert log.getvalue().count("\n") == 2

    screen = io.StringIO()
    progress = Progress(screen, after=0.0, tty=True)
    progress.waiting("step 4")
    progress.check(progress._since + 0.3)
    progress.done()
    assert screen.getvalue().startswith("\r\x1b[Kchunkwatch doctor: waiting for step 4")
    assert screen.getvalue().endswith("\r\x1b[K")


def test_cli_subprocess_on_a_stalled_gateway(gateway: Running[Gateway]) -> None:
    """`uv run chunkwatch doctor ... --json` as a CI job would run it, against a gateway
    that never answers: exit 12 (stalled), a schema-valid report on stdout, a progress
    line on stderr while it waited, and the key in neither stream."""
    gateway.server.set_fault("stall-headers", limit=10.0)
    uv = shutil.which("uv")
    # as scripts/test runs pytest: the locked environment, never a sync mid-test
    command = [uv, "run", "--frozen", "--no-sync", "chunkwatch"] if uv else [sys.executable]
    if not uv:
        command += ["-m", "chunkwatch"]
    env = {**os.environ, KEY_ENV: API_KEY}
    try:
        done = subprocess.run(
            [
                *command,
                "doctor",
                gateway.url,
                "--deployment",
                DEPLOYMENT,
                "--api-key-env",
                KEY_ENV,
                "--timeout",
                "1.5",
                "--json",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        gateway.server.set_fault("pass")
    assert done.returncode == EXIT_CODES[Outcome.STALLED], done.stderr
    report = json.loads(done.stdout)
    validate(report)
    assert report["verdict"]["label"] == "stalled@gateway"
    assert steps_of(report)["stream"]["wire"]["status"] is None
    assert "chunkwatch doctor: waiting for step 2" in done.stderr
    assert API_KEY not in done.stdout + done.stderr


# -- the documented contract -------------------------------------------------------------------


def test_exit_codes_are_distinct_and_documented() -> None:
    """Every outcome has its own exit code; 0 is ok and only ok; 1 and 2 stay reserved for
    a doctor failure and bad usage; docs/doctor.md lists each code with its outcome."""
    assert set(EXIT_CODES) == set(Outcome)
    codes = list(EXIT_CODES.values())
    assert len(set(codes)) == len(codes)
    assert EXIT_CODES[Outcome.OK] == 0 and not {1, 2} & set(codes)
    doc = DOC.read_text()
    for outcome, code in EXIT_CODES.items():
        assert re.search(rf"^\| `{code}` \| `{outcome}` \|", doc, re.MULTILINE), outcome


def test_json_schema_is_documented() -> None:
    """docs/doctor.md names the schema version and documents every field of the schema;
    the schema's enums match the outcome vocabulary."""
    root = schema()
    doc = DOC.read_text()
    assert root["properties"]["schema_version"]["const"] == SCHEMA_VERSION
    assert f"`schema_version`: {SCHEMA_VERSION}" in doc

    def resolve(ref: str) -> dict[str, Any]:
        resolved: dict[str, Any] = root["$defs"][ref.removeprefix("#/$defs/")]
        return resolved

    def fields(spec: dict[str, Any], prefix: str) -> Iterator[str]:
        """Every property path: `target.url`, `steps[].wire.status`, ..."""
        for name, sub in spec.get("properties", {}).items():
            yield f"{prefix}{name}"
            refs = [sub.get("$ref"), *(o.get("$ref") for o in sub.get("oneOf", []))]
            ref = next((r for r in refs if r), None)
            target = resolve(ref) if ref else sub
            if "properties" in target:
                yield from fields(target, f"{prefix}{name}.")
            items = sub.get("items", {})
            if "$ref" in items:
                yield from fields(resolve(items["$ref"]), f"{prefix}{name}[].")

    missing = [f for f in fields(root, "") if f"`{f}`" not in doc]
    assert not missing, f"fields not documented in docs/doctor.md: {missing}"
    assert root["$defs"]["outcome"]["enum"] == [str(o) for o in Outcome]
