"""The names a round's status uses: member states, round phases, condition reasons.

They appear in `FederationRound.status`, `Participant.status`, Kubernetes events and the
local runner's output, so they are stable API: add new ones, never rename.
"""

from __future__ import annotations

from enum import StrEnum


class MemberState(StrEnum):
    """Where one member of a round stands, as the coordinator sees it through the store."""

    PLANNED = "Planned"  # named in the plan, no answer yet
    ACCEPTED = "Accepted"  # its receipt says training started
    DECLINED = "Declined"  # its admission policy refused the plan
    TRAINING = "Training"  # the participant's own view: its Job runs
    UPLOADED = "Uploaded"  # its update manifest is committed
    MERGED = "Merged"  # the result merged it, with a weight
    REJECTED = "Rejected"  # the result refused it, with a reason
    LATE = "Late"  # no update when the round closed
    FAILED = "Failed"  # its training failed for good


class RoundPhase(StrEnum):
    """A round's phase: the `phase` printer column."""

    PENDING = "Pending"  # waiting for the previous round or the base
    TRAINING = "Training"  # the plan is out; members train
    AGGREGATING = "Aggregating"  # closed; the aggregator merges
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class JobState(StrEnum):
    """What the driver knows of a Job (or process) it launched: training or aggregation."""

    ABSENT = "Absent"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"  # failed for good (its retries are spent)


# Condition types, as kstatus and Argo CD read them.
READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"


class Reason(StrEnum):
    """CamelCase reasons of conditions and events, all in one place."""

    WAITING_FOR_BASE = "WaitingForBase"
    PLAN_PUBLISHED = "PlanPublished"
    WAITING_FOR_MEMBERS = "WaitingForMembers"
    CLOSED = "Closed"
    AGGREGATING = "Aggregating"
    AGGREGATOR_FAILED = "AggregatorFailed"
    SUCCEEDED = "Succeeded"
    NO_QUORUM = "NoQuorum"
    SUSPENDED = "Suspended"
    DUPLICATE_ROUND = "DuplicateRound"
    INVALID_SPEC = "InvalidSpec"
    STORE_UNAVAILABLE = "StoreUnavailable"
    PREVIOUS_ROUND_FAILED = "PreviousRoundFailed"
    # store identities (spec.store.identities)
    STORE_IDENTITY_ISSUED = "StoreIdentityIssued"
    STORE_IDENTITY_REVOKED = "StoreIdentityRevoked"
    STORE_IDENTITY_REMOVED = "StoreIdentityRemoved"
    STORE_IDENTITY_FAILED = "StoreIdentityFailed"
    # participant side
    PLAN_REFUSED = "PlanRefused"
    AWAITING_APPROVAL = "AwaitingApproval"
    APPROVAL_DENIED = "ApprovalDenied"
    ADMITTED = "Admitted"
    TRAINING = "Training"
    TRAINING_FAILED = "TrainingFailed"
    UPLOADED = "Uploaded"
    MERGED = "Merged"
    REJECTED = "Rejected"
    DEADLINE_PASSED = "DeadlinePassed"
    NOT_A_MEMBER = "NotAMember"
