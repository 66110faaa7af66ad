"""Imports point down only (DESIGN.md): the protocol imports nothing of ours, the
lifecycle only the protocol, telemetry only the protocol, the aggregator and trainer
the protocol and telemetry; the operator and the CLI are drivers on top, and the
operator never imports the trainer (no torch)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {
    "tapestry_protocol": set(),
    "tapestry_lifecycle": {"tapestry_protocol"},
    "tapestry_telemetry": {"tapestry_protocol"},
    "tapestry_aggregator": {"tapestry_protocol", "tapestry_telemetry"},
    "tapestry_trainer": {"tapestry_protocol", "tapestry_telemetry"},
    "tapestry_operator": {
        "tapestry_protocol",
        "tapestry_lifecycle",
        "tapestry_aggregator",
        "tapestry_telemetry",
    },
}


def _ours_imported(package: Path) -> dict[str, set[str]]:
    """Our packages each module of `package` imports (at any depth, lazily or not)."""
    found: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = {n for n in names if n.startswith("tapestry_")}
    return found


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_imports_point_down(name: str) -> None:
    (package,) = [p for p in ROOT.glob(f"*/{name}") if p.is_dir()]
    for module, imported in _ours_imported(package).items():
        outside = imported - ALLOWED[name] - {name}
        assert not outside, f"{module} imports {sorted(outside)}"
