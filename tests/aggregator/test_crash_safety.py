"""The aggregator stopped at every store call of a round, then re-run: one result, same bytes.

Every run starts from the same stored state (base, plan, updates, close record, built
once: `Arena.reset` deletes whatever a run added and checks that nothing else changed).
The uninterrupted run gives the reference bytes and the number of store calls; then, for
every call k, the aggregator is stopped at k, a late update arrives from a member the
close left out, the round is aggregated again on the plain store, and everything written
since the starting state must equal the reference byte for byte: the result, the next
base and optimizer state (manifests and shards), nothing extra and nothing missing.

Ways to stop it (`Fault`):

- `KILL_BEFORE`: the process dies as it issues write k, which never lands. `Crash` is a
  BaseException, because a kill is: no `except Exception` (such as the one that turns a
  parser's surprise into a refusal) may see it. Once raised, every later call on the
  store, from any thread, raises it too: a dead process does nothing more.
- `KILL_AFTER`: write k lands, then the process dies. Writes are strictly ordered, so
  this leaves what a kill before write k+1 leaves; it is new only after the last write.
- `WRITE_OUTAGE` / `READ_OUTAGE`: the store fails call k with StoreUnavailable and the
  process lives on. The run must fail, since an outage is nobody's refusal, unless the
  failed write was one the merge discards anyway (a pass abandoned on a refusal); either
  way the re-run publishes the reference bytes.

Every round has a participant whose last shard holds NaN, refused mid-stream, so the
merge restarts and the stopping points include those of an abandoned first pass. DiLoCo
runs two rounds: a kill in the first must leave the second, and the optimizer state it
reads, as they would have been. Also here: aggregators racing on one round (in lockstep
at every conditional create, and free-running), and a real process SIGKILLed in the
middle of writing a shard. MinIO runs the kills of the last round only (every call is a
request); the filesystem runs cover the rest.

Filesystem stores live on tmpfs (/dev/shm) where there is one: every write is fsynced,
which on a slow disk costs far more than the merge.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
import pytest

from tapestry_aggregator.merge import aggregate_round
from tapestry_aggregator.strategy import Strategy
from tapestry_protocol import exchange, rejections
from tapestry_protocol.documents import (
    CloseTrigger,
    ModelManifest,
    Outcome,
    Role,
    RoundResult,
)
from tapestry_protocol.exchange import (
    COORDINATOR,
    Verified,
    close_round,
    make_plan,
    publish_model,
    publish_plan,
    publish_update,
    read_model,
    read_plan,
    read_plan_base,
)
from tapestry_protocol.layout import Layout
from tapestry_protocol.shards import FloatArray, plan_shards
from tapestry_protocol.signing import SigningKey
from tapestry_protocol.store import (
    FilesystemStore,
    ObjectInfo,
    ObjectStore,
    StoreError,
    StoreUnavailable,
)
from tapestry_protocol.store.base import DEFAULT_CHUNK, RESERVED_SEGMENT_PREFIX
from tests.s3servers import S3Server

T = TypeVar("T")

Shapes = dict[str, tuple[int, ...]]
Base = Verified[ModelManifest]

FEDERATION = "crash"
# Generated once: every run signs with the same keys, and Ed25519 signatures are
# deterministic, so identical inputs are identical bytes.
COORDINATOR_KEY = SigningKey.generate(COORDINATOR)
PUBLIC_KEY = COORDINATOR_KEY.public_key_text
ON_TIME = ("alice", "bob", "erin")
POISONED = "erin"  # NaN in its last shard: refused mid-stream, the merge restarts
LATE = "dave"  # in every plan, but reports only after the round was closed
KEYS = {n: SigningKey.generate(n) for n in (*ON_TIME, LATE)}
TOKENS = {"alice": 1200, "bob": 3400, "erin": 800, "dave": 5000}
CLOSED_AT = datetime(2030, 1, 1, tzinfo=UTC)
CLOCK = "2030-01-01T00:00:00Z"  # plans' issuedAt and updates' createdAt
MODEL = {"preset": "crash-test"}
HYPERPARAMETERS = {"innerSteps": 2, "learningRate": 1e-3, "batchSize": 2, "seqLen": 8}
SMALL: Shapes = {"emb": (16, 8), "l0.w": (8, 8), "l0.b": (8,), "l1.w": (8, 8), "l1.b": (8,)}
SMALL_SHARD_BYTES = 300  # three shards
BIG: Shapes = {f"layer{i}.w": (64, 16) for i in range(8)}  # eight shards of 4 KiB
BIG_SHARD_BYTES = 4096
FAST_TMP = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
STRATEGIES = {
    "fedavg": (Strategy("fedavg", weighting="tokens"), 1),
    "diloco": (Strategy("diloco", learning_rate=0.7, momentum=0.9), 2),
}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plans and updates carry the time they were made; fix it, so reruns compare."""
    monkeypatch.setattr(exchange, "now_rfc3339", lambda: CLOCK)


# --- a store that fails on cue --------------------------------------------------------


class Crash(BaseException):
    """The aggregator's process dies here (a BaseException, as a kill is)."""


class Fault(Enum):
    KILL_BEFORE = "kill before write k"
    KILL_AFTER = "kill after write k"
    WRITE_OUTAGE = "write k fails"
    READ_OUTAGE = "read k fails"


class FaultyStore(ObjectStore):
    """Delegates every call to `inner`, counting writes and reads, and injects `fault` at
    call number `at` of its kind. After a kill every call raises Crash."""

    def __init__(self, inner: ObjectStore, fault: Fault | None = None, at: int = -1) -> None:
        self.inner = inner
        self.url = inner.url
        self.fault = fault
        self.at = at
        self.writes = 0
        self.reads = 0
        self.fired = False
        self.dead = False
        self._lock = threading.Lock()

    def _write(self, key: str, op: Callable[[], T]) -> T:
        with self._lock:
            self._check_alive(key)
            index, self.writes = self.writes, self.writes + 1
            fault = self.fault if index == self.at else None
            if fault is Fault.KILL_BEFORE:
                self.fired = self.dead = True
                raise Crash(f"killed before write {index} ({key})")
            if fault is Fault.WRITE_OUTAGE:
                self.fired = True
                raise StoreUnavailable(f"injected outage at write {index}", key)
            if fault is Fault.KILL_AFTER:  # the write lands, and nothing after it
                op()
                self.fired = self.dead = True
                raise Crash(f"killed after write {index} ({key})")
        return op()

    def _read(self, key: str, op: Callable[[], T]) -> T:
        with self._lock:
            self._check_alive(key)
            index, self.reads = self.reads, self.reads + 1
            if index == self.at and self.fault is Fault.READ_OUTAGE:
                self.fired = True
                raise StoreUnavailable(f"injected outage at read {index}", key)
        return op()

    def _check_alive(self, key: str) -> None:
        if self.dead:
            raise Crash(f"the process is dead ({key})")

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        return self._write(key, lambda: self.inner.put(key, data, if_absent=if_absent))

    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> ObjectInfo:
        return self._write(key, lambda: self.inner.put_file(key, path, if_absent=if_absent))

    def put_stream(self, key: str, stream: BinaryIO, *, if_absent: bool = False) -> ObjectInfo:
        return self._write(key, lambda: self.inner.put_stream(key, stream, if_absent=if_absent))

    def delete(self, key: str) -> None:
        self._write(key, lambda: self.inner.delete(key))

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        return self._read(key, lambda: self.inner.get(key, offset=offset, length=length))

    def get_file(self, key: str, path: Path) -> ObjectInfo:
        return self._read(key, lambda: self.inner.get_file(key, path))

    def iter_chunks(self, key: str, chunk_size: int = DEFAULT_CHUNK) -> Iterator[bytes]:
        return self._read(key, lambda: self.inner.iter_chunks(key, chunk_size))

    def stat(self, key: str) -> ObjectInfo:
        return self._read(key, lambda: self.inner.stat(key))

    def exists(self, key: str) -> bool:
        return self._read(key, lambda: self.inner.exists(key))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self._read(prefix, lambda: iter(list(self.inner.list(prefix))))


# --- a federation whose every byte is reproducible --------------------------------------


def model_tensors(shapes: Shapes) -> dict[str, FloatArray]:
    rng = np.random.default_rng(1)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def make_delta(shapes: Shapes, round_number: int, who: str) -> dict[str, FloatArray]:
    rng = np.random.default_rng([round_number, *who.encode()])
    delta = {n: (rng.standard_normal(s) * 0.05).astype(np.float32) for n, s in shapes.items()}
    if who == POISONED:
        delta[list(shapes)[-1]].flat[-1] = np.nan
    return delta


def open_round(
    store: ObjectStore,
    layout: Layout,
    shapes: Shapes,
    round_number: int,
    base: Verified[ModelManifest],
) -> None:
    """Plan a round for every member, let the on-time ones report, and close it."""
    plan = make_plan(
        layout, round_number, base, model=MODEL, hyperparameters=HYPERPARAMETERS,
        participants={n: k.public_key_text for n, k in KEYS.items()}, min_participants=2,
        deadline=CLOCK,
    )  # fmt: skip
    published = publish_plan(store, layout, plan, COORDINATOR_KEY)
    for who in ON_TIME:
        publish_update(
            store, layout, published, base, make_delta(shapes, round_number, who), KEYS[who],
            tokens=TOKENS[who], metrics={"trainLoss": 2.0 + len(who) / 10},
        )  # fmt: skip
    close = close_round(
        store, layout, published, COORDINATOR_KEY, CloseTrigger.ALL_REPORTED, CLOSED_AT
    )
    assert [e.participant for e in close.document.excluded] == [LATE]


def publish_late(store: ObjectStore, layout: Layout, shapes: Shapes, round_number: int) -> None:
    """The member the close left out reports after all."""
    plan = read_plan(store, layout, round_number, PUBLIC_KEY)
    base = read_plan_base(store, layout, plan, PUBLIC_KEY)
    delta = make_delta(shapes, round_number, LATE)
    publish_update(store, layout, plan, base, delta, KEYS[LATE], tokens=TOKENS[LATE], metrics={})


def aggregate(
    store: ObjectStore, layout: Layout, round_number: int, strategy: Strategy
) -> Verified[RoundResult]:
    return aggregate_round(store, layout, round_number, COORDINATOR_KEY, strategy)


def next_base(store: ObjectStore, layout: Layout, result: Verified[RoundResult]) -> Base:
    ref = result.document.next_base
    assert ref is not None, result.document.message
    return read_model(store, layout, ref.manifest, PUBLIC_KEY)


@dataclass
class Arena:
    """A store holding a federation up to the closed round `start`, and the objects of
    that starting state, so that every run can begin from exactly it."""

    store: ObjectStore
    layout: Layout
    shapes: Shapes
    start: int
    initial: dict[str, ObjectInfo]

    @classmethod
    def build(
        cls,
        store: ObjectStore,
        strategy: Strategy,
        *,
        start: int = 0,
        shapes: Shapes = SMALL,
        shard_bytes: int = SMALL_SHARD_BYTES,
    ) -> Arena:
        layout = Layout(FEDERATION)
        tensors = model_tensors(shapes)
        groups = plan_shards([(n, a.nbytes) for n, a in tensors.items()], shard_bytes)
        assert len(groups) >= 3, groups
        base = publish_model(store, layout, 0, tensors, groups, COORDINATOR_KEY, model=MODEL)
        open_round(store, layout, shapes, 0, base)
        for r in range(start):  # earlier rounds, as every run finds them
            result = aggregate(store, layout, r, strategy)
            publish_late(store, layout, shapes, r)
            open_round(store, layout, shapes, r + 1, next_base(store, layout, result))
        return cls(store, layout, shapes, start, {i.key: i for i in store.list("")})

    def written(self) -> dict[str, bytes]:
        """Every object added since the starting state, with its bytes."""
        keys = [i.key for i in self.store.list("") if i.key not in self.initial]
        return {key: self.store.get(key) for key in keys}

    def reset(self) -> None:
        """Delete what the last run added; no object of the starting state may change."""
        now = {i.key: i for i in self.store.list("")}
        for key in sorted(set(now) - set(self.initial)):
            self.store.delete(key)
        assert {k: now.get(k) for k in self.initial} == self.initial


def play(
    arena: Arena,
    strategy: Strategy,
    rounds: int,
    faulty: FaultyStore | None = None,
    marks: list[tuple[int, int]] | None = None,
) -> list[Verified[RoundResult]]:
    """Aggregate rounds `arena.start`..`rounds`-1, each first through `faulty` until its
    fault has fired. The late update arrives after each round's first attempt; an attempt
    that failed is followed by a re-run on the plain store. `marks` collects the store
    calls made before each round."""
    store, layout = arena.store, arena.layout
    results: list[Verified[RoundResult]] = []
    for r in range(arena.start, rounds):
        if r > arena.start:
            open_round(store, layout, arena.shapes, r, next_base(store, layout, results[-1]))
        attempt: ObjectStore = store
        if faulty is not None and not faulty.fired:
            attempt = faulty
            if marks is not None:
                marks.append((faulty.writes, faulty.reads))
        result: Verified[RoundResult] | None = None
        try:
            result = aggregate(attempt, layout, r, strategy)
        except (Crash, StoreError) as e:
            if not isinstance(attempt, FaultyStore) or not attempt.fired:
                raise
            killed = attempt.fault in (Fault.KILL_BEFORE, Fault.KILL_AFTER)
            assert isinstance(e, Crash) == killed, f"{attempt.fault} ended the run with {e!r}"
        else:
            # An outage may hit a write that the merge then discards (a pass abandoned
            # because an update was refused), and the run goes on; a kill stops it.
            assert not (isinstance(attempt, FaultyStore) and attempt.dead), (
                f"{attempt.fault} at call {attempt.at} killed the process, yet it went on"
            )
        publish_late(store, layout, arena.shapes, r)
        if result is None:
            result = aggregate(store, layout, r, strategy)
        results.append(result)
    return results


def check_reference(results: list[Verified[RoundResult]], strategy: Strategy) -> None:
    """The uninterrupted run merged two updates, refused the poisoned one mid-stream and
    left the late one out: the reruns are compared with a round that did all of that."""
    for result in results:
        doc = result.document
        assert doc.outcome == Outcome.SUCCEEDED, doc.message
        assert [a.participant for a in doc.accepted] == ["alice", "bob"]
        reasons = {r.participant: r.reason for r in doc.rejected}
        assert reasons == {POISONED: rejections.NON_FINITE, LATE: rejections.LATE}
        assert doc.metrics["mergePasses"] == 2
        assert (doc.optimizer_state is not None) == bool(strategy.slots)


def used_objects(
    store: ObjectStore, layout: Layout, results: list[Verified[RoundResult]]
) -> frozenset[str]:
    """The results and everything they lead to: next bases, optimizer states, shards."""
    used: set[str] = set()
    for result in results:
        doc = result.document
        used.add(layout.result(doc.round))
        for role, ref in ((Role.BASE, doc.next_base), (Role.OPTIMIZER, doc.optimizer_state)):
            if ref is not None:
                model = read_model(store, layout, ref.manifest, PUBLIC_KEY, role=role)
                used |= {model.key} | {model.directory + s.name for s in model.document.shards}
    return frozenset(used)


def check_same(
    arena: Arena,
    results: list[Verified[RoundResult]],
    expected: list[Verified[RoundResult]],
    reference: dict[str, bytes],
    what: str,
    optional: frozenset[str] = frozenset(),
) -> None:
    """Everything written since the starting state equals the reference byte for byte;
    only the `optional` objects may be missing."""
    written = arena.written()
    layout = arena.layout
    result_keys = sorted(k for k in written if k.endswith("/result.json"))
    assert result_keys == [layout.result(r.document.round) for r in expected], what
    for got, want in zip(results, expected, strict=True):
        doc = want.document
        assert got.sha256 == want.sha256, f"{what}: round {doc.round}'s result differs"
        assert doc.next_base is not None
        named = [layout.result(doc.round), doc.next_base.manifest]
        if doc.optimizer_state is not None:
            named.append(doc.optimizer_state.manifest)
        for key in named:
            assert written.get(key) == reference[key], f"{what}: {key} differs"
    missing = sorted(set(reference) - set(written) - optional)
    extra = sorted(set(written) - set(reference))
    assert not missing and not extra, f"{what}: missing {missing[:5]}, extra {extra[:5]}"
    changed = sorted(k for k in written if written[k] != reference[k])
    assert not changed, f"{what}: {changed[:5]} differ"


def crash_everywhere(
    arena: Arena, strategy: Strategy, rounds: int, faults: list[tuple[Fault, int]]
) -> int:
    """The reference run, then one run for each (fault, first round it hits) and each
    store call of that kind from that round on; returns how many runs were made."""
    counter = FaultyStore(arena.store)
    marks: list[tuple[int, int]] = []
    expected = play(arena, strategy, rounds, counter, marks)
    check_reference(expected, strategy)
    reference = arena.written()
    # Shards of a pass abandoned when the poisoned update was refused.
    orphans = frozenset(
        k
        for k in set(reference) - used_objects(arena.store, arena.layout, expected)
        if k.endswith(".safetensors") and "/rounds/" not in k
    )
    assert orphans, "the poisoned update was refused before any shard was written"
    arena.reset()
    runs = 0
    for fault, first in faults:
        writes, reads = marks[first - arena.start]
        if fault is Fault.READ_OUTAGE:
            points = range(reads, counter.reads)
        elif fault is Fault.KILL_AFTER:
            # The state a kill after write k leaves is the one a kill before write k+1
            # leaves; only after the last write (the result) is it new.
            points = range(counter.writes - 1, counter.writes)
        else:
            points = range(writes, counter.writes)
        for k in points:
            faulty = FaultyStore(arena.store, fault, k)
            what = f"{fault.value}, k={k} of {counter.writes} writes, {counter.reads} reads"
            results = play(arena, strategy, rounds, faulty)
            # Reads run on a prefetch pool, and those still queued are cancelled when an
            # update is refused: a run may make fewer reads than the reference did.
            assert faulty.fired or fault is Fault.READ_OUTAGE, what
            # A run that an outage did not stop may lack an abandoned pass's shards.
            optional = orphans if not faulty.dead else frozenset()
            check_same(arena, results, expected, reference, what, optional)
            arena.reset()
            runs += 1
    return runs


# --- tests ------------------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    store: ObjectStore


@pytest.fixture
def fast_tmp(tmp_path: Path) -> Iterator[Path]:
    """A fresh directory, on tmpfs where there is one."""
    if FAST_TMP is None:
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir=FAST_TMP, prefix="tapestry-test-") as d:
        yield Path(d)


@pytest.fixture(params=["filesystem", pytest.param("minio", marks=pytest.mark.s3)])
def backend(request: pytest.FixtureRequest, fast_tmp: Path) -> Iterator[Backend]:
    if request.param == "filesystem":
        yield Backend("filesystem", FilesystemStore(fast_tmp / "store", create=True))
        return
    server: S3Server = request.getfixturevalue("minio_server")
    with server.open("crash-safety", f"t-{uuid.uuid4().hex[:12]}") as store:
        yield Backend("minio", store)


@pytest.mark.parametrize("optimizer", sorted(STRATEGIES))
def test_a_crash_at_any_store_call_reruns_to_the_same_bytes(
    backend: Backend, optimizer: str
) -> None:
    strategy, rounds = STRATEGIES[optimizer]
    last = rounds - 1
    if backend.name == "filesystem":
        arena = Arena.build(backend.store, strategy)
        # Kills in every round (one in round 0 must leave round 1 and its optimizer state
        # as they would have been); outages in the last round, which reads every kind of
        # object, optimizer state included.
        faults = [(Fault.KILL_BEFORE, 0), (Fault.KILL_AFTER, last)]
        faults += [(Fault.WRITE_OUTAGE, last), (Fault.READ_OUTAGE, last)]
    else:
        # Every S3 call is a request: kills in the last round only, from a starting state
        # that holds the earlier rounds already aggregated.
        arena = Arena.build(backend.store, strategy, start=last)
        faults = [(Fault.KILL_BEFORE, last), (Fault.KILL_AFTER, last)]
    runs = crash_everywhere(arena, strategy, rounds, faults)
    assert runs >= 8


class LockstepStore(FaultyStore):
    """Every write waits until the other aggregator issues its own write of the same
    number: two aggregators doing the same work meet at every conditional create."""

    def __init__(self, inner: ObjectStore, barrier: threading.Barrier) -> None:
        super().__init__(inner)
        self.barrier = barrier

    def _write(self, key: str, op: Callable[[], T]) -> T:
        self.barrier.wait(timeout=60)
        return super()._write(key, op)


@pytest.mark.parametrize("mode", ["lockstep", "free"])
def test_racing_aggregators_publish_one_result(backend: Backend, mode: str) -> None:
    strategy, _ = STRATEGIES["diloco"]
    arena = Arena.build(backend.store, strategy)
    expected = aggregate(arena.store, arena.layout, 0, strategy)
    reference = arena.written()
    arena.reset()

    racers = 2 if mode == "lockstep" else 4
    barrier = threading.Barrier(racers)
    start = threading.Barrier(racers)
    results: list[Verified[RoundResult]] = []
    errors: list[BaseException] = []

    def run() -> None:
        store: ObjectStore = arena.store
        if mode == "lockstep":
            store = LockstepStore(arena.store, barrier)
        try:
            start.wait(timeout=60)
            results.append(aggregate(store, arena.layout, 0, strategy))
        except BaseException as e:
            barrier.abort()  # do not leave the other one waiting
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert [r.sha256 for r in results] == [expected.sha256] * racers
    assert arena.written() == reference  # one result, the same bytes as a lone run


# --- a real process, killed ---------------------------------------------------------------

CHILD = """
import json, sys, threading, time
from pathlib import Path
from tapestry_aggregator.merge import aggregate_round
from tapestry_aggregator.strategy import Strategy
from tapestry_protocol.layout import Layout
from tapestry_protocol.signing import load_signing_key
from tapestry_protocol.store import FilesystemStore

root, federation, round_number, key_file, strategy, stall_at = sys.argv[1:]


class HalfThenHang:
    # Gives half the bytes, then hangs in the middle of the write until killed.
    def __init__(self, data):
        self.data, self.calls = data, 0

    def read(self, size=-1):
        self.calls += 1
        if self.calls == 1:
            return self.data[: len(self.data) // 2]
        print("stalled", flush=True)
        time.sleep(600)
        return b""


class StallingStore(FilesystemStore):
    writes, lock = 0, threading.Lock()

    def put(self, key, data, *, if_absent=False):
        with self.lock:
            index = StallingStore.writes
            StallingStore.writes += 1
        if index == int(stall_at):
            return self.put_stream(key, HalfThenHang(data), if_absent=if_absent)
        return super().put(key, data, if_absent=if_absent)


aggregate_round(
    StallingStore(root), Layout(federation), int(round_number),
    load_signing_key("coordinator", Path(key_file)), Strategy.from_json(json.loads(strategy)),
)
print("finished", flush=True)
"""


def test_sigkill_mid_merge_then_rerun(fast_tmp: Path) -> None:
    """A real aggregator process on a larger model, killed in the middle of writing a
    shard of the second DiLoCo round; the re-run in this process gives the same bytes."""
    strategy, rounds = STRATEGIES["diloco"]
    store = FilesystemStore(fast_tmp / "store", create=True)
    arena = Arena.build(store, strategy, start=1, shapes=BIG, shard_bytes=BIG_SHARD_BYTES)
    counter = FaultyStore(store)
    expected = play(arena, strategy, rounds, counter)
    check_reference(expected, strategy)
    reference = arena.written()
    arena.reset()

    key_file = COORDINATOR_KEY.save(fast_tmp / "keys")[0]
    stall_at = counter.writes // 2  # a shard of the second pass: mid-merge
    argv = [
        sys.executable, "-c", CHILD, str(store.root), FEDERATION, "1", str(key_file),
        json.dumps(strategy.to_json()), str(stall_at),
    ]  # fmt: skip
    child = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: queue.Queue[bytes] = queue.Queue()
    out = child.stdout
    assert out is not None

    def read() -> None:
        for line in out:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        said = lines.get(timeout=120)
    except queue.Empty:
        said = b"(nothing)"
    finally:
        child.send_signal(signal.SIGKILL)
        _, stderr = child.communicate(timeout=30)
    assert said == b"stalled\n", stderr.decode(errors="replace")[-3000:]
    assert child.returncode == -signal.SIGKILL

    layout = arena.layout
    assert not store.exists(layout.result(1))
    assert not store.exists(layout.base_manifest(2))
    assert list(store.list(layout.base_dir(2))), "no shard was written before the kill"
    # The torn write is a temp file that no listing shows.
    assert any(p.is_file() for p in store.root.glob(f"{RESERVED_SEGMENT_PREFIX}*/*"))

    publish_late(store, layout, arena.shapes, 1)
    rerun = aggregate(store, layout, 1, strategy)
    check_same(arena, [rerun], expected, reference, "after SIGKILL")
