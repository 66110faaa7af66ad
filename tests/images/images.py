"""The project's images as its files describe them: the build files under images/, the
extras each installs, and the builds docs/images.md tells users to run (which name the
images the chart and the CRDs default to)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tests.images.dockerfile import Dockerfile, PipCommand, Stage, expand, parse

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
DOCS = ROOT / "docs" / "images.md"
DOCUMENTED_REGISTRY = "ghcr.io/tapestry-dev/"  # the project's own names, as the defaults use

_EXTRAS = re.compile(r"^(?P<ref>.+?)\[(?P<extras>[A-Za-z0-9_,\- ]+)\]$")


def dockerfiles() -> dict[str, Path]:
    """image name (`operator`, `trainer`) -> its build file."""
    return {p.name.removesuffix(".Dockerfile"): p for p in sorted(IMAGES.glob("*.Dockerfile"))}


@cache
def dockerfile(name: str) -> Dockerfile:
    return parse(dockerfiles()[name])


@dataclass(frozen=True)
class ProjectInstall:
    """The `pip install "<the project's wheel>[extras]"` of a build file."""

    stage: Stage
    pip: PipCommand
    extras: frozenset[str]
    wheel: str  # the wheel path pattern, e.g. /wheels/tapestry-*.whl


def _assignments(stage: Stage) -> dict[str, str]:
    """Shell variables set by `NAME=value` commands of the stage's RUN lines."""
    out: dict[str, str] = {}
    for command in stage.commands():
        if len(command) == 1 and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", command[0]):
            name, _, value = command[0].partition("=")
            out[name] = value
    return out


def _project_wheel(argument: str, variables: dict[str, str]) -> tuple[str, set[str]] | None:
    """(wheel path pattern, extras) when a `pip install` argument is the project's own
    wheel (a `tapestry-*.whl`, directly or through a shell variable)."""
    match = _EXTRAS.match(argument)
    resolved = expand(match.group("ref") if match else argument, variables)
    wheel = re.search(r"(/\S*tapestry-\*\.whl)", resolved)
    if wheel is None:
        return None
    extras = {e.strip() for e in match.group("extras").split(",")} if match else set()
    return wheel.group(1), extras


def project_installs(df: Dockerfile) -> list[ProjectInstall]:
    """Every install of the project's own wheel in any stage, with the extras it names."""
    found = []
    for stage in df.stages:
        variables = _assignments(stage)
        for pip in stage.pip_commands():
            if pip.subcommand != "install":
                continue
            for argument in pip.arguments:
                if (project := _project_wheel(argument, variables)) is not None:
                    wheel, extras = project
                    found.append(ProjectInstall(stage, pip, frozenset(extras), wheel))
    return found


def other_installs(df: Dockerfile) -> list[tuple[Stage, str]]:
    """(stage, requirement) of every `pip install` argument that is not the project's
    wheel, the stage's ARGs substituted."""
    out = []
    for stage in df.stages:
        variables = _assignments(stage)
        for pip in stage.pip_commands():
            if pip.subcommand == "install":
                out += [
                    (stage, expand(a, stage.args()))
                    for a in pip.arguments
                    if _project_wheel(a, variables) is None
                ]
    return out


@dataclass(frozen=True)
class Build:
    """One `docker build` command of docs/images.md."""

    dockerfile: str  # -f, relative to the repository root
    tags: tuple[str, ...]
    build_args: dict[str, str]
    context: str
    text: str


def _commands(markdown: str) -> list[str]:
    """Shell commands in the fenced code blocks, `\\` continuations joined."""
    out: list[str] = []
    for language, block in re.findall(r"^```(\w*)\n(.*?)^```", markdown, re.DOTALL | re.MULTILINE):
        if language not in ("bash", "sh", "shell", "console", ""):
            continue
        pending = ""
        for line in block.splitlines():
            line = line.strip().removeprefix("$ ")
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            out.append(pending + line)
            pending = ""
    return out


def _section(markdown: str, title: str) -> str:
    """The text of the `## title` section (up to the next `## ` heading)."""
    match = re.search(
        rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", markdown, re.DOTALL | re.MULTILINE
    )
    assert match, f"docs/images.md has no section '## {title}'"
    return match.group(1)


def documented_builds(section: str = "Building") -> list[Build]:
    """The `docker build` commands of a section of docs/images.md (by default the one
    that says how to build the images under their default names)."""
    builds = []
    for command in _commands(_section(DOCS.read_text(encoding="utf-8"), section)):
        words = shlex.split(command, comments=True)
        if words[:2] == ["docker", "build"]:
            rest = words[2:]
        elif words[:3] == ["docker", "buildx", "build"]:
            rest = words[3:]
        else:
            continue
        dockerfile, tags, build_args, positional = "", [], {}, []
        i = 0
        while i < len(rest):
            word = rest[i]
            name, eq, inline = word.partition("=")
            takes_value = name in ("-f", "--file", "-t", "--tag", "--build-arg", "--platform")
            value = inline if eq else (rest[i + 1] if takes_value else "")
            i += 1 if eq or not takes_value else 2
            if name in ("-f", "--file"):
                dockerfile = value
            elif name in ("-t", "--tag"):
                tags.append(value)
            elif name == "--build-arg":
                key, _, arg = value.partition("=")
                build_args[key] = arg
            elif not word.startswith("-"):
                positional.append(word)
        builds.append(Build(dockerfile, tuple(tags), build_args, positional[-1], command))
    return builds


def default_builds() -> list[Build]:
    """The builds docs/images.md gives for the project's own image names."""
    return [
        b for b in documented_builds() if all(t.startswith(DOCUMENTED_REGISTRY) for t in b.tags)
    ]


def build_of(reference: str) -> Build:
    """The documented build that produces the image `reference`."""
    found = [b for b in default_builds() if reference in b.tags]
    assert len(found) == 1, (
        f"docs/images.md has {len(found)} builds of {reference!r}; its builds tag "
        f"{sorted(t for b in default_builds() for t in b.tags)}"
    )
    return found[0]


def image_of(reference: str) -> str:
    """Which of images/ (`operator`, `trainer`) the image `reference` is built from."""
    return Path(build_of(reference).dockerfile).name.removesuffix(".Dockerfile")


def extras_of(image: str) -> set[str]:
    """The extras the image's build file installs the project with."""
    (install,) = project_installs(dockerfile(image))
    return set(install.extras)
