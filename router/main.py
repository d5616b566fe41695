"""A router process, started by the control plane (one per router it keeps running) or by `pdserve router`:

    python -m pdserve.router.main --redis-url URL [--host HOST] [--port N] [--http-port M] [--metrics-port K]

It joins the cluster whose registry is at URL (`router.router_process`) and serves until SIGTERM or SIGINT, or until
the cluster stops. Exit codes: 0 stopped, 1 no cluster there, 2 a port or file it could not use.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import dataclass

from pdserve.router.log_limit import limit_repeats

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pdserve.router.main")
    parser.add_argument("--redis-url", required=True, help="the cluster's registry")
    add_listen_args(parser)
    return parser.parse_args(argv)


def add_listen_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (default: the config's router.host)")
    parser.add_argument("--port", "--grpc-port", dest="port", type=int, metavar="N",
                        help="gRPC port (default: the config's router.port; 0: a free one)")
    parser.add_argument("--http-port", type=int, metavar="N",
                        help="OpenAI-compatible HTTP port (default: the config's router.http_port; 0: a free one)")
    parser.add_argument("--metrics-port", type=int, metavar="N", help="Prometheus port (default: a free one)")


@dataclass(frozen=True)
class Listen:
    """Where one router listens; a port of None takes the config's (router.port, router.http_port,
    router.metrics_port), 0 a free one."""

    host: str | None = None
    port: int | None = None
    http_port: int | None = None
    metrics_port: int | None = None


def listen_of(args: argparse.Namespace) -> Listen:
    return Listen(args.host, args.port, args.http_port, args.metrics_port)


def run(redis_url: str, listen: Listen) -> int:
    """Serve until stopped. Ray is imported here, not before: a caller sets Ray's auth environment first."""
    from pdserve.router.router_process import NoCluster, RouterProcess

    for noisy in ("asyncio", "uvicorn.error", "grpc"):  # the loggers a flood of clients makes repeat
        limit_repeats(logging.getLogger(noisy))

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await RouterProcess(redis_url, listen).serve(stop)

    try:
        asyncio.run(go())
    except NoCluster as e:
        print(f"pdserve router: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"pdserve router: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args.redis_url, listen_of(args))


if __name__ == "__main__":
    raise SystemExit(main())
