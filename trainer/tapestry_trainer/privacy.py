"""Participant-level differential privacy: clip the round's whole delta, add Gaussian
noise, account for it across rounds.

The unit protected is one participant's whole contribution to one round (every example
it trained on, together): the delta is clipped to L2 norm <= `clip_norm` and noise of
std `noise_multiplier * clip_norm` is added to every coordinate *before* anything leaves
the participant, so the store, the coordinator and the other members only ever see the
noised delta. Each round this participant takes part in is one Gaussian mechanism with
sampling probability 1; the RDP accountant of Google's `dp_accounting` composes them,
and the (epsilon, delta) of the signed manifest is the cumulative guarantee over every
noised upload of this participant so far, counted from its own earlier signed manifests.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tapestry_protocol.documents import Privacy, UpdateManifest
from tapestry_protocol.exchange import read_document
from tapestry_protocol.files import atomic_file, atomic_write_text
from tapestry_protocol.layout import Layout
from tapestry_protocol.rejections import Rejected
from tapestry_protocol.shards import FloatArray
from tapestry_protocol.signing import SigningKey, verify
from tapestry_protocol.store import ObjectStore

DEFAULT_DELTA = 1e-5
MECHANISM = "gaussian"
ACCOUNTANT = "rdp"
SEED_BYTES = 32  # 256 bits from os.urandom: the noise must not be guessable
RELEASE_FILE = "dp-release.npz"  # the noised delta of a round, beside its checkpoints
RECORD_FILE = "dp-release.json"  # its Privacy record and the plan/base it was made for


class PrivacyError(ValueError):
    """A differential-privacy setting that cannot be used, in words for the user."""


@dataclass(frozen=True)
class Settings:
    """What the member asked for (`spec.privacy`, `--dp-*`): noise std is
    `noise_multiplier * clip_norm`; `delta` is the target delta epsilon is reported at."""

    noise_multiplier: float
    clip_norm: float
    delta: float = DEFAULT_DELTA

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise PrivacyError(
                f"the noise multiplier must be a number > 0, not {self.noise_multiplier!r}"
            )
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise PrivacyError(f"the clip norm must be a number > 0, not {self.clip_norm!r}")
        if not (0 < self.delta < 1):
            raise PrivacyError(f"the privacy delta must be in (0, 1), not {self.delta!r}")

    @classmethod
    def parse(
        cls, noise_multiplier: str | float | None, clip_norm: str | float | None,
        delta: str | float | None = None,
    ) -> Settings | None:  # fmt: skip
        """The settings from flags or environment values; None when privacy is off
        (neither noise nor clip given). One without the other is a mistake."""
        given = {"noise multiplier": noise_multiplier, "clip norm": clip_norm}
        present = {k for k, v in given.items() if v not in (None, "")}
        if not present:
            if delta not in (None, ""):
                raise PrivacyError("a privacy delta needs a noise multiplier and a clip norm")
            return None
        if len(present) < len(given):
            (missing,) = set(given) - present
            raise PrivacyError(f"differential privacy needs a {missing} too")
        try:
            values = [float(v) for v in (noise_multiplier, clip_norm)]  # type: ignore[arg-type]
            target = DEFAULT_DELTA if delta is None or delta == "" else float(delta)
        except ValueError as e:
            raise PrivacyError(f"a privacy setting is not a number: {e}") from None
        return cls(values[0], values[1], target)


def l2_norm(tensors: Mapping[str, FloatArray]) -> float:
    """The L2 norm of all tensors together, summed in float64."""
    total = 0.0
    for tensor in tensors.values():
        flat = tensor.ravel().astype(np.float64)
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def clip(tensors: Mapping[str, FloatArray], clip_norm: float) -> dict[str, FloatArray]:
    """The whole delta scaled down to L2 norm `clip_norm` if it is longer (never up)."""
    norm = l2_norm(tensors)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (v * np.float32(scale)).astype(np.float32) for k, v in tensors.items()}


def new_seed() -> int:
    """A cryptographically strong seed: noise from a guessable seed could be subtracted."""
    return int.from_bytes(os.urandom(SEED_BYTES), "big")


def privatize(
    delta: Mapping[str, FloatArray], settings: Settings, seed: int | None = None
) -> dict[str, FloatArray]:
    """Clip `delta`, then add N(0, (noise_multiplier * clip_norm)^2) to every coordinate.

    `seed` is a seam for tests; in use it is None and a fresh `new_seed()` is drawn."""
    rng = np.random.default_rng(new_seed() if seed is None else seed)
    sigma = np.float32(settings.noise_multiplier * settings.clip_norm)
    out: dict[str, FloatArray] = {}
    for name, tensor in sorted(clip(delta, settings.clip_norm).items()):
        noise = rng.standard_normal(tensor.shape, dtype=np.float32)
        out[name] = (tensor + sigma * noise).astype(np.float32)
    return {name: out[name] for name in delta}


def epsilon(noise_multipliers: Sequence[float], delta: float) -> float:
    """Cumulative epsilon at `delta` of one Gaussian mechanism per round (sampling
    probability 1, the noise multiplier each round used), composed by the RDP accountant."""
    import dp_accounting
    from dp_accounting import rdp

    if not noise_multipliers:
        return 0.0
    accountant = rdp.RdpAccountant()
    for z in noise_multipliers:
        event = dp_accounting.GaussianDpEvent(z)
        accountant.compose(dp_accounting.PoissonSampledDpEvent(1.0, event))
    return float(accountant.get_epsilon(delta))


def earlier_noise(
    store: ObjectStore, layout: Layout, signer: SigningKey, before_round: int
) -> list[float]:
    """The noise multipliers of this participant's own earlier noised uploads (rounds
    below `before_round`), read from its signed manifests, so the count survives
    restarts and re-runs. A manifest that is not validly signed by this participant's
    key is an error: it would make the accounting unsound."""
    found: list[float] = []
    me = signer.key_id
    for r in range(before_round):
        key = layout.update_manifest(r, me)
        if not store.exists(key):
            continue
        try:
            document, raw, _ = read_document(store, key, UpdateManifest)
            verify(raw, me, signer.public_key)
        except Rejected as e:
            raise PrivacyError(f"cannot count earlier noised rounds: {e}") from None
        if document.participant != me or document.round != r:
            raise PrivacyError(f"{key} is not {me}'s update of round {r}")
        if document.privacy is not None:
            found.append(document.privacy.noise_multiplier)
    return found


def account(settings: Settings, earlier: Sequence[float]) -> Privacy:
    """The signed record of this round's upload: its settings and the cumulative
    guarantee over the earlier noised rounds and this one."""
    multipliers = [*earlier, settings.noise_multiplier]
    return Privacy(
        clip_norm=settings.clip_norm,
        noise_multiplier=settings.noise_multiplier,
        epsilon=epsilon(multipliers, settings.delta),
        delta=settings.delta,
        rounds=len(multipliers),
        mechanism=MECHANISM,
        accountant=ACCOUNTANT,
    )


def release(
    directory: Path,
    made_for: str,
    delta: Mapping[str, FloatArray],
    settings: Settings,
    record: Privacy,
    seed: int | None = None,
) -> tuple[dict[str, FloatArray], Privacy]:
    """The noised delta of this round and its record, made once: a retried upload of the
    same round (a restarted process) finds them in `directory` and sends the same noised
    delta again instead of a second, differently noised one, which would average the noise
    away. `made_for` names the plan and base; a file made for others is replaced."""
    arrays_path, record_path = directory / RELEASE_FILE, directory / RECORD_FILE
    if arrays_path.exists() and record_path.exists():
        saved = json.loads(record_path.read_text(encoding="utf-8"))
        if saved.get("madeFor") == made_for:
            with np.load(arrays_path, allow_pickle=False) as loaded:
                arrays = {name: loaded[name].astype(np.float32) for name in delta}
            stored = Privacy.from_json(saved["privacy"])
            assert stored is not None
            return arrays, stored
    noised = privatize(delta, settings, seed)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_file(arrays_path, mode=0o600) as f:
        np.savez(f, **noised)  # type: ignore[arg-type]
    saved = {"madeFor": made_for, "privacy": record.to_json()}
    atomic_write_text(record_path, json.dumps(saved) + "\n", mode=0o600)
    return noised, record
