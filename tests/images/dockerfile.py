"""A small reader of the image build files, enough to check them without a container
engine: Dockerfile stages and instructions (ARG substitution, ENV/LABEL pairs, COPY
flags, the commands of RUN lines, `pip install` arguments) and `.dockerignore` matching
with Docker's rules (patterns anchored at the context root, `**` for any depth, a
pattern that matches a folder excludes everything in it, the last match wins)."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_VARIABLE = re.compile(
    rf"\$(?:\{{(?P<braced>{_NAME})(?::-(?P<default>[^}}]*))?\}}|(?P<bare>{_NAME}))"
)
_PUNCTUATION = set("();<>|&")


def expand(text: str, variables: Mapping[str, str]) -> str:
    """`$NAME`, `${NAME}` and `${NAME:-default}` replaced as the builder does (unknown
    names left as written, so a test sees what was not resolved)."""

    def one(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("bare")
        if variables.get(name):
            return variables[name]
        if match.group("default") is not None:
            return match.group("default")
        return variables.get(name, match.group(0))

    return _VARIABLE.sub(one, text)


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    value: str  # the rest of the logical line, continuations joined
    line: int


@dataclass(frozen=True)
class Copy:
    sources: tuple[str, ...]
    destination: str
    source_stage: str | None  # --from=...


@dataclass(frozen=True)
class PipCommand:
    """One `pip <subcommand>` of a RUN line: its options and positional arguments."""

    subcommand: str
    options: dict[str, str | None]
    arguments: tuple[str, ...]


@dataclass
class Stage:
    index: int
    name: str | None
    base: str  # the FROM image or stage name, ARGs substituted
    instructions: list[Instruction] = field(default_factory=list)
    global_args: dict[str, str] = field(default_factory=dict)

    def of(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def args(self) -> dict[str, str]:
        """The stage's ARGs with their defaults (a bare `ARG X` takes the global one)."""
        out: dict[str, str] = {}
        for instruction in self.of("ARG"):
            for item in shlex.split(instruction.value):
                name, _, default = item.partition("=")
                out[name] = default if "=" in item else self.global_args.get(name, "")
        return out

    def _pairs(self, keyword: str) -> dict[str, str]:
        out: dict[str, str] = {}
        args = self.args()
        for instruction in self.of(keyword):
            for item in shlex.split(instruction.value):
                name, sep, value = item.partition("=")
                assert sep, f"line {instruction.line}: {keyword} {item!r} is not KEY=VALUE"
                out[name] = expand(value, {**args, **out})
        return out

    def env(self) -> dict[str, str]:
        return self._pairs("ENV")

    def labels(self) -> dict[str, str]:
        return self._pairs("LABEL")

    def copies(self) -> list[Copy]:
        out = []
        for instruction in self.of("COPY"):
            words = shlex.split(instruction.value)
            flags = {w.split("=", 1)[0]: w.split("=", 1)[-1] for w in words if w.startswith("--")}
            paths = [w for w in words if not w.startswith("--")]
            if paths and paths[0].startswith("["):
                paths = json.loads(" ".join(paths))
            out.append(Copy(tuple(paths[:-1]), paths[-1], flags.get("--from")))
        return out

    def user(self) -> str | None:
        users = self.of("USER")
        return users[-1].value.strip() if users else None

    def exec_form(self, keyword: str) -> list[str] | None:
        found = self.of(keyword)
        if not found:
            return None
        value = json.loads(found[-1].value)  # the exec (JSON) form; shell form fails here
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)
        return value

    def commands(self) -> Iterator[list[str]]:
        """Every simple command of every RUN line (split at `;`, `&&`, `||`, `|`)."""
        for instruction in self.of("RUN"):
            lexer = shlex.shlex(instruction.value, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            command: list[str] = []
            for token in lexer:
                if set(token) <= _PUNCTUATION:
                    if command:
                        yield command
                    command = []
                else:
                    command.append(token)
            if command:
                yield command

    def pip_commands(self) -> list[PipCommand]:
        return [pip for command in self.commands() if (pip := parse_pip(command)) is not None]


# pip options that take a value (the rest are flags)
_PIP_VALUED = {
    "--python", "--index-url", "-i", "--extra-index-url", "--find-links", "-f",
    "--wheel-dir", "-w", "--target", "-t", "--prefix", "--root", "--requirement", "-r",
    "--constraint", "-c", "--cache-dir", "--platform", "--python-version",
}  # fmt: skip


def parse_pip(command: list[str]) -> PipCommand | None:
    """`pip ...`, `pip3 ...` or `python -m pip ...` as subcommand, options, arguments."""
    words = list(command)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words.pop(0)  # VAR=value prefixes
    if not words:
        return None
    program = words[0].rsplit("/", 1)[-1]
    if re.fullmatch(r"pip3?(\.\d+)?", program):
        rest = words[1:]
    elif re.fullmatch(r"python3?(\.\d+)?", program) and words[1:3] == ["-m", "pip"]:
        rest = words[3:]
    else:
        return None
    options: dict[str, str | None] = {}
    arguments: list[str] = []
    subcommand = ""
    i = 0
    while i < len(rest):
        word = rest[i]
        if word.startswith("-"):
            name, eq, value = word.partition("=")
            if eq:
                options[name] = value
            elif name in _PIP_VALUED:
                options[name] = rest[i + 1]
                i += 1
            else:
                options[name] = None
        elif not subcommand:
            subcommand = word
        else:
            arguments.append(word)
        i += 1
    return PipCommand(subcommand, options, tuple(arguments))


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        (found,) = [s for s in self.stages if s.name == name]
        return found

    def external_bases(self) -> list[str]:
        """The images FROM lines pull (stage names excluded)."""
        names = {s.name for s in self.stages if s.name}
        return [s.base for s in self.stages if s.base not in names]


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) of each instruction: comments dropped, `\\` joined."""
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        yield start, " ".join(p for p in pending if p)
        pending = []
    assert not pending, f"line {start}: a continuation runs past the end of the file"


def parse(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in logical_lines(path.read_text(encoding="utf-8")):
        keyword, _, value = line.partition(" ")
        keyword = keyword.upper()
        value = value.strip()
        if keyword == "FROM":
            words = [w for w in value.split() if not w.startswith("--platform")]
            base = expand(words[0], global_args)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), f"{path.name}:{number}: FROM {value!r}"
            stages.append(Stage(len(stages), name, base, global_args=dict(global_args)))
        elif not stages:
            assert keyword == "ARG", f"{path.name}:{number}: {keyword} before the first FROM"
            for item in shlex.split(value):
                name, _, default = item.partition("=")
                global_args[name] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, value, number))
    assert stages, f"{path.name} has no FROM"
    return Dockerfile(path, global_args, stages)


# --- .dockerignore ---------------------------------------------------------------------


@dataclass(frozen=True)
class IgnoreRule:
    pattern: str
    regex: re.Pattern[str]
    exclude: bool  # False for a `!` exception


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def ignore_rules(path: Path) -> list[IgnoreRule]:
    rules = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        rules.append(IgnoreRule(pattern, _pattern_regex(pattern), exclude))
    return rules


def ignored(relative: str, rules: list[IgnoreRule]) -> bool:
    """Whether Docker leaves `relative` (a posix path in the context) out of the build."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for rule in rules:
        if any(rule.regex.fullmatch(p) for p in prefixes):
            result = rule.exclude
    return result


def build_context(root: Path, rules: list[IgnoreRule]) -> list[str]:
    """The files (relative posix paths) that the build context of `root` holds."""
    prune = all(rule.exclude for rule in rules)  # no exception can bring a file back
    found: list[str] = []

    def walk(folder: Path) -> None:
        for entry in sorted(folder.iterdir()):
            relative = entry.relative_to(root).as_posix()
            if entry.is_dir() and not entry.is_symlink():
                if not (prune and ignored(relative, rules)):
                    walk(entry)
            elif not ignored(relative, rules):
                found.append(relative)

    walk(root)
    return found
