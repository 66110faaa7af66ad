"""Property test: one hostile participant's validly signed update never disturbs a round.

Two honest participants and one hostile one ("mallory") are in every plan. The hostile
update is whatever a strategy draws: mutated or random shard bytes, hand-made safetensors
headers, NaN, infinities and huge values, broken int8 scales, manifests with out-of-range
numbers or tampered fields. Its shards are listed with their true size and sha256 and its
manifest is signed with mallory's key unless an edit says otherwise, so only the
aggregator's own checks stand between those bytes and the merge.

For each example, a full `aggregate_round` must return (never raise), and either

- refuse mallory, with a reason from `tapestry_protocol.rejections` that fits what is
  wrong (never UnreadableUpdate, the reason for the aggregator's own surprises), and
  publish the next base and optimizer state byte for byte as the round does in which
  mallory never reported, with the same weights, norms and metrics for the honest two;
- or merge mallory, when an independent reading of the bytes says the update is valid,
  and publish exactly what the round publishes with the same tensors sent by a well-behaved
  client (canonically encoded, same token count).

The independent reading is the reference `safetensors` library plus this file's own
checks of names, dtypes, shapes and values; where our reader is deliberately stricter
than that library (duplicate or unknown keys, a null `__metadata__`), the strategy says
so and expects a refusal.

The merge does not depend on which plan or close record it serves, only on the updates
it accepts, so the honest-only round is the same round closed without mallory's update.

Examples are derandomised and their number fixed (TAPESTRY_FUZZ_EXAMPLES, default 25), so
a run is reproducible; `make fuzz` raises the budget. Each example runs in a fresh copy
of a prepared store, on tmpfs where there is one.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
from hypothesis import HealthCheck, event, given
from hypothesis import strategies as st

from tapestry_aggregator.merge import MAX_DELTA_NORM, aggregate_round
from tapestry_aggregator.strategy import Strategy
from tapestry_protocol import documents, rejections
from tapestry_protocol.documents import (
    CloseTrigger,
    Contribution,
    ModelManifest,
    Outcome,
    Role,
    RoundPlan,
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
)
from tapestry_protocol.layout import MANIFEST, Layout, shard_name
from tapestry_protocol.shards import (
    CODEBOOK_LEVELS,
    CODEBOOK_SUFFIX,
    INT8_BLOCK,
    SCALE_SUFFIX,
    FloatArray,
    Tensor,
    encode_delta,
    encode_safetensors,
    plan_shards,
    sha256_hex,
    stored_names,
)
from tapestry_protocol.signing import SigningKey
from tapestry_protocol.store import FilesystemStore, ObjectStore
from tests.fuzz import SAFETENSORS_DTYPES, fuzz_settings

FUZZ = fuzz_settings(25, HealthCheck.function_scoped_fixture)

FEDERATION = "fuzz"
COORDINATOR_KEY = SigningKey.generate(COORDINATOR)
HONEST = {"alice": 3000, "bob": 1000}  # name -> tokens
HOSTILE = "mallory"
KEYS = {n: SigningKey.generate(n) for n in (*HONEST, HOSTILE)}
CLOSED_AT = datetime(2030, 1, 1, tzinfo=UTC)
CLOCK = "2030-01-01T00:00:00Z"
SHAPES = {"emb": (16, 20), "w1": (20, 4), "b1": (4,), "head": (4, 16)}
SHARD_BYTES = 512  # three shards: [emb], [w1, b1], [head]; emb spans two int8 blocks
STRATEGY = Strategy("diloco")  # so the optimizer state is compared too
HYPERPARAMETERS = {"innerSteps": 2, "learningRate": 1e-3, "batchSize": 2, "seqLen": 8}
ENCODINGS = ("fp32", "int8", "codebook")
FAST_TMP = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None

# The reference reader: [(name, {"dtype": ..., "shape": [...], "data": bytes}), ...].
deserialize: Callable[[bytes], list[tuple[str, dict[str, Any]]]] = safetensors.deserialize
FORMAT = frozenset({rejections.MALFORMED_DOCUMENT, rejections.TENSOR_MISMATCH})
MALFORMED = frozenset({rejections.MALFORMED_DOCUMENT})
# The dtypes our reader knows, as the reference library names them.
NUMPY_DTYPES = SAFETENSORS_DTYPES


def groups() -> list[list[str]]:
    return plan_shards([(n, 4 * int(np.prod(s))) for n, s in SHAPES.items()], SHARD_BYTES)


def small_delta(seed: int) -> dict[str, FloatArray]:
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) * 0.02).astype(np.float32) for n, s in SHAPES.items()}


def stored_shards(delta: dict[str, FloatArray], encoding: str) -> list[dict[str, Tensor]]:
    """The tensors a well-behaved client stores, shard by shard."""
    out: list[dict[str, Tensor]] = []
    for group in groups():
        tensors: dict[str, Tensor] = {}
        for name in group:
            tensors.update(encode_delta(name, delta[name], encoding))
        out.append(tensors)
    return out


HOSTILE_DELTA = small_delta(7)  # what mallory sends when it sends a well-formed update
WELL_FORMED_STORED = {e: stored_shards(HOSTILE_DELTA, e) for e in ENCODINGS}
WELL_FORMED_BYTES = {
    e: tuple(encode_safetensors(t) for t in s) for e, s in WELL_FORMED_STORED.items()
}


# --- the round ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Outputs:
    """What a round published: its result and, byte for byte, the next base and optimizer
    state (manifests and the shards they list)."""

    result: RoundResult
    model: dict[str, bytes]

    @property
    def honest(self) -> list[Contribution]:
        return [a for a in self.result.accepted if a.participant in HONEST]

    @property
    def accepted(self) -> list[Contribution]:
        return list(self.result.accepted)


class Template:
    """A store with the base, the plan and the honest updates of round 0, to copy."""

    def __init__(
        self,
        root: Path,
        encoding: str,
        layout: Layout,
        plan: Verified[RoundPlan],
        base: Verified[ModelManifest],
    ) -> None:
        self.root = root
        self.encoding = encoding
        self.layout = layout
        self.plan = plan
        self.base = base
        self.honest_only: Outputs | None = None
        # Rounds that merged a well-behaved client's update, by its shards and tokens.
        self.merged: dict[tuple[tuple[bytes, ...], Any], Outputs] = {}

    def __repr__(self) -> str:  # printed with every failing example
        return f"Template({self.encoding!r})"

    def run(
        self,
        publish: Callable[[ObjectStore], None],
        after_close: Callable[[ObjectStore], None] | None = None,
    ) -> Outputs:
        """A copy of the template, `publish` run on it, the round closed (then
        `after_close` run) and aggregated."""
        with tempfile.TemporaryDirectory(dir=FAST_TMP, prefix="tapestry-fuzz-") as d:
            root = Path(d) / "store"
            shutil.copytree(self.root, root)
            store = FilesystemStore(root)
            publish(store)
            close_round(
                store, self.layout, self.plan, COORDINATOR_KEY, CloseTrigger.ALL_REPORTED,
                CLOSED_AT,
            )  # fmt: skip
            if after_close is not None:
                after_close(store)
            result = aggregate_round(store, self.layout, 0, COORDINATOR_KEY, STRATEGY)
            return Outputs(result.document, model_objects(store, self.layout, result.document))


def model_objects(store: ObjectStore, layout: Layout, result: RoundResult) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    key = COORDINATOR_KEY.public_key_text
    for role, ref in ((Role.BASE, result.next_base), (Role.OPTIMIZER, result.optimizer_state)):
        if ref is None:
            continue
        model = read_model(store, layout, ref.manifest, key, role=role)
        for name in [MANIFEST] + [s.name for s in model.document.shards]:
            out[model.directory + name] = store.get(model.directory + name)
    return out


def build_template(root: Path, encoding: str) -> Template:
    store = FilesystemStore(root, create=True)
    layout = Layout(FEDERATION)
    rng = np.random.default_rng(1)
    tensors = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    base = publish_model(store, layout, 0, tensors, groups(), COORDINATOR_KEY, model={"p": 1})
    plan = make_plan(
        layout, 0, base, model={"p": 1}, hyperparameters=HYPERPARAMETERS,
        participants={n: k.public_key_text for n, k in KEYS.items()}, min_participants=2,
        deadline=CLOCK, encoding=encoding,
    )  # fmt: skip
    published = publish_plan(store, layout, plan, COORDINATOR_KEY)
    for i, (who, tokens) in enumerate(HONEST.items()):
        publish_update(
            store, layout, published, base, small_delta(i), KEYS[who], tokens=tokens,
            metrics={"trainLoss": 2.5 + i},
        )  # fmt: skip
    template = Template(root, encoding, layout, published, base)
    honest_only = template.run(lambda store: None)
    assert honest_only.result.outcome == Outcome.SUCCEEDED, honest_only.result.message
    assert [(r.participant, r.reason) for r in honest_only.result.rejected] == [
        (HOSTILE, rejections.LATE)
    ]
    template.honest_only = honest_only
    return template


@pytest.fixture(scope="module")
def templates() -> Iterator[dict[str, Template]]:
    with tempfile.TemporaryDirectory(dir=FAST_TMP, prefix="tapestry-fuzz-") as d:
        yield {e: build_template(Path(d) / e, e) for e in ENCODINGS}


# --- the hostile update ------------------------------------------------------------------


@dataclass(frozen=True)
class Edit:
    """One change to the hostile update's manifest (or to which shards are uploaded).
    `reasons`: the refusals it calls for; none when the manifest stays valid."""

    name: str
    slot: str  # edits of one slot exclude each other
    reasons: frozenset[str] = frozenset()
    doc: Callable[[dict[str, Any]], None] | None = field(default=None, repr=False)
    signed: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = field(
        default=None, repr=False
    )
    raw: Callable[[bytes], bytes] | None = field(default=None, repr=False)
    skip_upload: int | None = None
    tokens: Any = None  # a token count to claim instead of the default
    swap: bool = False  # replace the manifest after the close has pinned it


@dataclass(frozen=True)
class Hostile:
    encoding: str
    shards: tuple[bytes, ...]
    tokens: Any = 500
    edits: tuple[Edit, ...] = ()
    strict: bool = False  # our reader refuses it where the reference library would not

    @property
    def swapped(self) -> bool:
        return any(e.swap for e in self.edits)

    def publish(self, store: ObjectStore, template: Template) -> None:
        """Upload the shards and the manifest. With a `swap` edit, the manifest uploaded
        now is a valid one, which the close pins, and `after_close` replaces it."""
        directory = template.layout.update_dir(0, HOSTILE)
        skipped = {e.skip_upload for e in self.edits}
        for i, data in enumerate(self.shards):
            if i not in skipped:
                store.put(directory + shard_name(i, sha256_hex(data)), data)
        store.put(directory + MANIFEST, self.manifest(template, edited=not self.swapped))

    def after_close(self, store: ObjectStore, template: Template) -> None:
        if self.swapped:
            key = template.layout.update_manifest(0, HOSTILE)
            store.delete(key)
            store.put(key, self.manifest(template, edited=True))

    def manifest(self, template: Template, *, edited: bool) -> bytes:
        refs = [
            {"name": shard_name(i, sha256_hex(d)), "size": len(d), "sha256": sha256_hex(d),
             "tensors": group}
            for i, (d, group) in enumerate(zip(self.shards, groups(), strict=True))
        ]  # fmt: skip
        doc: dict[str, Any] = {
            "kind": "UpdateManifest",
            "schemaVersion": 1,
            "federation": FEDERATION,
            "round": 0,
            "participant": HOSTILE,
            "plan": {"sha256": template.plan.sha256},
            "base": {"sha256": template.base.sha256},
            "encoding": self.encoding,
            "shards": refs,
            "tokens": self.tokens,
            "metrics": {"trainLoss": 1.5 if edited else 9.0},
            "createdAt": CLOCK,
        }
        edits = self.edits if edited else ()
        for edit in edits:
            if edit.doc:
                edit.doc(doc)
        signed = KEYS[HOSTILE].sign(doc)
        for edit in edits:
            if edit.signed:
                signed = edit.signed(doc, signed)
        data = documents.encode(signed)
        for edit in edits:
            if edit.raw:
                data = edit.raw(data)
        return data


# --- the independent reading ---------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """What is right for an update: the refusal reasons that fit, whether merging it is
    right, and (if so) its tensors as stored, to send again from a well-behaved client."""

    reasons: frozenset[str]
    accept: bool
    stored: tuple[dict[str, Tensor], ...] = ()


def refuse(reasons: frozenset[str], maybe_large: bool = False) -> Expect:
    extra = frozenset({rejections.DELTA_TOO_LARGE}) if maybe_large else frozenset()
    return Expect(reasons | extra, False)


def judge(hostile: Hostile) -> Expect:
    """Read the shards with the reference safetensors library and check them shard by
    shard, tensor by tensor, in the order the merge does."""
    if hostile.strict:
        return refuse(FORMAT)
    stored: list[dict[str, Tensor]] = []
    maybe_large = False  # a norm so close to the limit that float32 rounding decides
    for data, group in zip(hostile.shards, groups(), strict=True):
        if len(data) < 8:
            return refuse(MALFORMED, maybe_large)  # the manifest schema's minimum size
        try:
            items = deserialize(data)
        except Exception:
            return refuse(FORMAT, maybe_large)
        tensors: dict[str, Tensor] = {}
        for name, info in items:
            if info["dtype"] not in NUMPY_DTYPES:
                return refuse(FORMAT, maybe_large)
            array = np.frombuffer(bytes(info["data"]), NUMPY_DTYPES[info["dtype"]])
            tensors[name] = Tensor(info["dtype"], array.reshape(info["shape"]))
        if sorted(tensors) != stored_names(group, hostile.encoding):
            return refuse(FORMAT, maybe_large)
        decoded = {}
        for name in group:
            values = _decoded(tensors, name, hostile.encoding)
            if values is None:
                return refuse(FORMAT, maybe_large)
            decoded[name] = values
        for name in group:
            values = decoded[name]
            if values.shape != SHAPES[name]:
                return refuse(FORMAT, maybe_large)
            if not np.isfinite(values).all():
                return refuse(frozenset({rejections.NON_FINITE}), maybe_large)
            norm = float(np.sqrt(np.sum(values.astype(np.float64) ** 2)))
            if norm > 2 * MAX_DELTA_NORM:
                return refuse(frozenset({rejections.DELTA_TOO_LARGE}))
            maybe_large |= norm > MAX_DELTA_NORM / 2
        stored.append(tensors)
    reasons = frozenset({rejections.DELTA_TOO_LARGE}) if maybe_large else frozenset()
    return Expect(reasons, True, tuple(stored))


def _decoded(tensors: dict[str, Tensor], name: str, encoding: str) -> FloatArray | None:
    tensor = tensors[name]
    with np.errstate(all="ignore"):
        if encoding == "fp32":
            return tensor.array.astype(np.float32) if tensor.dtype == "F32" else None
        if encoding == "codebook":
            levels = tensors[name + CODEBOOK_SUFFIX]
            if tensor.dtype != "U8" or levels.dtype != "F32":
                return None
            if levels.array.shape != (CODEBOOK_LEVELS,):
                return None
            looked_up: FloatArray = levels.array[tensor.array.astype(np.intp)]
            return looked_up
        scale = tensors[name + SCALE_SUFFIX]
        if tensor.dtype != "I8" or scale.dtype != "F32":
            return None
        flat = tensor.array.reshape(-1).astype(np.float32)
        blocks = -(-flat.size // INT8_BLOCK)
        if scale.array.shape != (blocks,):
            return None
        padded = np.zeros(blocks * INT8_BLOCK, dtype=np.float32)
        padded[: flat.size] = flat
        values = padded.reshape(blocks, INT8_BLOCK) * scale.array[:, None]
        out: FloatArray = values.reshape(-1)[: flat.size].reshape(tensor.array.shape)
        return out


def expected_reasons(hostile: Hostile) -> Expect:
    """The manifest edits decide when there are any that call for a refusal."""
    shards = judge(hostile)
    wrong = frozenset().union(*(e.reasons for e in hostile.edits))
    if wrong:
        return Expect(wrong | (shards.reasons if not shards.accept else frozenset()), False)
    return shards


# --- the property ---------------------------------------------------------------------------


def check(templates: dict[str, Template], hostile: Hostile) -> str:
    """Run the round with `hostile` in it; returns what became of the update."""
    template = templates[hostile.encoding]
    expect = expected_reasons(hostile)
    got = template.run(
        lambda store: hostile.publish(store, template),
        lambda store: hostile.after_close(store, template),
    )
    result = got.result
    assert result.outcome == Outcome.SUCCEEDED, result.message
    refused = {r.participant: r for r in result.rejected}
    if HOSTILE in refused:
        refusal = refused[HOSTILE]
        assert refusal.reason != rejections.UNREADABLE_UPDATE, refusal.message
        assert refusal.reason in expect.reasons, (refusal.reason, refusal.message, expect)
        assert refusal.message
        assert list(refused) == [HOSTILE]
        assert [a.participant for a in result.accepted] == list(HONEST)
        honest_only = template.honest_only
        assert honest_only is not None
        assert got.honest == honest_only.honest
        assert got.model == honest_only.model  # the next base and state, byte for byte
        return f"refused: {refusal.reason}"
    assert expect.accept, f"mallory was merged, but the update should be refused: {expect}"
    assert not refused
    assert [a.participant for a in result.accepted] == [*HONEST, HOSTILE]
    # The same tensors from a well-behaved client give the same round.
    well_behaved = tuple(encode_safetensors(t) for t in expect.stored)
    key = (well_behaved, hostile.tokens)
    if key not in template.merged:
        clean = Hostile(hostile.encoding, well_behaved, hostile.tokens)
        template.merged[key] = template.run(lambda store: clean.publish(store, template))
    reference = template.merged[key]
    assert got.model == reference.model
    mine = [(a.participant, a.weight, a.delta_norm, a.tokens) for a in result.accepted]
    theirs = [(a.participant, a.weight, a.delta_norm, a.tokens) for a in reference.accepted]
    assert mine == theirs
    return "merged"


# --- strategies: shard bytes -----------------------------------------------------------------


@st.composite
def mutated_shards(draw: st.DrawFn) -> Hostile:
    """A well-formed update with one shard's bytes mutated, replaced by random bytes or
    by another shard's."""
    encoding = draw(st.sampled_from(ENCODINGS))
    shards = list(WELL_FORMED_BYTES[encoding])
    i = draw(st.integers(0, len(shards) - 1))
    how = draw(st.sampled_from(("mutate", "mutate", "mutate", "random", "other shard")))
    if how == "random":
        shards[i] = draw(st.binary(max_size=400))
    elif how == "other shard":
        shards[i] = shards[(i + draw(st.integers(1, len(shards) - 1))) % len(shards)]
    else:
        data = bytearray(shards[i])
        header_end = 8 + int.from_bytes(data[:8], "little")
        for _ in range(draw(st.integers(1, 3))):
            if not data:
                break
            end = header_end if draw(st.booleans()) else len(data)
            pos = draw(st.integers(0, max(0, min(end, len(data)) - 1)))
            ops = ("flip", "flip", "byte", "byte", "insert", "delete", "cut", "append")
            op = draw(st.sampled_from(ops))
            if op == "flip":
                data[pos] ^= 1 << draw(st.integers(0, 7))
            elif op == "byte":
                data[pos] = draw(st.integers(0, 255))
            elif op == "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
            elif op == "delete":
                del data[pos : pos + draw(st.integers(1, 8))]
            elif op == "append":
                data += draw(st.binary(min_size=1, max_size=8))
            else:
                del data[pos:]
        shards[i] = bytes(data)
    return Hostile(encoding, tuple(shards))


# Values for the fields of a hand-made header entry: usually right, often not.
DTYPES = st.sampled_from(
    ["F32", "F32", "F32", "F16", "F64", "I32", "BOOL", "U8", "f32", "", "F32\x00", "x" * 500]
) | st.sampled_from([32, None, True, ["F32"], {"F": 32}, 3.5])
BAD_SHAPES = st.sampled_from(
    [
        [2**40, 2**40],
        [10**30],
        [-1, 8],
        [8.0, 40],
        [],
        [[16], [20]],
        "16,20",
        [True, 20],
        [1] * 40,
        [0, 2**62],
        [2**64],
    ]
)
BAD_OFFSETS = st.sampled_from(["reversed", "past data", "overlap", "gap", "huge", "negative"])


@st.composite
def hostile_headers(draw: st.DrawFn) -> Hostile:
    """One shard of an fp32 update with a header made by hand around the right data."""
    shards = list(WELL_FORMED_BYTES["fp32"])
    i = draw(st.integers(0, len(shards) - 1))
    tensors = dict(WELL_FORMED_STORED["fp32"][i])
    if draw(st.booleans()):
        tensors["extra"] = Tensor("F32", np.zeros(1, np.float32))
    names = sorted(tensors)
    body = b"".join(tensors[n].array.tobytes() for n in names)
    header: dict[str, Any] = {}
    offset = 0
    for name in names:
        size = tensors[name].array.nbytes
        entry: dict[str, Any] = {
            "dtype": draw(DTYPES),
            "shape": list(tensors[name].array.shape),
            "data_offsets": [offset, offset + size],
        }
        if draw(st.integers(0, 3)) == 0:
            entry["shape"] = draw(BAD_SHAPES)
        elif draw(st.integers(0, 4)) == 0:  # the same elements, another shape
            entry["shape"] = [*reversed(entry["shape"]), 1]
        if draw(st.integers(0, 3)) == 0:
            entry["data_offsets"] = _bad_offsets(draw(BAD_OFFSETS), offset, size, len(body))
        offset += size
        renamed = draw(st.sampled_from([name] * 6 + ["", name + "\x00", "n" * 5000, "other"]))
        header[renamed] = entry
    strict = False
    metadata = draw(st.sampled_from(["absent", "absent", "ok", "not strings", "null", "list"]))
    if metadata != "absent":
        header["__metadata__"] = {
            "ok": {"format": "pt"},
            "not strings": {"format": 1},
            "null": None,
            "list": ["pt"],
        }[metadata]
        strict |= metadata == "null"  # the reference library takes a null __metadata__
    if draw(st.integers(0, 4)) == 0:
        next(iter(header.values()))["unexpected"] = 1
        strict = True  # the reference library ignores unknown keys
    text = json.dumps(header).encode()
    tweak = draw(
        st.sampled_from(["none"] * 6 + ["duplicate", "deep", "nan", "utf8", "length", "pad"])
    )
    if tweak == "duplicate":  # the reference library keeps the last of two equal keys
        first = next(iter(header))
        text = text[:-1] + b", " + json.dumps({first: header[first]}).encode()[1:]
        strict = True
    elif tweak == "deep":
        text = text[:-1] + b', "deep": ' + b"[" * 40 + b"]" * 40 + b"}"
    elif tweak == "nan":
        text = text[:-1] + b', "n": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 0]}}'
    elif tweak == "utf8":
        text = text[:1] + b'"\xff\xfe": 1, ' + text[1:]
    elif tweak == "pad":  # trailing spaces are allowed, as writers align the data
        text += b" " * draw(st.integers(1, 15))
    if draw(st.integers(0, 4)) == 0:  # bytes after the last tensor's data
        body += draw(st.binary(min_size=1, max_size=8))
    length = len(text)
    if tweak == "length":
        length = draw(st.sampled_from([length + d for d in (-8, -3, -1, 1, 2, 8)] + [2**40]))
        length = draw(st.sampled_from([length, 2**64 - 1]))
    shards[i] = struct.pack("<Q", length) + text + body
    return Hostile("fp32", tuple(shards), strict=strict)


def _bad_offsets(kind: str, start: int, size: int, body: int) -> list[Any]:
    return {
        "reversed": [start + size, start],
        "past data": [start, body + 4],
        "overlap": [max(0, start - 4), start + size - 4],
        "gap": [start + 4, start + size + 4],
        "huge": [start, 2**63],
        "negative": [-4, start + size],
    }[kind]


SPECIAL = st.sampled_from(
    [np.nan, np.inf, -np.inf, 1e30, -3.4e38, 1e19, 1e14, 3e14, 1e-45, -0.0, 65504.0]
) | st.floats(width=32)


@st.composite
def bad_values(draw: st.DrawFn) -> Hostile:
    """Well-formed fp32 shards whose values include NaN, infinities and huge numbers."""
    delta = {n: v.copy() for n, v in HOSTILE_DELTA.items()}
    for name in draw(st.lists(st.sampled_from(sorted(SHAPES)), min_size=1, unique=True)):
        flat = delta[name].reshape(-1)
        for _ in range(draw(st.integers(1, 12))):
            flat[draw(st.integers(0, flat.size - 1))] = draw(SPECIAL)
    shards = tuple(encode_safetensors(t) for t in stored_shards(delta, "fp32"))
    tokens = draw(st.sampled_from([0, 1, 500, 2**53 - 1]))
    return Hostile("fp32", shards, tokens)


SIDE_EDITS = ["ok", "ok", "F16", "F64", "I8", "longer", "shorter", "2-D", "scalar", "missing",
              "renamed", "nan", "inf", "huge", "negative", "zero"]  # fmt: skip
# encoding -> the suffix of its side tensor (int8's scales, the codebook's levels), and
# the dtype of its values
SIDE = {"int8": (SCALE_SUFFIX, "I8"), "codebook": (CODEBOOK_SUFFIX, "U8")}


@st.composite
def side_tensors(draw: st.DrawFn, encoding: str) -> Hostile:
    """An int8 or codebook update whose stored values or side tensor (int8's scales, the
    codebook's levels) are wrong in dtype, shape or value."""
    suffix, dtype = SIDE[encoding]
    other = "U8" if dtype == "I8" else "I8"  # the other 8-bit integer
    i = draw(st.integers(0, len(groups()) - 1))
    stored = [dict(s) for s in WELL_FORMED_STORED[encoding]]
    tensors = stored[i]
    for name in groups()[i]:
        values, side = tensors[name].array, tensors[name + suffix].array
        how = draw(st.sampled_from(SIDE_EDITS))
        new = _side(how, side)
        del tensors[name + suffix]
        if new is not None:
            tensors[name + (":renamed" if how == "renamed" else suffix)] = new
        wrong = draw(st.sampled_from(["ok", "ok", "ok", other, "I16", "F32", "reshaped"]))
        tensors[name] = {
            "ok": Tensor(dtype, values),
            other: Tensor(other, values.view(np.uint8 if other == "U8" else np.int8)),
            "I16": Tensor("I16", values.astype(np.int16)),
            "F32": Tensor("F32", values.astype(np.float32)),
            "reshaped": Tensor(dtype, values.reshape(-1)),
        }[wrong]
    shards = tuple(encode_safetensors(t) for t in stored)
    return Hostile(encoding, shards, draw(st.sampled_from([1, 500, 10**6])))


def _side(how: str, side: FloatArray) -> Tensor | None:
    """`side` changed as `how` says (None: left out)."""
    if how == "missing":
        return None
    if how in ("F16", "F64"):
        return Tensor(how, side.astype(np.float16 if how == "F16" else np.float64))
    if how == "I8":
        return Tensor("I8", np.ones(side.shape, np.int8))
    changed = {
        "longer": np.append(side, np.float32(0.01)),
        "shorter": side[:-1],
        "2-D": side.reshape(1, -1),
        "scalar": side[0],
        "nan": np.full_like(side, np.nan),
        "inf": np.full_like(side, np.inf),
        "huge": np.full_like(side, 1e38),
        "negative": -side,
        "zero": np.zeros_like(side),
    }.get(how, side)
    return Tensor("F32", np.ascontiguousarray(changed, dtype=np.float32))


# --- strategies: the manifest ------------------------------------------------------------------

TOKEN_MAX = 2**53 - 1


def _set(path: tuple[str | int, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        target: Any = doc
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value

    return edit


def _replace(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        assert old in data, old
        return data.replace(old, new, 1)

    return edit


def _resign(key: str, key_id: str) -> Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]:
    def edit(doc: dict[str, Any], signed: dict[str, Any]) -> dict[str, Any]:
        out = KEYS[key].sign(doc)
        out["signature"]["keyId"] = key_id
        return out

    return edit


def _signature(**fields: Any) -> Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]:
    def edit(doc: dict[str, Any], signed: dict[str, Any]) -> dict[str, Any]:
        return {**signed, "signature": {**signed["signature"], **fields}}

    return edit


def _unsigned(doc: dict[str, Any], signed: dict[str, Any]) -> dict[str, Any]:
    return dict(doc)


def _shards(change: Callable[[list[dict[str, Any]]], None]) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        change(doc["shards"])

    return edit


def _drop(name: str) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        del doc[name]

    return edit


def _drop_last(shards: list[dict[str, Any]]) -> None:
    shards.pop()


def _pretty(data: bytes) -> bytes:
    return json.dumps(json.loads(data), indent=2, sort_keys=False).encode()


M = rejections
FIXED_EDITS = [
    Edit(
        "other participant", "who", frozenset({M.WRONG_PARTICIPANT}), _set(("participant",), "bob")
    ),
    Edit("other round", "round", frozenset({M.WRONG_ROUND}), _set(("round",), 1)),
    Edit("other federation", "fed", frozenset({M.WRONG_FEDERATION}), _set(("federation",), "x")),
    Edit("other plan", "plan", frozenset({M.WRONG_PLAN}), _set(("plan", "sha256"), "0" * 64)),
    Edit("other base", "base", frozenset({M.WRONG_BASE}), _set(("base", "sha256"), "1" * 64)),
    Edit("bf16 encoding", "enc", MALFORMED, _set(("encoding",), "bf16")),
    Edit("unknown encoding", "enc", MALFORMED, _set(("encoding",), "int4")),
    Edit("another kind", "kind", MALFORMED, _set(("kind",), "RoundPlan")),
    Edit("schema v2", "kind", frozenset({M.UNKNOWN_SCHEMA_VERSION}), _set(("schemaVersion",), 2)),
    Edit("extra field", "extra", MALFORMED, _set(("extra",), 1)),
    Edit("bad time", "time", MALFORMED, _set(("createdAt",), "yesterday at noon")),
    Edit("no time", "time", MALFORMED, _drop("createdAt")),
    Edit("nested metric", "metrics", MALFORMED, _set(("metrics", "x"), {"y": 1})),
    Edit("list metric", "metrics", MALFORMED, _set(("metrics", "x"), [1.0])),
    Edit("bool metric", "metrics", MALFORMED, _set(("metrics", "x"), True)),
    Edit("long metric key", "metrics", MALFORMED, _set(("metrics", "k" * 65), 1)),
    Edit("long metric text", "metrics", MALFORMED, _set(("metrics", "x"), "t" * 257)),
    # Refusal messages quote what is wrong; they must stay within the result's bounds.
    Edit("5000-char metric key", "metrics", MALFORMED, _set(("metrics", "k" * 5000), 1)),
    Edit("5000-char metric text", "metrics", MALFORMED, _set(("metrics", "x"), "t" * 5000)),
    Edit("5000-char participant", "who", MALFORMED, _set(("participant",), "p" * 5000)),
    Edit("null metric", "metrics", frozenset(), _set(("metrics", "x"), None)),
    Edit("text metric", "metrics", frozenset(), _set(("metrics", "trainLoss"), "t" * 256)),
    Edit(
        "65 metrics",
        "metrics",
        MALFORMED,
        lambda d: d["metrics"].update({f"m{i}": i for i in range(65)}),
    ),
    Edit(
        "deep metric",
        "metrics",
        MALFORMED,
        _set(("metrics", "x"), json.loads("[" * 30 + "]" * 30)),
    ),
    Edit(
        "size + 1",
        "shards",
        frozenset({M.SIZE_MISMATCH}),
        _shards(lambda s: s[0].update(size=s[0]["size"] + 1)),
    ),
    Edit("size 2**50", "shards", MALFORMED, _shards(lambda s: s[1].update(size=2**50))),
    Edit("size -1", "shards", MALFORMED, _shards(lambda s: s[1].update(size=-1))),
    Edit(
        "other sha",
        "shards",
        frozenset({M.HASH_MISMATCH}),
        _shards(lambda s: s[2].update(sha256="a" * 64)),
    ),
    Edit("sha not hex", "shards", MALFORMED, _shards(lambda s: s[2].update(sha256="Z" * 64))),
    Edit(
        "wrong index",
        "shards",
        frozenset({M.TENSOR_MISMATCH}),
        _shards(lambda s: s[0].update(name=s[1]["name"])),
    ),
    Edit(
        "bad name", "shards", MALFORMED, _shards(lambda s: s[0].update(name="../../x.safetensors"))
    ),
    Edit(
        "renamed tensor",
        "shards",
        frozenset({M.TENSOR_MISMATCH}),
        _shards(lambda s: s[0].update(tensors=["embed"])),
    ),
    Edit(
        "tensors reversed",
        "shards",
        frozenset({M.TENSOR_MISMATCH}),
        _shards(lambda s: s[1]["tensors"].reverse()),
    ),
    Edit("tensor twice", "shards", MALFORMED, _shards(lambda s: s[1].update(tensors=["w1", "w1"]))),
    Edit("no tensors", "shards", MALFORMED, _shards(lambda s: s[1].update(tensors=[]))),
    Edit(
        "shards swapped", "shards", frozenset({M.TENSOR_MISMATCH}), _shards(lambda s: s.reverse())
    ),
    Edit(
        "last shard dropped",
        "shards",
        frozenset({M.MISSING_SHARD}),
        _shards(_drop_last),
    ),
    Edit("no shards", "shards", MALFORMED, _shards(lambda s: s.clear())),
    Edit(
        "shard added",
        "shards",
        frozenset({M.EXTRA_SHARD}),
        _shards(lambda s: s.append({**s[-1], "name": "part-00003-" + s[-1]["name"][11:]})),
    ),
    Edit("shard not uploaded", "upload", frozenset({M.MISSING_SHARD}), skip_upload=1),
    Edit("replaced after the close", "swap", frozenset({M.HASH_MISMATCH}), swap=True),
    Edit(
        "signed by bob's key", "sig", frozenset({M.BAD_SIGNATURE}), signed=_resign("bob", HOSTILE)
    ),
    Edit("signed as bob", "sig", frozenset({M.UNKNOWN_SIGNER}), signed=_resign("bob", "bob")),
    Edit("unsigned", "sig", frozenset({M.MISSING_SIGNATURE}), signed=_unsigned),
    Edit(
        "zero signature",
        "sig",
        frozenset({M.BAD_SIGNATURE}),
        signed=_signature(value=base64.b64encode(bytes(64)).decode()),
    ),
    Edit(
        "signature not base64", "sig", frozenset({M.BAD_SIGNATURE}), signed=_signature(value="!!!!")
    ),
    Edit("rsa signature", "sig", MALFORMED, signed=_signature(algorithm="rsa")),
    Edit("pretty-printed", "raw", frozenset(), raw=_pretty),
    Edit("trailing whitespace", "raw", frozenset(), raw=lambda d: d + b"\n \t\n"),
    Edit("duplicate key", "raw", MALFORMED, raw=_replace(b'"round":', b'"round":0,"round":')),
    Edit(
        "duplicate 5000-char key",
        "raw",
        MALFORMED,
        raw=_replace(
            b'"metrics":{', b'"metrics":{"' + b"k" * 5000 + b'":1,"' + b"k" * 5000 + b'":2,'
        ),
    ),
    Edit("NaN", "raw", MALFORMED, raw=_replace(b'"metrics":{', b'"metrics":{"n":NaN,')),
    Edit("Infinity", "raw", MALFORMED, raw=_replace(b'"metrics":{', b'"metrics":{"n":-Infinity,')),
    Edit("1e400", "raw", MALFORMED, raw=_replace(b'"metrics":{', b'"metrics":{"n":1e400,')),
    Edit(
        "5000 digits",
        "raw",
        MALFORMED,
        raw=_replace(b'"metrics":{', b'"metrics":{"n":1' + b"0" * 5000 + b","),
    ),
    Edit(
        "5000 deep",
        "raw",
        MALFORMED,
        raw=_replace(b'"metrics":{', b'"metrics":{"n":' + b"[" * 5000 + b"]" * 5000 + b","),
    ),
    Edit("not UTF-8", "raw", MALFORMED, raw=_replace(b'"metrics":{', b'"metrics":{"\xff":1,')),
    Edit(
        "lone surrogate", "raw", MALFORMED, raw=_replace(b'"metrics":{', b'"metrics":{"\\ud800":1,')
    ),
    Edit("BOM", "raw", MALFORMED, raw=lambda d: b"\xef\xbb\xbf" + d),
    Edit("array", "raw", MALFORMED, raw=lambda d: b"[" + d + b"]"),
    Edit("truncated", "raw", MALFORMED, raw=lambda d: d[: len(d) // 2]),
    Edit("empty", "raw", MALFORMED, raw=lambda d: b""),
    Edit("trailing garbage", "raw", MALFORMED, raw=lambda d: d + b"x"),
]


def _tokens_edit(value: Any) -> Edit:
    valid = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and float(value).is_integer()
        and 0 <= value <= TOKEN_MAX
    )
    return Edit(f"tokens={value!r}", "tokens", frozenset() if valid else MALFORMED, tokens=value)


def _metric_edit(value: Any) -> Edit:
    valid = isinstance(value, int | float) and not isinstance(value, bool) and abs(value) <= 1e300
    return Edit(
        f"trainLoss={value!r}",
        "metrics",
        frozenset() if valid else MALFORMED,
        _set(("metrics", "trainLoss"), value),
    )


TOKENS = (
    st.integers(-3, 3)
    | st.integers(TOKEN_MAX - 2, TOKEN_MAX + 2)
    | st.sampled_from([10**30, -(10**30), 1.0, 1.5, 1e300, float(TOKEN_MAX), True, "7", None])
)
METRICS = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
    [1e300, -1e300, 1e308, -1e301, 10**300, 10**301, 2**64]
)
EDITS = st.sampled_from(FIXED_EDITS) | TOKENS.map(_tokens_edit) | METRICS.map(_metric_edit)


@st.composite
def hostile_manifests(draw: st.DrawFn) -> Hostile:
    """Well-formed shards under a manifest with one or two fields out of range or tampered."""
    edits = draw(st.lists(EDITS, min_size=1, max_size=2, unique_by=lambda e: e.slot))
    encoding = draw(st.sampled_from(ENCODINGS))
    tokens = next((e.tokens for e in edits if e.slot == "tokens"), 500)
    return Hostile(encoding, WELL_FORMED_BYTES[encoding], tokens, tuple(edits))


# --- tests ---------------------------------------------------------------------------------------


@FUZZ
@given(hostile=mutated_shards())
def test_mutated_shard_bytes(templates: dict[str, Template], hostile: Hostile) -> None:
    event(check(templates, hostile))


@FUZZ
@given(hostile=hostile_headers())
def test_hostile_safetensors_headers(templates: dict[str, Template], hostile: Hostile) -> None:
    event(check(templates, hostile))


@FUZZ
@given(hostile=bad_values())
def test_nan_infinite_and_huge_values(templates: dict[str, Template], hostile: Hostile) -> None:
    event(check(templates, hostile))


@FUZZ
@given(hostile=side_tensors("int8"))
def test_int8_updates_with_bad_scales(templates: dict[str, Template], hostile: Hostile) -> None:
    event(check(templates, hostile))


@FUZZ
@given(hostile=side_tensors("codebook"))
def test_codebook_updates_with_bad_levels(templates: dict[str, Template], hostile: Hostile) -> None:
    event(check(templates, hostile))


@FUZZ
@given(hostile=hostile_manifests())
def test_out_of_range_and_tampered_manifests(
    templates: dict[str, Template], hostile: Hostile
) -> None:
    event(check(templates, hostile))


def test_a_manifest_larger_than_the_document_limit(templates: dict[str, Template]) -> None:
    """Too large to draw often: a manifest padded past the 16 MiB document limit."""
    pad = Edit("huge", "raw", MALFORMED, raw=lambda d: d[:-2] + b" " * (17 << 20) + d[-2:])
    outcome = check(templates, Hostile("fp32", WELL_FORMED_BYTES["fp32"], edits=(pad,)))
    assert outcome == f"refused: {rejections.MALFORMED_DOCUMENT}"


@pytest.mark.parametrize("edit", FIXED_EDITS, ids=[e.name for e in FIXED_EDITS])
def test_every_manifest_edit_alone(templates: dict[str, Template], edit: Edit) -> None:
    """Each edit of the table once, whatever the drawn examples happen to cover."""
    outcome = check(templates, Hostile("fp32", WELL_FORMED_BYTES["fp32"], edits=(edit,)))
    # check() has asserted that a refusal gives one of the edit's reasons.
    assert outcome.startswith("refused: ") if edit.reasons else outcome == "merged"


def _with_header(header: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + body


def _long_names() -> list[tuple[str, bytes, frozenset[str]]]:
    """Shards whose names or dtypes are far longer than a refusal message may be."""
    emb = WELL_FORMED_STORED["fp32"][0]["emb"]
    long_name = encode_safetensors({"n" * 5000: emb})
    entry = {"dtype": "x" * 5000, "shape": [16, 20], "data_offsets": [0, emb.array.nbytes]}
    long_dtype = _with_header(json.dumps({"emb": entry}).encode(), emb.array.tobytes())
    duplicate = b'{"%s": 1, "%s": 2}' % (b"d" * 5000, b"d" * 5000)
    return [
        ("tensor name", long_name, FORMAT),
        ("dtype", long_dtype, FORMAT),
        ("duplicate header key", _with_header(duplicate, b""), FORMAT),
    ]


LONG_NAMES = _long_names()


@pytest.mark.parametrize(("what", "shard", "reasons"), LONG_NAMES, ids=[c[0] for c in LONG_NAMES])
def test_long_names_in_a_shard(
    templates: dict[str, Template], what: str, shard: bytes, reasons: frozenset[str]
) -> None:
    hostile = Hostile("fp32", (shard, *WELL_FORMED_BYTES["fp32"][1:]))
    assert judge(hostile).reasons == reasons, what
    assert check(templates, hostile).startswith("refused: ")


@pytest.mark.parametrize("loss", [1e300, -1e300])
def test_extreme_metrics_that_dominate_the_round(
    templates: dict[str, Template], loss: float
) -> None:
    """The largest valid loss with nearly all the weight: the round's weighted mean of the
    losses must stay within the range a result may hold."""
    edits = (_tokens_edit(TOKEN_MAX), _metric_edit(loss))
    hostile = Hostile("fp32", WELL_FORMED_BYTES["fp32"], TOKEN_MAX, edits)
    assert check(templates, hostile) == "merged"
