"""The ``chunkwatch`` command: ``demo``, ``doctor``, ``serve``, ``gateway``, ``upstream``.

Each subcommand lives with the code it runs; this module only wires them up, and
imports only the one that runs (the service pulls in LangGraph and langchain,
seconds of start-up a ``doctor`` run in cron should not pay). ``demo``, ``serve``,
``gateway`` and ``upstream`` are the lab's (:mod:`chunkwatch_lab`, the ``lab`` extra).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]

# name -> (module, function adding its parser, one line of help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": (
        "chunkwatch_lab.demo",
        "add_demo_parser",
        "reproduce the empty-stream incident on loopback",
    ),
    "doctor": ("chunkwatch.doctor", "add_doctor_parser", "probe an endpoint layer by layer"),
    "serve": ("chunkwatch_lab.serving", "add_serve_parser", "run the reference service"),
    "gateway": ("chunkwatch_lab.fault_gateway", "add_gateway_parser", "run the fault gateway"),
    "upstream": ("chunkwatch_lab.upstream", "add_upstream_parser", "run the local model"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (all of them when None)."""
    parser = argparse.ArgumentParser(
        prog="chunkwatch",
        description="Observability for LLM services that stream tokens.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, function, help_) in COMMANDS.items():
        if command is None or name == command:
            try:
                add_parser = getattr(importlib.import_module(module), function)
            except ImportError as err:  # the lab's dependencies are an extra
                if command is None:
                    sub.add_parser(name, help=help_)
                    continue
                raise SystemExit(
                    f"chunkwatch {name} needs {err.name or 'a module'} that is not installed: "
                    "pip install 'chunkwatch[lab]'"
                ) from None
            add_parser(sub)
        else:
            sub.add_parser(name, help=help_)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else ""
    return ""  # no command: --help or an error, neither needs a module


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(_command(argv)).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
