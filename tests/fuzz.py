"""One hypothesis budget for every property-based test: fixed and derandomised in CI,
raised with TAPESTRY_FUZZ_EXAMPLES (what `make fuzz` does)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

BUDGET_ENV = "TAPESTRY_FUZZ_EXAMPLES"

# The safetensors dtypes the protocol's reader knows, as NumPy type codes: written out
# here, independently of the reader, so the tests check it against the format itself.
SAFETENSORS_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}


def fuzz_settings(default_examples: int, *allowed: HealthCheck) -> settings:
    """Reproducible settings: the same examples on every run, none stored on disk."""
    return settings(
        max_examples=int(os.environ.get(BUDGET_ENV, str(default_examples))),
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, *allowed],
    )
