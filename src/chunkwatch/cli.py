"""The ``chunkwatch`` command: ``upstream``, ``gateway``, ``serve``, ``demo``.

Each subcommand lives with the code it runs; this module only wires them up.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    from chunkwatch import demo, doctor
    from chunkwatch.reference import gateway, service, upstream

    parser = argparse.ArgumentParser(
        prog="chunkwatch",
        description="Observability for LLM services that stream tokens.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    upstream.add_upstream_parser(sub)
    gateway.add_gateway_parser(sub)
    service.add_serve_parser(sub)
    demo.add_demo_parser(sub)
    doctor.add_doctor_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
