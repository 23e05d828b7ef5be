"""Test helpers for the shipped Prometheus rules and Grafana dashboards.

* :func:`binary` finds ``prometheus`` / ``promtool`` (Debian's ``prometheus``
  package; ``scripts/bootstrap --test`` installs it) or fails the test saying so.
* :class:`Prometheus` runs a real Prometheus on a free loopback port and talks to
  its HTTP API; :func:`compress_durations` shortens the rules' windows and ``for``
  durations so an end-to-end run takes seconds instead of minutes.
* :func:`dashboards`, :func:`panels`, :func:`substitute`: the dashboard JSON as data;
  :func:`variable_values` gives every template variable a value, :func:`label_values_query`
  reads a ``label_values(...)`` variable query.
* :func:`wait_for`, :class:`Traffic`, :func:`has_data`: polling, a stream of chat requests,
  the series of a query result that hold a value.
* :func:`mixin_config`: the settings the rules are generated from (prometheus/mixin.yaml).
* :func:`emitted_series`, :func:`metric_names`: the names the code writes, the names a
  PromQL expression reads.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from chunkwatch_lab.client import chat

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "prometheus" / "chunkwatch.rules.yml"
RULE_TESTS = ROOT / "prometheus" / "tests"
DASHBOARDS = ROOT / "dashboards"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
MIXIN = ROOT / "prometheus" / "mixin.py"
MIXIN_CONFIG = ROOT / "prometheus" / "mixin.yaml"

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^(\d+)([smhd])$")
_RANGE = re.compile(r"\[(\d+)([smhd])\]")


def shipped_rules() -> set[str]:
    """The name of every recording rule and alert in the shipped rules file."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r.get("record") or r["alert"] for g in groups for r in g["rules"]}


def binary(name: str) -> str:
    """The path of ``name`` (``prometheus`` or ``promtool``), or fail with how to get it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"`{name}` is not on PATH: these tests run a real Prometheus. "
            "`scripts/bootstrap --test` installs Debian's `prometheus` package "
            "(prometheus and promtool)."
        )
    return path


def _unix(rfc3339: str) -> float:
    """Prometheus's RFC 3339 time (Go's: up to nanoseconds, ``Z`` or an offset) as unix
    seconds."""
    m = re.fullmatch(r"([^.]+?)(\.\d+)?(Z|[+-]\d\d:\d\d)", rfc3339)
    assert m is not None, rfc3339
    stamp, fraction, zone = m.groups()
    when = datetime.datetime.fromisoformat(stamp + ("+00:00" if zone == "Z" else zone))
    return when.timestamp() + float(fraction or 0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def seconds(duration: str) -> int:
    m = _DURATION.match(duration)
    if m is None:
        raise ValueError(f"not a simple Prometheus duration: {duration!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _shorter(duration: str, factor: int) -> str:
    return f"{max(1, math.ceil(seconds(duration) / factor))}s"


def compress_durations(rules_yaml: str, factor: int) -> str:
    """The same rules with every range window ``[5m]`` and every ``for:`` divided by ``factor``.

    Nothing else changes: expressions, thresholds, labels and annotations stay as
    shipped, so an end-to-end run exercises the real rules on a faster clock.
    """
    doc = yaml.safe_load(rules_yaml)
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["expr"] = _RANGE.sub(
                lambda m: f"[{_shorter(m.group(1) + m.group(2), factor)}]", rule["expr"]
            )
            if "for" in rule:
                rule["for"] = _shorter(rule["for"], factor)
    return str(yaml.safe_dump(doc, sort_keys=False))


class Prometheus:
    """A real ``prometheus`` on 127.0.0.1, scraping ``targets`` every ``interval`` seconds
    (as one ``job``), or as ``scrape_configs`` say (several jobs, target labels)."""

    def __init__(
        self,
        workdir: Path,
        targets: list[str],
        rule_files: list[Path],
        interval: int = 1,
        job: str = "chunkwatch",
        scrape_configs: list[dict[str, Any]] | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        config = {
            "global": {
                "scrape_interval": f"{interval}s",
                "scrape_timeout": f"{interval}s",
                "evaluation_interval": f"{interval}s",
            },
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": scrape_configs
            or [{"job_name": job, "static_configs": [{"targets": targets}]}],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        args = [
            binary("prometheus"),
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--enable-feature=exemplar-storage",
            "--log.level=warn",
        ]
        with self.log.open("wb") as log:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                pytest.fail(f"prometheus exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"prometheus not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def rule_health(self) -> dict[str, str]:
        """Each loaded rule's ``"<health>: <lastError>"`` (``"ok: "`` when it evaluates)."""
        return {
            rule["name"]: f"{rule['health']}: {rule.get('lastError', '')}"
            for group in self.api("rules")["groups"]
            for rule in group["rules"]
        }

    def alert_states(self, evaluated_after: float) -> dict[str, set[str]]:
        """The states of the active alerts of every alerting rule last evaluated after
        ``evaluated_after`` (unix time): what the rules said about data they had then,
        not a state left from an evaluation before it (``/api/v1/alerts`` has no time)."""
        states: dict[str, set[str]] = {}
        for group in self.api("rules", type="alert")["groups"]:
            for rule in group["rules"]:
                if _unix(rule["lastEvaluation"]) > evaluated_after:
                    for alert in rule.get("alerts", []):
                        states.setdefault(rule["name"], set()).add(alert["state"])
        return states

    def api(self, path: str, **params: Any) -> Any:
        """GET ``/api/v1/{path}``; the ``data`` of a success, else an AssertionError."""
        query = urllib.parse.urlencode(params, doseq=True)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as err:
            body = json.load(err)
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> Any:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending and firing)."""
        return list(self.api("alerts")["alerts"])

    def exemplars(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        return list(self.api("query_exemplars", query=expr, start=start, end=end))

    def label_values(self, label: str, match: str) -> list[str]:
        return list(self.api(f"label/{label}/values", **{"match[]": match}))


# -- names ---------------------------------------------------------------------------------------


def emitted_series() -> dict[str, frozenset[str]]:
    """Every series name chunkwatch's :class:`~chunkwatch.metrics.Metrics` can write (counters
    with ``_total``, histograms as ``_bucket``/``_sum``/``_count``), with its label names —
    read from the code, not from a copy."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

    from chunkwatch.genai_metrics import FAMILIES as GENAI_FAMILIES
    from chunkwatch.metrics import Metrics
    from chunkwatch.request_series import FAMILIES as REQUEST_FAMILIES
    from chunkwatch.stream_series import FAMILIES

    out: dict[str, frozenset[str]] = {}

    def add(name: str, kind: str, labels: frozenset[str]) -> None:
        if kind == "counter":
            out[f"{name}_total"] = labels
        elif kind == "histogram":
            out[f"{name}_bucket"] = labels | {"le"}
            out[f"{name}_sum"] = out[f"{name}_count"] = labels
        else:
            out[name] = labels

    for metric in vars(Metrics(CollectorRegistry())).values():
        if isinstance(metric, MetricWrapperBase):
            add(metric._name, metric._type, frozenset(metric._labelnames))
    for name, (kind, names) in FAMILIES.items():  # the per-stream families' own collector
        add(name, kind, frozenset(names))
    for name, (kind, names) in REQUEST_FAMILIES.items():  # the per-request families' own
        add(name, kind, frozenset(names))
    for name, names in GENAI_FAMILIES.items():  # the GenAI histograms' own collector
        add(name, "histogram", frozenset(names))
    return out


def metric_names(expr: str, known: set[str] | frozenset[str] = frozenset()) -> set[str]:
    """The chunkwatch / GenAI series and the recording rules (``a:b:c``) ``expr`` reads.

    A recording-rule name not in ``known`` is returned as is, so a caller checking the
    result against ``known`` and the emitted series catches a typo in either.
    """
    records = set(re.findall(r"(?<![\w:])(\w+:\w+:\w+)(?![\w:])", expr))
    plain = set(re.findall(r"(?<![\w:])((?:chunkwatch|gen_ai)_\w+)(?![\w:])", expr))
    return records | plain


# -- dashboards ----------------------------------------------------------------------------------


def dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard JSON under dashboards/, by file name."""
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that is not a row, including those inside collapsed rows."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def substitute(expr: str, variables: dict[str, str]) -> str:
    """``expr`` with Grafana's ``$name`` / ``${name}`` variables replaced; fails on leftovers."""

    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise AssertionError(f"unknown variable ${name} in {expr!r}")
        return variables[name]

    out = re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)
    assert "$" not in out, out
    return out


def variable_values(dashboard: dict[str, Any], chosen: dict[str, str]) -> dict[str, str]:
    """A value for every template variable of ``dashboard``: ``chosen``'s, else ``.*`` (what
    Grafana puts for *All* with ``allValue: .*``), plus whatever else ``chosen`` names
    (Grafana's built-ins such as ``__rate_interval``)."""
    names = [v["name"] for v in dashboard.get("templating", {}).get("list", [])]
    return {**{name: ".*" for name in names}, **chosen}


def builtin_variables(start: float, end: float, rate_interval: str) -> dict[str, str]:
    """Grafana's built-in variables for a dashboard shown from ``start`` to ``end`` with a
    1 s scrape interval (``$__rate_interval`` is Grafana's 4 x scrape interval)."""
    return {
        "__rate_interval": rate_interval,
        "__interval": "1s",
        "__range": f"{math.ceil(end - start) + 1}s",
    }


def label_values_query(definition: str) -> tuple[str | None, str]:
    """``label_values(selector, label)`` -> (selector, label); ``label_values(label)`` ->
    (None, label)."""
    m = re.fullmatch(r"\s*label_values\((?:(.+),)?\s*(\w+)\s*\)\s*", definition)
    assert m, f"not a label_values() query: {definition!r}"
    return (m.group(1).strip() if m.group(1) else None), m.group(2)


def mixin_config() -> dict[str, Any]:
    """prometheus/mixin.yaml: the selector, kept labels, runbook pattern and alert settings
    the committed rules were generated from."""
    config: dict[str, Any] = yaml.safe_load(MIXIN_CONFIG.read_text())
    return config


# -- running a scenario ---------------------------------------------------------------------

T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float, every: float = 0.25) -> tuple[T | None, float]:
    """Poll ``check`` until it returns something truthy; (that value, seconds taken)."""
    t0 = time.monotonic()
    while True:
        value = check()
        elapsed = time.monotonic() - t0
        if value or elapsed > timeout:
            return (value or None), elapsed
        time.sleep(every)


class Traffic(threading.Thread):
    """One chat request after another, until stopped; hold ``lock`` to pause between two."""

    def __init__(self, url: str, prompt: str) -> None:
        super().__init__(name=f"traffic {url}", daemon=True)
        self.url = url
        self.prompt = prompt
        self.lock = threading.Lock()
        self.sent = 0
        self.failures: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            with self.lock:
                try:
                    chat(self.url, self.prompt, timeout=20)
                    self.sent += 1
                except Exception as exc:  # recorded; the scenario goes on
                    self.failures.append(repr(exc))
            self._halt.wait(0.1)

    def halt(self) -> None:
        self._halt.set()
        self.join(30)


def has_data(result: list[dict[str, Any]]) -> int:
    """Series with at least one finite value (a range or an instant result)."""
    n = 0
    for series in result:
        values = series.get("values") or [series.get("value")]
        if any(v is not None and math.isfinite(float(v[1])) for v in values):
            n += 1
    return n
