"""Inner training: H AdamW steps from the shared base, on one process or many (DDP).

The torchrun entry point (``tapestry_trainer.participant``) calls, in this order::

    ctx = init_distributed()                          # reads torchrun's RANK/WORLD_SIZE/...
    model = plugins.build_model(spec)                 # same init on every rank
    if ctx.is_main:
        load_state_arrays(model, base_arrays)         # base fetched and verified on rank 0
    loader = plugins.loader_for(data, config, ctx)    # this rank's slice of each batch
    result = train_inner(model, loader, config, ctx, checkpoint_dir=..., run_id=...)
    if ctx.is_main:
        local = state_arrays(model)                   # delta = base - local, upload
    shutdown_distributed()

Rank 0's weights reach the other ranks when the model is wrapped in DDP, so only rank 0
needs the base. Without ``WORLD_SIZE`` (or with 1) no process group is created at all.
On GPU the backend is NCCL and forward passes run under bf16 autocast with fp32 master
weights; on CPU it is gloo in fp32.

Resumption: with a ``checkpoint_dir`` and ``config.checkpoint_every > 0``, rank 0 writes
``inner.pt`` (model, optimizer, step, loader position, loss sums) atomically every N steps
and at the end. A restarted run with the same config fingerprint and ``run_id`` continues
from it; rank 0 reads it and broadcasts model and optimizer state, so only node 0 needs the
file. The learning rate is a pure function of the step and the RNG is reseeded from
(seed, rank, step) before every step, so a resumed run reproduces the uninterrupted one
exactly (bitwise on CPU) without saving RNG states. A finished run's checkpoint makes a
repeated call return at once; delete it after the delta is uploaded.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from tapestry_protocol import shards
from tapestry_protocol.files import atomic_file, atomic_write
from tapestry_trainer.data import BatchLoader
from tapestry_trainer.specs import InnerConfig

log = logging.getLogger(__name__)

CHECKPOINT = "inner.pt"
_CHECKPOINT_VERSION = 1
ADAM_BETAS = (0.9, 0.95)

FloatArray = npt.NDArray[np.float32]


# --------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its rank among ``world_size`` and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(*, device: str | None = None, timeout_s: float = 1800.0) -> DistContext:
    """Join the process group described by torchrun's environment, if there is one.

    torchrun (single- or multi-node: ``--nnodes``/``--node-rank`` or the ``PET_*`` variables
    that Kubernetes launchers set) exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT. The device defaults to ``cuda:LOCAL_RANK`` when CUDA is present, else CPU;
    ``device`` (e.g. ``"cpu"``) overrides it.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None:
        dev = torch.device(device)
    else:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if dev.type == "cuda" else "gloo",
            timeout=timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed(*, device: str | None = None) -> Iterator[DistContext]:
    """``init_distributed`` ... ``shutdown_distributed`` as a ``with`` block."""
    ctx = init_distributed(device=device)
    try:
        yield ctx
    finally:
        shutdown_distributed()


def micro_batch_size(config: InnerConfig, ctx: DistContext, requested: int | None = None) -> int:
    """Sequences per forward on each rank; the global batch must split evenly.

    Default: the whole per-rank share in one forward (no accumulation). Pass ``requested``
    to trade memory for gradient-accumulation steps.
    """
    per_rank, rest = divmod(config.batch_size, ctx.world_size)
    if rest or per_rank == 0:
        raise ValueError(
            f"global batch {config.batch_size} does not split over {ctx.world_size} ranks"
        )
    m = requested or per_rank
    if per_rank % m:
        raise ValueError(f"micro batch {m} does not divide the per-rank batch {per_rank}")
    return m


# --------------------------------------------------------------------------- weights


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
            continue
        compiled = getattr(model, "_orig_mod", None)
        if not isinstance(compiled, nn.Module):
            return model
        model = compiled


def _exchanged(model: nn.Module) -> dict[str, Tensor]:
    """The floating-point state entries that travel, each shared tensor once (tied weights
    keep their first name). Integer buffers (counters) stay local."""
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for name, tensor in unwrap(model).state_dict(keep_vars=True).items():
        if tensor.is_floating_point() and id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tensor
    return out


def state_arrays(model: nn.Module) -> dict[str, FloatArray]:
    """The model's exchanged weights as fresh float32 numpy arrays, keyed by stable names."""
    return {
        name: t.detach().to(device="cpu", dtype=torch.float32, copy=True).numpy()
        for name, t in _exchanged(model).items()
    }


def save_arrays(arrays: Mapping[str, FloatArray], path: Path) -> None:
    """Write exchanged weights as a safetensors file, atomically (the wire format too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(
        path, shards.encode_safetensors({n: shards.Tensor.of(a) for n, a in arrays.items()})
    )


def load_arrays(path: Path) -> dict[str, FloatArray]:
    tensors, _ = shards.decode_safetensors(path.read_bytes())
    return {n: t.array for n, t in tensors.items()}


@torch.no_grad()
def load_state_arrays(model: nn.Module, arrays: Mapping[str, npt.NDArray[Any]]) -> None:
    """Copy ``arrays`` (e.g. a verified base) into the model; names and shapes must match
    exactly, so a base for another architecture fails loudly instead of half-loading."""
    targets = _exchanged(model)
    missing, unexpected = (
        sorted(targets.keys() - arrays.keys()),
        sorted(arrays.keys() - targets.keys()),
    )
    if missing or unexpected:
        raise KeyError(
            f"weights do not fit the model: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in targets.items():
        array = arrays[name]
        if tuple(array.shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: shape {tuple(array.shape)} != model {tuple(tensor.shape)}")
        tensor.copy_(torch.tensor(array))


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class StepInfo:
    """Handed to ``on_step`` after every optimizer step (on every rank)."""

    step: int  # completed steps, 1-based
    loss: float  # this rank's loss of that step
    lr: float


@dataclass(frozen=True)
class InnerResult:
    """Metrics of one inner run; ``tokens`` counts all H steps, also those before a resume."""

    steps: int
    resumed_from: int
    final_loss: float
    mean_loss: float
    tokens: int
    tokens_per_s: float
    wall_time_s: float

    def to_dict(self) -> dict[str, float | int]:
        """camelCase metrics for the update manifest."""
        return {
            "steps": self.steps,
            "resumedFrom": self.resumed_from,
            "finalLoss": self.final_loss,
            "meanLoss": self.mean_loss,
            "tokens": self.tokens,
            "tokensPerSecond": self.tokens_per_s,
            "wallTimeSeconds": self.wall_time_s,
        }


class _TensorMeta(NamedTuple):
    shape: tuple[int, ...]
    dtype: str
    on_param_device: bool


def _step_seed(seed: int, rank: int, step: int) -> int:
    digest = hashlib.sha256(f"{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def _make_optimizer(
    model: nn.Module, config: InnerConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norm gains, biases) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=ADAM_BETAS, eps=1e-8, fused=device.type == "cuda"
    )


def _all_mean(values: list[float], ctx: DistContext) -> list[float]:
    if not ctx.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)  # SUM: gloo has no AVG
    return [v / ctx.world_size for v in t.tolist()]


def _broadcast_tensor(t: Tensor, ctx: DistContext) -> None:
    if ctx.device.type == "cuda" and t.device.type == "cpu":  # NCCL moves GPU memory only
        staged = t.to(ctx.device)
        dist.broadcast(staged, src=0)
        t.copy_(staged.cpu())
    else:
        dist.broadcast(t, src=0)


def _broadcast_optimizer_state(opt: torch.optim.Optimizer, ctx: DistContext) -> None:
    """Give every rank rank 0's optimizer state (read from a checkpoint only node 0 has)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    layout: list[dict[str, Any]] = []
    if ctx.is_main:
        for p in params:
            layout.append(
                {
                    k: _TensorMeta(
                        tuple(v.shape), str(v.dtype).removeprefix("torch."), v.device == p.device
                    )
                    if isinstance(v, Tensor)
                    else v
                    for k, v in opt.state[p].items()
                }
            )
    box: list[Any] = [layout]
    dist.broadcast_object_list(box, src=0)
    for p, entry in zip(params, box[0], strict=True):
        state = opt.state[p]
        for key, value in entry.items():
            if isinstance(value, _TensorMeta):
                if not ctx.is_main:
                    state[key] = torch.empty(
                        value.shape,
                        dtype=getattr(torch, value.dtype),
                        device=p.device if value.on_param_device else "cpu",
                    )
                _broadcast_tensor(state[key], ctx)
            else:
                state[key] = value


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    with atomic_file(path) as f:
        torch.save(obj, f)


def _read_checkpoint(path: Path, config: InnerConfig, run_id: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    ckpt: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if (
        ckpt.get("version") != _CHECKPOINT_VERSION
        or ckpt.get("run_id") != run_id
        or ckpt.get("fingerprint") != config.fingerprint()
    ):
        log.warning("ignoring checkpoint %s: it belongs to another run or config", path)
        return None
    return ckpt


def train_inner(
    model: nn.Module,
    loader: BatchLoader,
    config: InnerConfig,
    ctx: DistContext | None = None,
    *,
    micro_batch: int | None = None,
    checkpoint_dir: Path | str | None = None,
    run_id: str = "",
    on_step: Callable[[StepInfo], None] | None = None,
    log_every: int = 10,
) -> InnerResult:
    """Train ``model`` in place for ``config.steps`` optimizer steps; see the module doc.

    ``log_every`` steps between log lines; 0 logs none.

    ``loader`` must yield this rank's micro batches of ``micro_batch`` sequences (default:
    :func:`micro_batch_size`); gradients are accumulated until the global batch
    ``config.batch_size`` is complete, then averaged across ranks by DDP. ``run_id`` ties
    checkpoints to one round and participant (e.g. ``"fed/round-3/alice"``): a checkpoint
    of another run is ignored. The model is moved to ``ctx.device``.
    """
    ctx = ctx or DistContext()
    started = time.perf_counter()
    m = micro_batch_size(config, ctx, micro_batch)
    accum = config.batch_size // (ctx.world_size * m)
    raw = unwrap(model).to(ctx.device)
    raw.train()

    ckpt_path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    saving = ckpt_path is not None and config.checkpoint_every > 0
    ckpt = _read_checkpoint(ckpt_path, config, run_id) if ckpt_path and ctx.is_main else None
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
    meta: dict[str, Any] | None = (
        None if ckpt is None else {k: ckpt[k] for k in ("step", "loader", "loss_sum", "last_loss")}
    )
    if ctx.distributed:
        box: list[Any] = [meta]
        dist.broadcast_object_list(box, src=0)
        meta = box[0]

    net: nn.Module = raw
    if ctx.distributed:  # wrapping broadcasts rank 0's weights (base or checkpoint)
        net = DistributedDataParallel(
            raw,
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )
    opt = _make_optimizer(raw, config, ctx.device)

    start_step, prev_loss_sum, last_loss = 0, 0.0, math.nan
    if meta is not None:
        if ckpt is not None:
            opt.load_state_dict(ckpt["optimizer"])
        if ctx.distributed:
            _broadcast_optimizer_state(opt, ctx)
        loader.load_state_dict(meta["loader"])
        start_step, prev_loss_sum, last_loss = meta["step"], meta["loss_sum"], meta["last_loss"]
        if ctx.is_main:
            log.info("resuming inner training at step %d/%d", start_step, config.steps)
    del ckpt

    def checkpoint(done: int) -> None:
        sums = _all_mean([float(run_loss_sum), float(step_loss)], ctx)
        if ctx.is_main and ckpt_path is not None:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            _save_atomic(
                {
                    "version": _CHECKPOINT_VERSION,
                    "run_id": run_id,
                    "fingerprint": config.fingerprint(),
                    "step": done,
                    "model": raw.state_dict(),
                    "optimizer": opt.state_dict(),
                    "loader": loader.state_dict(),
                    "loss_sum": prev_loss_sum + sums[0],
                    "last_loss": sums[1],
                },
                ckpt_path,
            )

    autocast = torch.autocast(
        ctx.device.type, dtype=torch.bfloat16, enabled=ctx.device.type == "cuda"
    )
    run_loss_sum = torch.zeros((), device=ctx.device)
    step_loss = torch.zeros((), device=ctx.device)
    loop_started = time.perf_counter()
    for step in range(start_step, config.steps):
        lr = config.lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        torch.manual_seed(_step_seed(config.seed, ctx.rank, step))
        opt.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=ctx.device)
        for k in range(accum):
            x, y = loader.next_batch()
            if x.shape[0] != m:  # the global-mean gradient relies on equal micro batches
                raise ValueError(f"loader gave {x.shape[0]} sequences, expected {m}")
            # Gradients are all-reduced once per step, on the last micro batch.
            sync: AbstractContextManager[Any] = nullcontext()
            if k < accum - 1 and isinstance(net, DistributedDataParallel):
                sync = net.no_sync()
            with sync:
                with autocast:
                    loss = net(
                        x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
                    )
                (loss / accum).backward()
            step_loss += loss.detach() / accum
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), config.grad_clip)
        opt.step()
        run_loss_sum += step_loss
        done = step + 1
        if saving and (done % config.checkpoint_every == 0 or done == config.steps):
            checkpoint(done)
        logging_now = ctx.is_main and log_every > 0 and done % log_every == 0
        if on_step is not None or logging_now:
            info = StepInfo(step=done, loss=float(step_loss), lr=lr)
            if logging_now:
                log.info("step %d/%d loss %.4f lr %.2e", done, config.steps, info.loss, lr)
            if on_step is not None:
                on_step(info)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)  # kernels still queued belong to the loop's time
    loop_time = time.perf_counter() - loop_started

    steps_run = config.steps - start_step
    if steps_run:
        run_mean, last_loss = _all_mean([float(run_loss_sum), float(step_loss)], ctx)
        prev_loss_sum += run_mean
    return InnerResult(
        steps=config.steps,
        resumed_from=start_step,
        final_loss=last_loss,
        mean_loss=prev_loss_sum / config.steps,
        tokens=config.steps * config.tokens_per_step,
        tokens_per_s=steps_run * config.tokens_per_step / loop_time if loop_time > 0 else 0.0,
        wall_time_s=time.perf_counter() - started,
    )
