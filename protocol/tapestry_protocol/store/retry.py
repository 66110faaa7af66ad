"""Bounded retries for transient store failures.

Object stores fail transiently all the time (connection resets, 503 SlowDown, timeouts),
and a federated round must not die of one. Permanent failures (403, 404, 412) are answers,
not accidents: they surface at once, as the specific StoreError naming the key.

A backend supplies `translate`, which maps a raw exception to a StoreError: a
StoreUnavailable means "transient, try again", any other StoreError is final, and None
means "not a store failure" (a programming error), which is re-raised untouched.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .base import StoreError, StoreUnavailable

T = TypeVar("T")
#: Maps a raw exception (and the key at hand) to a StoreError, or None if foreign.
Translate = Callable[[BaseException, str | None], StoreError | None]

log = logging.getLogger("tapestry.store")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded in attempts and per-sleep delay.

    Full jitter (sleep uniformly in [0, min(max_delay, base_delay * 2**n)]) spreads out
    the many participants that all hit the same store after a blip. The defaults give up
    after about 25 s of sleeping in the worst case.
    """

    attempts: int = 8
    base_delay: float = 0.2
    max_delay: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay < 0 or self.max_delay < 0:
            raise ValueError(f"invalid retry policy: {self}")

    def delay(self, failures: int) -> float:
        """Seconds to sleep after the `failures`-th consecutive failure (1-based)."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (failures - 1)))


#: For tests and interactive tools: fail fast, but still exercise the retry path.
FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.1)


class Retrier:
    """Runs operations under a policy, classifying failures with `translate`."""

    def __init__(
        self,
        policy: RetryPolicy,
        translate: Translate,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.policy = policy
        self._translate = translate
        self._sleep = sleep

    def classify(self, exc: BaseException, key: str | None) -> StoreError | None:
        """The StoreError for `exc` (StoreUnavailable when transient), None if foreign."""
        if isinstance(exc, StoreError):
            return exc
        err = self._translate(exc, key)
        if err is not None:
            err.__cause__ = exc
        return err

    def backoff(self, failures: int, err: StoreError, what: str, key: str | None) -> None:
        """Sleep before retry number `failures`, or raise once the attempts are spent."""
        if failures >= self.policy.attempts:
            raise StoreUnavailable(
                f"{what} {key!r}: gave up after {failures} attempts: {err}", key
            ) from err
        delay = self.policy.delay(failures)
        log.warning(
            "%s %r failed (attempt %d/%d), retrying in %.2fs: %s",
            what,
            key,
            failures,
            self.policy.attempts,
            delay,
            err,
        )
        self._sleep(delay)

    def call(self, what: str, key: str | None, op: Callable[[], T]) -> T:
        """Run `op` until it succeeds, fails permanently, or the attempts run out."""
        failures = 0
        while True:
            try:
                return op()
            except Exception as exc:
                failures += 1
                self.after_failure(exc, failures, what, key)

    def after_failure(self, exc: Exception, failures: int, what: str, key: str | None) -> None:
        """From an `except` block: raise `exc` (as the store error it means) unless it is
        transient, else back off before retry number `failures` (or give up)."""
        err = self.classify(exc, key)
        if err is None:
            raise exc
        if err is exc and not isinstance(err, StoreUnavailable):
            raise exc
        if not isinstance(err, StoreUnavailable):
            raise err from exc
        self.backoff(failures, err, what, key)
