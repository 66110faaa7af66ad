"""Check a whole federation's history with nothing but the store and the coordinator's key.

`verify_federation` walks from round 0's base to the latest round and checks every
link of the chain with the same readers the coordinator, the participants and the
aggregator use (`tapestry_protocol.exchange`), so "verified" means exactly what they
would accept:

- each plan is signed by the coordinator and names the base its round trains from:
  `bases/0` for round 0, otherwise the base the previous round's result published
  (or, after a failed round, the previous plan's base again);
- each receipt is signed by the member key its plan lists;
- the close record is signed and answers the plan;
- each update the result merged is the one the close record included (manifest
  sha256), signed by its member, made for this plan and base, and every shard has the
  size and sha256 its manifest lists;
- the result is signed and names this plan, close record and base; the next base and
  optimizer state it names are signed manifests with those hashes, at the next round's
  keys, and every one of their shards hashes to what the manifest lists.

Updates that the close record included but the result refused are the result's
refusals: the report lists them with the result's reason and does not check them again
(a member's bad update is that member's refusal, not a broken chain). A receipt has no
such record, so a receipt that does not verify fails the walk.

The walk stops at the first object that fails and names it. Memory is bounded by one
chunk of one shard: shards are hashed as they stream, one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from tapestry_protocol import rejections
from tapestry_protocol.documents import (
    CloseRecord,
    ModelManifest,
    Outcome,
    ReceiptState,
    Ref,
    Role,
    RoundPlan,
    RoundResult,
)
from tapestry_protocol.exchange import (
    Verified,
    check_shard,
    read_close,
    read_model,
    read_plan,
    read_receipt,
    read_result,
    read_update,
)
from tapestry_protocol.layout import Layout
from tapestry_protocol.rejections import Rejected
from tapestry_protocol.shards import ShardRef
from tapestry_protocol.store import ObjectStore

#: Bytes read per request while a shard is hashed: the walk's memory, whatever the model.
CHUNK = 1 << 20

_RECEIPT_FILES = {f"{state.lower()}.json": state for state in ReceiptState}


@dataclass(frozen=True)
class Failure:
    """The first object that did not verify: its key, a rejection reason and why."""

    key: str
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.reason}: {self.message}"

    def to_json(self) -> dict[str, str]:
        return {"key": self.key, "reason": self.reason, "message": self.message}


@dataclass(frozen=True)
class Contributor:
    """A merged update, as the verified result records it."""

    participant: str
    weight: float
    tokens: int
    manifest_sha256: str
    adjustments: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "participant": self.participant,
            "weight": self.weight,
            "tokens": self.tokens,
            "manifestSha256": self.manifest_sha256,
            "adjustments": list(self.adjustments),
        }


@dataclass(frozen=True)
class Refused:
    """A member whose update the round did not merge, with the result's reason (a
    refusal by the merge, or what the close record said: late, declined, failed)."""

    participant: str
    reason: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"participant": self.participant, "reason": self.reason, "message": self.message}


@dataclass
class RoundReport:
    """One round as far as it verified. `outcome` is None for a round still open (no
    result yet); `closed` says whether it has a close record."""

    round: int
    base: Ref
    plan_sha256: str
    receipts: dict[str, list[str]] = field(default_factory=dict)
    closed: bool = False
    outcome: str | None = None
    message: str = ""
    contributors: list[Contributor] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    next_base: Ref | None = None
    optimizer_state: Ref | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "base": self.base.to_json(),
            "planSha256": self.plan_sha256,
            "receipts": self.receipts,
            "closed": self.closed,
            "outcome": self.outcome,
            "message": self.message,
            "contributors": [c.to_json() for c in self.contributors],
            "refused": [r.to_json() for r in self.refused],
            "nextBase": None if self.next_base is None else self.next_base.to_json(),
            "optimizerState": (
                None if self.optimizer_state is None else self.optimizer_state.to_json()
            ),
        }


@dataclass
class FederationReport:
    """What the walk verified; `failure` is the object that stopped it (None: all good).

    `rounds` holds only rounds that verified whole; the one that failed is not among them."""

    federation: str
    rounds: list[RoundReport] = field(default_factory=list)
    objects: int = 0
    shard_bytes: int = 0
    latest_base: Ref | None = None
    failure: Failure | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def completed(self) -> int:
        """Rounds with a verified result (an open last round is not counted)."""
        return sum(1 for r in self.rounds if r.outcome is not None)

    def to_json(self) -> dict[str, Any]:
        return {
            "federation": self.federation,
            "verified": self.ok,
            "rounds": [r.to_json() for r in self.rounds],
            "roundsCompleted": self.completed,
            "objects": self.objects,
            "shardBytes": self.shard_bytes,
            "latestBase": None if self.latest_base is None else self.latest_base.to_json(),
            "failure": None if self.failure is None else self.failure.to_json(),
        }


@dataclass(frozen=True)
class VerifyProgress:
    """Where the walk is: round `round` of rounds 0..`last_round`, the objects and
    shard bytes checked so far, and the key just checked."""

    round: int
    last_round: int
    objects: int
    shard_bytes: int
    key: str


VerifyCallback = Callable[[VerifyProgress], None]


class _Failed(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(str(failure))
        self.failure = failure


def _fail(key: str, reason: str, message: str) -> _Failed:
    return _Failed(Failure(key, reason, message))


@contextmanager
def _about(key: str) -> Iterator[None]:
    """Any refusal inside is blamed on `key`, the object being checked."""
    try:
        yield
    except Rejected as e:
        raise _fail(key, e.reason, e.message) from None
    except ValueError as e:  # a key in a plan that is not a key, a ref to no manifest
        raise _fail(key, rejections.MALFORMED_DOCUMENT, str(e)) from None


def verify_federation(
    store: ObjectStore,
    layout: Layout,
    coordinator_key: str,
    *,
    progress: VerifyCallback | None = None,
) -> FederationReport:
    """Walk the federation from round 0 to its latest round (see the module docstring).

    Returns the report; on the first object that fails, `report.failure` names it and
    the report holds the rounds verified before it. Store failures (unreachable, access
    denied) are raised as StoreError: they say nothing about the federation."""
    walk = _Walk(store, layout, coordinator_key, progress)
    try:
        walk.run()
    except _Failed as e:
        walk.report.failure = e.failure
    return walk.report


class _Walk:
    def __init__(
        self,
        store: ObjectStore,
        layout: Layout,
        coordinator_key: str,
        progress: VerifyCallback | None,
    ) -> None:
        self.store = store
        self.layout = layout
        self.key = coordinator_key
        self.progress = progress
        self.report = FederationReport(layout.federation)
        self.round = 0
        self.last_round = 0
        self._hashed: set[tuple[str, str]] = set()  # models whose shards were hashed

    def run(self) -> None:
        rounds = self._round_numbers()
        base_key = self.layout.base_manifest(0)
        if not rounds:
            base = self._model(base_key, None, Role.BASE)
            self.report.latest_base = base.ref
            return
        self.last_round = rounds[-1]
        expected = list(range(rounds[-1] + 1))
        if rounds != expected:
            missing = min(set(expected) - set(rounds))
            raise _fail(
                self.layout.plan(missing),
                rejections.MISSING_MANIFEST,
                f"round {missing} has no objects, but round {rounds[-1]} exists",
            )
        chain: Ref | None = None  # the base the next round must name; None: bases/0
        for r in rounds:
            self.round = r
            chain = self._round(r, chain, last=r == rounds[-1])

    def _round_numbers(self) -> list[int]:
        """Round numbers in the listing, collected as it streams (memory: one per round)."""
        found: set[int] = set()
        start = len(self.layout.rounds_prefix())
        for info in self.store.list(self.layout.rounds_prefix()):
            head = info.key[start:].split("/", 1)[0]
            if head.isdigit():
                found.add(int(head))
        return sorted(found)

    def _counted(self, key: str, shard_bytes: int = 0) -> None:
        self.report.objects += 1
        self.report.shard_bytes += shard_bytes
        if self.progress is not None:
            self.progress(
                VerifyProgress(
                    self.round, self.last_round, self.report.objects, self.report.shard_bytes,
                    key,
                )
            )  # fmt: skip

    # -- one round --------------------------------------------------------------------

    def _round(self, r: int, chain: Ref | None, *, last: bool) -> Ref:
        """Verify round r; return the base round r+1 must name."""
        layout = self.layout
        plan_key = layout.plan(r)
        with _about(plan_key):
            plan = read_plan(self.store, layout, r, self.key)
        self._counted(plan_key)
        named = plan.document.base
        if chain is None:
            if named.manifest != layout.base_manifest(0):
                raise _fail(
                    plan_key,
                    rejections.WRONG_BASE,
                    f"round 0 must train from {layout.base_manifest(0)}, the plan names "
                    f"{named.manifest}",
                )
        elif named != chain:
            raise _fail(
                plan_key,
                rejections.WRONG_BASE,
                f"names base {named.manifest} ({named.sha256[:16]}…), but round {r - 1} "
                f"leaves {chain.manifest} ({chain.sha256[:16]}…)",
            )
        base = self._model(named.manifest, named.sha256, Role.BASE)
        report = RoundReport(r, base.ref, plan.sha256)
        report.receipts = self._receipts(plan)
        close_key, result_key = layout.close(r), layout.result(r)
        has_close, has_result = self.store.exists(close_key), self.store.exists(result_key)
        if not has_result:
            if not last:
                raise _fail(
                    result_key,
                    rejections.MISSING_MANIFEST,
                    f"round {r} has no result, but round {r + 1} has begun",
                )
            if has_close:
                report.closed = True
                self._close(plan)
            self._done(report, base.ref)
            return named
        if not has_close:
            raise _fail(close_key, rejections.NOT_CLOSED, f"round {r} has a result but no close")
        report.closed = True
        close = self._close(plan)
        result = self._result(plan, base, close, report)
        self._done(report, report.next_base or base.ref)
        if result.document.outcome == Outcome.SUCCEEDED and result.document.next_base:
            return result.document.next_base
        return named

    def _done(self, report: RoundReport, latest: Ref) -> None:
        """A round enters the report only once all of it verified."""
        self.report.rounds.append(report)
        self.report.latest_base = latest

    def _receipts(self, plan: Verified[RoundPlan]) -> dict[str, list[str]]:
        """Every object under the round's receipts/, each a receipt that verifies."""
        r = plan.document.round
        prefix = self.layout.round_prefix(r) + "receipts/"
        out: dict[str, list[str]] = {}
        for info in self.store.list(prefix):
            name, _, file = info.key[len(prefix) :].partition("/")
            state = _RECEIPT_FILES.get(file)
            if state is None or "/" in file:
                raise _fail(
                    info.key,
                    rejections.MALFORMED_DOCUMENT,
                    "not a receipt: receipts are <participant>/{accepted,declined,failed}.json",
                )
            with _about(info.key):
                read_receipt(self.store, self.layout, plan, name, state)
            self._counted(info.key)
            out.setdefault(name, []).append(str(state))
        return out

    def _close(self, plan: Verified[RoundPlan]) -> Verified[CloseRecord]:
        r = plan.document.round
        key = self.layout.close(r)
        with _about(key):
            close = read_close(self.store, self.layout, r, self.key)
        self._counted(key)
        document = close.document
        if document.plan_sha256 != plan.sha256:
            raise _fail(key, rejections.WRONG_PLAN, "closes another plan of this round")
        names = [i.participant for i in document.included] + [
            e.participant for e in document.excluded
        ]
        strangers = sorted(set(names) - set(plan.document.names))
        if strangers or len(set(names)) != len(names):
            raise _fail(
                key,
                rejections.MALFORMED_DOCUMENT,
                f"lists members the plan does not ({strangers[:3]}) or one member twice",
            )
        return close

    def _result(
        self,
        plan: Verified[RoundPlan],
        base: Verified[ModelManifest],
        close: Verified[CloseRecord],
        report: RoundReport,
    ) -> Verified[RoundResult]:
        r = plan.document.round
        key = self.layout.result(r)
        with _about(key):
            result = read_result(self.store, self.layout, r, self.key)
        self._counted(key)
        doc = result.document
        for said, actual, what, reason in (
            (doc.plan_sha256, plan.sha256, "plan", rejections.WRONG_PLAN),
            (doc.base_sha256, base.sha256, "base", rejections.WRONG_BASE),
            (doc.close_sha256, close.sha256, "close record", rejections.HASH_MISMATCH),
        ):
            if said != actual:
                raise _fail(
                    key, reason, f"names {what} sha256 {said[:16]}…, the round's is {actual[:16]}…"
                )
        included = {i.participant: i.manifest_sha256 for i in close.document.included}
        for contribution in doc.accepted:
            name = contribution.participant
            if included.get(name) != contribution.manifest_sha256:
                raise _fail(
                    key,
                    rejections.HASH_MISMATCH,
                    f"merged {name}'s update {contribution.manifest_sha256[:16]}…, which the "
                    "close record does not include",
                )
        for contribution in doc.accepted:
            self._update(plan, base, contribution.participant, contribution.manifest_sha256)
            report.contributors.append(
                Contributor(
                    contribution.participant, contribution.weight, contribution.tokens,
                    contribution.manifest_sha256,
                    tuple(a.reason for a in contribution.adjustments),
                )
            )  # fmt: skip
        strangers = sorted({x.participant for x in doc.rejected} - set(plan.document.names))
        if strangers:
            raise _fail(key, rejections.MALFORMED_DOCUMENT, f"refuses non-members {strangers[:3]}")
        report.refused = [Refused(x.participant, x.reason, x.message) for x in doc.rejected]
        report.outcome, report.message = str(doc.outcome), doc.message
        if doc.outcome == Outcome.SUCCEEDED:
            next_base = doc.next_base
            if next_base is None:
                raise _fail(key, rejections.MISSING_MANIFEST, "succeeded but names no next base")
            self._expect_at(key, next_base, self.layout.base_manifest(r + 1), "next base")
            self._model(next_base.manifest, next_base.sha256, Role.BASE)
            report.next_base = next_base
        if doc.optimizer_state is not None:
            state = doc.optimizer_state
            self._expect_at(key, state, self.layout.optimizer_manifest(r + 1), "optimizer state")
            self._model(state.manifest, state.sha256, Role.OPTIMIZER)
            report.optimizer_state = state
        return result

    def _expect_at(self, key: str, ref: Ref, where: str, what: str) -> None:
        if ref.manifest != where:
            raise _fail(
                key, rejections.MALFORMED_DOCUMENT, f"its {what} is {ref.manifest}, not {where}"
            )

    # -- manifests and shards ---------------------------------------------------------

    def _update(
        self, plan: Verified[RoundPlan], base: Verified[ModelManifest], name: str, sha256: str
    ) -> None:
        r = plan.document.round
        key = self.layout.update_manifest(r, name)
        with _about(key):
            update = read_update(self.store, self.layout, plan, base, name)
        if update.sha256 != sha256:
            raise _fail(
                key,
                rejections.HASH_MISMATCH,
                f"has sha256 {update.sha256[:16]}…, the close record and result name "
                f"{sha256[:16]}…",
            )
        self._counted(key)
        for ref in update.document.shards:
            self._shard(update.directory, ref)

    def _model(self, key: str, sha256: str | None, role: Role) -> Verified[ModelManifest]:
        """A base or optimizer manifest and, once per walk, every one of its shards."""
        with _about(key):
            if sha256 is None and not self.store.exists(key):
                raise Rejected(rejections.MISSING_MANIFEST, "the federation has no first base")
            model = read_model(
                self.store, self.layout, key, self.key, role=role, expected_sha256=sha256
            )
        if (key, model.sha256) not in self._hashed:
            self._counted(key)
            for ref in model.document.shards:
                self._shard(model.directory, ref)
            self._hashed.add((key, model.sha256))
        return model

    def _shard(self, directory: str, ref: ShardRef) -> None:
        """The shard's size and sha256, hashed as it streams (`exchange.check_shard`)."""
        key = directory + ref.name
        with _about(key):
            size = check_shard(self.store, directory, ref, CHUNK)
        self._counted(key, size)
