"""Small real-prose corpora for end-to-end tests, taken from the standard library's own
documentation so that nothing is downloaded."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

GROUPS = {
    "alice": ["json", "csv", "argparse", "logging", "pathlib"],
    "bob": ["asyncio", "collections", "itertools", "functools", "dataclasses"],
}


def write_corpora(root: Path, groups: dict[str, list[str]] = GROUPS) -> Path:
    """One folder of .txt per participant, from module and function docstrings."""
    for name, modules in groups.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for module_name in modules:
            module = importlib.import_module(module_name)
            parts = [inspect.getdoc(module) or ""]
            for _, member in inspect.getmembers(module):
                doc = inspect.getdoc(member) if callable(member) else None
                if doc:
                    parts.append(doc)
            (folder / f"{module_name}.txt").write_text("\n\n".join(parts))
    return root
