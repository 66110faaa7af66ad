"""Where every protocol object lives in the store: the one place that spells out keys.

    federations/<fed>/bases/<round>/{manifest.json, part-NNNNN-<hash>.safetensors}
    federations/<fed>/rounds/<round>/plan.json
    federations/<fed>/rounds/<round>/receipts/<participant>/{accepted,declined,failed}.json
    federations/<fed>/rounds/<round>/updates/<participant>/{manifest.json, part-NNNNN-<hash>...}
    federations/<fed>/rounds/<round>/close.json
    federations/<fed>/rounds/<round>/result.json
    federations/<fed>/rounds/<round>/parts/<K>/<k>-{check,merge}.json
    federations/<fed>/optimizer/<round>/{manifest.json, part-NNNNN-<hash>.safetensors}

`bases/<r>` is the model that round r trains from; round r's result publishes
`bases/<r+1>` and `optimizer/<r+1>` (the outer-optimizer state that goes with it).
Rounds are zero-padded so that listing returns them in order. `parts/<K>/` holds what
the K parts of a scaled-out aggregation exchange before the one commit of the result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = 63
MANIFEST = "manifest.json"


def validate_name(kind: str, name: str) -> str:
    """Federation and participant names are DNS-1123 labels, like Kubernetes names."""
    if not isinstance(name, str) or len(name) > MAX_NAME or not NAME_RE.match(name):
        raise ValueError(
            f"{kind} name {name!r} is invalid: use 1-63 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit"
        )
    return name


def shard_name(index: int, sha256: str) -> str:
    """Shard objects are content-addressed, so a retried or racing writer never has to
    overwrite one: the same name always means the same bytes."""
    return f"part-{index:05d}-{sha256[:16]}.safetensors"


MAX_ROUND = 999_999  # six digits keep listings in order; the schemas say the same


def round_dir(round_number: int) -> str:
    if not 0 <= round_number <= MAX_ROUND:
        raise ValueError(f"round must be between 0 and {MAX_ROUND}, got {round_number}")
    return f"{round_number:06d}"


MAX_PARTS = 999  # three digits: a scaled-out aggregation has at most this many parts


def check_part(part: int, parts: int) -> None:
    """A part index `part` of `parts`: 0 <= part < parts <= MAX_PARTS."""
    if not 1 <= parts <= MAX_PARTS:
        raise ValueError(f"parts must be between 1 and {MAX_PARTS}, got {parts}")
    if not 0 <= part < parts:
        raise ValueError(f"part must be between 0 and {parts - 1} (of {parts}), got {part}")


@dataclass(frozen=True)
class Layout:
    """Keys of one federation, optionally below a prefix inside the bucket."""

    federation: str
    prefix: str = ""

    def __post_init__(self) -> None:
        validate_name("federation", self.federation)

    @property
    def root(self) -> str:
        return f"{self.prefix.strip('/')}/federations/{self.federation}/".lstrip("/")

    def base_dir(self, round_number: int) -> str:
        return f"{self.root}bases/{round_dir(round_number)}/"

    def base_manifest(self, round_number: int) -> str:
        return self.base_dir(round_number) + MANIFEST

    def optimizer_dir(self, round_number: int) -> str:
        return f"{self.root}optimizer/{round_dir(round_number)}/"

    def optimizer_manifest(self, round_number: int) -> str:
        return self.optimizer_dir(round_number) + MANIFEST

    def rounds_prefix(self) -> str:
        return f"{self.root}rounds/"

    def round_prefix(self, round_number: int) -> str:
        return f"{self.rounds_prefix()}{round_dir(round_number)}/"

    def plan(self, round_number: int) -> str:
        return self.round_prefix(round_number) + "plan.json"

    def result(self, round_number: int) -> str:
        return self.round_prefix(round_number) + "result.json"

    def close(self, round_number: int) -> str:
        return self.round_prefix(round_number) + "close.json"

    def part(self, round_number: int, part: int, parts: int, phase: str) -> str:
        """Part `part` of `parts`' `phase` object ("check" or "merge"); K is in the key,
        so runs with another number of parts never meet."""
        check_part(part, parts)
        if phase not in ("check", "merge"):
            raise ValueError(f"a part's phase is check or merge, not {phase!r}")
        return f"{self.round_prefix(round_number)}parts/{parts:03d}/{part:03d}-{phase}.json"

    def receipt(self, round_number: int, participant: str, state: str) -> str:
        """`state` is a receipt state (Accepted, Declined, Failed); one object each."""
        validate_name("participant", participant)
        return f"{self.round_prefix(round_number)}receipts/{participant}/{state.lower()}.json"

    def updates_prefix(self, round_number: int) -> str:
        return self.round_prefix(round_number) + "updates/"

    def update_dir(self, round_number: int, participant: str) -> str:
        validate_name("participant", participant)
        return f"{self.updates_prefix(round_number)}{participant}/"

    def update_manifest(self, round_number: int, participant: str) -> str:
        return self.update_dir(round_number, participant) + MANIFEST

    def model_round(self, key: str, role: str = "base") -> int:
        """The round of a base or optimizer manifest key of this federation."""
        folder = "bases" if role == "base" else "optimizer"
        head = f"{self.root}{folder}/"
        rest = key[len(head) :] if key.startswith(head) else ""
        number, _, name = rest.partition("/")
        if not number.isdigit() or name != MANIFEST:
            raise ValueError(f"{key!r} is not a {role} manifest of federation {self.federation}")
        return int(number)

    def round_numbers(self, keys: list[str]) -> list[int]:
        """Round numbers that appear in a listing of `rounds_prefix()`."""
        found: set[int] = set()
        start = len(self.rounds_prefix())
        for key in keys:
            head = key[start:].split("/", 1)[0]
            if head.isdigit():
                found.add(int(head))
        return sorted(found)
