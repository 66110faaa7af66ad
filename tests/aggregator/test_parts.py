"""Scale-out aggregation: K parts give the bytes one aggregator gives, on a real
filesystem store; a crashed part's re-run changes nothing; a missing part blocks the
commit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tapestry_aggregator.parts import (
    PartError,
    PartsMissing,
    aggregate_part,
    commit_parts,
    part_shards,
)
from tapestry_aggregator.strategy import Strategy
from tapestry_protocol import rejections
from tapestry_protocol.documents import Outcome, Role
from tapestry_protocol.exchange import publish_update, read_model, read_result
from tapestry_protocol.store import ObjectStore, StoreError
from tapestry_protocol.store.filesystem import FilesystemStore
from tests.protocol.federation import Federation, make_federation

PEOPLE = ("alice", "bob", "carol", "dave")
WAIT = 60.0  # generous: the parts run as threads of one process on a loaded machine


def _round(tmp_path: Path, *, min_participants: int = 1, bad: bool = False) -> Federation:
    """Round 0 with four updates, closed; with `bad`, bob's holds a NaN in the last
    shard and carol's first shard is corrupt (both found mid-stream)."""
    store = FilesystemStore(tmp_path / "inputs", create=True)
    fed = make_federation(store, participants=PEOPLE, min_participants=min_participants)
    for i, who in enumerate(PEOPLE):
        delta = fed.delta(scale=0.1 * (1 + 3 * (who == "dave")), seed=10 + i)
        if bad and who == "bob":
            delta[fed.base.document.shards[-1].tensors[0]].reshape(-1)[-1] = np.nan
        publish_update(
            store, fed.layout, fed.plan, fed.base, delta, fed.participants[who],
            tokens=1000 * (i + 1), metrics={"trainLoss": 2.0 + i},
        )  # fmt: skip
    if bad:
        prefix = fed.layout.update_dir(0, "carol")
        key = next(i.key for i in store.list(prefix) if "part-00000" in i.key)
        data = bytearray(store.get(key))
        data[-1] ^= 1
        store.delete(key)
        store.put(key, bytes(data))
    fed.close(0)
    return fed


def _copy(fed: Federation, where: Path) -> Federation:
    assert isinstance(fed.store, FilesystemStore)
    shutil.copytree(fed.store.root, where)
    return replace(fed, store=FilesystemStore(where))


def _parts(
    fed: Federation, strategy: Strategy, parts: int, store: ObjectStore | None = None
) -> None:
    """Every part at once, as the pods of an Indexed Job are; raises what any raised."""
    errors: list[BaseException] = []

    def run(part: int) -> None:
        try:
            aggregate_part(
                store or fed.store, fed.layout, 0, fed.coordinator, strategy, part, parts,
                wait=WAIT, poll=0.01,
            )  # fmt: skip
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in range(parts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _outputs(fed: Federation) -> dict[str, bytes]:
    """The committed bytes: result, next base and optimizer state, each with its shards."""
    key = fed.coordinator.public_key_text
    result = read_result(fed.store, fed.layout, 0, key)
    out = {result.key: fed.store.get(result.key)}
    for ref, role in ((result.document.next_base, Role.BASE),
                      (result.document.optimizer_state, Role.OPTIMIZER)):  # fmt: skip
        if ref is None:
            continue
        model = read_model(fed.store, fed.layout, ref.manifest, key, role=role)
        out[model.key] = fed.store.get(model.key)
        for shard in model.document.shards:
            out[model.directory + shard.name] = fed.store.get(model.directory + shard.name)
    return out


def _single(fed: Federation, strategy: Strategy, where: Path) -> dict[str, bytes]:
    one = _copy(fed, where)
    aggregate_part(one.store, one.layout, 0, one.coordinator, strategy, 0, 1)
    return _outputs(one)


STRATEGIES = {
    "diloco": Strategy("diloco", max_share=0.5),
    "fedadam-median-clip": Strategy("fedadam", clip="median", clip_bound=1.5),
    "trimmed-mean": Strategy("fedavg", combine="trimmed-mean", trim=0.25),
}


@pytest.mark.parametrize("bad", [False, True], ids=["clean", "refused"])
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_two_and_three_parts_write_the_bytes_of_one(tmp_path: Path, name: str, bad: bool) -> None:
    strategy = STRATEGIES[name]
    fed = _round(tmp_path, bad=bad)
    assert len(fed.base.document.shards) >= 3
    expected = _single(fed, strategy, tmp_path / "k1")
    for parts in (2, 3):
        split = _copy(fed, tmp_path / f"k{parts}")
        _parts(split, strategy, parts)
        assert _outputs(split) == expected, f"{parts} parts differ from one"
    doc = read_result(split.store, split.layout, 0, fed.coordinator.public_key_text).document
    assert doc.outcome == Outcome.SUCCEEDED
    refused = {r.participant: r.reason for r in doc.rejected}
    if bad:
        assert refused == {"bob": rejections.NON_FINITE, "carol": rejections.HASH_MISMATCH}
    else:
        assert refused == {}
    if strategy.clip != "none":
        assert any(a.adjustments for a in doc.accepted)  # dave's large delta is clipped


def test_a_quorum_lost_mid_stream_fails_alike(tmp_path: Path) -> None:
    """Two refusals take four updates below the quorum of three: the failed result (who
    is refused for what, who is valid but not merged) is the same in parts."""
    fed = _round(tmp_path, min_participants=3, bad=True)
    expected = _single(fed, Strategy(), tmp_path / "k1")
    split = _copy(fed, tmp_path / "k2")
    _parts(split, Strategy(), 2)
    assert _outputs(split) == expected
    doc = read_result(split.store, split.layout, 0, fed.coordinator.public_key_text).document
    assert doc.outcome == Outcome.FAILED
    assert {r.participant: r.reason for r in doc.rejected}["alice"] == rejections.NO_QUORUM


class _CrashOnce:
    """The store, but the first write of a key containing `marker` fails (a pod killed
    there): everything written before it stays."""

    def __init__(self, store: ObjectStore, marker: str) -> None:
        self._store, self._marker, self.crashed = store, marker, False

    def put(self, key: str, data: bytes, **kwargs: object) -> None:
        if self._marker in key and not self.crashed:
            self.crashed = True
            raise StoreError(f"killed before writing {key}")
        self._store.put(key, data, **kwargs)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


def test_a_killed_part_rerun_gives_the_same_bytes(tmp_path: Path) -> None:
    """Part 1 dies after its check object, before its merge object (a refusal makes the
    second merge necessary); part 0 waits; the re-run of index 1 leaves its check
    object as it was, and the commit writes the bytes of one aggregator."""
    strategy = Strategy("diloco")
    fed = _round(tmp_path, bad=True)
    expected = _single(fed, strategy, tmp_path / "k1")
    split = _copy(fed, tmp_path / "k2")
    check_key = split.layout.part(0, 1, 2, "check")
    crashing = _CrashOnce(split.store, split.layout.part(0, 1, 2, "merge"))
    first = threading.Thread(
        target=lambda: aggregate_part(
            split.store, split.layout, 0, split.coordinator, strategy, 0, 2, wait=WAIT, poll=0.01
        )
    )
    first.start()
    with pytest.raises(StoreError, match="killed"):
        aggregate_part(crashing, split.layout, 0, split.coordinator, strategy, 1, 2,  # type: ignore[arg-type]
                       wait=WAIT, poll=0.01)  # fmt: skip
    before = split.store.get(check_key)
    assert not split.store.exists(split.layout.result(0))
    aggregate_part(split.store, split.layout, 0, split.coordinator, strategy, 1, 2, wait=WAIT)
    first.join()
    assert split.store.get(check_key) == before
    assert _outputs(split) == expected


def test_a_rerun_part_rewrites_its_objects_byte_for_byte(tmp_path: Path) -> None:
    strategy = Strategy("fedadam", clip="median", clip_bound=1.5)
    split = _copy(_round(tmp_path, bad=True), tmp_path / "k2")
    _parts(split, strategy, 2)
    keys = [split.layout.part(0, 1, 2, phase) for phase in ("check", "merge")]
    stored = {k: split.store.get(k) for k in keys}
    for key in [*keys, split.layout.result(0)]:
        split.store.delete(key)
    aggregate_part(split.store, split.layout, 0, split.coordinator, strategy, 1, 2, wait=0)
    assert {k: split.store.get(k) for k in keys} == stored


def test_a_missing_part_blocks_the_commit(tmp_path: Path) -> None:
    fed = _round(tmp_path)
    with pytest.raises(PartsMissing) as e:
        aggregate_part(fed.store, fed.layout, 0, fed.coordinator, Strategy(), 0, 3, wait=0.05,
                       poll=0.01)  # fmt: skip
    message = str(e.value)
    assert "2 of 3 parts have not written their check object" in message
    assert fed.layout.part(0, 1, 3, "check") in message
    assert fed.layout.part(0, 2, 3, "check") in message
    with pytest.raises(PartsMissing):
        commit_parts(fed.store, fed.layout, 0, fed.coordinator, Strategy(), 3, wait=0)
    assert not fed.store.exists(fed.layout.result(0))
    assert not fed.store.exists(fed.layout.base_manifest(1))


def test_parts_written_for_another_strategy_are_refused(tmp_path: Path) -> None:
    fed = _round(tmp_path)
    with pytest.raises(PartsMissing):  # part 1 stores its check object, then waits for 0
        aggregate_part(fed.store, fed.layout, 0, fed.coordinator, Strategy("fedavg"), 1, 2,
                       wait=0)  # fmt: skip
    with pytest.raises(PartError, match="other inputs"):
        aggregate_part(fed.store, fed.layout, 0, fed.coordinator, Strategy("diloco"), 0, 2,
                       wait=0)  # fmt: skip


def test_the_validation_floor_is_refused_in_parts(tmp_path: Path) -> None:
    fed = _round(tmp_path)
    with pytest.raises(ValueError, match="cannot run in parts"):
        aggregate_part(fed.store, fed.layout, 0, fed.coordinator,
                       Strategy(validation_margin=0.1), 0, 2)  # fmt: skip


def test_part_shards_cover_every_shard_once() -> None:
    for count in (1, 3, 7, 64):
        for parts in (1, 2, 3, 5):
            ranges = [part_shards(count, p, parts) for p in range(parts)]
            assert [i for r in ranges for i in r] == list(range(count))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    with pytest.raises(ValueError, match="part must be between 0 and 1"):
        part_shards(4, 2, 2)


def test_the_cli_runs_two_parts_as_two_processes(tmp_path: Path) -> None:
    fed = _round(tmp_path)
    expected = _single(fed, Strategy("diloco"), tmp_path / "k1")
    split = _copy(fed, tmp_path / "k2")
    split.coordinator.save(tmp_path / "keys")
    key = str(tmp_path / "keys" / "coordinator.key")
    args = [
        sys.executable, "-m", "tapestry_cli", "aggregate", "--store", str(tmp_path / "k2"),
        "--federation", fed.layout.federation, "--round", "0", "--key", key,
        "--optimizer", "diloco", "--parts", "2", "--wait", "60",
    ]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200"}
    procs = [
        subprocess.Popen(
            args,
            env={**env, "JOB_COMPLETION_INDEX": str(i)},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in (1, 0)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "part 1 of 2 is stored" in "".join(outs[0])
    assert _outputs(split) == expected
    usage = subprocess.run([*args[:-4], "--parts", "2", "--close"], env=env, text=True,
                           capture_output=True, timeout=60)  # fmt: skip
    assert usage.returncode == 2
    assert (
        usage.stderr.count("\n") == 1 and "--close closes the round in one process" in usage.stderr
    )
