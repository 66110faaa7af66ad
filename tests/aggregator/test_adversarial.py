"""The adversarial suite: each attack beside honest members, through the real merge.

Seven members train once on real text (the standard library's documentation) with the
real participant entry point; each attack of tests/aggregator/attacks.py then replaces the
updates of its attackers, and each attack x policy is merged by `aggregate_round` in a
federation of its own. For every policy that defends an attack: each attacker is refused
or neutralised with the policy's reason, every honest contribution is merged (and not
clipped), the model moves no more than the policy's stated bound, and the pooled
validation loss stays within the policy's stated share of the all-honest round's gain.
The undefended mean, on the other hand, must be moved by the large attacks: otherwise
these tests could not fail. bench/robust.py runs the same definitions on the demo task.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tapestry_protocol import rejections
from tapestry_trainer.specs import InnerConfig, ModelSpec
from tests.aggregator import attacks
from tests.aggregator.attacks import ATTACKS, ATTACKS_BY_NAME, POLICIES, POLICIES_BY_NAME, Harness

pytestmark = [pytest.mark.torch, pytest.mark.slow]

SPEC = ModelSpec.preset("tiny", seed=3, n_layers=1, d_model=32, n_heads=2, d_ff=64, max_seq_len=32)
CONFIG = InnerConfig(steps=8, lr=1e-2, batch_size=4, seq_len=32, warmup_steps=1, checkpoint_every=0)
#: Relative slack for float32 arithmetic where a bound is met with equality (an attacker
#: exactly opposite to the honest consensus).
SLACK = 1e-4
#: Two shards per delta (the model is about 80 kB): the merge streams, yet stays cheap.
SHARD_BYTES = 48 << 10

DEFENDED = [
    pytest.param(a.name, p.name, id=f"{a.name}-{p.name}")
    for p in POLICIES
    for a in ATTACKS
    if a.name in p.defends
]
EVERY = [pytest.param(a.name, p.name, id=f"{a.name}-{p.name}") for p in POLICIES for a in ATTACKS]


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    """Trains the seven honest members once for the whole module."""
    with attacks.scratch() as root:
        setup = attacks.stdlib_setup(root, SPEC, CONFIG, SHARD_BYTES)
        yield Harness(setup, attacks.train_honest(setup, root / "training"), root / "merges")


def _policy(name: str) -> attacks.Policy:
    policy = POLICIES_BY_NAME[name]
    if not policy.available:  # pragma: no cover - the policies are part of this build
        pytest.fail(f"policy {name} is not available in this build's Strategy")
    return policy


@pytest.mark.parametrize(("attack", "policy"), DEFENDED)
def test_a_defending_policy_neutralises_the_attack(
    harness: Harness, attack: str, policy: str
) -> None:
    defence = _policy(policy)
    case = harness.run(ATTACKS_BY_NAME[attack], defence)
    for name in case.attackers:
        seen = {case.refused[name]} if name in case.refused else set(case.adjusted.get(name, []))
        assert seen & defence.reasons, f"{name}: {seen or 'merged as sent'}"
    assert not case.honest_refused, case.honest_refused
    clipped = {n: r for n, r in case.honest_adjusted.items() if rejections.CLIPPED in r}
    assert not clipped, f"honest members clipped: {clipped}"
    assert case.bound is not None
    assert case.movement <= case.bound * (1 + SLACK), (case.movement, case.bound)
    if defence.loss_bound is not None:  # the token cap's is exact: the test below
        assert case.gain_lost <= defence.loss_bound, (
            case.loss, case.all_honest_loss, case.base_loss,
        )  # fmt: skip


def test_an_inflated_claim_under_the_token_cap_buys_no_more_than_an_honest_one(
    harness: Harness,
) -> None:
    """Tokens x 100 with a sign-flipped delta, capped, merges exactly as the sign flip
    with an honest claim does under the mean: same weights, same model, same loss."""
    capped = harness.run(ATTACKS_BY_NAME["inflated-tokens"], _policy("token-cap"))
    honest_claim = harness.run(ATTACKS_BY_NAME["sign-flip"], _policy("mean"))
    uncapped = harness.run(ATTACKS_BY_NAME["inflated-tokens"], _policy("mean"))
    attacker = capped.attackers[0]
    assert capped.figures[attacker]["tokensCounted"] == harness.honest.tokens[attacker]
    assert capped.attacker_weight == honest_claim.attacker_weight == 0.25
    assert capped.movement == honest_claim.movement and capped.loss == honest_claim.loss
    assert uncapped.attacker_weight > 0.9 and uncapped.movement > 3 * capped.movement


@pytest.mark.parametrize(("attack", "policy"), EVERY)
def test_every_policy_keeps_its_movement_bound(harness: Harness, attack: str, policy: str) -> None:
    """The stated bound holds for every attack, defended or not (it is a property of
    the policy's arithmetic: for an undefended attack it is merely large)."""
    case = harness.run(ATTACKS_BY_NAME[attack], _policy(policy))
    assert case.bound is not None
    assert case.movement <= case.bound * (1 + SLACK), (case.movement, case.bound)


@pytest.mark.parametrize("attack", [a.name for a in ATTACKS if a.big])
def test_the_undefended_mean_is_moved_by_the_large_attacks(harness: Harness, attack: str) -> None:
    case = harness.run(ATTACKS_BY_NAME[attack], _policy("mean"))
    assert not case.refused and not case.adjusted
    assert case.movement > 1.0, "the attack moved the model less than one honest step"
    assert case.loss > case.all_honest_loss


@pytest.mark.parametrize("policy", [p.name for p in POLICIES])
def test_a_malformed_update_is_refused_under_every_policy(harness: Harness, policy: str) -> None:
    case = harness.run(ATTACKS_BY_NAME["malformed-nan"], _policy(policy))
    assert case.refused == {case.attackers[0]: rejections.NON_FINITE}
    assert case.movement == 0.0 and not case.honest_refused


def test_the_benchmark_quick_mode_writes_its_table(tmp_path: Path) -> None:
    """bench/robust.py --quick: the harness end to end as a script, and the JSON shape
    the docs' table is made from."""
    out = tmp_path / "robust.json"
    script = Path(__file__).resolve().parents[2] / "bench" / "robust.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--workdir", str(tmp_path / "work"),
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == "robust" and report["quick"] is True
    assert set(report["setup"]) >= {"model", "hyperparameters", "members", "fixedClipBound"}
    names = {(c["attack"], c["policy"]) for c in report["cases"]}
    assert names == {(a, p) for a in report["attacks"] for p in report["policies"]}
    assert len(names) >= 4
    for case in report["cases"]:
        assert set(case) >= {
            "refused", "adjusted", "movement", "movementBound", "validationLoss",
            "allHonestValidationLoss", "lossChange", "gainLost",
        }  # fmt: skip
        assert case["movement"] <= case["movementBound"] * (1 + SLACK)
    header = next(line for line in done.stdout.splitlines() if line.startswith("| attack |"))
    assert all(report["policies"][p]["label"] in header for p in report["policies"])
