"""Benchmark: every attack x robust-aggregation policy through the real merge.

Honest deltas are trained once on the demo task (the multilingual corpus, one language per
member, each language split in two so that seven members exist; the tiny GPT preset with
the demo's inner settings; one warm-up federated round first), then each attack of
tests/aggregator/attacks.py replaces its attackers' updates and every attack x policy is
merged by `aggregate_round` in a federation of its own (signed updates, the close record),
and the merged model is scored on the members' pooled held-out data. The attacks, the
policies, their stated bounds and the measuring are defined once, in that module, and the
adversarial tests use the same definitions on a smaller setup.

Usage: python bench/robust.py [--quick] [--workdir DIR] [--out FILE]
  --quick: the CI smoke test of this harness (stdlib text, a smaller model, four members,
           two attacks, three policies); writes the same JSON shape.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from report import header, write

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.aggregator import attacks
from tests.aggregator.attacks import (
    ATTACKS,
    ATTACKS_BY_NAME,
    POLICIES,
    POLICIES_BY_NAME,
    Attack,
    Case,
    Harness,
    Policy,
    Setup,
)

LANGUAGES = ("de", "es", "it", "en")
#: Every sixth file of each language goes to the coordinator's held-out set.
HOLDOUT_EVERY = 6
#: Half the demo's 40 inner steps: the honest deltas of two rounds for seven members must
#: train on two shared cores in minutes.
INNER_STEPS = 20
QUICK_ATTACKS = ("scaled-x100", "inflated-tokens")
QUICK_POLICIES = ("mean", "clip-median", "token-cap")


def demo_setup(root: Path) -> Setup:
    """Seven members from the demo corpus (de-a, es-a, it-a, en-a, de-b, es-b, it-b: each
    language's files alternately), the coordinator's held-out set from every sixth file
    of every language; the tiny preset with the demo's inner settings but INNER_STEPS."""
    from tapestry_trainer.corpus import prepare_demo_corpus
    from tapestry_trainer.data import prepare_shards
    from tapestry_trainer.specs import FLAG_DEFAULTS, InnerConfig, ModelSpec, default_warmup

    folders = prepare_demo_corpus(root / "corpus", list(LANGUAGES))
    parts: dict[str, list[Path]] = {}
    holdout: list[Path] = []
    for language in LANGUAGES:
        files = sorted(Path(folders[language]).glob("*.txt"))
        kept = [f for i, f in enumerate(files) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
        holdout += [f for f in files if f not in kept]
        parts[f"{language}-a"] = kept[0::2]
        parts[f"{language}-b"] = kept[1::2]
    members = [f"{lang}-a" for lang in LANGUAGES] + [f"{lang}-b" for lang in LANGUAGES[:3]]
    data = {}
    for name in members:
        data[name] = root / "data" / name
        prepare_shards(parts[name], data[name], val_fraction=0.1)
    held_out = root / "data" / "holdout"
    prepare_shards(holdout, held_out, val_fraction=0.9)
    steps = INNER_STEPS
    config = InnerConfig(
        steps=steps, lr=float(FLAG_DEFAULTS["lr"]), batch_size=int(FLAG_DEFAULTS["batch_size"]),
        seq_len=int(FLAG_DEFAULTS["seq_len"]), warmup_steps=default_warmup(steps),
        checkpoint_every=0,
    )  # fmt: skip
    return Setup(ModelSpec.preset("tiny", seed=0), config, data, held_out)


def quick_setup(root: Path) -> Setup:
    from tapestry_trainer.specs import InnerConfig, ModelSpec

    spec = ModelSpec.preset(
        "tiny", seed=3, n_layers=1, d_model=32, n_heads=2, d_ff=64, max_seq_len=32
    )
    config = InnerConfig(steps=4, lr=1e-2, batch_size=4, seq_len=32, warmup_steps=1,
                         checkpoint_every=0)  # fmt: skip
    return attacks.stdlib_setup(root, spec, config, 48 << 10, members=4)


def cell(case: Case) -> str:
    """One table cell: what happened to the attacker, movement (bound), loss change."""
    reasons = sorted({*case.refused.values(), *(r for rs in case.adjusted.values() for r in rs)})
    verdict = ("refused " if case.refused else "") + ", ".join(reasons) or "merged as sent"
    bound = "∞" if case.bound is None else f"{case.bound:.3g}"
    return f"{verdict} · {case.movement:.3g} (≤ {bound}) · {case.loss_change:+.3f}"


def table(cases: list[Case], policies: list[Policy], attack_list: list[Attack]) -> str:
    by = {(c.attack, c.policy): c for c in cases}
    head = "| attack | " + " | ".join(p.label for p in policies) + " |"
    rule = "| --- |" + " --- |" * len(policies)
    rows = [head, rule]
    for attack in attack_list:
        cells = [cell(by[(attack.name, p.name)]) for p in policies if (attack.name, p.name) in by]
        rows.append(f"| {attack.label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the harness's CI smoke test")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="kept (default: a temporary one, in memory)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/robust.json"))
    args = parser.parse_args()
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or stack.enter_context(attacks.scratch())
        setup = quick_setup(workdir) if args.quick else demo_setup(workdir)
        honest = attacks.train_honest(setup, workdir / "training")
        trained = time.monotonic() - started
        harness = Harness(setup, honest, workdir / "merges")
        attack_list = [ATTACKS_BY_NAME[a] for a in QUICK_ATTACKS] if args.quick else list(ATTACKS)
        chosen = [POLICIES_BY_NAME[p] for p in QUICK_POLICIES] if args.quick else list(POLICIES)
        policies = [p for p in chosen if p.available]
        cases = [harness.run(a, p) for a in attack_list for p in policies]
        report = _report(args, setup, harness, cases, policies, attack_list, trained, started)
    write(args.out, report)
    print(table(cases, policies, attack_list))
    print(f"\n{len(cases)} cases in {report['seconds']:.0f} s; results in {args.out}")


def _report(
    args: argparse.Namespace,
    setup: Setup,
    harness: Harness,
    cases: list[Case],
    policies: list[Policy],
    attack_list: list[Attack],
    trained: float,
    started: float,
) -> dict[str, Any]:
    base_losses = {
        str(n): harness.loss(harness.honest.base, setup.members[:n])
        for n in sorted({a.members for a in attack_list})
    }
    return {
        **header("robust", args.quick, "robust.py"),
        "setup": {
            "model": setup.spec.to_dict(),
            "parameters": setup.spec.param_count(),
            "hyperparameters": setup.config.to_dict(),
            "members": setup.members,
            "warmupRounds": setup.warmup_rounds,
            "honestNorms": {n: attacks.norm(d) for n, d in harness.honest.deltas.items()},
            "fixedClipBound": harness.calibration.fixed_bound,
            "baseValidationLoss": base_losses,
        },
        "policies": {
            p.name: {
                "label": p.label,
                "settings": p.settings(harness.calibration),
                "defends": sorted(p.defends),
                "reasons": sorted(p.reasons),
                "lossBound": p.loss_bound,
            }
            for p in policies
        },
        "attacks": {
            a.name: {"label": a.label, "members": a.members, "attackers": a.attackers}
            for a in attack_list
        },
        "cases": [c.to_json() for c in cases],
        "trainingSeconds": round(trained, 1),
        "seconds": round(time.monotonic() - started, 1),
    }


if __name__ == "__main__":
    main()
