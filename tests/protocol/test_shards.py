"""The NumPy safetensors codec against the reference `safetensors` library, and the
delta encodings' accuracy."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import safetensors.numpy

from tapestry_protocol.shards import (
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
        (_with_header(b"{not json"), "not JSON"),
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
            "not contiguous",
        ),
    ],
)
def test_malformed_files_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ShardFormatError, match=message):
        decode_safetensors(data)


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
