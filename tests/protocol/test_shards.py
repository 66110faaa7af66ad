"""The NumPy safetensors codec against the reference `safetensors` library, and the
delta encodings' accuracy."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

from tapestry_protocol.shards import (
    MAX_HEADER_BYTES,
    MAX_RANK,
    ShardFormatError,
    Tensor,
    decode_delta,
    decode_safetensors,
    encode_delta,
    encode_safetensors,
    from_bf16_bits,
    plan_shards,
    to_bf16_bits,
)


def test_encoding_is_read_by_the_reference_library() -> None:
    rng = np.random.default_rng(0)
    tensors: dict[str, np.ndarray] = {
        "b.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "a.bias": np.arange(7, dtype=np.int64),
        "c": np.array([1, -2, 3], dtype=np.int8),
    }
    data = encode_safetensors({k: Tensor.of(v) for k, v in tensors.items()}, {"k": "v"})
    loaded = safetensors.numpy.load(data)
    assert sorted(loaded) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(loaded[name], value)


def test_decoding_reads_the_reference_library_output() -> None:
    tensors = {"x": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)}
    data = safetensors.numpy.save(tensors, metadata={"who": "ref"})
    decoded, metadata = decode_safetensors(data)
    assert metadata == {"who": "ref"}
    np.testing.assert_array_equal(decoded["x"].array, tensors["x"])


def _with_header(header: bytes, body: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + body


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01\x02", "shorter than"),
        (_with_header(b"{}", b"")[:-1] + b"", "exceeds the file"),
        (_with_header(b"[1]"), "not a JSON object"),
        (_with_header(b"{not json"), "not valid JSON"),
        (
            _with_header(b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', b"\0" * 4),
            "does not match its shape",
        ),
        (
            _with_header(b'{"x":{"dtype":"PICKLE","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4),
            "unsupported dtype",
        ),
        (
            _with_header(b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 8),
            "trailing bytes",
        ),
        (
            _with_header(b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8),
            "leaves a gap after the previous tensor",
        ),
    ],
)
def test_malformed_files_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ShardFormatError, match=message):
        decode_safetensors(data)


def _entry(dtype: Any = "F32", shape: Any = (1,), offsets: Any = (0, 4)) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _shard(header: dict[str, Any], body: bytes = b"\0" * 4) -> bytes:
    return _with_header(json.dumps(header).encode(), body)


# One case per class of hostile header: each used to escape as another exception
# (TypeError, OverflowError, RecursionError...) or to be silently accepted.
HOSTILE_HEADERS: list[tuple[str, bytes, str]] = [
    ("dtype is a list", _shard({"x": _entry(dtype=["F32"])}), "unsupported dtype ['F32']"),
    ("dtype is a number", _shard({"x": _entry(dtype=4)}), "unsupported dtype 4"),
    ("dtype unknown", _shard({"x": _entry(dtype="U64")}), "use one of F64, F32"),
    (
        "element count overflows int64",
        _shard({"x": _entry(shape=[2**40, 2**40, 2**40])}),
        "impossibly large",
    ),
    (
        "element count wraps to zero in int64",
        _shard({"x": _entry(shape=[2**32, 2**32], offsets=[0, 0])}, b""),
        "impossibly large",
    ),
    (
        "empty tensor with a huge dimension",
        _shard({"x": _entry(shape=[0, 2**62], offsets=[0, 0])}, b""),
        "impossibly large",
    ),
    (
        "dimension beyond uint64",
        _shard({"x": _entry(shape=[0, 2**70], offsets=[0, 0])}, b""),
        "impossibly large",
    ),
    (
        "integer with thousands of digits",
        _with_header(b'{"x":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}'),
        "integer of 5000 digits",
    ),
    ("negative dimension", _shard({"x": _entry(shape=[-1])}), "invalid shape [-1]"),
    ("bool dimension", _shard({"x": _entry(shape=[True])}), "invalid shape [True]"),
    ("float dimension", _shard({"x": _entry(shape=[1.0])}), "invalid shape [1.0]"),
    ("shape not a list", _shard({"x": _entry(shape="1")}), "invalid shape"),
    ("rank too high", _shard({"x": _entry(shape=[1] * (MAX_RANK + 1))}), "more than the limit"),
    ("offsets past the data", _shard({"x": _entry(offsets=[0, 8])}), "end <= 4"),
    ("offsets far past the data", _shard({"x": _entry(offsets=[2**64, 2**64 + 4])}), "invalid"),
    ("negative offset", _shard({"x": _entry(offsets=[-4, 0])}), "invalid data_offsets [-4, 0]"),
    ("bool offset", _shard({"x": _entry(offsets=[False, 4])}), "invalid data_offsets [False"),
    ("reversed offsets", _shard({"x": _entry(offsets=[4, 0])}), "0 <= start <= end"),
    ("three offsets", _shard({"x": _entry(offsets=[0, 2, 4])}), "invalid data_offsets"),
    (
        "overlapping spans",
        _shard({"a": _entry(offsets=[0, 4]), "b": _entry(offsets=[2, 6])}, b"\0" * 6),
        "tensor 'b' data (bytes 2..6) overlaps the previous tensor",
    ),
    (
        "the same span twice",
        _shard({"a": _entry(), "b": _entry()}),
        "overlaps the previous tensor",
    ),
    ("gap before the first", _shard({"x": _entry(offsets=[4, 8])}, b"\0" * 8), "leaves a gap"),
    ("trailing bytes", _shard({"x": _entry()}, b"\0" * 5), "1 trailing bytes"),
    ("nested JSON", _with_header(b"[" * 100_000 + b"]" * 100_000), "nests 100000 levels deep"),
    ("nested in an entry", _shard({"x": _entry(shape=[[1]])}), "nests 4 levels deep"),
    (
        "duplicate tensor names",
        _with_header(
            b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            b'"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
            b"\0" * 4,
        ),
        "repeats the object key 'x'",
    ),
    (
        "duplicate entry keys",
        _with_header(
            b'{"x":{"dtype":"F32","dtype":"F16","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4
        ),
        "repeats the object key 'dtype'",
    ),
    ("NaN", _with_header(b'{"__metadata__":{"a":NaN}}'), "holds NaN"),
    ("number overflowing a float", _with_header(b'{"x":1e400}'), "too large for a float"),
    ("entry not an object", _shard({"x": [1, 2]}), "entry is not an object"),
    ("entry with an extra key", _shard({"x": {**_entry(), "z": 1}}), "unexpected ['z']"),
    ("entry missing a key", _shard({"x": {"dtype": "F32", "shape": [1]}}), "missing ['data_"),
    ("empty name", _shard({"": _entry()}), "empty name"),
    ("metadata not an object", _shard({"__metadata__": None, "x": _entry()}), "must be an obj"),
    ("metadata not strings", _shard({"__metadata__": {"k": 1}, "x": _entry()}), "'k' maps to 1"),
    ("header not UTF-8", _with_header(b'{"\xff":1}'), "not UTF-8"),
    ("header in UTF-16", _with_header('{"x":1}'.encode("utf-16")), "not UTF-8"),
    ("lone surrogate", _shard({"\ud800": _entry()}), "lone UTF-16 surrogate"),
    ("BOOL that is not 0 or 1", _shard({"x": _entry("BOOL", [4])}, b"\0\1\2\0"), "BOOL but"),
    ("header beyond the limit", struct.pack("<Q", MAX_HEADER_BYTES + 1), "more than the limit"),
    ("header length near 2**64", struct.pack("<Q", 2**64 - 1) + b"{}", "more than the limit"),
    ("header is empty", _with_header(b""), "not valid JSON"),
]


@pytest.mark.parametrize(
    ("data", "message"),
    [pytest.param(data, message, id=case) for case, data, message in HOSTILE_HEADERS],
)
def test_hostile_headers_are_refused_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(ShardFormatError) as e:
        decode_safetensors(data)
    assert message in str(e.value)
    assert len(str(e.value)) < 400, "messages stay short even for huge values"


def test_a_huge_name_is_cut_short_in_the_message() -> None:
    with pytest.raises(ShardFormatError, match=r"tensor 'nnnn.*\.\.\. has unsupported") as e:
        decode_safetensors(_shard({"n" * 1_000_000: _entry(dtype="X")}))
    assert len(str(e.value)) < 400


@pytest.mark.parametrize(
    ("header", "body"),
    [
        ({}, b""),
        ({"__metadata__": {"format": "np"}}, b""),
        ({"z": _entry(shape=[0, 7], offsets=[0, 0]), "a": _entry(offsets=[0, 4])}, b"\0" * 4),
        ({"a": _entry(shape=[]), "b": _entry("BOOL", [2, 1], [4, 6])}, b"\0" * 4 + b"\1\0"),
        ({"x": _entry("F32", [1] * MAX_RANK)}, b"\0" * 4),
    ],
)
def test_edge_cases_that_are_well_formed(header: dict[str, Any], body: bytes) -> None:
    tensors, _ = decode_safetensors(_shard(header, body))
    assert sorted(tensors) == sorted(k for k in header if k != "__metadata__")
    for name, tensor in tensors.items():
        assert tensor.array.shape == tuple(header[name]["shape"])


def test_decoding_is_zero_copy() -> None:
    data = bytearray(encode_safetensors({"x": Tensor.of(np.zeros(4, dtype=np.float32))}))
    tensors, _ = decode_safetensors(memoryview(data))
    data[-4:] = np.float32(2.5).tobytes()
    assert tensors["x"].array[-1] == 2.5


@pytest.mark.parametrize(
    ("stored", "encoding", "message"),
    [
        ({}, "fp32", "w: tensor is missing"),
        ({"w": Tensor.of(np.zeros(2, np.float16))}, "fp32", "needs dtype F32, got F16"),
        ({"w": Tensor.of(np.zeros(2, np.float32))}, "bf16", "needs dtype BF16, got F32"),
        ({"w": Tensor.of(np.zeros(2, np.float32))}, "int8", "needs dtype I8, got F32"),
        ({"w": Tensor.of(np.zeros(2, np.int8))}, "int8", "needs the tensor w:scale"),
        (
            {"w": Tensor.of(np.zeros(2, np.int8)), "w:scale": Tensor.of(np.zeros(1, np.int8))},
            "int8",
            "need dtype F32, got I8",
        ),
        (
            {
                "w": Tensor.of(np.zeros(300, np.int8)),
                "w:scale": Tensor.of(np.zeros(1, np.float32)),
            },
            "int8",
            "expected shape [2] (one scale per 256 values), got [1]",
        ),
        (
            {
                "w": Tensor.of(np.zeros(3, np.int8)),
                "w:scale": Tensor.of(np.zeros((1, 1), np.float32)),
            },
            "int8",
            "expected shape [1]",
        ),
        ({"w": Tensor.of(np.zeros(2, np.int8))}, "codebook", "needs dtype U8, got I8"),
        ({"w": Tensor.of(np.zeros(2, np.uint8))}, "codebook", "needs the tensor w:codebook"),
        (
            {
                "w": Tensor.of(np.zeros(2, np.uint8)),
                "w:codebook": Tensor.of(np.zeros(255, np.float32)),
            },
            "codebook",
            "expected F32 of shape [256], got F32 of shape [255]",
        ),
        (
            {
                "w": Tensor.of(np.zeros(2, np.uint8)),
                "w:codebook": Tensor.of(np.zeros(256, np.int8)),
            },
            "codebook",
            "expected F32 of shape [256], got I8",
        ),
    ],
)
def test_inconsistent_deltas_are_format_errors(
    stored: dict[str, Tensor], encoding: str, message: str
) -> None:
    with pytest.raises(ShardFormatError) as e:
        decode_delta(stored, "w", encoding)
    assert message in str(e.value)


def test_bf16_rounds_to_nearest_even_like_torch() -> None:
    torch = pytest.importorskip("torch", reason="torch is the bf16 reference")
    values = np.random.default_rng(1).standard_normal(10_000).astype(np.float32) * 100
    ours = to_bf16_bits(values)
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
    np.testing.assert_array_equal(ours, theirs.view(np.uint16))
    np.testing.assert_array_equal(
        from_bf16_bits(ours), torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    )


@pytest.mark.parametrize(("encoding", "tolerance"), [("fp32", 0.0), ("bf16", 4e-3), ("int8", 1e-2)])
def test_delta_encodings_round_trip_within_their_precision(encoding: str, tolerance: float) -> None:
    delta = np.random.default_rng(2).standard_normal((33, 70)).astype(np.float32)
    stored = encode_delta("w", delta, encoding)
    data = encode_safetensors(stored)
    decoded, _ = decode_safetensors(data)
    restored = decode_delta(decoded, "w", encoding)
    assert restored.dtype == np.float32 and restored.shape == delta.shape
    error = np.abs(restored - delta).max() / np.abs(delta).max()
    assert error <= tolerance
    if encoding == "int8":
        assert len(data) < delta.nbytes * 0.3


def test_codebook_levels_are_the_means_of_their_buckets() -> None:
    """256 levels at most, each the mean of the values stored as it: the sum of a tensor
    survives exactly; constant and empty tensors come back as they were."""
    rng = np.random.default_rng(3)
    delta = (rng.standard_t(3, (80, 1000)) * 1e-3).astype(np.float32)
    stored = encode_delta("w", delta, "codebook")
    assert stored["w"].dtype == "U8" and stored["w"].array.shape == delta.shape
    assert stored["w:codebook"].array.shape == (256,)
    restored = decode_delta(stored, "w", "codebook")
    assert len(np.unique(restored)) <= 256
    for index in np.unique(stored["w"].array)[::17]:
        chosen = stored["w"].array == index
        assert restored[chosen][0] == pytest.approx(delta[chosen].mean(dtype=np.float64), rel=1e-5)
    assert restored.sum(dtype=np.float64) == pytest.approx(delta.sum(dtype=np.float64), abs=1e-6)
    size = len(encode_safetensors(stored))
    assert size < delta.nbytes * 0.26
    for same in (np.full(700, 0.25, np.float32), np.zeros((3, 5), np.float32)):
        again = decode_delta(encode_delta("c", same, "codebook"), "c", "codebook")
        np.testing.assert_array_equal(again, same)
    empty = np.zeros((0, 4), np.float32)
    assert decode_delta(encode_delta("e", empty, "codebook"), "e", "codebook").shape == (0, 4)


def test_int8_keeps_zero_blocks_exact() -> None:
    delta = np.zeros(600, dtype=np.float32)
    delta[300] = 5.0
    restored = decode_delta(encode_delta("z", delta, "int8"), "z", "int8")
    np.testing.assert_array_equal(restored, delta)


def test_plan_shards_respects_the_size_limit_and_order() -> None:
    groups = plan_shards([("a", 40), ("b", 40), ("c", 40), ("huge", 500), ("d", 10)], 100)
    assert groups == [["a", "b"], ["c"], ["huge"], ["d"]]
    with pytest.raises(ValueError, match="positive"):
        plan_shards([("a", 1)], 0)
