"""Names for what chunkwatch records about a URL: the ``upstream`` label and ``url.full``.

Both are asked for every stream and depend only on the URL and the configuration, so
:class:`Names` works each one out once per URL and remembers a bounded number
(parsing a URL costs more than a stream's whole bookkeeping).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit, urlunsplit

__all__ = ["MAX_URLS", "Names", "redact_url", "upstream_name"]

MAX_URLS = 256  # URLs whose names are remembered, whatever is asked
_NAME_RE = re.compile(r"[^a-z0-9_.:-]")


def upstream_name(url: str, names: Mapping[str, str] | None = None) -> str:
    """The ``upstream`` label for ``url``: a configured name, else ``host[:port]``.

    ``names`` maps ``host``, ``host:port`` or a URL prefix to a name. Never a path,
    never a query; at most 64 characters of ``[a-z0-9_.:-]``.
    """
    parts = urlsplit(url if "//" in url else f"//{url}")
    host = (parts.hostname or "unknown").lower()
    hostport = f"{host}:{parts.port}" if parts.port else host
    for key, name in (names or {}).items():
        if key in (host, hostport) or (key.startswith("http") and url.startswith(key)):
            return _NAME_RE.sub("_", name.lower())[:64]
    return _NAME_RE.sub("_", hostport)[:64]


_KEPT_QUERY = frozenset({"api-version"})


def redact_url(url: str) -> str:
    """``url`` with user and password replaced by ``REDACTED`` and every query value but
    ``api-version``'s replaced by ``REDACTED`` (the HTTP semantic conventions' rule for
    ``url.full``, applied to every key: gateways carry keys and signatures there)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "REDACTED:REDACTED@" + netloc.rsplit("@", 1)[1]
    query = "&".join(
        item
        if item.split("=", 1)[0] in _KEPT_QUERY or "=" not in item
        else item.split("=", 1)[0] + "=REDACTED"
        for item in parts.query.split("&")
        if item
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


class _Remembered:
    """``work(url)``, computed once per URL; at most :data:`MAX_URLS` kept."""

    def __init__(self, work: Callable[[str], str]) -> None:
        self._work = work
        self.known: dict[str, str] = {}

    def __call__(self, url: str) -> str:
        value = self.known.get(url)
        if value is None:
            if len(self.known) >= MAX_URLS:
                self.known.clear()
            value = self.known[url] = self._work(url)
        return value


class Names:
    """The ``upstream`` label (configured names first) and the redacted ``url.full``."""

    def __init__(self, upstreams: Mapping[str, str]) -> None:
        self.upstreams = dict(upstreams)
        self.upstream = _Remembered(lambda url: upstream_name(url, self.upstreams))
        self.url_full = _Remembered(redact_url)
