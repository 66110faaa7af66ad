"""One hypothesis budget for every property-based test: fixed and derandomised in CI,
raised with TAPESTRY_FUZZ_EXAMPLES (what `make fuzz` does)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

BUDGET_ENV = "TAPESTRY_FUZZ_EXAMPLES"


def fuzz_settings(default_examples: int, *allowed: HealthCheck) -> settings:
    """Reproducible settings: the same examples on every run, none stored on disk."""
    return settings(
        max_examples=int(os.environ.get(BUDGET_ENV, str(default_examples))),
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, *allowed],
    )
