"""What the doctor calls, and the exact request an application sends there.

A :class:`Target` is an endpoint plus how to address it:

* **Azure OpenAI** (``deployment`` given): ``POST {url}/openai/deployments/{deployment}
  /chat/completions?api-version={api_version}`` with an ``api-key`` header, the way
  ``AzureChatOpenAI`` (langchain-openai) calls it;
* **OpenAI-compatible** (no deployment; ``model`` required): ``POST {url}/chat/completions``
  with ``Authorization: Bearer``, ``url`` being the base URL (``.../v1``).

:meth:`Target.body` builds the JSON body byte for byte as ``AzureChatOpenAI`` does
(openai 3.x, langchain-openai 1.x): ``{"model":...,"stream":true,"messages":[...],
"stream_options":{"include_usage":true}}``, compact separators, this key order. The
stream and non-stream bodies differ only in ``stream`` and ``stream_options``.

The key is held here and written only into the request header; ``repr`` hides it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

__all__ = ["DEFAULT_API_VERSION", "PROMPT", "Target"]

DEFAULT_API_VERSION = "2024-10-21"
# A short, predictable answer of a dozen or more tokens: enough units to tell a
# buffered stream from a streamed one, cheap on a real model.
PROMPT = "Count from 1 to 20, separated by spaces."


@dataclass(frozen=True)
class Target:
    """One endpoint the doctor probes. ``api_key`` never leaves the request headers."""

    url: str
    deployment: str | None = None
    api_version: str = DEFAULT_API_VERSION
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    name: str = "gateway"  # which path this is in the report: "gateway" or "direct"

    @property
    def azure(self) -> bool:
        return self.deployment is not None

    @property
    def api(self) -> str:
        return "azure" if self.azure else "openai"

    @property
    def chat_url(self) -> str:
        """The chat completions URL under ``url`` (whose own query, if any, is kept)."""
        parts = urlsplit(self.url)
        base, query = parts.path.rstrip("/"), parts.query
        if self.deployment is not None:
            path = f"{base}/openai/deployments/{quote(self.deployment, safe='')}/chat/completions"
            version = f"api-version={quote(self.api_version, safe='')}"
            query = f"{query}&{version}" if query else version
        else:
            path = f"{base}/chat/completions"
        return urlunsplit((parts.scheme, parts.netloc, path, query, ""))

    @property
    def sdk_model(self) -> str | None:
        """The ``model`` the application passes: None for an Azure deployment by default."""
        return self.model

    def headers(self) -> dict[str, str]:
        """The headers the openai SDK sends (user agent aside), the key included."""
        from chunkwatch import __version__

        headers = {
            "accept": "application/json",
            "content-type": "application/json",
            "user-agent": f"chunkwatch-doctor/{__version__}",
        }
        if self.api_key:
            if self.azure:
                headers["api-key"] = self.api_key
            else:
                headers["authorization"] = f"Bearer {self.api_key}"
        return headers

    def body(self, *, stream: bool | None, stream_options: bool) -> bytes:
        """The chat request body. ``stream=None`` leaves the ``stream`` field out."""
        obj: dict[str, Any] = {"model": self.model}
        if stream is not None:
            obj["stream"] = stream
        obj["messages"] = [{"content": PROMPT, "role": "user"}]
        if stream_options:
            obj["stream_options"] = {"include_usage": True}
        return json.dumps(obj, separators=(",", ":")).encode()

    def describe(self) -> str:
        if self.azure:
            return f"Azure OpenAI deployment {self.deployment}, api-version {self.api_version}"
        return f"OpenAI-compatible, model {self.model}"
