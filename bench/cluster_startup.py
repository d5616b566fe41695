"""How long a local cluster takes to start, answer its first request and stop, as a user meets it: `pdserve up
--detach` (until it says the cluster serves), then a first request through the router (8 greedy tokens), then
`pdserve down`, each timed from outside.

    python -m pdserve.bench.cluster_startup --runs 3                          # this checkout
    python -m pdserve.bench.cluster_startup --runs 3 --baseline /tmp/old      # and another checkout, in turn

With --baseline (a checkout of pdserve, e.g. `git worktree add /tmp/old REV`), the two run in turn (A B A B ...), so
that a noisy machine moves both alike; it prints each phase's median for both and the median of the pairwise ratios.
The cluster: deploy/configs/local.yaml's shape (1 prefill + 1 decode worker on SmolLM2, a core each).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import yaml

from pdserve.client import SyncClient
from pdserve.control_plane.local_redis import free_port
from pdserve.engine import SamplingParams

CONFIG = {"workers": {"prefill": {"count": 1, "resources": {"cpus": 1}},
                      "decode": {"count": 1, "resources": {"cpus": 1}}}}
PHASES = ("up", "first_request", "down")


@dataclass(frozen=True)
class Checkout:
    label: str
    python_path: str
    """Put first on PYTHONPATH so that `pdserve` is this checkout ("" for the installed one)."""


def checkout_at(folder: str) -> Checkout:
    """A checkout of the repository (whose root is the package) importable as `pdserve` through a link."""
    links = tempfile.mkdtemp(prefix="pdserve-checkout-")
    os.symlink(os.path.abspath(folder), os.path.join(links, "pdserve"))
    return Checkout(os.path.basename(os.path.abspath(folder)), links)


def one_run(checkout: Checkout) -> dict[str, float]:
    """Seconds of each phase for one cluster of `checkout`."""
    state_dir = tempfile.mkdtemp(prefix="pdserve-startup-")
    port = free_port()
    config = {**CONFIG, "router": {"host": "127.0.0.1", "port": port, "http_port": free_port()}}
    path = os.path.join(state_dir, "cluster.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    env = {**os.environ, "PDSERVE_STATE_DIR": state_dir}
    if checkout.python_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (checkout.python_path, env.get("PYTHONPATH")) if p)

    def pdserve(*args: str) -> float:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "pdserve.cli", *args], env=env, capture_output=True, text=True,
                              timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"pdserve {args[0]} ({checkout.label}) failed: {done.stderr[-2000:]}")
        return time.monotonic() - started

    seconds = {"up": pdserve("up", "--detach", "--config", path)}
    try:
        started = time.monotonic()
        with SyncClient(f"127.0.0.1:{port}", timeout_s=120) as client:
            client.generate("Say hello.", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        seconds["first_request"] = time.monotonic() - started
    finally:
        seconds["down"] = pdserve("down")
    return seconds


def phase_s(run: dict[str, float], phase: str) -> float:
    return sum(run.values()) if phase == "total" else run[phase]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdserve.bench.cluster_startup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", metavar="CHECKOUT", help="another checkout to run in turn with this one")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs: must be at least 1")
    checkouts = [Checkout("this", "")] + ([checkout_at(args.baseline)] if args.baseline else [])
    runs: dict[str, list[dict[str, float]]] = {c.label: [] for c in checkouts}
    for number in range(args.runs):
        for checkout in checkouts:
            seconds = one_run(checkout)
            runs[checkout.label].append(seconds)
            print(f"run {number + 1} {checkout.label}: " + ", ".join(f"{p} {seconds[p]:.2f} s" for p in PHASES),
                  flush=True)
    print(f"\n| phase | {' | '.join(c.label + ' (median s)' for c in checkouts)}"
          + (" | this / baseline (median of pairs) |" if args.baseline else " |"))
    print("|---|" + "---:|" * (len(checkouts) + (1 if args.baseline else 0)))
    for phase in (*PHASES, "total"):
        medians = [statistics.median(phase_s(r, phase) for r in runs[c.label]) for c in checkouts]
        row = f"| {phase} | " + " | ".join(f"{m:.2f}" for m in medians)
        if args.baseline:
            ratios = [phase_s(a, phase) / phase_s(b, phase) for a, b in zip(runs["this"], runs[checkouts[1].label])]
            row += f" | {statistics.median(ratios):.2f}x"
        print(row + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
