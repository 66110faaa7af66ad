"""Inner training: weight exchange helpers, resume equivalence, gradient accumulation, and
DDP on two gloo processes against one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import tapestry_trainer  # noqa: E402
from tapestry_trainer import train  # noqa: E402
from tapestry_trainer.data import LoaderContext, ShardLoader  # noqa: E402
from tapestry_trainer.inner import (  # noqa: E402
    CHECKPOINT,
    DistContext,
    InnerResult,
    StepInfo,
    load_arrays,
    load_state_arrays,
    micro_batch_size,
    state_arrays,
    train_inner,
)
from tapestry_trainer.plugins import build_model  # noqa: E402
from tapestry_trainer.specs import InnerConfig, ModelSpec  # noqa: E402

pytestmark = pytest.mark.torch

SPEC = ModelSpec.preset("tiny", seed=0)  # what `train --model tiny --seed 0` builds
# Dropout draws random numbers every step, so resuming must restore the RNG stream too.
NOISY_SPEC = ModelSpec.preset("tiny", seed=0, dropout=0.1)
CLI_ARGS = [
    "--model",
    "tiny",
    "--seed",
    "0",
    "--steps",
    "4",
    "--batch-size",
    "8",
    "--seq-len",
    "32",
    "--warmup",
    "1",
    "--lr",
    "3e-3",
    "--eval-batches",
    "0",
    "--device",
    "cpu",
]


def _config(**overrides: int) -> InnerConfig:
    """The InnerConfig that CLI_ARGS describe."""
    return replace(
        InnerConfig(steps=4, lr=3e-3, batch_size=8, seq_len=32, warmup_steps=1, seed=0),
        **overrides,
    )


def _train(
    shard_dir: Path,
    config: InnerConfig,
    *,
    micro: int | None = None,
    ckpt: Path | None = None,
    run_id: str = "standalone",
    on_step: Callable[[StepInfo], None] | None = None,
    spec: ModelSpec = SPEC,
    log_every: int = 10,
) -> tuple[nn.Module, InnerResult]:
    model = build_model(spec)
    ctx = LoaderContext(
        data=str(shard_dir),
        rank=0,
        world_size=1,
        micro_batch_size=micro or config.batch_size,
        seq_len=config.seq_len,
        seed=config.seed,
    )
    result = train_inner(
        model,
        ShardLoader(ctx),
        config,
        micro_batch=micro,
        checkpoint_dir=ckpt,
        run_id=run_id,
        on_step=on_step,
        log_every=log_every,
    )
    return model, result


def test_log_every_zero_logs_nothing_and_trains(
    shard_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="tapestry_trainer.inner"):
        _, result = _train(shard_dir, _config(steps=2), log_every=0)
    assert result.steps == 2
    assert not [r for r in caplog.records if r.getMessage().startswith("step ")]


class Interrupted(Exception):
    pass


def _interrupt_after(step: int) -> Callable[[StepInfo], None]:
    def on_step(info: StepInfo) -> None:
        if info.step == step:
            raise Interrupted  # like a pod killed right after this step

    return on_step


def test_state_arrays_round_trip_and_checks() -> None:
    model = build_model(SPEC)
    arrays = state_arrays(model)
    assert all(a.dtype == np.float32 for a in arrays.values())
    assert list(arrays) == list(model.state_dict())
    arrays["tok_emb.weight"][0, 0] = 42.0  # a copy, not a view of the parameter
    assert float(model.state_dict()["tok_emb.weight"][0, 0]) != 42.0

    other = build_model(ModelSpec.preset("tiny", seed=1))
    load_state_arrays(other, arrays)
    assert float(other.state_dict()["tok_emb.weight"][0, 0]) == 42.0
    with pytest.raises(KeyError, match="missing"):
        load_state_arrays(other, {k: v for k, v in arrays.items() if k != "norm.weight"})
    with pytest.raises(ValueError, match="shape"):
        load_state_arrays(other, {**arrays, "norm.weight": np.zeros(3, np.float32)})


def test_state_arrays_skip_tied_duplicates_and_integer_buffers() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.emb.weight
            self.bn = nn.BatchNorm1d(3)

    names = set(state_arrays(Tied()))
    assert names == {"emb.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"}


def test_micro_batch_size_must_split_the_global_batch() -> None:
    two = DistContext(rank=0, world_size=2)
    assert micro_batch_size(_config(), two) == 4
    assert micro_batch_size(_config(), two, 2) == 2
    with pytest.raises(ValueError, match="does not split"):
        micro_batch_size(_config(batch_size=7), two)
    with pytest.raises(ValueError, match="does not divide"):
        micro_batch_size(_config(), two, 3)


def test_resume_reproduces_the_uninterrupted_run_bitwise(shard_dir: Path, tmp_path: Path) -> None:
    config = _config(steps=6, checkpoint_every=2)
    full, full_result = _train(shard_dir, config, ckpt=tmp_path / "a", spec=NOISY_SPEC)
    plain, _ = _train(shard_dir, _config(steps=6), spec=NOISY_SPEC)  # checkpoints change nothing
    with pytest.raises(Interrupted):
        _train(shard_dir, config, ckpt=tmp_path / "b", on_step=_interrupt_after(3),
               spec=NOISY_SPEC)  # fmt: skip
    resumed, result = _train(shard_dir, config, ckpt=tmp_path / "b", spec=NOISY_SPEC)

    expected = full.state_dict()
    for other in (plain, resumed):
        assert all(torch.equal(expected[k], v) for k, v in other.state_dict().items())
    assert result.resumed_from == 2 and full_result.resumed_from == 0
    assert result.final_loss == pytest.approx(full_result.final_loss, rel=1e-6)
    assert result.mean_loss == pytest.approx(full_result.mean_loss, rel=1e-6)
    assert result.tokens == full_result.tokens == 6 * 8 * 32

    # A finished run's checkpoint answers a repeated call at once, with the same weights.
    again, again_result = _train(shard_dir, config, ckpt=tmp_path / "a", spec=NOISY_SPEC)
    assert again_result.resumed_from == 6
    assert all(torch.equal(expected[k], v) for k, v in again.state_dict().items())
    # Another run (next round, other participant) ignores the checkpoint.
    _, fresh = _train(shard_dir, config, ckpt=tmp_path / "a", run_id="round-2", spec=NOISY_SPEC)
    assert fresh.resumed_from == 0


def test_gradient_accumulation_matches_one_big_batch(shard_dir: Path) -> None:
    config = _config(steps=3)
    big, big_result = _train(shard_dir, config)
    accumulated, result = _train(shard_dir, config, micro=2)
    expected = big.state_dict()
    for name, value in accumulated.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=2e-5, rtol=1e-4)
    assert result.mean_loss == pytest.approx(big_result.mean_loss, rel=1e-5)
    # AdamW hides a constant gradient scale, so compare the gradients themselves.
    one_step = _config(steps=1, grad_clip=0)
    big, _ = _train(shard_dir, one_step)
    accumulated, _ = _train(shard_dir, one_step, micro=2)
    grads = dict(big.named_parameters())
    for name, param in accumulated.named_parameters():
        assert param.grad is not None and grads[name].grad is not None
        torch.testing.assert_close(param.grad, grads[name].grad, atol=1e-6, rtol=1e-4)


def _torchrun(args: list[str], tmp_path: Path) -> dict[str, object]:
    """Two gloo processes on this machine, through torchrun as a pod would run them."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    package_root = str(Path(tapestry_trainer.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    metrics = tmp_path / "metrics.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "tapestry_trainer.train",
            *args,
            "--metrics-out",
            str(metrics),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result: dict[str, object] = json.loads(metrics.read_text())
    return result


@pytest.fixture(scope="module")
def one_process(shard_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one") / "one.safetensors"
    train.main([*CLI_ARGS, "--data", str(shard_dir), "--out", str(out)])
    return out


def _assert_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=5e-5, rtol=1e-4, err_msg=name)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(
    shard_dir: Path, one_process: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ddp.safetensors"
    metrics = _torchrun([*CLI_ARGS, "--data", str(shard_dir), "--out", str(out)], tmp_path)
    assert metrics["steps"] == 4 and metrics["tokens"] == 4 * 8 * 32
    _assert_close(load_arrays(out), load_arrays(one_process))
    # Training really moved the weights, so the comparison above means something.
    start = state_arrays(build_model(SPEC))
    assert np.abs(load_arrays(out)["tok_emb.weight"] - start["tok_emb.weight"]).max() > 1e-3


@pytest.mark.slow
def test_ddp_resumes_a_checkpoint_written_by_another_world_size(
    shard_dir: Path, one_process: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupted):  # one process gets to step 3, checkpointed at 2
        _train(shard_dir, _config(checkpoint_every=2), ckpt=ckpt, on_step=_interrupt_after(3))
    assert (ckpt / CHECKPOINT).is_file()
    out = tmp_path / "resumed.safetensors"
    metrics = _torchrun(
        [
            *CLI_ARGS,
            "--data",
            str(shard_dir),
            "--out",
            str(out),
            "--checkpoint-dir",
            str(ckpt),
            "--checkpoint-every",
            "2",
        ],
        tmp_path,
    )
    assert metrics["resumedFrom"] == 2  # rank 0 read it, rank 1 got it by broadcast
    _assert_close(load_arrays(out), load_arrays(one_process))
