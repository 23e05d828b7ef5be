"""chunkwatch installs into a user's environment without moving it, the library runs
without the ``lab`` extra, and each integration has its own extra.

A service that adds chunkwatch already has its own OpenTelemetry set, often newer than
our lock. Installing chunkwatch must keep every version it finds (no downgrade), leave
``pip check`` clean, and the library (``import chunkwatch; chunkwatch.instrument()``)
must work with only its own dependencies: no Flask, LangGraph, openai, OTel SDK or
exporter (those come with the integration extras ``flask``, ``openai``, ``langgraph``,
``otel``, and all of them with ``lab``: the ``chunkwatch`` commands).

Real installs: fresh venvs made by ``uv`` (its cache keeps this to seconds), packages
from the index, chunkwatch built from this repository's working tree, and a model
stream over loopback HTTP in the venv's own interpreter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent

# A user ahead of our lock (uv.lock: opentelemetry-sdk 1.45.1, contrib 0.66b1): the newest
# consistent set on the index when written (opentelemetry-api 1.45.3 exists, but
# opentelemetry-sdk 1.45.2 requires opentelemetry-api 1.45.2).
USER_OTEL = {
    "opentelemetry-sdk": "1.45.2",
    "opentelemetry-instrumentation-httpx": "0.66b2",
}
# The extra of each integration and the distributions it brings (the built metadata's).
INTEGRATION_EXTRAS = {
    "flask": {"flask"},
    "openai": {"openai"},
    "langgraph": {"langgraph", "langchain-core"},
    "otel": {"opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http"},
}
# What the lab extra brings and the library must not need (import names).
LAB_MODULES = (
    "flask",
    "langgraph",
    "langchain_core",
    "langchain_openai",
    "openai",
    "opentelemetry.sdk",
    "opentelemetry.exporter",
)

# Run by the venv's interpreter: a model endpoint on loopback answering one streamed chat
# completion, chunkwatch instrumented with no app, one streamed call through httpx2 (the
# transport the gateway probe hooks). Prints what it saw as JSON.
_PROBE = r"""
import importlib.metadata, importlib.util, json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LAB_MODULES = %(lab)r


def installed(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


lab_installed = [m for m in LAB_MODULES if installed(m)]

import chunkwatch
import httpx2
from prometheus_client import CollectorRegistry

# what opentelemetry-instrument loads
(entry_point,) = importlib.metadata.entry_points(
    group="opentelemetry_instrumentor", name="chunkwatch"
)
entry_point.load()

CHUNK = {"id": "c1", "object": "chat.completion.chunk"}
DELTAS = [
    {"index": 0, "delta": {"content": "hi"}},
    {"index": 0, "delta": {}, "finish_reason": "stop"},
]
BODY = b"".join(
    b"data: " + json.dumps({**CHUNK, "choices": [d]}).encode() + b"\n\n" for d in DELTAS
) + b"data: [DONE]\n\n"


class Model(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Model)
threading.Thread(target=server.serve_forever, daemon=True).start()
port = server.server_address[1]
registry = CollectorRegistry()
chunkwatch.instrument(registry=registry, upstreams={f"127.0.0.1:{port}": "local"})
url = f"http://127.0.0.1:{port}/v1/chat/completions"
with httpx2.Client() as client:
    with client.stream("POST", url, json={"model": "m", "stream": True, "messages": []}) as r:
        events = [line for line in r.iter_lines() if line.startswith("data:")]
server.shutdown()
print(json.dumps({
    "lab_installed": lab_installed,
    "lab_imported": sorted(m for m in (*LAB_MODULES, "chunkwatch_lab") if m in sys.modules),
    "events": len(events),
    "gateway_ok": registry.get_sample_value(
        "chunkwatch_streams_total", {"layer": "gateway", "outcome": "ok", "upstream": "local"}
    ),
}))
"""


@dataclass
class Venv:
    python: Path
    before: dict[str, str]  # distribution -> version, before chunkwatch was installed
    after: dict[str, str]


def _uv() -> str:
    uv = shutil.which("uv") or shutil.which("uv", path=str(Path.home() / ".local" / "bin"))
    if uv is None:
        pytest.fail("`uv` is not on PATH nor in ~/.local/bin: scripts/bootstrap installs it")
    return uv


def _run(*args: str | Path, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command outside the project's venv (no VIRTUAL_ENV, in ``cwd``); fail with its
    output unless it succeeds."""
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    return proc


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _versions(python: Path, cwd: Path) -> dict[str, str]:
    """Every distribution installed in the venv of ``python``, read by that interpreter."""
    code = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    )
    out = _run(python, "-c", code, cwd=cwd).stdout
    return {_canonical(k): v for k, v in json.loads(out).items()}


def _venv(path: Path, *preinstalled: str) -> Venv:
    """A fresh venv (with pip) holding ``preinstalled``, then chunkwatch from this repository."""
    uv = _uv()
    _run(uv, "venv", "--quiet", "--seed", "--python", sys.executable, path, cwd=path.parent)
    python = path / "bin" / "python"
    if preinstalled:
        _run(uv, "pip", "install", "--quiet", "--python", python, *preinstalled, cwd=path.parent)
    before = _versions(python, path.parent)
    # --refresh-package: build the working tree now, not a wheel uv cached for this path
    _run(
        uv, "pip", "install", "--quiet", "--python", python,
        "--refresh-package", "chunkwatch", ROOT,
        cwd=path.parent,
    )  # fmt: skip
    return Venv(python, before, _versions(python, path.parent))


@pytest.fixture(scope="module")
def user_venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A user's environment with a newer OTel SDK and httpx instrumentation, then chunkwatch."""
    pins = [f"{name}=={version}" for name, version in USER_OTEL.items()]
    return _venv(tmp_path_factory.mktemp("user") / "venv", *pins)


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """chunkwatch alone: its dependencies and nothing else."""
    return _venv(tmp_path_factory.mktemp("bare") / "venv")


def _locked() -> dict[str, str]:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return {_canonical(p["name"]): p["version"] for p in lock["package"] if "version" in p}


def test_dependencies_and_user_extras_pin_nothing() -> None:
    """pyproject's `dependencies` (and the extras users install beside their app: each
    integration's and `lab`) give ranges, never an exact `==` / `===` pin: exact versions
    live only in uv.lock."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements = [*project["dependencies"]]
    for name in (*INTEGRATION_EXTRAS, "lab"):
        requirements += extras[name]
    assert requirements
    pinned = [
        r
        for r in requirements
        if any(s.operator in ("==", "===") for s in Requirement(r).specifier)
    ]
    assert pinned == []


def _requirements(python: Path, cwd: Path) -> tuple[set[str], list[Requirement]]:
    """The installed chunkwatch's `Provides-Extra` and `Requires-Dist`, as built from this
    repository (what an index would serve), read by the venv's interpreter."""
    code = (
        "import importlib.metadata as m, json; d = m.metadata('chunkwatch'); "
        "print(json.dumps([d.get_all('Provides-Extra'), d.get_all('Requires-Dist')]))"
    )
    extras, requires = json.loads(_run(python, "-c", code, cwd=cwd).stdout)
    return set(extras), [Requirement(r) for r in requires]


def _brought(requires: list[Requirement], extra: str) -> set[str]:
    """The distributions `chunkwatch[extra]` adds to the core, chunkwatch's own extras
    (`chunkwatch[flask,...]`) followed."""
    names: set[str] = set()
    for r in requires:
        if r.marker is None or not r.marker.evaluate({"extra": extra}):
            continue
        if r.marker.evaluate({"extra": ""}):
            continue  # not an extra's: the core
        if _canonical(r.name) == "chunkwatch":
            for inner in r.extras:
                names |= _brought(requires, inner)
        else:
            names.add(_canonical(r.name))
    return names


def test_each_integration_has_an_extra_and_the_core_none_of_them(bare_venv: Venv) -> None:
    """The built metadata offers `flask`, `openai`, `langgraph` and `otel`, each bringing
    the library it integrates (`otel`: the SDK and OTLP exporter) with a lower bound;
    `lab` brings them all; the core dependencies include none of them."""
    extras, requires = _requirements(bare_venv.python, bare_venv.python.parent)
    assert {*INTEGRATION_EXTRAS, "lab", "test"} <= extras
    integrated = set().union(*INTEGRATION_EXTRAS.values())
    for extra, expected in INTEGRATION_EXTRAS.items():
        assert _brought(requires, extra) == expected, extra
        for r in requires:
            if _canonical(r.name) in expected and r.marker and r.marker.evaluate({"extra": extra}):
                assert any(s.operator == ">=" for s in r.specifier), str(r)
    assert integrated <= _brought(requires, "lab")
    core = {
        _canonical(r.name) for r in requires if r.marker is None or r.marker.evaluate({"extra": ""})
    }
    assert core and core & integrated == set()


def test_the_user_set_is_newer_than_our_lock(user_venv: Venv) -> None:
    """The user's OTel set was installed as asked, and is newer than what uv.lock pins, so the
    next test really checks that chunkwatch does not pull a user back to our versions."""
    locked = _locked()
    for name, version in USER_OTEL.items():
        assert user_venv.before[name] == version, name
        assert Version(version) > Version(locked[name]), (
            f"{name} {version} is not newer than uv.lock's {locked[name]}: raise USER_OTEL to a "
            "newer release on the index"
        )


def test_installing_chunkwatch_changes_no_version_the_user_had(user_venv: Venv) -> None:
    """Installing chunkwatch into the user's environment keeps every package it finds at its
    version (no OTel package, nor wrapt or packaging, is downgraded or upgraded); it only adds."""
    assert "chunkwatch" in user_venv.after
    otel = {n: v for n, v in user_venv.before.items() if n.startswith("opentelemetry-")}
    assert set(USER_OTEL) <= set(otel)
    changed = {
        name: f"{version} -> {user_venv.after.get(name)}"
        for name, version in user_venv.before.items()
        if user_venv.after.get(name) != version
    }
    assert changed == {}
    added_otel = {n for n in user_venv.after if n.startswith("opentelemetry-")} - set(otel)
    assert added_otel == set()


def test_pip_check_is_clean_after_installing_chunkwatch(user_venv: Venv) -> None:
    """`python -m pip check` in the user's environment finds no broken or conflicting
    requirement once chunkwatch is in."""
    proc = subprocess.run(
        [str(user_venv.python), "-m", "pip", "check"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No broken requirements found" in proc.stdout


def test_the_library_alone_leaves_the_lab_out(bare_venv: Venv) -> None:
    """`pip install chunkwatch` brings no Flask, LangGraph, langchain, openai, OTel SDK or
    exporter: they come with the integration extras and `lab`."""
    lab = {"flask", "langgraph", "langchain-core", "langchain-openai", "openai"}
    lab |= {"opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http"}
    assert "chunkwatch" in bare_venv.after
    assert lab & set(bare_venv.after) == set()


@pytest.mark.parametrize("which", ["bare_venv", "user_venv"])
def test_the_library_works_without_the_lab_extra(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """In a venv without the lab extra, `import chunkwatch`, `chunkwatch.instrument()` with no
    app, and its OpenTelemetry entry point load; a streamed chat completion over httpx2 from
    a loopback model is counted at the gateway layer as `ok`; no lab module gets imported,
    nor the `chunkwatch_lab` package (in the bare venv no lab dependency is even
    installed). An import error shows its traceback."""
    venv: Venv = request.getfixturevalue(which)
    script = tmp_path / "probe.py"
    script.write_text(_PROBE % {"lab": LAB_MODULES})
    proc = subprocess.run(
        [str(venv.python), str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    if which == "bare_venv":
        assert seen["lab_installed"] == []
    assert seen["lab_imported"] == []
    assert seen["events"] == 3
    assert seen["gateway_ok"] == 1.0


def test_the_version_is_written_once() -> None:
    """pyproject.toml takes the version from `chunkwatch.__version__` (hatch's dynamic
    version), so the installed metadata and the module agree and there is one place to bump."""
    import importlib.metadata

    import chunkwatch

    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and "\nversion =" not in text
    assert importlib.metadata.version("chunkwatch") == chunkwatch.__version__


def test_the_browser_files_are_installed(bare_venv: Venv) -> None:
    """The built distribution carries the browser module users' frontends import
    (`chunkwatch/static/chunkwatch.js`) and the lab page's files (`chunkwatch_lab/static`),
    which the service serves with importlib.resources: non-Python package data that a
    packaging change could silently leave out."""
    code = (
        "import importlib.metadata as m, json; "
        "print(json.dumps(sorted(str(f) for f in m.files('chunkwatch') if '/static/' in str(f))))"
    )
    files = json.loads(_run(bare_venv.python, "-c", code, cwd=bare_venv.python.parent).stdout)
    assert files == [
        "chunkwatch/static/chunkwatch.js",
        "chunkwatch_lab/static/app.js",
        "chunkwatch_lab/static/faults.css",
        "chunkwatch_lab/static/faults.js",
        "chunkwatch_lab/static/index.html",
        "chunkwatch_lab/static/page.css",
    ]
