"""The chat page of the reference service: ``/``, its files, and ``/chunkwatch.js``.

* ``GET /`` — ``static/index.html``: a chat that streams ``POST /chat`` with ``fetch`` and
  the library's :file:`chunkwatch.js` (``/?q=TEXT`` sends TEXT once on load);
* ``GET /static/<name>`` — the page's own files (``chunkwatch_lab/static``), by name
  only: a name that is not one of them (``..``, a sub-path) is a 404;
* ``GET /chunkwatch.js`` — the library's browser module (``chunkwatch/static``), the one
  a user's own frontend serves too (docs/browser.md).

Everything comes from the installed packages (``importlib.resources``), with its
content type and ``Cache-Control: no-cache`` (a page that changes with the service is
revalidated, never stale). The page loads nothing from elsewhere; its
``Content-Security-Policy`` holds the browser to that.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable

from flask import Blueprint, Response, abort

__all__ = ["CONTENT_TYPES", "blueprint"]

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# Same origin only, for scripts, styles, fetches and beacons alike: the page works offline
# and a stray external reference fails in the browser instead of leaking a request.
PAGE_CSP = "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'"

blueprint = Blueprint("chunkwatch_page", __name__)


def _page_files() -> dict[str, Traversable]:
    """The page's files by name: the only names ``/static/<name>`` serves."""
    root = resources.files("chunkwatch_lab") / "static"
    return {f.name: f for f in root.iterdir() if f.is_file() and _suffix(f.name) in CONTENT_TYPES}


def _suffix(name: str) -> str:
    dot = name.rfind(".")
    return name[dot:] if dot > 0 else ""


def _send(file: Traversable, *, csp: bool = False) -> Response:
    resp = Response(file.read_bytes(), content_type=CONTENT_TYPES[_suffix(file.name)])
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    if csp:
        resp.headers["Content-Security-Policy"] = PAGE_CSP
    return resp


@blueprint.get("/")
def index() -> Response:
    return _send(resources.files("chunkwatch_lab") / "static" / "index.html", csp=True)


@blueprint.get("/static/<name>")
def static_file(name: str) -> Response:
    file = _page_files().get(name)
    if file is None:
        abort(404)
    return _send(file)


@blueprint.get("/chunkwatch.js")
def library() -> Response:
    return _send(resources.files("chunkwatch") / "static" / "chunkwatch.js")
