"""The packages import one way, as README's tour draws them: each may import only the layers below it, so there is
no cycle and nothing reaches up (the router never drives the control plane, the worker side never knows a router).
Read from the source with `ast`: every `pdserve.<x>` import, at any depth in a module."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

BELOW = {
    "proto": set(),
    "engine": set(),
    "controller": set(),
    "registry": set(),
    "config": {"engine"},
    "access": {"config", "engine"},
    "client": {"engine", "proto"},
    "kv_transfer": {"engine"},
    "worker": {"config", "engine", "kv_transfer", "registry"},
    "prefill_worker": {"config", "engine", "kv_transfer", "registry", "worker"},
    "decode_worker": {"config", "engine", "kv_transfer", "registry", "worker"},
    "worker_actor": {"config", "engine", "kv_transfer", "registry", "worker", "prefill_worker", "decode_worker"},
    "router": {"access", "client", "config", "controller", "engine", "proto", "registry", "worker"},
    "control_plane": {"access", "client", "config", "controller", "engine", "kv_transfer", "proto", "registry",
                      "worker", "worker_actor", "prefill_worker", "decode_worker"},
}
"""Each unit (a package, or a module at the root) and what it may import besides itself. Above these: bench (may
import all of them), cli (all, and bench) and examples (plug-ins: each imports what it plugs into)."""

TOP = {"bench": set(BELOW) | {"bench"}, "cli": set(BELOW) | {"bench", "cli"}, "examples": {"controller"}}


def imports_of(unit: str) -> dict[str, set[str]]:
    """module path -> the pdserve units it imports."""
    paths = [ROOT / f"{unit}.py"] if (ROOT / f"{unit}.py").exists() else sorted((ROOT / unit).rglob("*.py"))
    found = {}
    for path in paths:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[str(path.relative_to(ROOT))] = {n.split(".")[1] for n in names if n.startswith("pdserve.")}
    return found


@pytest.mark.parametrize("unit", sorted(BELOW) + sorted(TOP))
def test_each_layer_imports_only_the_layers_below_it(unit):
    allowed = (BELOW[unit] if unit in BELOW else TOP[unit]) | {unit}
    wrong = {path: sorted(used - allowed) for path, used in imports_of(unit).items() if used - allowed}
    assert not wrong, f"{unit} may import {sorted(allowed)}; these reach elsewhere: {wrong}"


def test_every_package_has_a_layer():
    units = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()} | {
        p.stem for p in ROOT.glob("*.py") if p.stem != "__init__"}
    assert units - {"tests", "deploy", "docs", "scripts"} == set(BELOW) | set(TOP)


def test_the_imports_are_found():
    """The check is not vacuous: imports known to be there (at the top, and inside a function) are seen."""
    assert {"engine", "proto"} <= imports_of("client")["client.py"]
    assert {"prefill_worker", "decode_worker"} <= imports_of("worker_actor")["worker_actor.py"]
    assert "router" in imports_of("cli")["cli/router.py"]  # imported inside `run`
