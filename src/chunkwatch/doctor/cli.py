"""``chunkwatch doctor``: the command line.

``chunkwatch doctor URL [--deployment D] [--api-version V] [--model M]
[--api-key-env NAME] [--direct URL] [--direct-api-key-env NAME] [--json] [--timeout S]``

The API key is read from the environment variable named by ``--api-key-env``
(default ``AZURE_OPENAI_API_KEY`` with ``--deployment``, else ``OPENAI_API_KEY``);
there is no flag that takes a key. The report goes to standard output (a table, or
JSON with ``--json``), the progress line to standard error; the exit status names
the verdict's outcome (see ``docs/doctor.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from chunkwatch.doctor.diagnosis import EXIT_INTERNAL, EXIT_USAGE
from chunkwatch.doctor.progress import Progress
from chunkwatch.doctor.report import redact
from chunkwatch.doctor.steps import DoctorConfig, examine
from chunkwatch.doctor.target import DEFAULT_API_VERSION, Target

__all__ = ["add_doctor_parser", "config_from_args", "main", "run_doctor"]

log = logging.getLogger("chunkwatch.doctor")

AZURE_KEY_ENV = "AZURE_OPENAI_API_KEY"
OPENAI_KEY_ENV = "OPENAI_API_KEY"


def add_doctor_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``doctor`` subcommand to an argparse subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "doctor",
        help="probe an endpoint layer by layer and name the broken one",
        description="Debugging by elimination, automated: a non-streaming control, the same "
        "request streaming as AzureChatOpenAI sends it (read raw), a bisection on HTTP errors, "
        "the openai SDK and a LangGraph node on top, and optionally the direct model endpoint. "
        "Prints a verdict (ok, empty@gateway, ...), the evidence and the action.",
        epilog="Exit status: 0 ok; 10 empty, 11 truncated, 12 stalled, 13 buffered, "
        "14 wrong_content_type, 15 http_error, 16 malformed, 17 error_event, 20 lost, "
        "21 error; 1 the doctor failed; 2 bad usage. See docs/doctor.md.",
    )
    p.add_argument("url", metavar="URL", help="what the application calls (usually the gateway)")
    p.add_argument(
        "--deployment",
        metavar="D",
        help="Azure OpenAI deployment: call URL/openai/deployments/D/chat/completions "
        "(without it, URL is an OpenAI-compatible base URL and --model is required)",
    )
    p.add_argument(
        "--api-version",
        metavar="V",
        default=DEFAULT_API_VERSION,
        help=f"Azure api-version (default {DEFAULT_API_VERSION})",
    )
    p.add_argument("--model", metavar="M", help="the model field (Azure: optional, sent as null)")
    p.add_argument(
        "--api-key-env",
        metavar="NAME",
        help=f"environment variable holding the API key (default {AZURE_KEY_ENV} with "
        f"--deployment, else {OPENAI_KEY_ENV}); the key is never printed",
    )
    p.add_argument(
        "--direct",
        metavar="URL",
        help="the model endpoint behind the gateway: repeat steps 1-2 there to tell a "
        "gateway fault from a model fault",
    )
    p.add_argument(
        "--direct-api-key-env",
        metavar="NAME",
        help="environment variable holding the direct endpoint's key (default: --api-key-env)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON (see schema)")
    p.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        default=30.0,
        help="seconds to wait for headers, the first event and each next one (default 30); "
        "no request runs longer than 10 x S",
    )
    p.set_defaults(func=run_doctor, _doctor_parser=p)
    return p


class UsageError(ValueError):
    """Arguments that cannot work together."""


def config_from_args(args: argparse.Namespace, environ: Any = None) -> DoctorConfig:
    """The run's configuration; the keys come from ``environ`` (default ``os.environ``)."""
    env = os.environ if environ is None else environ
    for url in (args.url, args.direct):
        if url is not None and not url.startswith(("http://", "https://")):
            raise UsageError(f"not an http(s) URL: {url!r}")
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be a positive number of seconds, not {args.timeout}")
    if args.deployment is None and not args.model:
        raise UsageError(
            "without --deployment, URL is an OpenAI-compatible base URL and --model is required"
        )
    key_env = args.api_key_env or (AZURE_KEY_ENV if args.deployment else OPENAI_KEY_ENV)
    direct_env = args.direct_api_key_env or key_env
    common = {"deployment": args.deployment, "api_version": args.api_version, "model": args.model}
    target = Target(args.url, api_key=env.get(key_env) or None, name="gateway", **common)
    direct = None
    if args.direct is not None:
        direct = Target(args.direct, api_key=env.get(direct_env) or None, name="direct", **common)
    return DoctorConfig(
        target=target,
        direct=direct,
        timeout=args.timeout,
        api_key_env=key_env,
        direct_api_key_env=direct_env if args.direct is not None else None,
    )


def run_doctor(args: argparse.Namespace) -> int:
    """Run the doctor; print the report; return the exit status."""
    try:
        config = config_from_args(args)
    except UsageError as err:
        parser = getattr(args, "_doctor_parser", None)
        if parser is not None:
            parser.error(str(err))  # exits with status 2
        print(f"chunkwatch doctor: {err}", file=sys.stderr)
        return EXIT_USAGE
    secrets = [k for k in (config.target.api_key, config.direct and config.direct.api_key) if k]
    try:
        report = asyncio.run(examine(config, Progress(sys.stderr)))
    except Exception as err:  # a bug in the doctor, not a finding about the endpoint
        log.debug("chunkwatch doctor failed", exc_info=True)
        message = redact(f"{type(err).__name__}: {err}", secrets)
        print(f"chunkwatch doctor: internal error: {message} (rerun with -v)", file=sys.stderr)
        return EXIT_INTERNAL
    sys.stdout.write(report.to_json() + "\n" if args.json else report.render())
    sys.stdout.flush()
    return report.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m chunkwatch.doctor URL [...]``."""
    parser = argparse.ArgumentParser(prog="python -m chunkwatch.doctor")
    add_doctor_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["doctor", *(sys.argv[1:] if argv is None else argv)])
    return run_doctor(args)
