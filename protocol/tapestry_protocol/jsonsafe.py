"""One bounded JSON reader for everything read from the store.

Documents and safetensors headers come from participants, so their bytes are hostile
until proven otherwise. `loads` is total: for any input it returns a JSON value or
raises `JSONRejected` (a `ValueError`) saying what is wrong, never anything else, and it
bounds the work done before the standard parser sees the bytes:

- size above `max_bytes` is refused before anything else is looked at;
- the bytes must be UTF-8 (no UTF-16/32 guessing, no lone surrogates, even escaped,
  because they could not be written back as UTF-8, e.g. when a signature is checked);
- nesting deeper than `max_depth` is refused by a linear scan, before the recursive
  parser could hit Python's recursion limit;
- duplicate object keys are refused (a silent last-one-wins hides what was signed);
- `NaN`/`Infinity`, floats that overflow to infinity (`1e400`) and integers of more than
  `MAX_INT_DIGITS` digits are refused (the last would cost quadratic time to convert).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

MAX_DOCUMENT_BYTES = 16 << 20
"""A protocol document lists shards and participants; the largest real ones are a few
hundred KiB, so 16 MiB leaves ample room while bounding a hostile document's cost."""
MAX_DOCUMENT_DEPTH = 32
"""The schemas nest about six levels deep; anything far deeper is not a document."""
MAX_INT_DIGITS = 4300
"""Python's default `int` conversion limit, fixed here so that the interpreter's own
setting (which can be raised or disabled) cannot change what is accepted."""


class JSONRejected(ValueError):
    """Bytes that are not an acceptable JSON value; the message says why."""


# A string literal, from its opening quote to the closing one, or to the end of the input
# if it is never closed: every quote then starts a match, so the scan stays linear even on
# inputs such as `"\"\"\"...` that never close (the parser fails inside them anyway).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
# An escaped UTF-16 surrogate (`\ud800`-`\udfff`); its mere presence triggers the exact
# (slower) check that every string in the value can be encoded as UTF-8.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_STEPS = np.zeros(256, dtype=np.int8)
_STEPS[[ord("["), ord("{")]] = 1
_STEPS[[ord("]"), ord("}")]] = -1


def loads(
    data: bytes | bytearray | memoryview, *, max_bytes: int, max_depth: int, what: str
) -> Any:
    """Parse `data` as one JSON value, or raise `JSONRejected` naming `what` and the fault."""
    if len(data) > max_bytes:
        raise JSONRejected(f"{what} is {len(data)} bytes, more than the limit of {max_bytes}")
    raw = bytes(data)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JSONRejected(f"{what} is not UTF-8: {e.reason} at byte {e.start}") from None
    # Fewer opening brackets than the limit cannot nest past it: skip the scan.
    opening = raw.count(b"[") + raw.count(b"{")
    depth = nesting_depth(raw) if opening > max_depth else 0
    if depth > max_depth:
        raise JSONRejected(f"{what} nests {depth} levels deep, more than the limit of {max_depth}")
    try:
        value = json.loads(
            text,
            object_pairs_hook=lambda pairs: _object(pairs, what),
            parse_constant=lambda name: _constant(name, what),
            parse_float=lambda literal: _float(literal, what),
            parse_int=lambda literal: _int(literal, what),
        )
    except JSONRejected:
        raise
    except (ValueError, RecursionError) as e:
        raise JSONRejected(f"{what} is not valid JSON: {e}") from None
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise JSONRejected(f"{what} holds a lone UTF-16 surrogate escape") from None
    return value


def nesting_depth(raw: bytes) -> int:
    """The deepest bracket nesting of `raw` outside string literals, without recursion.

    For valid JSON this is the exact depth of the value; for anything else it is at least
    the depth the parser reaches before it fails, so bounding it bounds the recursion.
    """
    stripped = _STRING.sub(b"", raw)
    steps = _STEPS[np.frombuffer(stripped, dtype=np.uint8)]
    steps = steps[steps != 0]
    if steps.size == 0:
        return 0
    return max(0, int(np.cumsum(steps, dtype=np.int64).max()))


def _object(pairs: list[tuple[str, Any]], what: str) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JSONRejected(f"{what} repeats the object key {key!r}")
            seen.add(key)
    return out


def _constant(name: str, what: str) -> Any:
    raise JSONRejected(f"{what} holds {name}, which is not a JSON number")


def _float(literal: str, what: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise JSONRejected(f"{what} holds the number {literal[:40]}, too large for a float")
    return value


def _int(literal: str, what: str) -> int:
    digits = len(literal) - literal.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise JSONRejected(
            f"{what} holds an integer of {digits} digits, more than the limit of {MAX_INT_DIGITS}"
        )
    return int(literal)
