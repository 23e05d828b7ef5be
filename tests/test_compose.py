"""compose.yaml, read as data and checked against the real parts it names: every published
port on loopback only; the image installs the app from uv.lock (its `uv export` steps run
here, against this lock); every service that can be asked is health-checked, and the paths
the app's, the gateway's and the upstream's checks poll answer 200 on the real services;
`depends_on` waits for health where a service has one.

No Docker runs in the test suite: the other images' health endpoints (Prometheus `/-/ready`,
Jaeger `/status`, Grafana `/api/health`) are their documented ones, not exercised here.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from .helpers import instrumented_system
from .prom import ROOT

COLLECTORS = {"otel-collector", "otel-collector-lb", "otel-collector-sampling"}  # no shell


def _compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "compose.yaml").read_text()))


def _dockerfile() -> str:
    return str(_compose()["services"]["app"]["build"]["dockerfile_inline"])


def _health_command(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD", test  # exec form: no shell needed in the image
    return list(test[1:])


def _polled_url(service: dict[str, Any]) -> str:
    (url,) = re.findall(r"http://127\.0\.0\.1:\d+/[^\s'\"]*", " ".join(_health_command(service)))
    return str(url)


def test_every_published_port_is_on_loopback() -> None:
    """Each `ports` entry, in short or long syntax, binds 127.0.0.1: nothing in the stack
    authenticates, so nothing is reachable from other hosts unless someone publishes it."""
    published = 0
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", (name, port)
            else:
                host_ip, host_port, container_port = str(port).split(":")
                assert host_ip == "127.0.0.1" and host_port and container_port, (name, port)
    assert published >= 7  # gateway, app, collector (4), jaeger, prometheus, grafana


def test_image_installs_dependencies_from_the_lock_and_the_project_without_them() -> None:
    """The inline Dockerfile exports the lock with hashes and installs with --require-hashes,
    takes gunicorn at the lock's version (constraints), and installs the project with
    --no-deps; nothing is installed by a bare `pip install <project>` that would resolve
    afresh."""
    text = " ".join(_dockerfile().replace("\\\n", " ").split())
    assert "pip install --no-cache-dir /src" not in text
    installs = re.findall(r"uv pip install ([^&]+?)(?= && |$| RUN | COPY )", text)
    assert any("--require-hashes -r /tmp/requirements.txt" in i for i in installs), installs
    assert any("-c /tmp/lock-pins.txt gunicorn" in i for i in installs), installs
    assert any(i.endswith("--no-deps .") for i in installs), installs
    exports = re.findall(r"uv export ([^&]+?)(?= && |$)", text)
    assert len(exports) == 2 and all("--frozen" in e for e in exports), exports
    assert "COPY pyproject.toml uv.lock ./" in _dockerfile()


@pytest.mark.skipif(shutil.which("uv") is None, reason="uv is not installed")
def test_the_images_export_steps_pin_every_dependency_from_this_lock(tmp_path: Path) -> None:
    """The Dockerfile's own `uv export` commands, run here on a copy of pyproject.toml and
    uv.lock only (what the image has at that step): they succeed without resolving, every
    requirement is `==` with a hash, the lab extra's packages are there and the test tooling
    is not, and the constraints pin gunicorn to the lock's version."""
    for name in ("pyproject.toml", "uv.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    text = " ".join(_dockerfile().replace("\\\n", " ").split())
    outputs: dict[str, str] = {}
    for args in re.findall(r"uv export ([^&]+?)(?= && |$)", text):
        argv = shlex.split(args)
        out = argv[argv.index("-o") + 1]
        argv[argv.index("-o") + 1] = str(tmp_path / Path(out).name)
        subprocess.run(
            ["uv", "export", "--offline", *argv], cwd=tmp_path, check=True, capture_output=True
        )
        outputs[Path(out).name] = (tmp_path / Path(out).name).read_text()
    reqs = outputs["requirements.txt"]
    names = set(re.findall(r"^([a-z0-9_.-]+)==[^ ;]+(?: ;[^\\]*)? \\$", reqs, flags=re.M))
    lines = [ln for ln in reqs.splitlines() if ln and not ln.startswith((" ", "#"))]
    assert len(lines) == len(names) and all("==" in ln for ln in lines), lines
    assert reqs.count("--hash=sha256:") >= len(names)
    assert {"flask", "openai", "langgraph", "opentelemetry-sdk", "langchain-openai"} <= names
    assert not {"pytest", "mypy", "ruff", "gunicorn"} & names
    lock = (ROOT / "uv.lock").read_text()
    (locked,) = re.findall(r'name = "gunicorn"\nversion = "([^"]+)"', lock)
    assert f"gunicorn=={locked}" in outputs["lock-pins.txt"].splitlines()


def test_every_service_that_can_be_asked_has_a_healthcheck() -> None:
    """All services but the collectors (scratch images: no shell, no HTTP client) declare an
    exec-form healthcheck that polls their own health endpoint on loopback."""
    services = _compose()["services"]
    expected = {
        "upstream": "/_stats",
        "gateway": "/_chaos",
        "app": "/healthz",
        "jaeger": "/status",
        "prometheus": "/-/ready",
        "grafana": "/api/health",
    }
    assert set(services) - COLLECTORS == set(expected)
    for name, path in expected.items():
        assert _polled_url(services[name]).endswith(path), name
    for name in COLLECTORS:
        assert "healthcheck" not in services[name], name


def test_depends_on_waits_for_health_where_there_is_one() -> None:
    """Every dependency is in the long form with a condition; a service with a healthcheck is
    waited on until healthy, one without until started; the app waits for the gateway, the
    gateway for the upstream, Grafana for Prometheus and Jaeger."""
    services = _compose()["services"]
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), name
        for target, spec in depends.items():
            want = "service_healthy" if "healthcheck" in services[target] else "service_started"
            assert spec == {"condition": want}, (name, target)
    assert services["app"]["depends_on"]["gateway"] == {"condition": "service_healthy"}
    assert services["gateway"]["depends_on"]["upstream"] == {"condition": "service_healthy"}
    assert set(services["grafana"]["depends_on"]) == {"prometheus", "jaeger"}


def test_the_paths_the_healthchecks_poll_answer_on_the_real_services() -> None:
    """The upstream's, the gateway's and the app's healthcheck URLs, pointed at the real
    services on loopback, answer 200 (urllib raises on anything else, as in the container)."""
    services = _compose()["services"]
    with instrumented_system() as system:
        urls = {
            "upstream": system.upstream.url,
            "gateway": system.gateway.url,
            "app": system.service.url,
        }
        for name, base in urls.items():
            path = "/" + _polled_url(services[name]).split("/", 3)[3]
            with urllib.request.urlopen(base.rstrip("/") + path, timeout=5) as resp:
                assert resp.status == 200, (name, path)


def test_the_apps_scrape_job_is_named_as_its_traces_service() -> None:
    """The dashboard links a failing series to the traces of ``service=<job>``: in the lab,
    the job scraping the app is the app's ``OTEL_SERVICE_NAME``."""
    app = _compose()["services"]["app"]
    prom = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    (job,) = [
        j["job_name"]
        for j in prom["scrape_configs"]
        for c in j.get("static_configs", [])
        if "app:8000" in c["targets"]
    ]
    assert job == app["environment"]["OTEL_SERVICE_NAME"]
