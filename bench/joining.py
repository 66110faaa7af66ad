"""Benchmark: what joining the federation is worth to each participant, at equal compute.

P participants with one language each train the `tiny` GPT in five ways that all process
the same tokens (R rounds x H inner steps x B sequences per participant):

- (a) DiLoCo: R rounds; each participant runs H AdamW steps from the shared base on its
  own data, the coordinator averages the deltas and takes a Nesterov outer step.
- (b) FedAvg: the same rounds; the next base is the plain average of the local models.
- (c) local-only: each participant alone, R rounds of H steps on its own data (a
  federation of one, as the demo's baselines).
- (d) centralised data-parallel: R*H steps on pooled batches (each participant's B
  sequences of that step, concatenated: the mean loss over them has the gradient that
  averaging the participants' gradients gives), one gradient sync per step.
- (e) the DiLoCo model after a short local adaptation: ceil(H/10) steps on the
  participant's own data, scored on that participant's held-out data.

Every arm draws the very same windows: participant p's stream continues across rounds
(its loader is positioned at the step it has reached), and (d) takes step s's batch of
every participant's stream. The pieces are the project's own, in-process: the trainer's
model, loader, inner loop and held-out evaluation, and the aggregator's outer-optimizer
math (`compute_weights`, `outer_step`). The store, signing and process boundaries of a
real round are skipped; the protocol path is measured elsewhere.

Communication (fp32, model bytes M): (a) and (b) move 2M per participant per round (the
base down, the delta up); (d) moves 2M per participant per step (the gradient up, the
averaged gradient down: the parameter-server view; a ring all-reduce moves 2M(P-1)/P each
way), so (d)/(a) = H by construction.

Usage: python bench/joining.py [--quick] [--out FILE] [--data DIR] [--plot PNG]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from report import header, write

from tapestry_aggregator.strategy import Strategy, compute_weights, outer_step
from tapestry_protocol.shards import FloatArray
from tapestry_trainer import plugins
from tapestry_trainer.data import BatchLoader, evaluate, prepare_shards
from tapestry_trainer.inner import (
    DistContext,
    StepInfo,
    load_state_arrays,
    state_arrays,
    train_inner,
)
from tapestry_trainer.specs import InnerConfig, ModelSpec, default_warmup

ROOT = Path(__file__).resolve().parents[1]

FULL: dict[str, Any] = {
    "participants": 3, "rounds": 10, "innerSteps": 10, "batchSize": 8, "seqLen": 128,
    "seeds": [0, 1, 2], "evalBatches": 4, "evalBatchSize": 16,
}  # fmt: skip
QUICK: dict[str, Any] = {
    "participants": 2, "rounds": 2, "innerSteps": 3, "batchSize": 4, "seqLen": 32,
    "seeds": [0], "evalBatches": 2, "evalBatchSize": 4,
}  # fmt: skip
INNER_LR = 3e-3  # the demo's (`tapestry local run`) inner learning rate
HELD_OUT = 0.1  # as `tapestry local run`: a tenth of each participant's data is held out
ADAPT_FRACTION = 0.1  # (e): this share of a round's inner steps, rounded up
LANGUAGES = ["de", "es", "it", "en"]  # the demo's order: the largest corpora first
ARMS = {
    "diloco": "(a) DiLoCo",
    "fedavg": "(b) FedAvg",
    "local": "(c) local-only",
    "central": "(d) centralised data-parallel",
    "adapted": "(e) DiLoCo + local adaptation",
}
POOLED = "pooled"

Arrays = dict[str, FloatArray]


@dataclass(frozen=True)
class Setup:
    """One configuration of the experiment: who takes part, on what, how long."""

    names: list[str]
    data: dict[str, str]  # participant -> shard set (its held-out split is its eval set)
    pooled: str  # every participant's held-out split, pooled
    rounds: int
    inner: InnerConfig  # one participant's inner run of one round
    eval_batches: int
    eval_batch_size: int
    diloco: Strategy
    fedavg: Strategy

    @property
    def adapt_steps(self) -> int:
        return max(1, math.ceil(ADAPT_FRACTION * self.inner.steps))

    def config(self, seed: int, steps: int | None = None, batch: int | None = None) -> InnerConfig:
        """The inner config of `seed`, optionally for another number of steps or batch
        (warmup re-derived as the command line derives it)."""
        steps = steps or self.inner.steps
        return replace(
            self.inner, seed=seed, steps=steps, batch_size=batch or self.inner.batch_size,
            warmup_steps=default_warmup(steps),
        )  # fmt: skip


# --------------------------------------------------------------------------- pieces


def _loader(data: str, config: InnerConfig, position: int) -> BatchLoader:
    """The participant's loader, `position` steps into its sample stream (so a round
    continues where the previous one stopped instead of redrawing the same windows)."""
    loader = plugins.loader_for(data, config, DistContext())
    loader.load_state_dict({"consumed": position * config.batch_size, "seed": config.seed})
    return loader


class PooledLoader:
    """(d)'s batches: step s's batch of every participant's stream, concatenated."""

    def __init__(self, loaders: Sequence[BatchLoader]) -> None:
        self.loaders = list(loaders)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [loader.next_batch() for loader in self.loaders]
        return torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [loader.state_dict() for loader in self.loaders]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for loader, part in zip(self.loaders, state["parts"], strict=True):
            loader.load_state_dict(part)


class Scorer:
    """Held-out loss of weights on the eval sets, with one model kept for it."""

    def __init__(self, spec: ModelSpec, setup: Setup) -> None:
        self.model = plugins.build_model(spec)
        self.setup = setup

    def model_loss(self, model: torch.nn.Module, where: str) -> float:
        data = self.setup.pooled if where == POOLED else self.setup.data[where]
        return evaluate(
            model, data, batches=self.setup.eval_batches,
            batch_size=self.setup.eval_batch_size, seq_len=self.setup.inner.seq_len,
        )  # fmt: skip

    def __call__(self, arrays: Mapping[str, FloatArray], where: Sequence[str]) -> dict[str, float]:
        load_state_arrays(self.model, arrays)
        return {w: self.model_loss(self.model, w) for w in where}


def _train(
    spec: ModelSpec, arrays: Mapping[str, FloatArray], data: str, config: InnerConfig,
    position: int,
) -> Arrays:  # fmt: skip
    """H inner steps from `arrays` on `data`, from `position` in its stream."""
    model = plugins.build_model(spec)
    load_state_arrays(model, arrays)
    train_inner(model, _loader(data, config, position), config, log_every=0)
    return state_arrays(model)


def _outer(
    strategy: Strategy, base: Arrays, locals_: Mapping[str, Arrays], tokens: Mapping[str, int],
    state: dict[str, Arrays],
) -> Arrays:  # fmt: skip
    """The coordinator's step: weighted mean of the deltas `base - local`, then the
    strategy's outer optimizer on each tensor (state: per tensor, its slots)."""
    weights = compute_weights(tokens, strategy.weighting, strategy.max_share)
    new: Arrays = {}
    for name, current in base.items():
        grad = np.zeros_like(current)
        for who in sorted(locals_):
            grad += np.float32(weights[who]) * (current - locals_[who][name])
        new[name], state[name] = outer_step(strategy, current, grad, state.get(name, {}))
    return new


def model_bytes(arrays: Mapping[str, FloatArray]) -> int:
    """What one fp32 copy of the exchanged weights (or a delta, or a gradient) weighs."""
    return sum(int(a.size) * 4 for a in arrays.values())


# --------------------------------------------------------------------------- arms

Curve = list[dict[str, float]]  # per round (0 = the initial model): eval set -> loss


def run_federated(
    setup: Setup, spec: ModelSpec, seed: int, strategy: Strategy, scorer: Scorer,
    adapt: bool, say: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    """(a) or (b); with `adapt`, also (e) after every round."""
    config = setup.config(seed)
    adapt_config = setup.config(seed, steps=setup.adapt_steps)
    base = state_arrays(plugins.build_model(spec))
    everywhere = [*setup.names, POOLED]
    curve: Curve = [scorer(base, everywhere)]
    adapted: Curve = [{n: curve[0][n] for n in setup.names}]
    state: dict[str, Arrays] = {}
    tokens = {n: config.steps * config.tokens_per_step for n in setup.names}
    steps = adapt_steps = 0
    for r in range(setup.rounds):
        locals_ = {
            n: _train(spec, base, setup.data[n], config, r * config.steps) for n in setup.names
        }
        steps += config.steps * len(setup.names)
        base = _outer(strategy, base, locals_, tokens, state)
        curve.append(scorer(base, everywhere))
        if adapt:
            after: dict[str, float] = {}
            for n in setup.names:
                tuned = _train(spec, base, setup.data[n], adapt_config, (r + 1) * config.steps)
                after |= scorer(tuned, [n])
            adapt_steps += adapt_config.steps * len(setup.names)
            adapted.append(after)
        say(f"  {strategy.optimizer} round {r + 1}: " + _fmt(curve[-1]))
    out: dict[str, Any] = {"curve": curve, "steps": steps, "tokens": steps * config.tokens_per_step}
    if adapt:
        out["adapted"] = {
            "curve": adapted, "extraSteps": adapt_steps,
            "extraTokens": adapt_steps * adapt_config.tokens_per_step,
        }  # fmt: skip
    return out


def run_local(
    setup: Setup, spec: ModelSpec, seed: int, scorer: Scorer, say: Callable[[str], None]
) -> dict[str, Any]:
    """(c): every participant alone; each local model scored on its own set and pooled."""
    config = setup.config(seed)
    initial = state_arrays(plugins.build_model(spec))
    first = scorer(initial, [*setup.names, POOLED])
    curves: dict[str, Curve] = {}
    for n in setup.names:
        arrays, curve = initial, [{n: first[n], POOLED: first[POOLED]}]
        for r in range(setup.rounds):
            arrays = _train(spec, arrays, setup.data[n], config, r * config.steps)
            curve.append(scorer(arrays, [n, POOLED]))
        curves[n] = curve
        say(f"  local-only {n}: " + _fmt(curve[-1]))
    steps = setup.rounds * config.steps * len(setup.names)
    return {"curves": curves, "steps": steps, "tokens": steps * config.tokens_per_step}


def run_central(
    setup: Setup, spec: ModelSpec, seed: int, scorer: Scorer, say: Callable[[str], None]
) -> dict[str, Any]:
    """(d): one run of R*H steps on pooled batches, scored after every H steps."""
    per = setup.config(seed)
    total = setup.rounds * per.steps
    config = setup.config(seed, steps=total, batch=per.batch_size * len(setup.names))
    model = plugins.build_model(spec)
    everywhere = [*setup.names, POOLED]
    curve: Curve = [{w: scorer.model_loss(model, w) for w in everywhere}]

    def on_step(info: StepInfo) -> None:
        if info.step % per.steps == 0:
            curve.append({w: scorer.model_loss(model, w) for w in everywhere})
            say(f"  central step {info.step}: " + _fmt(curve[-1]))

    loader = PooledLoader([_loader(setup.data[n], per, 0) for n in setup.names])
    train_inner(model, loader, config, on_step=on_step, log_every=0)
    return {"curve": curve, "steps": total, "tokens": total * config.tokens_per_step}


def run_seed(setup: Setup, seed: int, threads: int) -> dict[str, Any]:
    """Every arm for one seed (model init and data order), one after the other."""
    if threads:
        torch.set_num_threads(threads)
    spec = ModelSpec.preset("tiny", seed=seed)
    scorer = Scorer(spec, setup)

    def say(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} seed {seed}] {line}", flush=True)

    say("start")
    return {
        "seed": seed,
        "modelBytes": model_bytes(state_arrays(scorer.model)),
        "diloco": run_federated(setup, spec, seed, setup.diloco, scorer, True, say),
        "fedavg": run_federated(setup, spec, seed, setup.fedavg, scorer, False, say),
        "local": run_local(setup, spec, seed, scorer, say),
        "central": run_central(setup, spec, seed, scorer, say),
    }


def _fmt(losses: Mapping[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in losses.items())


# --------------------------------------------------------------------------- summary


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation over seeds (std 0 for a single seed)."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": list(values),
    }


def arm_curves(run: Mapping[str, Any], names: Sequence[str]) -> dict[str, Curve]:
    """arm -> per-round curve of one seed, every arm as eval set -> loss (local-only: each
    participant's own model on its own set; on the pooled set, the best local model)."""
    local = run["local"]["curves"]
    rounds = len(run["diloco"]["curve"])
    local_curve = [
        {
            **{n: local[n][r][n] for n in names},
            POOLED: min(local[n][r][POOLED] for n in names),
        }
        for r in range(rounds)
    ]
    return {
        "diloco": run["diloco"]["curve"],
        "fedavg": run["fedavg"]["curve"],
        "local": local_curve,
        "central": run["central"]["curve"],
        "adapted": run["diloco"]["adapted"]["curve"],
    }


def summarise(runs: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """Per arm and eval set: the final loss and the per-round curve, mean +- std."""
    curves = [arm_curves(run, names) for run in runs]
    out: dict[str, Any] = {}
    for arm in ARMS:
        sets = [*names] if arm == "adapted" else [*names, POOLED]
        rounds = len(curves[0][arm])
        out[arm] = {
            "label": ARMS[arm],
            "final": {w: mean_std([c[arm][-1][w] for c in curves]) for w in sets},
            "curve": {
                w: [mean_std([c[arm][r][w] for c in curves]) for r in range(rounds)] for w in sets
            },
        }
    # Each local-only model on the pooled set, not just the best one.
    out["local"]["pooledByModel"] = {
        n: mean_std([run["local"]["curves"][n][-1][POOLED] for run in runs]) for n in names
    }
    return out


def targets(
    arms: Mapping[str, Any], names: Sequence[str], comm: Mapping[str, Any], inner_steps: int,
    runs: Sequence[Mapping[str, Any]],
) -> list[dict[str, Any]]:  # fmt: skip
    """Each target of the issue, its measured value (seed means) and whether it is met."""
    shared = arms["diloco"]["final"][POOLED]["mean"]
    local_pooled = {n: arms["local"]["pooledByModel"][n]["mean"] for n in names}
    central = arms["central"]["final"][POOLED]["mean"]
    gap = (shared - central) / central
    own = {
        n: {w: arms[a]["final"][n]["mean"] for w, a in (("adapted", "adapted"), ("local", "local"))}
        for n in names
    }
    per_seed_beats = [
        all(
            run["diloco"]["adapted"]["curve"][-1][n] < run["local"]["curves"][n][-1][n]
            for n in names
        )
        for run in runs
    ]
    return [
        {
            "target": "the shared (DiLoCo) model beats every local-only model on the pooled set",
            "measured": {"shared": shared, "localOnly": local_pooled},
            "met": all(shared < v for v in local_pooled.values()),
        },
        {
            "target": "the shared model's pooled loss is within 4 % of the centralised baseline",
            "measured": {"shared": shared, "central": central, "gap": gap},
            "met": gap <= 0.04,
        },
        {
            "target": "(e) adapted beats (c) local-only on every participant's own data",
            "measured": {**own, "seedsWhereAllBeat": sum(per_seed_beats)},
            "met": all(v["adapted"] < v["local"] for v in own.values()),
        },
        {
            "target": f"(a) communicates at least H = {inner_steps} x fewer bytes than (d)",
            "measured": {"ratio": comm["ratio"], "H": inner_steps},
            "met": comm["ratio"] >= inner_steps,
        },
    ]


def communication(setup: Setup, m_bytes: int) -> dict[str, Any]:
    """Bytes moved over the whole run (see the module docstring for the conventions)."""
    p, r, h = len(setup.names), setup.rounds, setup.inner.steps
    federated = 2 * m_bytes * p * r
    central = 2 * m_bytes * p * r * h
    return {
        "modelBytes": m_bytes,
        "convention": "fp32; (a)/(b): base down + delta up, per participant per round; "
        "(d): gradient up + averaged gradient down, per participant per step",
        "diloco": federated,
        "fedavg": federated,
        "central": central,
        "ratio": central / federated,
    }


def plot(report: Mapping[str, Any], out: Path) -> None:
    """Validation loss against rounds, one panel per eval set, mean +- std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, size = report["participants"], report["size"]
    sets = [*names, POOLED]
    fig, axes = plt.subplots(1, len(sets), figsize=(4 * len(sets), 3.6), sharey=False)
    for ax, where in zip(axes, sets, strict=True):
        for arm, data in report["arms"].items():
            if where not in data["curve"]:
                continue
            points = data["curve"][where]
            xs = np.arange(len(points))
            mean = np.array([p["mean"] for p in points])
            std = np.array([p["std"] for p in points])
            label = data["label"] + (" (pooled: the best model)" if arm == "local" else "")
            (line,) = ax.plot(xs[1:], mean[1:], marker="o", ms=3, label=label)
            ax.fill_between(xs[1:], (mean - std)[1:], (mean + std)[1:], alpha=0.2,
                            color=line.get_color())  # fmt: skip
        later = [p["mean"] for data in report["arms"].values() if where in data["curve"]
                 for p in data["curve"][where][2:]]  # fmt: skip
        if later:  # round 1's warm-up spikes would flatten every other round
            ax.set_ylim(min(later) - 0.1, max(later) + 0.15)
        ax.set_title(f"held-out: {where}")
        ax.set_xlabel("round")
        ax.set_xticks(range(1, size["rounds"] + 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (nats/byte)")
    handles = {h.get_label(): h for ax in axes for h in ax.get_lines()}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle(
        f"tiny GPT, {len(names)} participants, {size['rounds']} rounds x "
        f"{size['innerSteps']} steps, {len(size['seeds'])} seeds (mean ± std), equal tokens",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}", flush=True)


# --------------------------------------------------------------------------- main


def _prepare(args: argparse.Namespace, participants: int, workdir: Path) -> dict[str, Path]:
    """participant -> folder of .txt: --data's sub-folders or the demo corpus."""
    if args.data is not None:
        folders = sorted(p for p in args.data.iterdir() if p.is_dir())
        if len(folders) < participants:
            raise SystemExit(
                f"--data {args.data} has {len(folders)} sub-folders, need {participants}"
            )
        return {f.name: f for f in folders[:participants]}
    from tapestry_trainer.corpus import prepare_demo_corpus

    return prepare_demo_corpus(workdir / "corpus", LANGUAGES[:participants])


def build_setup(args: argparse.Namespace, size: Mapping[str, Any]) -> Setup:
    """The participants' shard sets (each with its held-out split) and the pooled held-out
    set under `--workdir`, and the inner and outer settings of `size` and the flags."""
    workdir = args.workdir.absolute()
    texts = _prepare(args, size["participants"], workdir)
    names = list(texts)
    shards = workdir / "data"
    data = {
        n: str(prepare_shards([texts[n]], shards / n, val_fraction=HELD_OUT).parent) for n in names
    }
    pooled = str(
        prepare_shards([texts[n] for n in names], shards / POOLED, val_fraction=HELD_OUT).parent
    )
    return Setup(
        names=names, data=data, pooled=pooled, rounds=size["rounds"],
        inner=InnerConfig(steps=size["innerSteps"], lr=INNER_LR, batch_size=size["batchSize"],
                          seq_len=size["seqLen"]),
        eval_batches=size["evalBatches"], eval_batch_size=size["evalBatchSize"],
        diloco=Strategy("diloco", learning_rate=args.outer_lr, momentum=args.outer_momentum,
                        weighting="equal"),
        fedavg=Strategy("fedavg", learning_rate=1.0, weighting="equal"),
    )  # fmt: skip


def run_seeds(
    fn: Callable[..., dict[str, Any]], setup: Setup, seeds: Sequence[int], jobs: int, *extra: Any
) -> list[dict[str, Any]]:
    """`fn(setup, seed, *extra)` for every seed, `jobs` processes at a time (spawned: torch
    and fork do not mix); each seed's arms stay side by side in one process."""
    jobs = max(1, min(jobs, len(seeds)))
    if jobs == 1:
        return [fn(setup, seed, *extra) for seed in seeds]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        columns = [[value] * len(seeds) for value in extra]
        return list(pool.map(fn, [setup] * len(seeds), seeds, *columns))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 2 participants, 2 short rounds")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "joining.json")
    p.add_argument("--data", type=Path, default=None,
                   help="a sub-folder of .txt per participant (default: demo corpus)")  # fmt: skip
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-joining")
    p.add_argument("--plot", type=Path, default=None,
                   help="write the PNG here (default in a full run: docs/images/joining.png "
                   "when matplotlib is importable; never in --quick)")  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--inner-steps", type=int, default=None)
    # Chosen on seed 10 (not a reported seed) from the DiLoCo paper's 0.7 / 0.9 and
    # 1.0 / 0.5 at 10 rounds x 10 steps (docs/benchmarks.md).
    p.add_argument("--outer-lr", type=float, default=1.0, help="DiLoCo outer learning rate")
    p.add_argument("--outer-momentum", type=float, default=0.5, help="DiLoCo Nesterov momentum")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads per process (0: torch's default; 1 is fastest "
                   "on a shared machine)")  # fmt: skip
    p.add_argument("--jobs", type=int, default=2, help="seeds trained in parallel processes")
    args = p.parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    for key, value in (
        ("seeds", args.seeds),
        ("rounds", args.rounds),
        ("innerSteps", args.inner_steps),
    ):
        if value is not None:
            size[key] = value
    started = time.monotonic()
    setup = build_setup(args, size)
    names = setup.names
    print(f"participants {names}, {size}", flush=True)

    runs = run_seeds(run_seed, setup, size["seeds"], args.jobs, args.threads)
    m_bytes = runs[0]["modelBytes"]

    comm = communication(setup, m_bytes)
    arms = summarise(runs, names)
    report = header("joining", args.quick, "joining.py")
    report |= {
        "participants": names,
        "size": size,
        "innerLearningRate": INNER_LR,
        "heldOutFraction": HELD_OUT,
        "strategies": {"diloco": setup.diloco.to_json(), "fedavg": setup.fedavg.to_json()},
        "adaptSteps": setup.adapt_steps,
        "tokensPerArm": {
            arm: runs[0][arm]["tokens"] for arm in ("diloco", "fedavg", "local", "central")
        },
        "adaptExtraTokens": runs[0]["diloco"]["adapted"]["extraTokens"],
        "communication": comm,
        "arms": arms,
        "targets": targets(arms, names, comm, setup.inner.steps, runs),
        "runs": runs,
        "wallSeconds": round(time.monotonic() - started, 1),
    }
    write(args.out, report)
    png = args.plot
    if png is None and not args.quick:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("matplotlib missing: no plot (pip install -e '.[docs]')", flush=True)
        else:
            png = ROOT / "docs" / "images" / "joining.png"
    if png is not None:
        plot(report, png)
    for t in report["targets"]:
        print(f"{'MET' if t['met'] else 'NOT MET'}: {t['target']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
