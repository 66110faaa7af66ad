"""Why an update (or a plan, or a base) was refused.

Every refusal carries one of these reason codes and a human-readable message. The
codes end up in `FederationRound.status` and in `result.json`, so they are stable
API: add new ones, never rename.
"""

from __future__ import annotations

UNKNOWN_SCHEMA_VERSION = "UnknownSchemaVersion"
MALFORMED_DOCUMENT = "MalformedDocument"
MISSING_MANIFEST = "MissingManifest"
MISSING_SHARD = "MissingShard"
EXTRA_SHARD = "ExtraShard"
SIZE_MISMATCH = "SizeMismatch"
HASH_MISMATCH = "HashMismatch"
MISSING_SIGNATURE = "MissingSignature"
BAD_SIGNATURE = "BadSignature"
UNKNOWN_SIGNER = "UnknownSigner"
WRONG_FEDERATION = "WrongFederation"
WRONG_ROUND = "WrongRound"
WRONG_PARTICIPANT = "WrongParticipant"
WRONG_PLAN = "WrongPlan"
WRONG_BASE = "WrongBase"
TENSOR_MISMATCH = "TensorMismatch"
NON_FINITE = "NonFiniteValues"
TRAINING_FAILED = "TrainingFailed"
DELTA_TOO_LARGE = "DeltaTooLarge"
UNREADABLE_UPDATE = "UnreadableUpdate"
LATE = "Late"
DECLINED = "Declined"
NOT_CLOSED = "NotClosed"
MISSING_OPTIMIZER_STATE = "MissingOptimizerState"
NO_QUORUM = "NoQuorum"
WORSE_ON_VALIDATION = "WorseOnValidation"

ALL_REASONS = frozenset(
    {
        UNKNOWN_SCHEMA_VERSION,
        MALFORMED_DOCUMENT,
        MISSING_MANIFEST,
        MISSING_SHARD,
        EXTRA_SHARD,
        SIZE_MISMATCH,
        HASH_MISMATCH,
        MISSING_SIGNATURE,
        BAD_SIGNATURE,
        UNKNOWN_SIGNER,
        WRONG_FEDERATION,
        WRONG_ROUND,
        WRONG_PARTICIPANT,
        WRONG_PLAN,
        WRONG_BASE,
        TENSOR_MISMATCH,
        NON_FINITE,
        TRAINING_FAILED,
        DELTA_TOO_LARGE,
        UNREADABLE_UPDATE,
        LATE,
        DECLINED,
        NOT_CLOSED,
        MISSING_OPTIMIZER_STATE,
        NO_QUORUM,
        WORSE_ON_VALIDATION,
    }
)

# What a robust-aggregation policy did to an update it still merged (a result's
# `adjustments`); stable API like the refusal reasons above.
CLIPPED = "Clipped"
TOKENS_CAPPED = "TokensCapped"
TRIMMED = "Trimmed"

ADJUSTMENTS = frozenset({CLIPPED, TOKENS_CAPPED, TRIMMED})


class Rejected(Exception):
    """A protocol object failed verification; `reason` is one of the codes above."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in ALL_REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
