"""The `swarm health` subcommand: the public swarm health dashboard."""

from __future__ import annotations

import argparse
import asyncio

from swarm.errors import SwarmError


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 seconds")
    return v


def cmd_health(a: argparse.Namespace) -> int:
    from swarm.health.server import HealthConfig, run_dashboard
    if not a.initial_peers:
        raise SwarmError("give --initial-peers MADDR ... (the multiaddr of any peer or bootstrap node)")
    cfg = HealthConfig(initial_peers=tuple(a.initial_peers), host=a.host, port=a.port, refresh=a.refresh,
                       forget_after=a.forget_after)
    try:
        asyncio.run(run_dashboard(cfg))
    except OSError as e:  # the port is taken, the address is not ours, ...
        raise SwarmError(f"cannot serve the dashboard on {a.host}:{a.port}: {e}") from None
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    h = sub.add_parser("health", help="serve the swarm health dashboard (web page, JSON API, Prometheus metrics)")
    h.add_argument("--initial-peers", nargs="+", default=[], help="multiaddrs of peers already in the swarm")
    h.add_argument("--host", default="127.0.0.1", help="web server address (0.0.0.0 to publish it)")
    h.add_argument("--port", type=int, default=8000, help="web server port (0: any free port)")
    h.add_argument("--refresh", type=_positive, default=20.0, help="seconds between crawls of the swarm")
    h.add_argument("--forget-after", type=_positive, default=600.0,
                   help="seconds a peer whose records expired stays listed as gone")
    h.set_defaults(fn=cmd_health)
