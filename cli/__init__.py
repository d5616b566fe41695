"""The `pdserve` command. Each subcommand lives in its own module and registers its arguments here."""

from __future__ import annotations

import argparse
import logging
import sys

from pdserve.cli import bench, down, drain, generate, logs, plan, ratio, router, scale, status, up


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated LLM serving.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up.register(commands)
    router.register(commands)
    down.register(commands)
    status.register(commands)
    generate.register(commands)
    bench.register(commands)
    plan.register(commands)
    ratio.register(commands)
    scale.register(commands)
    drain.register(commands)
    logs.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
