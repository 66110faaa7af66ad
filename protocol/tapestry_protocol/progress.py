"""How far a piece of work has got: one typed event, written and read as JSON lines.

The trainer appends one event per inner step and one when its update is uploaded; the
local runner tails that file for its progress bars; the aggregator reports one event per
merged shard to a callback. All of them speak :class:`ProgressEvent`::

    {"phase": "train", "done": 12, "total": 40, "loss": 2.317}
    {"phase": "upload", "done": 40, "total": 40, "message": "uploading the update"}
    {"phase": "done", "done": 40, "total": 40, "loss": 2.2, "message": "uploaded",
     "extra": {"manifest": "...", "tokens": 81920, ...}}
    {"phase": "merge", "done": 3, "total": 7}            (done = shards merged so far)

A file of events is written with :func:`append`, one ``write`` per line, so a reader
sees whole lines and at most a half-written last one; :func:`last_event` reads only the
file's tail and skips such a line.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any


class Phase(StrEnum):
    """What the work is doing; the JSON form is the lower-case value."""

    TRAIN = "train"  # inner steps: done of total steps, with the step's loss
    UPLOAD = "upload"  # training finished, the update is being published
    MERGE = "merge"  # aggregation: done of total shards merged
    DONE = "done"  # finished; extra carries the summary
    FAILED = "failed"  # gave up; message says why


@dataclass(frozen=True)
class ProgressEvent:
    """``done`` of ``total`` units of ``phase``; ``loss``, ``message`` and ``extra`` are
    optional. ``extra`` must be JSON-serialisable."""

    phase: Phase
    done: int = 0
    total: int = 0
    loss: float | None = None
    message: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.phase, Phase):
            object.__setattr__(self, "phase", Phase(self.phase))
        if self.done < 0 or self.total < 0:
            raise ValueError(f"done and total must be >= 0, got {self.done}/{self.total}")

    @property
    def fraction(self) -> float | None:
        """``done / total`` in [0, 1], or None when the total is unknown (0)."""
        return min(1.0, self.done / self.total) if self.total else None

    @property
    def finished(self) -> bool:
        return self.phase in (Phase.DONE, Phase.FAILED)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"phase": self.phase.value, "done": self.done, "total": self.total}
        if self.loss is not None:
            out["loss"] = self.loss if math.isfinite(self.loss) else None
        if self.message:
            out["message"] = self.message
        if self.extra:
            out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProgressEvent:
        """Raises ValueError (or TypeError) for anything that is not an event."""
        loss = data.get("loss")
        extra = data.get("extra", {})
        if not isinstance(extra, Mapping):
            raise ValueError("extra must be an object")
        return cls(
            phase=Phase(data["phase"]),
            done=_count(data.get("done", 0)),
            total=_count(data.get("total", 0)),
            loss=None if loss is None else float(loss),
            message=str(data.get("message", "")),
            extra=dict(extra),
        )

    def to_line(self) -> str:
        """One JSON line, newline included; never contains another newline."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False) + "\n"

    @classmethod
    def from_line(cls, line: str | bytes) -> ProgressEvent | None:
        """The event on ``line``, or None for a line that is half-written or not an event."""
        try:
            data = json.loads(line)
            return cls.from_dict(data) if isinstance(data, dict) else None
        except (ValueError, TypeError, KeyError):
            return None


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a count, got {value!r}")
    return value


#: A callback that receives events as they happen (e.g. the aggregator's per-shard one).
ProgressCallback = Callable[[ProgressEvent], None]


def append(path: Path | str, event: ProgressEvent) -> None:
    """Append ``event`` to ``path`` as one line, in one ``write`` (``O_APPEND``)."""
    data = event.to_line().encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        while written < len(data):  # only on a full disk or a signal; finish the line
            written += os.write(fd, data[written:])
    finally:
        os.close(fd)


def last_event(path: Path | str, tail_bytes: int = 4096) -> ProgressEvent | None:
    """The newest complete event in ``path``, reading at most its last ``tail_bytes``;
    None if there is no file or no complete event in the tail."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - tail_bytes)
            f.seek(max(0, start - 1))  # one byte more: does the tail start a line?
            data = f.read()
    except FileNotFoundError:
        return None
    if start > 0:  # drop the tail's first line unless a newline precedes it: it is cut
        data = data[data.find(b"\n") + 1 :] if b"\n" in data else b""
    for line in reversed(data.split(b"\n")):
        event = ProgressEvent.from_line(line) if line.strip() else None
        if event is not None:
            return event
    return None


def read_events(path: Path | str) -> list[ProgressEvent]:
    """Every complete event in ``path``, oldest first (lines that are not events skipped)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    events = (ProgressEvent.from_line(line) for line in data.split(b"\n") if line.strip())
    return [e for e in events if e is not None]
