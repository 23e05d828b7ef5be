"""``chunkwatch doctor``: debugging by elimination, automated.

Usage::

    export AZURE_OPENAI_API_KEY=...
    chunkwatch doctor https://my-gateway.example.com --deployment gpt-4o-mini \\
        --direct https://my-resource.openai.azure.com --json

Against any OpenAI or Azure OpenAI compatible endpoint, directly or through a
gateway, it runs, each step timed and bounded by ``--timeout``:

1. a non-streaming control request;
2. the same request streaming, sent as ``AzureChatOpenAI`` sends it (with
   ``stream_options``), read raw by the gateway probe's body reader
   (:class:`chunkwatch.wire.WireReader`);
3. on an HTTP error, a bisection (without ``stream_options``, then without
   ``stream``) naming the field that flips it;
4. the streaming request through the openai SDK and through a one-node LangGraph
   graph under ``astream_events`` — what the application would see;
5. with ``--direct``, steps 1-2 against the model endpoint behind the gateway.

It prints a verdict in chunkwatch's outcome vocabulary and layer (``ok``,
``empty@gateway``, ``http_error@gateway (stream_options rejected)``, ``stalled@model``),
the evidence in plain sentences and the action; a table per step, or ``--json``
(schema: ``docs/doctor.md``). The exit status names the outcome (0 for ok), so it
works as a synthetic probe in CI or cron. The evidence is classified by the same
rules as the probes' (:func:`chunkwatch.outcomes.classify`).

In Python::

    from chunkwatch.doctor import DoctorConfig, Target, examine
    report = asyncio.run(examine(DoctorConfig(Target(url, deployment="gpt-4o-mini"))))
    report.diagnosis.label, report.exit_code, report.as_dict()
"""

from __future__ import annotations

from chunkwatch.doctor.cli import add_doctor_parser, main, run_doctor
from chunkwatch.doctor.diagnosis import EXIT_CODES, Diagnosis, Step, diagnose
from chunkwatch.doctor.progress import Progress
from chunkwatch.doctor.report import SCHEMA_VERSION, Report, schema
from chunkwatch.doctor.steps import DoctorConfig, examine
from chunkwatch.doctor.target import Target

__all__ = [
    "EXIT_CODES",
    "SCHEMA_VERSION",
    "Diagnosis",
    "DoctorConfig",
    "Progress",
    "Report",
    "Step",
    "Target",
    "add_doctor_parser",
    "diagnose",
    "examine",
    "main",
    "run_doctor",
    "schema",
]
