"""How long a ratio-controller move takes on a real local cluster (SmolLM2-135M on CPU): a role switch in place
against a restart, side by side in one run.

    python -m pdserve.bench.role_switch [--moves 4] [--json]

Each mode starts its own cluster (1 prefill, 2 decode workers, controller on) and moves a worker back and forth with
operator pins, (2, 1) then (1, 2), `--moves` times, idle. Per move it records the wall time from the pin to the new
worker listed READY in `pdserve status`, and the pool's own breakdown from the cluster log (drain, then switch or
restart). In place: both pools ask for the same resources, so the drained actor serves the other role on its
engine. Restart: the decode pool asks for slightly more CPU (0.55 against 0.5), so a move stops the actor and starts
a new one, which loads the model again (the only way before role switches in place).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

from pdserve.bench.local_cluster import RunningCluster, start_cluster, stop_cluster

ENGINE = {"num_kv_blocks": 1024, "max_num_batched_tokens": 256}
CONTROLLER = {"enabled": True, "interval_s": 1.0, "cooldown_s": 0, "window_s": 10}
MOVE_TIMEOUT_S = 180
POLL_S = 0.1
MOVED = re.compile(r"worker (\S+) moved to (\S+) as (\S+): drained in ([\d.]+) s, (switched in place|restarted) "
                   r"in ([\d.]+) s")


@dataclass(frozen=True)
class Move:
    worker_id: str
    new_id: str
    wall_s: float
    """From the pin to the new worker listed READY."""
    drain_s: float
    switch_s: float
    """From drained to the new identity registered (the pool's log)."""
    how: str


def config(decode_cpus: float) -> dict:
    return {"engine": ENGINE, "controller": CONTROLLER,
            "workers": {"prefill": {"count": 1, "resources": {"cpus": 0.5}},
                        "decode": {"count": 2, "resources": {"cpus": decode_cpus}}}}


def split(cluster: RunningCluster) -> tuple[int, int]:
    roles = [w["role"] for w in cluster.workers().values()]
    return roles.count("prefill"), roles.count("decode")


def pin_and_wait(cluster: RunningCluster, prefill: int, decode: int) -> float:
    began = time.monotonic()
    done = cluster.pdserve("ratio", "--pin", f"{prefill}:{decode}")
    if done.returncode != 0:
        raise RuntimeError(f"pdserve ratio pin failed: {done.stderr[-1000:]}")
    while split(cluster) != (prefill, decode):
        if time.monotonic() - began > MOVE_TIMEOUT_S:
            raise TimeoutError(f"no move to {prefill}:{decode} within {MOVE_TIMEOUT_S} s")
        time.sleep(POLL_S)
    return time.monotonic() - began


def logged_moves(cluster: RunningCluster) -> list[re.Match]:
    text = cluster.pdserve("logs", "-n", "100000").stdout
    return list(MOVED.finditer(text))


def measure(decode_cpus: float, moves: int) -> list[Move]:
    with tempfile.TemporaryDirectory(prefix="pdserve-role-switch-") as state_dir:
        cluster = start_cluster(state_dir, config(decode_cpus))
        try:
            walls = [pin_and_wait(cluster, *((2, 1) if i % 2 == 0 else (1, 2))) for i in range(moves)]
            logged = logged_moves(cluster)
        finally:
            stop_cluster(cluster)
    if len(logged) != moves:
        raise RuntimeError(f"{moves} moves pinned but {len(logged)} logged")
    return [Move(m[1], m[3], wall, float(m[4]), float(m[6]), m[5]) for m, wall in zip(logged, walls)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moves", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = {"in place": measure(0.5, args.moves), "restart": measure(0.55, args.moves)}
    if args.json:
        print(json.dumps({mode: [asdict(m) for m in moves] for mode, moves in report.items()}, indent=1))
        return 0
    print(f"{'mode':<10} {'moves':>5} {'pin -> ready (s)':>17} {'drain (s)':>10} {'switch (s)':>11}")
    for mode, moves in report.items():
        print(f"{mode:<10} {len(moves):>5} {_median(m.wall_s for m in moves):>17.2f} "
              f"{_median(m.drain_s for m in moves):>10.2f} {_median(m.switch_s for m in moves):>11.2f}")
    switch = {mode: _median(m.switch_s for m in moves) for mode, moves in report.items()}
    print(f"switch, restart / in place (medians): {switch['restart'] / switch['in place']:.1f}x")
    return 0


def _median(values) -> float:
    return statistics.median(list(values))


if __name__ == "__main__":
    raise SystemExit(main())
