"""Error feedback for lossy delta encodings (bf16, int8, codebook): what rounding drops this round
is sent next round.

Quantising a delta loses `residual = sent - decode(encode(sent))`. With error feedback
the participant keeps that residual locally and adds it to its next round's delta before
anything else (differential-privacy clipping included), so over rounds the shared model
receives what the participant trained, not what the rounding kept: the error stays
bounded instead of accumulating.

The participant keeps one file per round, the fp32 delta it sent (`sent-<round>.npz`,
with the plan and base it was made for), in its own work directory, never in the store:
the residual is private like the data. The residual is recomputed from that file (the
encoding is deterministic), and the same file makes a retried upload send the very same
bytes. In Kubernetes the work directory survives from one round's pod to the next only
on a persistent volume (the Participant's `spec.workspace`); with an emptyDir every
round starts from a zero residual, and the trainer says so in its log.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tapestry_protocol.files import atomic_file, atomic_write_text
from tapestry_protocol.shards import FloatArray, decode_delta, encode_delta

LOSSLESS = "fp32"  # the one encoding with nothing to feed back
DIRECTORY = "error-feedback"  # under the work directory: <federation>/<participant>/
_SENT = "sent-{round}.npz"
_RECORD = "sent-{round}.json"


def quantisation_residual(sent: Mapping[str, FloatArray], encoding: str) -> dict[str, FloatArray]:
    """What `encoding` drops of `sent`: `sent - decode(encode(sent))`, per tensor."""
    out: dict[str, FloatArray] = {}
    for name, values in sent.items():
        decoded = decode_delta(encode_delta(name, values, encoding), name, encoding)
        out[name] = (values - decoded).astype(np.float32)
    return out


def add(
    delta: Mapping[str, FloatArray], residual: Mapping[str, FloatArray]
) -> dict[str, FloatArray]:
    """`delta + residual`, tensor by tensor (the shapes are checked by `Workspace.carried`)."""
    return {name: (values + residual[name]).astype(np.float32) for name, values in delta.items()}


@dataclass(frozen=True)
class Carried:
    """The residual an earlier round left, and which round that was."""

    round: int
    residual: dict[str, FloatArray]


@dataclass(frozen=True)
class Workspace:
    """One participant's error-feedback files in one federation."""

    directory: Path

    @classmethod
    def at(cls, workdir: Path, federation: str, participant: str) -> Workspace:
        return cls(workdir / DIRECTORY / federation / participant)

    def _rounds(self) -> list[int]:
        """The rounds with a sent delta on disk, ascending."""
        found = []
        for path in self.directory.glob("sent-*.json"):
            number = path.stem.removeprefix("sent-")
            if number.isdigit() and (self.directory / _SENT.format(round=number)).exists():
                found.append(int(number))
        return sorted(found)

    def _record(self, round_number: int) -> dict[str, str]:
        path = self.directory / _RECORD.format(round=round_number)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _load(self, round_number: int, like: Mapping[str, FloatArray]) -> dict[str, FloatArray]:
        """The sent delta of a round, or {} when it does not match `like`'s tensors (the
        model changed): a residual of another shape cannot be carried."""
        try:
            with np.load(self.directory / _SENT.format(round=round_number)) as saved:
                if set(saved.files) != set(like):
                    return {}
                arrays = {name: saved[name].astype(np.float32) for name in like}
        except (OSError, ValueError):
            return {}
        if any(arrays[n].shape != like[n].shape for n in like):
            return {}
        return arrays

    def carried(self, before_round: int, like: Mapping[str, FloatArray]) -> Carried | None:
        """The residual of this participant's latest round before `before_round`, or None
        when there is none that fits this model."""
        earlier = [r for r in self._rounds() if r < before_round]
        if not earlier:
            return None
        latest = earlier[-1]
        encoding = self._record(latest).get("encoding", LOSSLESS)
        sent = self._load(latest, like)
        if not sent or encoding == LOSSLESS:
            return None
        return Carried(latest, quantisation_residual(sent, encoding))

    def release(
        self, round_number: int, made_for: str, delta: Mapping[str, FloatArray], encoding: str
    ) -> dict[str, FloatArray]:
        """The delta to send this round, kept on disk first: a retried upload of the same
        round (same plan and base, `made_for`) sends the saved one, so the bytes in the
        store and the residual carried next round agree. Keeps this round's file and the
        newest earlier one (in case this round is re-planned), drops older ones."""
        if self._record(round_number).get("madeFor") == made_for:
            saved = self._load(round_number, delta)
            if saved:
                return saved
        self.directory.mkdir(parents=True, exist_ok=True)
        sent = {name: np.ascontiguousarray(v, dtype=np.float32) for name, v in delta.items()}
        with atomic_file(self.directory / _SENT.format(round=round_number), mode=0o600) as f:
            np.savez(f, **sent)  # type: ignore[arg-type]
        record = {"round": round_number, "madeFor": made_for, "encoding": encoding}
        atomic_write_text(
            self.directory / _RECORD.format(round=round_number),
            json.dumps(record) + "\n",
            mode=0o600,
        )
        earlier = [r for r in self._rounds() if r < round_number]
        for old in earlier[:-1]:
            for name in (_SENT, _RECORD):
                (self.directory / name.format(round=old)).unlink(missing_ok=True)
        return sent
