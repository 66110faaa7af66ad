"""Status conditions as kstatus and Argo CD read them: Ready, Reconciling and Stalled,
with observedGeneration, and transition times that move only when a status does."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema
import pytest

from tapestry_lifecycle.states import READY, RECONCILING, STALLED, Reason
from tapestry_operator.conditions import Health, conditions
from tapestry_operator.coordinator import SETTLED_RECHECK_S, reconcile_round
from tests.operator.crd_defaults import schema

T0 = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=3)
STAMP0, STAMP1 = "2025-06-01T12:00:00Z", "2025-06-01T12:03:00Z"
OURS = (READY, RECONCILING, STALLED)

Condition = dict[str, Any]


def by_type(items: list[Condition]) -> dict[str, Condition]:
    out = {c["type"]: c for c in items}
    assert len(out) == len(items), "condition types must be unique (a list-map keyed by type)"
    return out


def statuses(items: list[Condition]) -> dict[str, str]:
    return {t: c["status"] for t, c in by_type(items).items() if t in OURS}


@pytest.mark.parametrize(
    ("health", "expected"),
    [
        (Health.working(Reason.TRAINING, "training"), ("False", "True", "False")),
        (Health.done(Reason.SUCCEEDED, "done"), ("True", "False", "False")),
        (Health.failed(Reason.AGGREGATOR_FAILED, "exit 2"), ("False", "False", "True")),
        (Health.idle(Reason.SUSPENDED, "suspended"), ("False", "False", "False")),
    ],
    ids=["working", "done", "failed", "idle"],
)
def test_the_three_conditions_from_the_first_visit(
    health: Health, expected: tuple[str, str, str]
) -> None:
    got = by_type(conditions(None, health, 3, T0))
    assert set(got) == set(OURS)
    assert tuple(got[t]["status"] for t in OURS) == expected
    for c in got.values():
        assert c == {
            "type": c["type"],
            "status": c["status"],
            "observedGeneration": 3,
            "lastTransitionTime": STAMP0,
            "reason": str(health.reason),
            "message": health.message,
        }


def test_an_empty_previous_list_is_a_first_visit() -> None:
    assert conditions([], Health.done("Succeeded", "ok"), 1, T0) == conditions(
        None, Health.done("Succeeded", "ok"), 1, T0
    )


def test_transition_times_stay_while_statuses_do() -> None:
    first = conditions(None, Health.working(Reason.PLAN_PUBLISHED, "publishing"), 1, T0)
    again = by_type(conditions(first, Health.working(Reason.WAITING_FOR_MEMBERS, "1/3"), 2, T1))
    for t in OURS:
        assert again[t]["lastTransitionTime"] == STAMP0
        assert again[t]["reason"] == "WaitingForMembers"  # reason and message follow the visit
        assert again[t]["message"] == "1/3"
        assert again[t]["observedGeneration"] == 2


def test_transition_times_move_when_a_status_changes() -> None:
    first = conditions(None, Health.working(Reason.AGGREGATING, "merging"), 1, T0)
    done = by_type(conditions(first, Health.done(Reason.SUCCEEDED, "merged"), 1, T1))
    assert done[READY]["status"] == "True" and done[READY]["lastTransitionTime"] == STAMP1
    assert done[RECONCILING]["status"] == "False"
    assert done[RECONCILING]["lastTransitionTime"] == STAMP1
    assert done[STALLED]["status"] == "False"
    assert done[STALLED]["lastTransitionTime"] == STAMP0  # False before, False now


def test_a_condition_without_a_transition_time_gets_one() -> None:
    previous = [{"type": READY, "status": "False", "reason": "Old", "message": ""}]
    got = by_type(conditions(previous, Health.working("Training", "t"), 1, T1))
    assert got[READY]["lastTransitionTime"] == STAMP1


def test_foreign_condition_types_are_kept_as_they_are() -> None:
    foreign = {
        "type": "example.com/Audited",
        "status": "True",
        "observedGeneration": 1,
        "lastTransitionTime": "2024-01-01T00:00:00Z",
        "reason": "Reviewed",
        "message": "by someone else",
    }
    previous = [*conditions(None, Health.working("Training", "t"), 1, T0), foreign]
    got = conditions(previous, Health.done("Succeeded", "ok"), 2, T1)
    assert by_type(got)["example.com/Audited"] == foreign
    assert statuses(got) == {READY: "True", RECONCILING: "False", STALLED: "False"}
    assert len(got) == 4


def test_the_previous_list_is_not_changed() -> None:
    previous = conditions(None, Health.working("Training", "t"), 1, T0)
    before = copy.deepcopy(previous)
    conditions(previous, Health.failed("TrainingFailed", "exit 3"), 2, T1)
    assert previous == before


def test_a_long_message_is_cut_to_what_the_schema_allows() -> None:
    got = conditions(None, Health.failed("TrainingFailed", "x" * 40000), 1, T0)
    assert all(len(c["message"]) == 32768 for c in got)


def test_conditions_validate_against_the_crd_status_schema() -> None:
    for kind in ("Federation", "FederationRound", "Participant"):
        node = schema(kind)["properties"]["status"]["properties"]["conditions"]
        validator = jsonschema.Draft4Validator(node)
        items: list[Condition] | None = None
        for reason in Reason:
            for health in (Health.working, Health.done, Health.failed, Health.idle):
                items = conditions(items, health(reason, f"{reason} happened"), 7, T1)
                validator.validate(items)


class _NoCluster:
    """Any API call fails the test: a settled round must not need one."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"a settled round called the API ({name})")


def test_a_settled_round_is_not_read_again() -> None:
    status = {
        "observedGeneration": 2,
        "phase": "Succeeded",
        "result": {"outcome": "Succeeded", "message": "merged 3 of 3 updates"},
    }
    body = {
        "metadata": {"name": "r0", "namespace": "c", "generation": 2},
        "spec": {"federation": "demo", "round": 0, "suspend": False},
        "status": status,
    }
    visit = reconcile_round(_NoCluster(), body, datetime(2030, 1, 1, tzinfo=UTC))  # type: ignore[arg-type]
    assert visit.status == status and visit.after == SETTLED_RECHECK_S
    body["metadata"]["generation"] = 3  # a new spec is looked at again
    with pytest.raises(AssertionError, match="called the API"):
        reconcile_round(_NoCluster(), body, datetime(2030, 1, 1, tzinfo=UTC))  # type: ignore[arg-type]
