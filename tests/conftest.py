"""Fixtures: the reference servers on loopback ports, each in its own thread."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from chunkwatch_lab.fault_gateway import Gateway
from chunkwatch_lab.threaded import Running, start_in_thread
from chunkwatch_lab.upstream import Upstream

UPSTREAM_TOKENS = 12
UPSTREAM_TOKEN_DELAY = 0.01


@pytest.fixture(scope="session")
def upstream() -> Iterator[Running[Upstream]]:
    """One local model endpoint for the session: 12 tokens, 10 ms apart.

    Do not change its settings in a test; start your own ``Upstream`` instead.
    """
    with start_in_thread(Upstream(tokens=UPSTREAM_TOKENS, token_delay=UPSTREAM_TOKEN_DELAY)) as up:
        yield up


@pytest.fixture(scope="session")
def azure_upstream() -> Iterator[Running[Upstream]]:
    """Like ``upstream``, answering as Azure OpenAI with content filtering: every stream
    starts with a prompt-filter chunk (``choices: []``). Do not change its settings."""
    up = Upstream(tokens=UPSTREAM_TOKENS, token_delay=UPSTREAM_TOKEN_DELAY, content_filter=True)
    with start_in_thread(up) as running:
        yield running


@pytest.fixture
def gateway(upstream: Running[Upstream]) -> Iterator[Running[Gateway]]:
    """A fresh gateway (fault ``pass``) in front of the session upstream."""
    with start_in_thread(Gateway(upstream.url)) as gw:
        yield gw
