"""One participant's share of a round: the torchrun entry point of the training pod.

    torchrun --nnodes N --nproc-per-node G -m tapestry_trainer.participant \\
        --store s3://bucket?endpoint=... --federation F --round R --name NAME \\
        --key /var/run/tapestry/key --coordinator-key ed25519:... --data /data

Rank 0 reads and verifies the signed plan and the base (signature, hash, every shard),
every rank builds the model the plan names, rank 0's base weights reach the others
through DDP, all ranks train H inner steps on this participant's data, and rank 0
computes `delta = base - local`, uploads the shards, then the signed manifest.
Every option also reads from a `TAPESTRY_*` environment variable, which is how the
operator configures the pod.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch.distributed as dist

import tapestry_telemetry as telemetry
from tapestry_protocol import pod
from tapestry_protocol.documents import ModelManifest, Privacy, RoundPlan, UpdateManifest
from tapestry_protocol.exchange import (
    Verified,
    load_tensors,
    publish_update,
    read_document,
    read_plan,
    read_plan_base,
)
from tapestry_protocol.files import atomic_write_text
from tapestry_protocol.layout import Layout
from tapestry_protocol.pod import ExitCode
from tapestry_protocol.progress import Phase, ProgressEvent, append
from tapestry_protocol.rejections import Rejected
from tapestry_protocol.shards import FloatArray
from tapestry_protocol.signing import SigningKey, load_signing_key
from tapestry_protocol.store import ObjectStore, StoreError, open_store
from tapestry_telemetry import Service, catalog, tracing
from tapestry_telemetry.catalog import SpanName
from tapestry_telemetry.store import metered
from tapestry_trainer import feedback, plugins, privacy
from tapestry_trainer.inner import (
    DistContext,
    InnerResult,
    StepInfo,
    init_distributed,
    load_state_arrays,
    shutdown_distributed,
    state_arrays,
    train_inner,
)
from tapestry_trainer.specs import InnerConfig, ModelSpec, SpecError


class ParticipantError(Exception):
    """Why this participant cannot take part in the round, in words for the log, and
    whether retrying could help (the pod contract's exit codes)."""

    def __init__(self, message: str, code: ExitCode = ExitCode.REFUSED) -> None:
        super().__init__(message)
        self.code = code


def compute_delta(
    base: dict[str, FloatArray], local: dict[str, FloatArray]
) -> dict[str, FloatArray]:
    """The pseudo-gradient `base - local`: it points uphill, like a gradient, so the
    outer optimizer *subtracts* it (new = base - lr * delta)."""
    if base.keys() != local.keys():
        missing = sorted(base.keys() ^ local.keys())[:3]
        raise ParticipantError(f"the model's tensors differ from the base's: {missing}")
    return {name: (base[name] - local[name]).astype(np.float32) for name in base}


def _env(name: str, default: str | None = None) -> str | None:
    """A `TAPESTRY_*` variable of the pod contract (`tapestry_protocol.pod`)."""
    return os.environ.get(name, default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tapestry_trainer.participant", description=__doc__.splitlines()[0]
    )
    p.add_argument("--store", default=_env(pod.STORE), help="object store URL")
    p.add_argument("--federation", default=_env(pod.FEDERATION))
    p.add_argument("--round", type=int, default=_env(pod.ROUND))
    p.add_argument("--name", default=_env(pod.PARTICIPANT), help="this participant's name")
    p.add_argument("--key", type=Path, default=_env(pod.KEY), help="signing key file or Secret dir")
    p.add_argument(
        "--coordinator-key",
        default=_env(pod.COORDINATOR_KEY),
        help="coordinator public key, ed25519:...",
    )
    p.add_argument("--data", default=_env(pod.DATA), help="token shard directory")
    p.add_argument("--loader", default=_env(pod.LOADER), help="plug-in loader module:function")
    p.add_argument("--loader-options", default=_env(pod.LOADER_OPTIONS),
                   help="JSON object handed to the plug-in loader as ctx.options")  # fmt: skip
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path(_env(pod.WORKDIR, "/tmp/tapestry") or "."),
        help="local checkpoints (an emptyDir or PVC in a pod)",
    )
    p.add_argument(
        "--progress",
        type=Path,
        default=_env(pod.PROGRESS),
        help="append progress events here, one JSON line each (tapestry_protocol.progress)",
    )
    p.add_argument(
        "--verdict",
        type=Path,
        default=_env(pod.VERDICT),
        help="on failure, rank 0 writes {exitCode, message} here (for tapestry_trainer.launch)",
    )
    dp = p.add_argument_group(
        "differential privacy", "clip the whole delta and add Gaussian noise before upload"
    )
    dp.add_argument("--dp-noise-multiplier", type=float, default=_env(pod.DP_NOISE_MULTIPLIER),
                    help="noise std / clip norm; with --dp-clip-norm turns privacy on")  # fmt: skip
    dp.add_argument("--dp-clip-norm", type=float, default=_env(pod.DP_CLIP_NORM),
                    help="L2 bound of the round's whole delta")  # fmt: skip
    dp.add_argument(
        "--dp-delta",
        type=float,
        default=_env(pod.DP_DELTA),
        help=f"epsilon is reported at this delta (default {privacy.DEFAULT_DELTA})",
    )
    p.add_argument(
        "--error-feedback",
        action=argparse.BooleanOptionalAction,
        default=_env(pod.ERROR_FEEDBACK),
        help="with a lossy plan (bf16, int8, codebook), keep what rounding drops in --workdir "
        "and send it "
        "next round (default: on)",
    )
    return p


def _switch(value: bool | str | None, name: str) -> bool:
    """A flag's value, or its true/false `TAPESTRY_*` variable (unset: on)."""
    if isinstance(value, bool):
        return value
    if value in (None, "") or value.lower() in ("true", "1", "yes", "on"):
        return True
    if value.lower() in ("false", "0", "no", "off"):
        return False
    raise ParticipantError(f"{name} must be true or false, not {value!r}", ExitCode.USAGE)


def _require(args: argparse.Namespace) -> None:
    missing = [
        f"--{name.replace('_', '-')}"
        for name in ("store", "federation", "round", "name", "key", "coordinator_key", "data")
        if getattr(args, name) in (None, "")
    ]
    if missing:
        raise ParticipantError(
            f"missing {', '.join(missing)} (or their TAPESTRY_* variables)", ExitCode.USAGE
        )
    _privacy_settings(args)
    args.error_feedback = _switch(args.error_feedback, pod.ERROR_FEEDBACK)


def _privacy_settings(args: argparse.Namespace) -> privacy.Settings | None:
    """The differential-privacy settings, or None when they are off."""
    try:
        return privacy.Settings.parse(args.dp_noise_multiplier, args.dp_clip_norm, args.dp_delta)
    except privacy.PrivacyError as e:
        raise ParticipantError(str(e), ExitCode.USAGE) from None


class Fetched(NamedTuple):
    """What rank 0 verified before training."""

    store: ObjectStore
    layout: Layout
    plan: Verified[RoundPlan]
    base: Verified[ModelManifest]
    base_arrays: dict[str, FloatArray]
    signer: SigningKey


def _fetch(args: argparse.Namespace) -> Fetched:
    """Rank 0: load the signing key, open the store, verify plan and base, load the base.

    Everything that can be checked before training is, so a bad key or a forged plan
    costs seconds, not a training run."""
    try:
        signer = load_signing_key(args.name, args.key)
    except ValueError as e:
        raise ParticipantError(str(e), ExitCode.USAGE) from None
    try:
        store = metered(open_store(args.store), args.federation)
        layout = Layout(args.federation)
        plan = read_plan(store, layout, args.round, args.coordinator_key)
        names = set(plan.document.names)
        if args.name not in names:
            raise ParticipantError(
                f"{args.name!r} is not a participant of round {args.round} ({sorted(names)})"
            )
        base = read_plan_base(store, layout, plan, args.coordinator_key)
        arrays = load_tensors(store, base)
    except Rejected as e:
        raise ParticipantError(f"refusing round {args.round}: {e}") from None
    except (StoreError, ValueError) as e:
        raise ParticipantError(
            f"cannot read round {args.round} from {args.store}: {e}", ExitCode.CRASH
        ) from None
    return Fetched(store, layout, plan, base, arrays, signer)


def run(args: argparse.Namespace, ctx: DistContext) -> dict[str, Any] | None:
    """The whole share of the round; returns the upload summary on rank 0.

    Rank 0's spans continue the context the pod was given (`TRACEPARENT`: its
    operator's span for this participant): one for the share, with the fetch, the inner
    training and the upload inside; the update manifest records the share's span, which
    the aggregator's span links to."""
    attributes: dict[str, str | int] = {
        catalog.FEDERATION: args.federation,
        catalog.ROUND: args.round,
        catalog.PARTICIPANT: args.name,
    }
    started = time.perf_counter()
    with tracing.phase(SpanName.TRAINING, os.environ.get(pod.TRACEPARENT), attributes):
        summary = _run(args, ctx)
    if summary is not None:
        labels = {catalog.FEDERATION: args.federation, catalog.PARTICIPANT: args.name}
        telemetry.metrics().training_duration.record(time.perf_counter() - started, labels)
    return summary


def _run(args: argparse.Namespace, ctx: DistContext) -> dict[str, Any] | None:
    fetched, failure = None, None
    if ctx.is_main:
        try:
            with tracing.phase(SpanName.TRAINING_FETCH):
                fetched = _fetch(args)
        except ParticipantError as e:
            if not ctx.distributed:
                raise
            failure = e
    # Rank 0 tells the others the plan, or that there is none, so nobody waits forever.
    shared: list[Any] = [fetched.plan.document if fetched else str(failure)]
    if ctx.distributed:
        dist.broadcast_object_list(shared, src=0)
    if failure is not None:
        raise failure
    plan: RoundPlan | str | None = shared[0]
    if not isinstance(plan, RoundPlan):
        raise ParticipantError(plan or "rank 0 could not read the round")
    try:
        spec = ModelSpec.from_dict(plan.model)
        config = InnerConfig.from_dict(plan.hyperparameters)
    except (SpecError, KeyError, TypeError) as e:
        raise ParticipantError(f"the plan's model or hyperparameters are unusable: {e}") from None
    model = plugins.build_model(spec)
    if fetched is not None:
        load_state_arrays(model, fetched.base_arrays)
    try:
        options = json.loads(args.loader_options) if args.loader_options else {}
    except json.JSONDecodeError as e:
        raise ParticipantError(f"--loader-options is not JSON: {e}", ExitCode.USAGE) from None
    if not isinstance(options, dict):
        raise ParticipantError("--loader-options must be a JSON object", ExitCode.USAGE)
    try:
        loader = plugins.loader_for(
            args.data, config, ctx, factory=args.loader, options=options, round_number=args.round
        )
    except (OSError, ValueError, plugins.PluginError) as e:
        # Missing or unreadable data, or a broken plug-in: retrying the pod cannot help.
        raise ParticipantError(f"cannot load data {args.data}: {e}", ExitCode.USAGE) from None
    progress = args.progress if ctx.is_main else None

    def on_step(info: StepInfo) -> None:
        _report(progress, ProgressEvent(Phase.TRAIN, info.step, config.steps, loss=info.loss))

    run_id = f"{args.federation}/{args.round}/{args.name}"
    checkpoints = args.workdir / "checkpoints" / args.federation / str(args.round) / args.name
    inner = tracing.phase(SpanName.TRAINING_INNER) if ctx.is_main else contextlib.nullcontext()
    with inner:
        result = train_inner(
            model, loader, config, ctx, checkpoint_dir=checkpoints, run_id=run_id,
            on_step=on_step if progress is not None else None,  # no per-step loss sync else
        )  # fmt: skip
    if fetched is None:
        return None
    _record_training(args, config, result)
    traceparent = tracing.current_traceparent()  # the share's span, for the manifest
    delta = compute_delta(fetched.base_arrays, state_arrays(model))
    metrics: dict[str, float | str | None] = {**result.to_dict(), "worldSize": ctx.world_size}
    metrics["trainLoss"] = metrics.pop("meanLoss")  # the protocol's name for it
    workspace = _feedback_workspace(args, fetched)
    if workspace is not None:
        carried = workspace.carried(args.round, delta)
        _say_if_lost(args, fetched, carried)
        if carried is not None:
            delta = feedback.add(delta, carried.residual)
        metrics["carriedResidualNorm"] = privacy.l2_norm(carried.residual) if carried else 0.0
    delta, noised = _privatize(args, fetched, checkpoints, delta)
    if workspace is not None:
        made_for = f"{fetched.plan.sha256}/{fetched.base.sha256}"
        delta = workspace.release(args.round, made_for, delta, fetched.plan.document.encoding)
        residual = feedback.quantisation_residual(delta, fetched.plan.document.encoding)
        metrics["residualNorm"] = privacy.l2_norm(residual)
    metrics["errorFeedback"] = "on" if workspace is not None else "off"
    _report(progress, ProgressEvent(Phase.UPLOAD, config.steps, config.steps, message="uploading"))
    started = time.perf_counter()
    with tracing.phase(SpanName.TRAINING_UPLOAD):
        update = publish_update(
            fetched.store, fetched.layout, fetched.plan, fetched.base, delta, fetched.signer,
            tokens=result.tokens, metrics=metrics, traceparent=traceparent, privacy=noised,
        )  # fmt: skip
    summary = {
        "manifest": update.key,
        "tokens": result.tokens,
        "trainLoss": result.mean_loss,
        "tokensPerSecond": result.tokens_per_s,
        "bytesUploaded": update.document.metrics["bytesUploaded"],
        "uploadSeconds": round(time.perf_counter() - started, 3),
    }
    committed = update.document.privacy  # a retried round reports what was committed
    if committed is not None:
        summary |= {"epsilon": committed.epsilon, "dpDelta": committed.delta,
                    "dpRounds": committed.rounds}  # fmt: skip
    done = ProgressEvent(
        Phase.DONE, config.steps, config.steps, loss=result.mean_loss, message="uploaded",
        extra=summary,
    )  # fmt: skip
    _report(progress, done)
    return summary


def _privatize(
    args: argparse.Namespace, fetched: Fetched, workdir: Path, delta: dict[str, FloatArray]
) -> tuple[dict[str, FloatArray], Privacy | None]:
    """With differential privacy on: the clipped, noised delta and its signed record
    (epsilon over this participant's noised rounds so far); else the delta as it is.

    The noised delta is kept beside the round's checkpoints, so a retried upload sends
    the same one (`privacy.release`)."""
    settings = _privacy_settings(args)
    if settings is None:
        return delta, None
    try:
        earlier = privacy.earlier_noise(
            fetched.store, fetched.layout, fetched.signer, fetched.plan.document.round
        )
        record = privacy.account(settings, earlier)
    except privacy.PrivacyError as e:
        raise ParticipantError(str(e)) from None
    except StoreError as e:
        raise ParticipantError(f"cannot count earlier noised rounds: {e}", ExitCode.CRASH) from None
    made_for = f"{fetched.plan.sha256}/{fetched.base.sha256}"
    return privacy.release(workdir, made_for, delta, settings, record)


def _feedback_workspace(args: argparse.Namespace, fetched: Fetched) -> feedback.Workspace | None:
    """Where this participant keeps its error feedback, or None when there is none to
    keep (a lossless plan, or `--no-error-feedback`)."""
    if not args.error_feedback or fetched.plan.document.encoding == feedback.LOSSLESS:
        return None
    return feedback.Workspace.at(args.workdir, args.federation, args.name)


def _say_if_lost(
    args: argparse.Namespace, fetched: Fetched, carried: feedback.Carried | None
) -> None:
    """Warn when this participant's previous update fed a residual forward that its work
    directory no longer has: the work directory did not persist (an emptyDir, not a
    workspace volume), so that rounding error is lost for good."""
    for earlier in range(args.round - 1, -1, -1):
        key = fetched.layout.update_manifest(earlier, fetched.signer.key_id)
        try:
            if not fetched.store.exists(key):
                continue
            document, _, _ = read_document(fetched.store, key, UpdateManifest)
        except (StoreError, Rejected):
            return  # only a warning: never fail the round over it
        fed_forward = document.metrics.get("errorFeedback") == "on"
        if fed_forward and (carried is None or carried.round != earlier):
            print(
                f"tapestry participant {args.name}: the error-feedback residual of round "
                f"{earlier} is not in {args.workdir}; starting from zero (keep the work "
                "directory between rounds: a Participant's spec.workspace)",
                file=sys.stderr, flush=True,
            )  # fmt: skip
        return


def _record_training(args: argparse.Namespace, config: InnerConfig, result: InnerResult) -> None:
    """The inner run's loss, throughput, step time and tokens (rank 0: all ranks'
    figures are already reduced)."""
    instruments = telemetry.metrics()
    labels = {catalog.FEDERATION: args.federation, catalog.PARTICIPANT: args.name}
    if math.isfinite(result.mean_loss):
        instruments.training_loss.set(result.mean_loss, labels)
    instruments.training_throughput.set(result.tokens_per_s, labels)
    if result.tokens_per_s > 0:  # the loop's time per step, from its token rate
        instruments.training_step_duration.record(
            config.tokens_per_step / result.tokens_per_s, labels
        )
    trained = (result.steps - result.resumed_from) * config.tokens_per_step
    if trained > 0:
        instruments.training_tokens.add(trained, labels)


def _report(progress: Path | None, event: ProgressEvent) -> None:
    """One event for whoever watches this run (the local runner tails the file)."""
    if progress is not None:
        append(progress, event)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _require(args)
        ctx = init_distributed()
    except ParticipantError as e:
        print(f"tapestry participant: {e}", file=sys.stderr)
        _verdict(args.verdict, e.code, str(e))
        return int(e.code)
    # Rank 0 exports (OTEL_* environment) and flushes before it exits, even on failure.
    exporting = (
        telemetry.process(Service.TRAINER, federation=args.federation, participant=args.name)
        if ctx.is_main
        else contextlib.nullcontext()
    )
    with exporting:
        return _main(args, ctx)


def _main(args: argparse.Namespace, ctx: DistContext) -> int:
    try:
        summary = run(args, ctx)
        if summary is not None:
            print(json.dumps(summary), flush=True)
        return 0
    except ParticipantError as e:
        print(f"tapestry participant {args.name}: {e}", file=sys.stderr, flush=True)
        if ctx.is_main:
            _verdict(args.verdict, e.code, str(e))
        return int(e.code)
    finally:
        shutdown_distributed()


def _verdict(path: Path | None, code: ExitCode, message: str) -> None:
    """Why this run stopped, for the launcher that maps it to the pod's exit code."""
    if path is not None:
        atomic_write_text(path, json.dumps({"exitCode": int(code), "message": message[:4000]}))


if __name__ == "__main__":
    sys.exit(main())
