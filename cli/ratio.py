"""`pdserve ratio`: the prefill:decode split and the controller's last decisions; pin or unpin the split.

    pdserve ratio                  # current split, pin, the last decisions
    pdserve ratio --pin 3:5        # move workers (one at a time, draining first) to 3 prefill : 5 decode
    pdserve ratio --unpin          # back to following the traffic

The pin lives in the cluster's Redis, so it holds until unpinned (and applies only when the controller is enabled).
"""

from __future__ import annotations

import argparse
import json
import sys


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("ratio", help="show, pin or unpin the prefill:decode split", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--pin", metavar="P:D", help="hold the split at P prefill and D decode workers")
    group.add_argument("--unpin", action="store_true", help="let the controller follow the traffic again")
    p.add_argument("--last", type=int, default=5, help="decisions to show (default 5)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def parse_pin(text: str) -> tuple[int, int]:
    parts = text.split(":")
    if len(parts) != 2 or not all(part.isdigit() and int(part) >= 1 for part in parts):
        raise ValueError(f"--pin: expected P:D with P, D >= 1 (like 3:5), got {text!r}")
    return int(parts[0]), int(parts[1])


def run(args: argparse.Namespace) -> int:
    import redis

    from pdserve.cli.cluster_state import NoCluster, read_state
    from pdserve.controller.decision import Decision
    from pdserve.registry.entries import Role
    from pdserve.registry.registry import Registry

    try:
        pin = parse_pin(args.pin) if args.pin else None
        registry = Registry(read_state().redis_url)
        if pin is not None:
            registry.set_pin(*pin)
        elif args.unpin:
            registry.clear_pin()
        workers = registry.workers()
        decisions = registry.read_decisions(args.last)
        pinned = registry.pin()
    except (ValueError, NoCluster) as e:
        print(f"pdserve ratio: {e}", file=sys.stderr)
        return 2
    except redis.RedisError as e:
        print(f"pdserve ratio: the cluster's Redis does not answer: {e}", file=sys.stderr)
        return 1
    split = {role.value: sum(1 for w in workers if w.role is role) for role in (Role.PREFILL, Role.DECODE)}
    shown = [(Decision.from_json(text), dry) for text, dry in decisions]
    if args.json:
        print(json.dumps({"split": split, "pin": pinned, "decisions": [
            {"now_s": d.now_s, "action": d.action.value, "target": d.target, "reason": d.reason, "dry_run": dry}
            for d, dry in shown]}))
        return 0
    print(f"split: {split['prefill']} prefill : {split['decode']} decode; pin: "
          f"{f'{pinned[0]}:{pinned[1]}' if pinned else 'none'}")
    for decision, dry in shown:
        print(f"  t={decision.now_s:7.1f}s {decision.action.value:<6}{' (dry run)' if dry else ''} {decision.reason}")
    if not shown:
        print("  no controller decisions yet (is controller.enabled set in the config?)")
    return 0
