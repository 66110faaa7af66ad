"""Tensors on the wire: safetensors shards and the delta encodings inside them.

Only safetensors crosses the wire, and it is parsed here with NumPy alone, strictly:
header size bounded, offsets contiguous and in range, dtypes and shapes consistent.
Nothing is ever unpickled. Parsing needs no torch, so the aggregator and the operator
image stay small.

Delta encodings (the `encoding` of an update manifest):
- `fp32`: the delta as float32.
- `bf16`: bfloat16 (round to nearest even), half the bytes.
- `int8`: blockwise absmax int8 with one float32 scale per block of `INT8_BLOCK`
  values (tensor `<name>` as I8 plus `<name>:scale` as F32), about a quarter.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

ENCODINGS = ("fp32", "bf16", "int8")
INT8_BLOCK = 256
SCALE_SUFFIX = ":scale"
DEFAULT_SHARD_BYTES = 64 << 20
MAX_HEADER_BYTES = 64 << 20

_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # carried as raw 16-bit patterns
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_DTYPE_NAMES = {
    np.dtype("<f8"): "F64",
    np.dtype("<f4"): "F32",
    np.dtype("<f2"): "F16",
    np.dtype("<i8"): "I64",
    np.dtype("<i4"): "I32",
    np.dtype("<i2"): "I16",
    np.dtype("i1"): "I8",
    np.dtype("<u2"): "U16",
    np.dtype("u1"): "U8",
    np.dtype("?"): "BOOL",
}

FloatArray = npt.NDArray[np.float32]


class ShardFormatError(ValueError):
    """The bytes are not a well-formed safetensors file."""


@dataclass(frozen=True)
class Tensor:
    """One stored tensor: its safetensors dtype name and its data as a NumPy array."""

    dtype: str
    array: npt.NDArray[Any]

    @classmethod
    def of(cls, array: npt.NDArray[Any]) -> Tensor:
        array = np.ascontiguousarray(array)
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype {array.dtype} cannot be stored in safetensors here")
        return cls(_DTYPE_NAMES[dtype], array.astype(dtype, copy=False))


def encode_safetensors(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialize tensors (sorted by name) in the safetensors format."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name]
        nbytes = tensor.array.nbytes
        header[name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.array.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    parts = [struct.pack("<Q", len(header_bytes)), header_bytes]
    parts += [np.ascontiguousarray(tensors[n].array).tobytes() for n in sorted(tensors)]
    return b"".join(parts)


def decode_safetensors(data: bytes | memoryview) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Parse safetensors bytes into zero-copy NumPy views; reject anything irregular."""
    view = memoryview(data)
    if len(view) < 8:
        raise ShardFormatError("file is shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", view[:8])
    if header_len > min(MAX_HEADER_BYTES, len(view) - 8):
        raise ShardFormatError(f"header length {header_len} exceeds the file")
    try:
        header = json.loads(bytes(view[8 : 8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardFormatError(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ShardFormatError("header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ShardFormatError("__metadata__ must map strings to strings")
    body = view[8 + header_len :]
    entries = sorted(header.items(), key=lambda item: _offsets(item[0], item[1])[0])
    tensors: dict[str, Tensor] = {}
    expected_start = 0
    for name, info in entries:
        start, end = _offsets(name, info)
        dtype = info.get("dtype")
        shape = info.get("shape")
        if dtype not in _NUMPY_DTYPES:
            raise ShardFormatError(f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ShardFormatError(f"tensor {name!r} has an invalid shape {shape!r}")
        np_dtype = _NUMPY_DTYPES[dtype]
        if start != expected_start:
            raise ShardFormatError(f"tensor {name!r} data is not contiguous with the previous")
        if end - start != int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize:
            raise ShardFormatError(f"tensor {name!r} byte length does not match its shape")
        expected_start = end
        array = np.frombuffer(body[start:end], dtype=np_dtype).reshape(shape)
        tensors[name] = Tensor(dtype, array)
    if expected_start != len(body):
        raise ShardFormatError(f"{len(body) - expected_start} trailing bytes after the last tensor")
    return tensors, metadata


def _offsets(name: str, info: Any) -> tuple[int, int]:
    if not isinstance(info, dict):
        raise ShardFormatError(f"tensor {name!r} entry is not an object")
    offsets = info.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise ShardFormatError(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    return offsets[0], offsets[1]


# --- float conversions -------------------------------------------------------------


def to_bf16_bits(values: FloatArray) -> npt.NDArray[np.uint16]:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (NaN stays NaN)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    rounded = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = np.uint16(0x7FC0)
    return rounded


def from_bf16_bits(bits: npt.NDArray[np.uint16]) -> FloatArray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


# --- delta encodings ---------------------------------------------------------------


def encode_delta(name: str, delta: FloatArray, encoding: str) -> dict[str, Tensor]:
    """The stored tensors for one float32 delta under `encoding`."""
    delta = np.ascontiguousarray(delta, dtype=np.float32)
    if encoding == "fp32":
        return {name: Tensor("F32", delta)}
    if encoding == "bf16":
        return {name: Tensor("BF16", to_bf16_bits(delta))}
    if encoding == "int8":
        flat = delta.reshape(-1)
        blocks = -(-flat.size // INT8_BLOCK)
        padded = np.zeros(blocks * INT8_BLOCK, dtype=np.float32)
        padded[: flat.size] = flat
        rows = padded.reshape(blocks, INT8_BLOCK)
        scale = np.abs(rows).max(axis=1) / 127.0
        safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(rows / safe[:, None]), -127, 127).astype(np.int8)
        return {
            name: Tensor("I8", q.reshape(-1)[: flat.size].reshape(delta.shape)),
            name + SCALE_SUFFIX: Tensor("F32", scale.astype(np.float32)),
        }
    raise ValueError(f"unknown encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")


def decode_delta(stored: Mapping[str, Tensor], name: str, encoding: str) -> FloatArray:
    """Reconstruct the float32 delta `name` from its stored tensors."""
    tensor = stored[name]
    if encoding == "fp32":
        if tensor.dtype != "F32":
            raise ValueError(f"{name}: fp32 encoding needs dtype F32, got {tensor.dtype}")
        return tensor.array.astype(np.float32, copy=False)
    if encoding == "bf16":
        if tensor.dtype != "BF16":
            raise ValueError(f"{name}: bf16 encoding needs dtype BF16, got {tensor.dtype}")
        return from_bf16_bits(tensor.array)
    if encoding == "int8":
        scale = stored.get(name + SCALE_SUFFIX)
        if tensor.dtype != "I8" or scale is None or scale.dtype != "F32":
            raise ValueError(f"{name}: int8 encoding needs I8 values and an F32 {SCALE_SUFFIX}")
        flat = tensor.array.reshape(-1).astype(np.float32)
        blocks = -(-flat.size // INT8_BLOCK)
        if scale.array.shape != (blocks,):
            raise ValueError(f"{name}: expected {blocks} int8 block scales")
        padded = np.zeros(blocks * INT8_BLOCK, dtype=np.float32)
        padded[: flat.size] = flat
        out: FloatArray = (padded.reshape(blocks, INT8_BLOCK) * scale.array[:, None]).reshape(-1)
        return out[: flat.size].reshape(tensor.array.shape)
    raise ValueError(f"unknown encoding {encoding!r}")


def stored_names(names: Iterable[str], encoding: str) -> list[str]:
    """Names that `encode_delta` produces for these tensors, sorted."""
    out: list[str] = []
    for n in names:
        out.append(n)
        if encoding == "int8":
            out.append(n + SCALE_SUFFIX)
    return sorted(out)


# --- sharding ----------------------------------------------------------------------


@dataclass(frozen=True)
class ShardRef:
    """A shard as listed in a manifest: object name, size, sha256 and tensor names."""

    name: str
    size: int
    sha256: str
    tensors: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "tensors": list(self.tensors),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShardRef:
        return cls(data["name"], data["size"], data["sha256"], tuple(data["tensors"]))


def plan_shards(sizes: Iterable[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Group tensors, in order, into shards of at most `max_bytes` (a larger tensor
    gets a shard of its own). The base's grouping is reused by every delta, so the
    aggregator can merge shard i of all participants in lockstep."""
    if max_bytes <= 0:
        raise ValueError("shard size must be positive")
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, nbytes in sizes:
        if current and used + nbytes > max_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current:
        groups.append(current)
    return groups


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()
