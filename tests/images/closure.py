"""What an image's virtualenv holds, and a Python that can import only that.

An image installs the project's wheel with some extras (`pip install "<wheel>[operator]"`)
and so gets pyproject.toml's dependencies, those extras' dependencies and, transitively,
theirs. `distributions` computes that set from pyproject.toml and the metadata of the
distributions installed here (the development virtualenv holds a superset: every extra).
`restricted_environment` makes every interpreter started with it, and every process
those start, refuse to import a top-level module that only other distributions provide,
with the message an image without them would give. That is how the tests run the pods'
own commands as they run in each image, without building it.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def pyproject() -> dict[str, Any]:
    """The `[project]` table of pyproject.toml."""
    loaded = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    project: dict[str, Any] = loaded["project"]
    return project


def _requirements(project: dict[str, Any], extras: set[str]) -> list[Requirement]:
    """The project's own requirements with `extras` (following self-references such as
    `tapestry[trainer,operator]`), from pyproject.toml rather than installed metadata,
    which lags until the next `make setup`."""
    name = canonicalize_name(project["name"])
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    unknown = extras - set(optional)
    assert not unknown, f"pyproject.toml has no extra {sorted(unknown)} (has {sorted(optional)})"
    out: list[Requirement] = []
    seen: set[str] = set()
    todo = [Requirement(r) for r in project["dependencies"]]
    todo += [Requirement(f"{name}[{extra}]") for extra in extras]
    while todo:
        requirement = todo.pop()
        if canonicalize_name(requirement.name) == name:
            for extra in requirement.extras - seen:
                seen.add(extra)
                todo += [Requirement(r) for r in optional[extra]]
            continue
        out.append(requirement)
    return out


def distributions(extras: set[str]) -> set[str]:
    """Canonical names of the distributions `pip install "<wheel>[extras]"` installs
    (the project's own included)."""
    project = pyproject()
    found: set[str] = {canonicalize_name(project["name"])}
    todo = _requirements(project, extras)
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        found.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            raise AssertionError(
                f"{requirement} is required but not installed here: run `make setup`"
            ) from None
        for text in requires:
            child = Requirement(text)
            wanted = requirement.extras or {""}
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in wanted):
                todo.append(child)
    return found


def blocked_modules(allowed: set[str]) -> dict[str, str]:
    """Top-level module -> the distribution that provides it, for every module that
    only distributions outside `allowed` provide (a namespace such as `google` that an
    allowed distribution shares stays importable)."""
    out: dict[str, str] = {}
    for module, providers in metadata.packages_distributions().items():
        names = {canonicalize_name(p) for p in providers}
        if names & allowed or module in sys.stdlib_module_names:
            continue
        out[module] = sorted(names)[0]
    return out


_SITECUSTOMIZE = '''\
"""Hide the modules the {image} image does not install (tests/images/closure.py)."""
import sys

_BLOCKED = {blocked!r}
_LOG = {log!r}


class _Installed:
    """A finder that finds what `inner` finds, except modules not in the image: for
    those it finds nothing, as in the image (`import` fails, `find_spec` is None)."""

    def __init__(self, inner):
        self._inner = inner

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in _BLOCKED:
            with open(_LOG, "a", encoding="utf-8") as log:
                log.write(fullname + "\\n")
            return None
        find = getattr(self._inner, "find_spec", None)
        return None if find is None else find(fullname, path, target)

    def __getattr__(self, name):
        return getattr(self._inner, name)


sys.meta_path[:] = [_Installed(finder) for finder in sys.meta_path]
'''


def restricted_environment(image: str, extras: set[str], scratch: Path) -> dict[str, str]:
    """The environment of a process (and its children) that can import only what the
    image installing `extras` has."""
    blocked = blocked_modules(distributions(extras))
    scratch.mkdir(parents=True, exist_ok=True)
    log = scratch / "hidden-imports.txt"
    (scratch / "sitecustomize.py").write_text(
        _SITECUSTOMIZE.format(image=image, blocked=blocked, log=str(log)), encoding="utf-8"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(scratch)
    return env
