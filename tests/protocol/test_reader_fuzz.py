"""Property tests: the shard reader and the JSON reader are total.

For any bytes, `decode_safetensors` returns tensors that match the header exactly or
raises `ShardFormatError`, and `jsonsafe.loads` returns a value or raises `JSONRejected`;
any other exception fails the test. The reference `safetensors` library serves as a
differential oracle for the shard reader.

The example budget is fixed and the search derandomised, so a run is reproducible; set
`TAPESTRY_FUZZ_EXAMPLES` for a longer search.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from typing import Any

import numpy as np
import safetensors.numpy
from hypothesis import HealthCheck, event, given
from hypothesis import strategies as st

from tapestry_protocol import documents, jsonsafe
from tapestry_protocol.rejections import Rejected
from tapestry_protocol.shards import (
    MAX_RANK,
    METADATA_KEY,
    ShardFormatError,
    Tensor,
    decode_safetensors,
    encode_safetensors,
)
from tests.fuzz import SAFETENSORS_DTYPES, fuzz_settings

FUZZ = fuzz_settings(200, HealthCheck.data_too_large)

DTYPES = SAFETENSORS_DTYPES
# Every dtype safetensors knows that a test here writes, with its item size: ours plus
# some we never write (the reference's NumPy loader reads U64, U32 and C64 but not F8).
ITEMSIZES = {name: np.dtype(code).itemsize for name, code in DTYPES.items()} | {
    "U64": 8,
    "U32": 4,
    "C64": 8,
    "F8_E4M3": 1,
}


# Characters that stress a JSON scanner: quotes, escapes, brackets inside strings,
# multi-byte UTF-8 and JSON-legal controls.
TRICKY = st.sampled_from(list('ab"\\[]{}:, é\u2028\U0001f600\x00\t\n/'))
NAMES = st.text(TRICKY, min_size=1, max_size=8).filter(lambda n: n != METADATA_KEY)


def _with_header(header: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + body


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """Header and body of a shard that our reader accepted, read with plain `json`."""
    (n,) = struct.unpack("<Q", data[:8])
    header: dict[str, Any] = json.loads(data[8 : 8 + n])
    return header, data[8 + n :]


# --- strategies ----------------------------------------------------------------------


@st.composite
def arrays(draw: st.DrawFn) -> tuple[str, np.ndarray[Any, Any]]:
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    size = math.prod(shape)
    np_dtype = np.dtype(DTYPES[dtype])
    if dtype == "BOOL":
        raw = bytes(draw(st.lists(st.integers(0, 1), min_size=size, max_size=size)))
    else:
        raw = draw(st.binary(min_size=size * np_dtype.itemsize, max_size=size * np_dtype.itemsize))
    return dtype, np.frombuffer(raw, dtype=np_dtype).reshape(shape)


@st.composite
def shards(draw: st.DrawFn) -> bytes:
    """A well-formed shard from our writer, with random names, dtypes and shapes."""
    tensors = draw(st.dictionaries(NAMES, arrays(), max_size=4))
    metadata = draw(st.none() | st.dictionaries(NAMES, st.text(TRICKY, max_size=4), max_size=2))
    return encode_safetensors({n: Tensor(d, a) for n, (d, a) in tensors.items()}, metadata)


# JSON values of every kind, including the awkward ones: bools where ints belong, ints
# beyond int64 and uint64, negative numbers, floats, deep and wide containers.
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, 1, 4, -1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**30])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(TRICKY, max_size=6)
    | st.sampled_from([*sorted(DTYPES), "U64", "C64", "F8_E4M3", "", "f32"])
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(NAMES, inner, max_size=3),
    max_leaves=12,
)
SHAPES = st.lists(
    st.integers(0, 4)
    | st.sampled_from([2**31, 2**32, 2**40, 2**62, 2**63, 2**64, -1, True, False, 1.0]),
    max_size=MAX_RANK + 2,
)
OFFSETS = st.lists(st.integers(-8, 64) | st.sampled_from([2**63, 2**64, True, False]), max_size=3)


@st.composite
def rewritten_headers(draw: st.DrawFn) -> bytes:
    """A valid shard whose header was rewritten in one of the ways an attacker could."""
    data = draw(shards())
    header, body = _split(data)
    names = [n for n in header if n != METADATA_KEY]
    how = draw(
        st.sampled_from(
            ["field", "shape", "offsets", "entry", "swap", "nest", "metadata", "add", "body"]
        )
    )
    if names and how in ("field", "shape", "offsets", "entry", "swap"):
        name = draw(st.sampled_from(names))
        entry = header[name]
        if how == "field":
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = draw(
                JSON_VALUES
            )
        elif how == "shape":
            entry["shape"] = draw(SHAPES)
        elif how == "offsets":
            entry["data_offsets"] = draw(OFFSETS)
        elif how == "entry":
            header[name] = draw(JSON_VALUES)
        else:  # overlapping or reordered spans: take another tensor's offsets
            other = draw(st.sampled_from(names))
            entry["data_offsets"] = list(header[other]["data_offsets"])
    elif how == "nest":
        depth = draw(st.integers(1, 50))
        header[draw(NAMES)] = json.loads("[" * depth + "]" * depth)
    elif how == "metadata":
        header[METADATA_KEY] = draw(JSON_VALUES)
    elif how == "add":
        header[draw(NAMES)] = {
            "dtype": draw(st.sampled_from(sorted(DTYPES))),
            "shape": draw(SHAPES),
            "data_offsets": draw(OFFSETS),
        }
    else:
        body = draw(st.sampled_from([body[:-1], body + b"\0", body + draw(st.binary(max_size=9))]))
    text = json.dumps(header, ensure_ascii=draw(st.booleans()))
    if draw(st.booleans()) and names:
        # A duplicate key: the first entry repeated at the end of the object.
        first = json.dumps(names[0])
        text = text[:-1] + f", {first}: {json.dumps(header[names[0]])}" + "}"
    return _with_header(text.encode("utf-8", "surrogatepass"), body)


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """A valid shard with bit flips, a truncation or a rewritten header length."""
    data = bytearray(draw(shards()))
    how = draw(st.sampled_from(["flip", "truncate", "length", "splice"]))
    if how == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
    elif how == "truncate":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif how == "length":
        data[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1) | st.integers(0, len(data))))
    else:
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


TWEAKS = [
    *[None] * 4,
    "empty name",
    "rank",
    "huge empty",
    "foreign dtype",
    "BOOL bytes",
    "extra key",
    "bool dim",
    "bool offset",
    "alias",
    "duplicate",
    "null metadata",
]


@st.composite
def unusual_shards(draw: st.DrawFn) -> bytes:
    """Consistent shards (offsets match shapes) in any entry order, with zero-size tensors
    sharing offsets, bent by at most one `TWEAKS` rule the format leaves open. The
    reference accepts most of these; we refuse some on purpose."""
    tweak = draw(st.sampled_from(TWEAKS))
    names = list(dict.fromkeys(draw(st.lists(NAMES, min_size=1, max_size=4))))
    if tweak == "empty name":
        names[draw(st.integers(0, len(names) - 1))] = ""
    target = draw(st.integers(0, len(names) - 1))
    entries: list[tuple[str, dict[str, Any]]] = []
    chunks: list[bytes] = []
    offset = 0
    for i, name in enumerate(names):
        tweaked = tweak if i == target else None
        foreign = tweaked == "foreign dtype"
        dtype = draw(st.sampled_from(sorted(set(ITEMSIZES) - set(DTYPES) if foreign else DTYPES)))
        shape: list[Any] = draw(st.lists(st.integers(0, 3), max_size=3))
        if tweaked == "rank":
            shape = [1] * draw(st.sampled_from([MAX_RANK - 1, MAX_RANK, MAX_RANK + 1, 64, 65]))
        elif tweaked == "BOOL bytes":
            dtype, shape = "BOOL", [draw(st.integers(1, 4))]
        elif tweaked == "huge empty":
            huge = [2**20, 2**44, 2**46, 2**50, 2**58, 2**61, 2**62, 2**63, 2**64]
            shape[draw(st.integers(0, len(shape))) :] = [0, draw(st.sampled_from(huge))]
        nbytes = math.prod(shape) * ITEMSIZES[dtype]
        if dtype == "BOOL" and tweaked != "BOOL bytes":
            chunks.append(
                bytes(draw(st.lists(st.integers(0, 1), min_size=nbytes, max_size=nbytes)))
            )
        else:
            chunks.append(draw(st.binary(min_size=nbytes, max_size=nbytes)))
        entry: dict[str, Any] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + nbytes],
        }
        if tweaked == "extra key":
            entry[draw(st.sampled_from(["extra", "dtype", "shape"]))] = draw(JSON_VALUES)
        elif tweaked == "bool dim" and 1 in shape:
            shape[shape.index(1)] = True  # equal to 1 in Python, but not a JSON integer
        elif tweaked == "bool offset":  # offsets 0 and 1 written as false and true
            entry["data_offsets"] = [
                bool(o) if o in (0, 1) else o for o in (offset, offset + nbytes)
            ]
        entries.append((name, entry))
        offset += nbytes
    if tweak == "alias":
        # Two names for the same bytes: the spans overlap, yet cover the body exactly.
        entries.append((draw(NAMES), dict(draw(st.sampled_from(entries))[1])))
    members = [f"{json.dumps(n)}:{json.dumps(e)}" for n, e in draw(st.permutations(entries))]
    metadata = (
        "null" if tweak == "null metadata" else draw(st.sampled_from(["", "{}", '{"k":"v"}']))
    )
    if metadata:
        members.insert(draw(st.integers(0, len(members))), f'"{METADATA_KEY}":{metadata}')
    if tweak == "duplicate":
        members.append(draw(st.sampled_from(members)))
    return _with_header(("{" + ",".join(members) + "}").encode(), b"".join(chunks))


ANY_SHARD = shards() | unusual_shards() | rewritten_headers() | damaged() | st.binary(max_size=64)


# --- the shard reader ----------------------------------------------------------------


def _decode(data: bytes) -> dict[str, Tensor] | None:
    """Our reader's verdict, after checking that what it accepted matches the header."""
    try:
        tensors, metadata = decode_safetensors(data)
    except ShardFormatError:
        return None
    header, body = _split(data)
    assert metadata == header.pop(METADATA_KEY, {})
    assert all(type(v) is str for v in metadata.values())
    assert sorted(tensors) == sorted(header)
    spans = []
    for name, info in header.items():
        # What the format promises, restated independently of the reader.
        tensor = tensors[name]
        assert name and sorted(info) == ["data_offsets", "dtype", "shape"]
        shape, offsets = info["shape"], info["data_offsets"]
        assert len(shape) <= MAX_RANK and all(type(d) is int and d >= 0 for d in shape)
        assert len(offsets) == 2 and all(type(o) is int for o in offsets)
        start, end = offsets
        assert end - start == math.prod(shape) * ITEMSIZES[info["dtype"]]
        spans.append((start, end))
        assert tensor.dtype == info["dtype"]
        assert tensor.array.dtype == np.dtype(DTYPES[info["dtype"]])
        assert tensor.array.shape == tuple(shape)
        assert tensor.array.tobytes() == body[start:end]
        if tensor.dtype == "BOOL":
            assert set(tensor.array.reshape(-1).view(np.uint8).tolist()) <= {0, 1}
    covered = 0
    for start, end in sorted(spans):
        assert start == covered, "spans overlap or leave a gap"
        covered = end
    assert covered == len(body), "bytes after the last tensor"
    return tensors


# Where our reader is intentionally stricter than safetensors 0.8, by message. The
# reference keeps the last of duplicate keys, ignores unknown entry keys (whatever they
# nest), allows empty names, `"__metadata__": null`, dtypes we never write, BOOL bytes
# other than 0 and 1, any rank NumPy allows and empty tensors of any extent.
STRICTER = (
    "repeats the object key",
    "must have exactly the keys",
    "nests",
    "empty name",
    "must be an object",
    "unsupported dtype",
    "BOOL but",
    "more than the limit of 32",
    "impossibly large",
)


def _reference(data: bytes) -> dict[str, np.ndarray[Any, Any]] | None:
    try:
        loaded: dict[str, np.ndarray[Any, Any]] = safetensors.numpy.load(data)
    except Exception:  # SafetensorError, and KeyError or ValueError from its NumPy layer
        return None
    return loaded


@FUZZ
@given(ANY_SHARD)
def test_the_reader_is_total(data: bytes) -> None:
    _decode(data)


@FUZZ
@given(shards())
def test_every_shard_we_write_is_read_back(data: bytes) -> None:
    assert _decode(data) is not None


def _bf16_as_u16(data: bytes) -> bytes:
    """The reference's NumPy loader has no bfloat16 (it raises KeyError for BF16); we
    carry BF16 as raw uint16 patterns, so compare against the shard relabelled U16."""
    header, body = _split(data)
    if not any(isinstance(e, dict) and e.get("dtype") == "BF16" for e in header.values()):
        return data
    for entry in header.values():
        if entry.get("dtype") == "BF16":
            entry["dtype"] = "U16"
    return _with_header(json.dumps(header).encode(), body)


@FUZZ
@given(ANY_SHARD)
def test_the_reader_agrees_with_the_reference_library(data: bytes) -> None:
    _compare_with_reference(data)


@FUZZ
@given(unusual_shards())
def test_the_reader_agrees_with_the_reference_on_unusual_shards(data: bytes) -> None:
    _compare_with_reference(data)


def _compare_with_reference(data: bytes) -> None:
    """Both accept with equal tensors, both refuse, or we refuse on purpose (`STRICTER`)."""
    ours = _decode(data)
    if ours is not None:
        event("both accept")
        theirs = _reference(_bf16_as_u16(data))
        assert theirs is not None, "we accept a shard the reference refuses"
        assert sorted(theirs) == sorted(ours)
        for name, tensor in ours.items():
            assert theirs[name].dtype == tensor.array.dtype
            assert theirs[name].shape == tensor.array.shape
            assert theirs[name].tobytes() == tensor.array.tobytes()
    elif _reference(data) is None:
        event("both refuse")
    else:
        try:
            decode_safetensors(data)
        except ShardFormatError as e:
            reasons = [reason for reason in STRICTER if reason in str(e)]
            assert reasons, f"we refuse a shard the reference accepts: {e}"
            event(f"only the reference accepts: {reasons[0]}")


# --- the JSON reader -----------------------------------------------------------------


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _loads(data: bytes, max_depth: int = 8) -> Any:
    return jsonsafe.loads(data, max_bytes=1 << 16, max_depth=max_depth, what="doc")


def _nested(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.dictionaries(NAMES, inner, max_size=2)


DEEP_VALUES = st.recursive(SCALARS, _nested, max_leaves=30)


@FUZZ
@given(st.binary(max_size=64) | st.text(TRICKY, max_size=32).map(str.encode))
def test_json_reader_is_total_on_any_bytes(data: bytes) -> None:
    try:
        value = _loads(data)
    except jsonsafe.JSONRejected:
        return
    assert value == json.loads(data.decode("utf-8"))


@FUZZ
@given(DEEP_VALUES, st.integers(0, 6), st.booleans())
def test_json_reader_round_trips_values_within_its_depth(
    value: Any, max_depth: int, ascii_only: bool
) -> None:
    data = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert jsonsafe.nesting_depth(data) == _depth(value)
    if _depth(value) > max_depth:
        try:
            _loads(data, max_depth)
        except jsonsafe.JSONRejected as e:
            assert "levels deep" in str(e)
        else:
            raise AssertionError("a value nested past the limit was accepted")
    else:
        assert _loads(data, max_depth) == value


@FUZZ
@given(DEEP_VALUES, st.data())
def test_json_reader_is_total_on_damaged_json(value: Any, data: st.DataObject) -> None:
    raw = bytearray(json.dumps(value).encode())
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw)))
        raw[i:i] = data.draw(st.sampled_from([b"[", b"]", b"{", b'"', b"\\", b",", b"\xff"]))
    try:
        parsed = _loads(bytes(raw))
    except jsonsafe.JSONRejected:
        return
    assert parsed == json.loads(raw.decode("utf-8"))


@FUZZ
@given(st.dictionaries(NAMES, SCALARS, min_size=1, max_size=4), st.data())
def test_json_reader_refuses_duplicate_keys(obj: dict[str, Any], data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(sorted(obj)))
    text = json.dumps(obj)[:-1] + f", {json.dumps(key)}: {json.dumps(data.draw(SCALARS))}" + "}"
    nested = data.draw(st.integers(0, 3))
    raw = ("[" * nested + text + "]" * nested).encode()
    try:
        _loads(raw)
    except jsonsafe.JSONRejected as e:
        assert "repeats the object key" in str(e)
    else:
        raise AssertionError("duplicate keys were accepted")


@FUZZ
@given(
    DEEP_VALUES,
    st.sampled_from(
        ["NaN", "Infinity", "-Infinity", "1e400", "-1e309", "1" * 4301, "-" + "9" * 5000]
    ),
)
def test_json_reader_refuses_numbers_python_cannot_keep(value: Any, number: str) -> None:
    raw = b"[" + json.dumps(value).encode() + b"," + number.encode() + b"]"
    try:
        _loads(raw, max_depth=64)
    except jsonsafe.JSONRejected as e:
        assert "holds" in str(e)
    else:
        raise AssertionError(f"{number[:10]} was accepted")


@FUZZ
@given(st.integers(1, 4300), st.booleans())
def test_json_reader_keeps_long_integers_within_the_limit(digits: int, negative: bool) -> None:
    literal = ("-" if negative else "") + "7" * digits
    assert _loads(literal.encode()) == int(literal)


@FUZZ
@given(st.lists(st.integers(0xD800, 0xDFFF).map(chr) | TRICKY, min_size=1, max_size=6))
def test_json_reader_refuses_lone_surrogates(chars: list[str]) -> None:
    # A high surrogate escape followed by a low one is one astral character; any other
    # surrogate escape is refused.
    raw = json.dumps({"k": "".join(chars)}).encode()
    try:
        value = _loads(raw)
    except jsonsafe.JSONRejected as e:
        assert "surrogate" in str(e)
    else:
        value["k"].encode("utf-8")


def test_json_reader_checks_the_size_before_parsing() -> None:
    try:
        jsonsafe.loads(b"[" * 65, max_bytes=64, max_depth=1000, what="doc")
    except jsonsafe.JSONRejected as e:
        assert "more than the limit of 64" in str(e)
    else:
        raise AssertionError("an oversized input was accepted")


def test_json_reader_is_fast_on_large_hostile_inputs() -> None:
    """Linear scans: every input below takes well under a second on its own."""
    size = 1 << 20  # a quadratic scan would take hours here
    for raw in (b"[" * size, b'"\\' * (size // 2), b'[""' * (size // 3), b"9" * size):
        with contextlib.suppress(jsonsafe.JSONRejected):
            jsonsafe.loads(raw, max_bytes=size, max_depth=32, what="doc")


@FUZZ
@given(st.binary(max_size=64) | DEEP_VALUES.map(lambda v: json.dumps(v).encode()))
def test_documents_refuse_hostile_bytes_as_malformed(data: bytes) -> None:
    try:
        documents.parse(data, "RoundPlan", "plan.json")
    except Rejected as e:
        assert e.reason == "MalformedDocument"
