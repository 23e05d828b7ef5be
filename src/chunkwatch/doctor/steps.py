"""The doctor's run: the steps in order, each bounded in time.

1. the non-streaming control (``stream: false``, as ``AzureChatOpenAI`` sends it);
2. the same request streaming, with ``stream_options`` — read raw;
3. only if step 2 ended in an HTTP error: the request without ``stream_options``, then
   without ``stream``;
4. the streaming request through the openai SDK, then through a one-node LangGraph
   graph under ``astream_events``;
5. with a direct endpoint: steps 1 and 2 against it.

:func:`examine` runs them and returns a :class:`~chunkwatch.doctor.report.Report`
with the :class:`~chunkwatch.doctor.diagnosis.Diagnosis`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx2

from chunkwatch.doctor.agent_steps import through_langgraph, through_sdk
from chunkwatch.doctor.diagnosis import Step, diagnose
from chunkwatch.doctor.progress import Progress
from chunkwatch.doctor.report import Report
from chunkwatch.doctor.target import Target
from chunkwatch.doctor.wire_step import measure, new_client
from chunkwatch.outcomes import Outcome

__all__ = ["TOTAL_FACTOR", "DoctorConfig", "examine"]

TOTAL_FACTOR = 10  # no request runs longer than this many --timeout


@dataclass(frozen=True)
class DoctorConfig:
    target: Target
    direct: Target | None = None
    timeout: float = 30.0
    api_key_env: str = "AZURE_OPENAI_API_KEY"
    direct_api_key_env: str | None = None

    @property
    def total(self) -> float:
        return self.timeout * TOTAL_FACTOR


async def examine(config: DoctorConfig, progress: Progress | None = None) -> Report:
    """Run every step against ``config``'s endpoints and diagnose."""
    progress = progress or Progress(None)
    started, t0 = datetime.now(UTC), time.perf_counter()
    ticker = asyncio.create_task(progress.run())
    steps: list[Step] = []
    try:
        target = config.target
        async with new_client(config.total) as client:
            await _wire(steps, client, config, target, "control", progress)
            stream = await _wire(steps, client, config, target, "stream", progress)
            if stream.outcome is Outcome.HTTP_ERROR:
                await _wire(steps, client, config, target, "without_stream_options", progress)
                await _wire(steps, client, config, target, "without_stream", progress)
        for layer, run in (("sdk", through_sdk), ("langgraph", through_langgraph)):
            title = _TITLES[layer][1]
            view = await run(
                target,
                timeout=config.timeout,
                total=config.total,
                progress=progress,
                label=f"step 4 ({title})",
            )
            steps.append(Step(layer, 4, title, "gateway", app=view))
        if config.direct is not None:
            async with new_client(config.total) as client:
                await _wire(steps, client, config, config.direct, "direct_control", progress)
                await _wire(steps, client, config, config.direct, "direct_stream", progress)
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
    diagnosis = diagnose(steps, direct=config.direct is not None)
    return Report(
        config=config,
        steps=steps,
        diagnosis=diagnosis,
        started_at=started,
        duration=time.perf_counter() - t0,
    )


# step id -> (step number, title)
_TITLES: dict[str, tuple[int, str]] = {
    "control": (1, "non-streaming control"),
    "stream": (2, "streaming, as AzureChatOpenAI sends it"),
    "without_stream_options": (3, "bisect: streaming without stream_options"),
    "without_stream": (3, "bisect: without stream"),
    "sdk": (4, "openai SDK stream"),
    "langgraph": (4, "LangGraph astream_events"),
    "direct_control": (5, "direct endpoint, non-streaming control"),
    "direct_stream": (5, "direct endpoint, streaming"),
}
# step id -> ("stream" field, None: left out; stream_options sent)
_REQUESTS: dict[str, tuple[bool | None, bool]] = {
    "control": (False, False),
    "stream": (True, True),
    "without_stream_options": (True, False),
    "without_stream": (None, False),
    "direct_control": (False, False),
    "direct_stream": (True, True),
}


async def _wire(
    steps: list[Step],
    client: httpx2.AsyncClient,
    config: DoctorConfig,
    target: Target,
    step_id: str,
    progress: Progress,
) -> Step:
    number, title = _TITLES[step_id]
    stream, options = _REQUESTS[step_id]
    wire = await measure(
        client,
        target,
        stream=stream,
        stream_options=options,
        timeout=config.timeout,
        total=config.total,
        progress=progress,
        label=f"step {number} ({title})",
    )
    step = Step(step_id, number, title, target.name, wire=wire)
    steps.append(step)
    return step
