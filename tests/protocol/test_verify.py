"""`verify_federation` on a real three-round federation in a filesystem store: it passes,
and one flipped byte in any object the chain depends on fails it, naming that object."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tapestry_aggregator.strategy import Strategy
from tapestry_protocol import rejections
from tapestry_protocol.documents import ReceiptState
from tapestry_protocol.exchange import Verified, make_plan, publish_plan, read_model
from tapestry_protocol.layout import Layout
from tapestry_protocol.signing import SigningKey
from tapestry_protocol.store.filesystem import FilesystemStore
from tapestry_protocol.verify import FederationReport, VerifyProgress, verify_federation
from tests.protocol.federation import HYPERPARAMETERS, Federation, make_federation

FEDERATION = "history"


@dataclass
class History:
    """Three rounds: 0 and 1 merge alice and bob (round 1 also refuses carol's update,
    trained from the wrong base); round 2 merges alice while bob declines."""

    root: Path
    coordinator_key: str
    fed: Federation

    @property
    def layout(self) -> Layout:
        return self.fed.layout


def build_history(root: Path) -> History:
    """The federation `History` describes, with DiLoCo (so optimizer state is chained)."""
    store = FilesystemStore(root, create=True)
    fed = make_federation(store, FEDERATION, participants=("alice", "bob", "carol"))
    strategy = Strategy("diloco")
    base = fed.base
    for r in range(3):
        plan = fed.plan if r == 0 else fed.plan_round(r, base)
        for i, who in enumerate(("alice", "bob")):
            if r == 2 and who == "bob":
                fed.receipt(who, ReceiptState.DECLINED, "Manual", "not this round", plan=plan)
                continue
            fed.receipt(who, ReceiptState.ACCEPTED, plan=plan)
            fed.publish(
                who, fed.delta(seed=10 * r + i), tokens=100 * (i + 1),
                metrics={"trainLoss": 2.0 - r / 10}, plan=plan, base=base,
            )  # fmt: skip
        if r == 1:  # carol's update names round 0's base: the merge refuses it
            fed.publish("carol", fed.delta(seed=99), plan=plan, base=fed.base)
        result = fed.aggregate(r, strategy).document
        assert result.next_base is not None and result.optimizer_state is not None
        base = read_model(store, fed.layout, result.next_base.manifest,
                          fed.coordinator.public_key_text)  # fmt: skip
    return History(root, fed.coordinator.public_key_text, fed)


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    return build_history(tmp_path_factory.mktemp("history") / "store")


@pytest.fixture
def copy(history: History, tmp_path: Path) -> Path:
    """A copy of the history's store, to tamper with."""
    shutil.copytree(history.root, tmp_path / "store")
    return tmp_path / "store"


def _verify(root: Path, key: str) -> FederationReport:
    return verify_federation(FilesystemStore(root), Layout(FEDERATION), key)


def _flip(root: Path, key: str, at: int | None = None) -> None:
    """XOR one byte of the object `key` (by default the middle one)."""
    path = root / key
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x01
    path.write_bytes(bytes(data))


def test_an_untouched_federation_verifies(history: History) -> None:
    events: list[VerifyProgress] = []
    report = verify_federation(
        history.fed.store, history.layout, history.coordinator_key, progress=events.append
    )
    assert report.ok, report.failure
    assert [r.round for r in report.rounds] == [0, 1, 2]
    assert report.completed == 3
    r0, r1, r2 = report.rounds
    assert {c.participant: c.tokens for c in r0.contributors} == {"alice": 100, "bob": 200}
    assert sum(c.weight for c in r0.contributors) == pytest.approx(1.0)
    assert r0.contributors[0].weight == pytest.approx(1 / 3)
    assert {c.participant for c in r1.contributors} == {"alice", "bob"}
    assert [(x.participant, x.reason) for x in r1.refused] == [("carol", rejections.WRONG_BASE)]
    assert [c.participant for c in r2.contributors] == ["alice"]
    refused = {x.participant: x.reason for x in r2.refused}
    assert refused == {"bob": rejections.DECLINED, "carol": rejections.LATE}
    assert r2.receipts == {"alice": ["Accepted"], "bob": ["Declined"]}
    assert r1.base == r0.next_base and r2.base == r1.next_base
    assert report.latest_base == r2.next_base
    assert report.latest_base is not None
    assert report.latest_base.manifest == history.layout.base_manifest(3)
    # Every object checked once: 4 bases and 3 optimizer states (manifest + shards),
    # per round a plan, close, result, receipts, and each merged update with its shards.
    shards = len(history.fed.base.document.shards)
    models = 4 * (1 + shards) + 3 * (1 + shards)
    rounds = 3 * 3 + (2 + 2 + 2) + 5 * (1 + shards)
    assert report.objects == models + rounds
    assert [e.objects for e in events] == list(range(1, report.objects + 1))
    assert events[-1].round == events[-1].last_round == 2
    assert events[-1].shard_bytes == report.shard_bytes > 0


def _kinds(history: History) -> dict[str, str]:
    layout, fed = history.layout, history.fed
    store = fed.store

    def first_shard(directory: str) -> str:
        return next(info.key for info in store.list(directory) if info.key.endswith(".safetensors"))

    return {
        "plan": layout.plan(1),
        "receipt": layout.receipt(2, "bob", ReceiptState.DECLINED),
        "close record": layout.close(1),
        "update manifest": layout.update_manifest(1, "alice"),
        "update shard": first_shard(layout.update_dir(2, "alice")),
        "result": layout.result(0),
        "base manifest": layout.base_manifest(1),
        "first base manifest": layout.base_manifest(0),
        "latest base manifest": layout.base_manifest(3),
        "base shard": first_shard(layout.base_dir(2)),
        "optimizer manifest": layout.optimizer_manifest(2),
        "optimizer shard": first_shard(layout.optimizer_dir(3)),
    }


KINDS = [
    "plan", "receipt", "close record", "update manifest", "update shard", "result",
    "base manifest", "first base manifest", "latest base manifest", "base shard",
    "optimizer manifest", "optimizer shard",
]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_a_flipped_byte_fails_naming_the_object(history: History, copy: Path, kind: str) -> None:
    key = _kinds(history)[kind]
    _flip(copy, key)
    report = _verify(copy, history.coordinator_key)
    assert report.failure is not None, f"a flipped byte in the {kind} {key} went unnoticed"
    assert report.failure.key == key
    assert report.failure.reason in rejections.ALL_REASONS
    assert not report.ok


def test_a_changed_value_is_a_bad_signature(history: History, copy: Path) -> None:
    """A byte flipped inside a value keeps the JSON valid: the signature catches it."""
    key = history.layout.close(1)
    text = (copy / key).read_bytes()
    _flip(copy, key, at=text.index(b'"closedAt":"2030') + len('"closedAt":"2030') - 1)
    report = _verify(copy, history.coordinator_key)
    assert report.failure is not None
    assert (report.failure.key, report.failure.reason) == (key, rejections.BAD_SIGNATURE)
    assert [r.round for r in report.rounds] == [0]  # verified before it; round 1 did not


def test_every_object_the_chain_uses_is_checked(history: History, copy: Path) -> None:
    """Flip each stored object in turn: all but carol's refused update fail, by name."""
    store = FilesystemStore(copy)
    keys = [info.key for info in store.list("")]
    unused = history.layout.update_dir(1, "carol")
    checked = [k for k in keys if not k.startswith(unused)]
    assert len(checked) == _verify(copy, history.coordinator_key).objects
    for key in keys:
        _flip(copy, key)
        failure = _verify(copy, history.coordinator_key).failure
        _flip(copy, key)
        if key.startswith(unused):
            assert failure is None, key
        else:
            assert failure is not None and failure.key == key, (key, failure)


def test_a_missing_shard_is_named(history: History, copy: Path) -> None:
    key = _kinds(history)["update shard"]
    (copy / key).unlink()
    report = _verify(copy, history.coordinator_key)
    assert report.failure is not None
    assert (report.failure.key, report.failure.reason) == (key, rejections.MISSING_SHARD)


def test_a_wrong_coordinator_key_fails_at_the_first_base(history: History) -> None:
    other = SigningKey.generate("coordinator").public_key_text
    report = _verify(history.root, other)
    assert report.failure is not None
    assert report.failure.key == history.layout.plan(0)
    assert report.failure.reason == rejections.BAD_SIGNATURE
    assert report.rounds == [] and report.completed == 0


def test_a_plan_that_leaves_the_chain_fails(history: History, copy: Path) -> None:
    """Round 1's plan re-signed by the coordinator, naming round 0's base: every
    signature holds, but the chain does not."""
    fed = history.fed
    store = FilesystemStore(copy)
    (copy / history.layout.plan(1)).unlink()
    plan = make_plan(
        history.layout, 1, fed.base, model={}, hyperparameters=HYPERPARAMETERS,
        participants={p: k.public_key_text for p, k in fed.participants.items()},
        min_participants=1, deadline="2030-01-01T00:00:00Z",
    )  # fmt: skip
    publish_plan(store, history.layout, plan, fed.coordinator)
    report = _verify(copy, history.coordinator_key)
    assert report.failure is not None
    assert (report.failure.key, report.failure.reason) == (
        history.layout.plan(1),
        rejections.WRONG_BASE,
    )
    assert history.layout.base_manifest(1) in report.failure.message


def test_a_missing_round_in_between_fails(history: History, copy: Path) -> None:
    shutil.rmtree(copy / history.layout.round_prefix(1))
    report = _verify(copy, history.coordinator_key)
    assert report.failure is not None
    assert report.failure.key == history.layout.plan(1)
    assert report.failure.reason == rejections.MISSING_MANIFEST


def test_an_open_round_verifies_as_far_as_it_goes(history: History, copy: Path) -> None:
    """The latest round without a result yet: verified up to its close record."""
    (copy / history.layout.result(2)).unlink()
    report = _verify(copy, history.coordinator_key)
    assert report.ok, report.failure
    assert report.completed == 2
    assert report.rounds[-1].outcome is None and report.rounds[-1].closed
    assert report.latest_base == report.rounds[-1].base


def test_a_result_missing_before_a_later_round_fails(history: History, copy: Path) -> None:
    (copy / history.layout.result(1)).unlink()
    report = _verify(copy, history.coordinator_key)
    assert report.failure is not None
    assert report.failure.key == history.layout.result(1)


def test_a_stray_object_among_receipts_fails(history: History, copy: Path) -> None:
    stray = history.layout.round_prefix(0) + "receipts/alice/notes.json"
    (copy / stray).write_text("{}")
    report = _verify(copy, history.coordinator_key)
    assert report.failure is not None
    assert (report.failure.key, report.failure.reason) == (stray, rejections.MALFORMED_DOCUMENT)


def test_an_empty_store_has_no_first_base(tmp_path: Path) -> None:
    report = _verify(FilesystemStore(tmp_path, create=True).root, "ed25519:AAAA")
    assert report.failure is not None
    assert report.failure.key == Layout(FEDERATION).base_manifest(0)
    assert report.failure.reason == rejections.MISSING_MANIFEST


def test_a_base_without_rounds_verifies(tmp_path: Path) -> None:
    fed = make_federation(FilesystemStore(tmp_path, create=True), FEDERATION)
    shutil.rmtree(tmp_path / fed.layout.rounds_prefix())
    report = _verify(tmp_path, fed.coordinator.public_key_text)
    assert report.ok and report.rounds == []
    assert isinstance(fed.base, Verified)
    assert report.latest_base == fed.base.ref


def test_after_a_failed_round_the_next_trains_from_the_same_base(tmp_path: Path) -> None:
    """Round 0 misses its quorum: no next base, and round 1 trains from bases/0 again."""
    fed = make_federation(FilesystemStore(tmp_path, create=True), FEDERATION, min_participants=2)
    fed.publish("alice", fed.delta())
    failed = fed.aggregate(0, Strategy("fedavg")).document
    assert failed.next_base is None
    plan = fed.plan_round(1, fed.base)
    fed.publish("alice", fed.delta(seed=1), plan=plan)
    fed.aggregate(1, Strategy("fedavg"))
    report = _verify(tmp_path, fed.coordinator.public_key_text)
    assert report.ok, report.failure
    r0, r1 = report.rounds
    assert (r0.outcome, r1.outcome) == ("Failed", "Succeeded")
    assert r0.next_base is None and r1.base == r0.base == fed.base.ref
    assert [(x.participant, x.reason) for x in r0.refused] == [
        ("alice", rejections.NO_QUORUM),
        ("bob", rejections.LATE),
    ]
    assert report.latest_base == r1.next_base
