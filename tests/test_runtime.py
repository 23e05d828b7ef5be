"""The runtime's upstream names, which every stream's bookkeeping asks for."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from chunkwatch import naming
from chunkwatch.naming import upstream_name
from chunkwatch.runtime import Runtime


def test_upstream_names_are_looked_up_once_per_url_and_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A runtime names each URL once, with the configured names (as upstream_name does),
    and remembers at most 256 URLs, whatever it is asked."""
    asked: list[str] = []

    def counting(url: str, names: dict[str, str] | None = None) -> str:
        asked.append(url)
        return upstream_name(url, names)

    monkeypatch.setattr(naming, "upstream_name", counting)
    rt = Runtime(registry=CollectorRegistry(), upstreams={"gw.example.com": "Azure GW"})
    try:
        assert rt.upstream_for("https://gw.example.com/openai") == "azure_gw"
        assert rt.upstream_for("https://gw.example.com/openai") == "azure_gw"
        assert rt.upstream_for("http://127.0.0.1:8431") == "127.0.0.1:8431"
        assert asked == ["https://gw.example.com/openai", "http://127.0.0.1:8431"]
        for port in range(1, 1001):
            assert rt.upstream_for(f"http://10.0.0.1:{port}") == f"10.0.0.1:{port}"
        assert len(rt.names.upstream.known) <= 256
    finally:
        rt.close()
