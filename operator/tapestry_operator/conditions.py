"""Status conditions in the metav1.Condition shape, as kstatus and Argo CD read them.

`Ready` when done, `Reconciling=True` while work is in progress, `Stalled=True` with a
reason on terminal failure (kstatus never reads `Ready=False` as failed). Transition
times change only when a condition's status does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tapestry_lifecycle.states import READY, RECONCILING, STALLED
from tapestry_protocol.documents import rfc3339


@dataclass(frozen=True)
class Health:
    """The three conditions' meaning for one visit."""

    ready: bool
    reconciling: bool
    stalled: bool
    reason: str
    message: str

    @classmethod
    def working(cls, reason: str, message: str) -> Health:
        return cls(False, True, False, reason, message)

    @classmethod
    def done(cls, reason: str, message: str) -> Health:
        return cls(True, False, False, reason, message)

    @classmethod
    def failed(cls, reason: str, message: str) -> Health:
        return cls(False, False, True, reason, message)

    @classmethod
    def idle(cls, reason: str, message: str) -> Health:
        """Nothing to do now and nothing wrong (e.g. suspended)."""
        return cls(False, False, False, reason, message)


def conditions(
    previous: Sequence[Mapping[str, Any]] | None, health: Health, generation: int, now: datetime
) -> list[dict[str, Any]]:
    """The new condition list; other condition types set by others are kept."""
    stamp = rfc3339(now)
    old = {c.get("type"): c for c in previous or []}
    wanted = {
        READY: health.ready,
        RECONCILING: health.reconciling,
        STALLED: health.stalled,
    }
    out: list[dict[str, Any]] = [dict(c) for t, c in old.items() if t not in wanted]
    for kind, value in wanted.items():
        status = "True" if value else "False"
        before = old.get(kind)
        since = before.get("lastTransitionTime") if before else None
        if before is None or before.get("status") != status or not since:
            since = stamp
        out.append(
            {
                "type": kind,
                "status": status,
                "observedGeneration": generation,
                "lastTransitionTime": since,
                "reason": health.reason,
                "message": health.message[:32768],
            }
        )
    return out
