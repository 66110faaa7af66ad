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
- `codebook`: 256 levels per tensor, as INTELLECT-1 quantises its pseudo-gradients:
  buckets of equal width spanning ±3 standard deviations (RMS) around zero, each value
  stored as its bucket's index (`<name>` as U8; values beyond the span go to the end
  buckets) and each bucket's level as the mean of the values in it (`<name>:codebook`,
  F32 of 256), about a quarter. The levels are the values' own averages, not the bucket
  centres, so each bucket's error averages out.
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

from tapestry_protocol import jsonsafe

ENCODINGS = ("fp32", "bf16", "int8", "codebook")
INT8_BLOCK = 256
SCALE_SUFFIX = ":scale"
CODEBOOK_LEVELS = 256
CODEBOOK_SPAN = 6.0  # the codebook's buckets span this many standard deviations
CODEBOOK_SUFFIX = ":codebook"
DEFAULT_SHARD_BYTES = 64 << 20
# A header entry takes about 80 bytes, so 16 MiB describes some 200,000 tensors, far more
# than any model has in one shard; it bounds what a hostile header costs to parse (its
# Python objects take several times its bytes) and stays under safetensors' own 100 MB.
MAX_HEADER_BYTES = 16 << 20
# The smallest NPY_MAXDIMS of the NumPy versions supported (1.x allows 32, 2.x 64).
MAX_RANK = 32
# No tensor, even an empty one such as shape [0, 2**62], may span more than 256 TiB, so
# NumPy can always represent the shape.
MAX_TENSOR_EXTENT = 1 << 48
METADATA_KEY = "__metadata__"
# {"name": {"shape": [...]}}: a header nests three levels deep, never more.
_HEADER_DEPTH = 3
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})

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
    # join() copies straight from the arrays' buffers (flat uint8 views of the same
    # bytes): one copy of the data, where tobytes() and then join() would make two.
    parts: list[bytes | memoryview] = [struct.pack("<Q", len(header_bytes)), header_bytes]
    for name in sorted(tensors):
        flat = np.ascontiguousarray(tensors[name].array).reshape(-1)
        parts.append(flat.view(np.uint8).data)
    return b"".join(parts)


def decode_safetensors(data: bytes | memoryview) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Parse safetensors bytes into zero-copy NumPy views; reject anything irregular.

    Total: for any bytes it returns tensors that match the header exactly, or raises
    `ShardFormatError`. A shard's hash and signature only prove who sent it, so every
    number in the header is checked before it sizes an allocation or a view.
    """
    view = memoryview(data).cast("B")
    if len(view) < 8:
        raise ShardFormatError("file is shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", view[:8])
    if header_len > MAX_HEADER_BYTES:
        raise ShardFormatError(
            f"header length {header_len} is more than the limit of {MAX_HEADER_BYTES}"
        )
    if header_len > len(view) - 8:
        raise ShardFormatError(f"header length {header_len} exceeds the file ({len(view)} bytes)")
    try:
        header = jsonsafe.loads(
            view[8 : 8 + header_len],
            max_bytes=MAX_HEADER_BYTES,
            max_depth=_HEADER_DEPTH,
            what="header",
        )
    except jsonsafe.JSONRejected as e:
        raise ShardFormatError(str(e)) from None
    if not isinstance(header, dict):
        raise ShardFormatError("header is not a JSON object")
    metadata = _metadata(header.pop(METADATA_KEY, {}))
    body = view[8 + header_len :]
    entries = [_entry(name, info, len(body)) for name, info in header.items()]
    entries.sort(key=lambda e: (e.start, e.end))
    expected_start = 0
    for entry in entries:
        if entry.start != expected_start:
            relation = "overlaps" if entry.start < expected_start else "leaves a gap after"
            raise ShardFormatError(
                f"tensor {_brief(entry.name)} data (bytes {entry.start}..{entry.end}) {relation} "
                f"the previous tensor, which ends at byte {expected_start}"
            )
        expected_start = entry.end
    if expected_start != len(body):
        raise ShardFormatError(f"{len(body) - expected_start} trailing bytes after the last tensor")
    tensors: dict[str, Tensor] = {}
    for entry in sorted(entries, key=lambda e: e.name):
        np_dtype = _NUMPY_DTYPES[entry.dtype]
        array = np.frombuffer(body[entry.start : entry.end], dtype=np_dtype)
        if entry.dtype == "BOOL" and array.size and array.view(np.uint8).max() > 1:
            raise ShardFormatError(
                f"tensor {_brief(entry.name)} is BOOL but holds bytes other than 0, 1"
            )
        tensors[entry.name] = Tensor(entry.dtype, array.reshape(entry.shape))
    return tensors, metadata


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _is_int(value: object) -> bool:
    """A JSON integer: Python's bool is an int subclass, but `true` is not a number."""
    return isinstance(value, int) and not isinstance(value, bool)


def _metadata(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ShardFormatError(f"{METADATA_KEY} must be an object, not {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise ShardFormatError(
                f"{METADATA_KEY} must map strings to strings; {_brief(key)} maps to {_brief(item)}"
            )
    return value


def _entry(name: str, info: object, body_len: int) -> _Entry:
    """One header entry, checked in full against the body's length."""
    if not name:
        raise ShardFormatError("a tensor has an empty name")
    if not isinstance(info, dict):
        raise ShardFormatError(f"tensor {_brief(name)} entry is not an object: {_brief(info)}")
    if set(info) != _ENTRY_KEYS:
        missing = sorted(_ENTRY_KEYS - set(info))
        extra = sorted(set(info) - _ENTRY_KEYS)
        raise ShardFormatError(
            f"tensor {_brief(name)} entry must have exactly the keys dtype, shape, data_offsets "
            f"(missing {missing}, unexpected {[k[:40] for k in extra[:3]]})"
        )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _NUMPY_DTYPES:
        raise ShardFormatError(
            f"tensor {_brief(name)} has unsupported dtype {_brief(dtype)}; "
            f"use one of {', '.join(_NUMPY_DTYPES)}"
        )
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ShardFormatError(
            f"tensor {_brief(name)} has an invalid shape {_brief(shape)}: "
            "it must be a list of integers >= 0"
        )
    if len(shape) > MAX_RANK:
        raise ShardFormatError(
            f"tensor {_brief(name)} has rank {len(shape)}, more than the limit of {MAX_RANK}"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= body_len
    ):
        raise ShardFormatError(
            f"tensor {_brief(name)} has invalid data_offsets {_brief(offsets)}: they must be two "
            f"integers with 0 <= start <= end <= {body_len}, the length of the data"
        )
    itemsize = _NUMPY_DTYPES[dtype].itemsize
    # Python ints cannot overflow; the extent (zero dimensions counted as one) bounds what
    # NumPy must represent even for an empty tensor, e.g. shape [0, 2**62].
    count = extent = 1
    for d in shape:
        count *= d
        extent *= max(d, 1)
    if extent * itemsize > MAX_TENSOR_EXTENT:
        raise ShardFormatError(f"tensor {_brief(name)} shape {_brief(shape)} is impossibly large")
    start, end = offsets
    if end - start != count * itemsize:
        raise ShardFormatError(
            f"tensor {_brief(name)} byte length {end - start} does not match its shape "
            f"{_brief(shape)} of {dtype} ({count * itemsize} bytes)"
        )
    return _Entry(name, dtype, tuple(shape), start, end)


def _brief(value: object) -> str:
    """A bounded repr for messages: hostile headers can hold megabytes in one value."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
    if encoding == "codebook":
        indices, levels = _codebook(delta.reshape(-1))
        return {
            name: Tensor("U8", indices.reshape(delta.shape)),
            name + CODEBOOK_SUFFIX: Tensor("F32", levels),
        }
    raise ValueError(f"unknown encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")


def _codebook(flat: FloatArray) -> tuple[npt.NDArray[np.uint8], FloatArray]:
    """Bucket indices (equal widths over ±`CODEBOOK_SPAN`/2 RMS) and each bucket's mean (0
    for an empty one: no index points at it)."""
    levels = np.zeros(CODEBOOK_LEVELS, dtype=np.float32)
    if flat.size == 0:
        return np.zeros(0, dtype=np.uint8), levels
    values = flat.astype(np.float64)
    rms = float(np.sqrt(np.dot(values, values) / max(1, flat.size - 1)))
    width = CODEBOOK_SPAN * rms / CODEBOOK_LEVELS or 1.0  # all zeros: any width
    middle = CODEBOOK_LEVELS // 2
    indices = np.clip(np.rint(values / width) + middle, 0, CODEBOOK_LEVELS - 1).astype(np.uint8)
    counts = np.bincount(indices, minlength=CODEBOOK_LEVELS)
    sums = np.bincount(indices, weights=values, minlength=CODEBOOK_LEVELS)
    filled = counts > 0
    levels[filled] = (sums[filled] / counts[filled]).astype(np.float32)
    return indices, levels


def decode_delta(stored: Mapping[str, Tensor], name: str, encoding: str) -> FloatArray:
    """Reconstruct the float32 delta `name` from its stored tensors.

    Every inconsistency between the tensors and the encoding is a `ShardFormatError`, so a
    reader that catches `ValueError` rejects the shard instead of failing.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}")
    tensor = stored.get(name)
    if tensor is None:
        raise ShardFormatError(f"{name}: tensor is missing")
    if encoding == "fp32":
        if tensor.dtype != "F32":
            raise ShardFormatError(f"{name}: fp32 encoding needs dtype F32, got {tensor.dtype}")
        return tensor.array.astype(np.float32, copy=False)
    if encoding == "bf16":
        if tensor.dtype != "BF16":
            raise ShardFormatError(f"{name}: bf16 encoding needs dtype BF16, got {tensor.dtype}")
        return from_bf16_bits(tensor.array)
    if encoding == "codebook":
        return _decode_codebook(stored, name, tensor)
    scale = stored.get(name + SCALE_SUFFIX)
    if tensor.dtype != "I8":
        raise ShardFormatError(f"{name}: int8 encoding needs dtype I8, got {tensor.dtype}")
    if scale is None:
        raise ShardFormatError(f"{name}: int8 encoding needs the tensor {name}{SCALE_SUFFIX}")
    if scale.dtype != "F32":
        raise ShardFormatError(
            f"{name}{SCALE_SUFFIX}: int8 scales need dtype F32, got {scale.dtype}"
        )
    flat = tensor.array.reshape(-1).astype(np.float32)
    blocks = -(-flat.size // INT8_BLOCK)
    if scale.array.shape != (blocks,):
        raise ShardFormatError(
            f"{name}{SCALE_SUFFIX}: expected shape [{blocks}] (one scale per {INT8_BLOCK} "
            f"values), got {list(scale.array.shape)}"
        )
    padded = np.zeros(blocks * INT8_BLOCK, dtype=np.float32)
    padded[: flat.size] = flat
    out: FloatArray = (padded.reshape(blocks, INT8_BLOCK) * scale.array[:, None]).reshape(-1)
    return out[: flat.size].reshape(tensor.array.shape)


def _decode_codebook(stored: Mapping[str, Tensor], name: str, tensor: Tensor) -> FloatArray:
    if tensor.dtype != "U8":
        raise ShardFormatError(f"{name}: codebook encoding needs dtype U8, got {tensor.dtype}")
    levels = stored.get(name + CODEBOOK_SUFFIX)
    if levels is None:
        raise ShardFormatError(
            f"{name}: codebook encoding needs the tensor {name}{CODEBOOK_SUFFIX}"
        )
    if levels.dtype != "F32" or levels.array.shape != (CODEBOOK_LEVELS,):
        raise ShardFormatError(
            f"{name}{CODEBOOK_SUFFIX}: expected F32 of shape [{CODEBOOK_LEVELS}], got "
            f"{levels.dtype} of shape {list(levels.array.shape)}"
        )
    out: FloatArray = levels.array[tensor.array]  # every U8 index is in range
    return out


_EXTRA_SUFFIX = {"int8": SCALE_SUFFIX, "codebook": CODEBOOK_SUFFIX}


def stored_names(names: Iterable[str], encoding: str) -> list[str]:
    """Names that `encode_delta` produces for these tensors, sorted."""
    out: list[str] = []
    suffix = _EXTRA_SUFFIX.get(encoding)
    for n in names:
        out.append(n)
        if suffix is not None:
            out.append(n + suffix)
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
