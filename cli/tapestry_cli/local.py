"""`tapestry local run`: a whole federation on this machine, no cluster needed.

The same protocol as in Kubernetes, with the parts as processes: a filesystem store (or
any S3 URL), each participant as a torchrun subprocess on its own data, the aggregator,
live progress, and at the end a table of how the shared model does on every
participant's held-out data next to local-only models trained with the same compute.

Re-running over the same work directory continues where it stopped: every step of the
protocol is write-once and idempotent, so finished rounds are only re-verified.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from tapestry_cli.errors import UsageError

if TYPE_CHECKING:
    from tapestry_protocol.progress import ProgressEvent

console = Console()

DEFAULT_WORKDIR = Path("runs/local")
POLL = timedelta(seconds=1)


def add_parser(sub: Any) -> None:
    from tapestry_aggregator.strategy import OPTIMIZERS, Strategy, add_robust_arguments
    from tapestry_protocol.shards import ENCODINGS
    from tapestry_trainer.specs import add_inner_arguments, add_preset_argument

    local = sub.add_parser("local", help="run a federation on this machine").add_subparsers(
        metavar="ACTION"
    )
    run = local.add_parser(
        "run",
        help="N participants x R rounds with local processes",
        description=__doc__.splitlines()[0],
    )
    run.add_argument("--participants", type=int, default=3, help="how many (demo: 1 language each)")
    run.add_argument("--rounds", type=int, default=4)
    add_preset_argument(run)
    add_inner_arguments(run)  # the standalone trainer's flags, with its defaults
    run.add_argument(
        "--optimizer",
        default=Strategy.optimizer,
        choices=OPTIMIZERS,
        help="outer optimizer (default: %(default)s)",
    )
    run.add_argument("--outer-lr", type=float, default=None, help="default per optimizer")
    add_robust_arguments(run)
    run.add_argument(
        "--encoding",
        default="fp32",
        choices=ENCODINGS,
        help="how updates are stored (default: %(default)s)",
    )
    run.add_argument(
        "--error-feedback",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with bf16, int8 or codebook, each participant keeps what rounding drops of its delta "
        "and sends it next round (default: on)",
    )
    run.add_argument("--nproc-per-participant", type=int, default=1, help="torchrun processes")
    run.add_argument(
        "--data",
        type=Path,
        default=None,
        help="your own data: one sub-folder of .txt files per participant "
        "(default: the multilingual demo corpus)",
    )
    run.add_argument("--store", default=None, help="store URL (default: WORKDIR/store)")
    run.add_argument("--federation", default="local")
    run.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    run.add_argument("--fresh", action="store_true", help="delete WORKDIR first")
    run.add_argument("--no-baseline", action="store_true", help="skip local-only models")
    run.add_argument(
        "--validation-margin",
        type=float,
        default=None,
        metavar="NATS",
        help="the validation floor: refuse an update whose model's loss on the coordinator's "
        "held-out set (every participant's held-out split, pooled) exceeds the base's by more",
    )
    dp = run.add_argument_group(
        "differential privacy",
        "each participant clips its whole delta and adds Gaussian noise before upload "
        "(see docs/privacy.md); off unless both of the first two are given",
    )
    dp.add_argument("--dp-noise-multiplier", type=float, default=None,
                    help="noise std as a multiple of the clip norm")  # fmt: skip
    dp.add_argument("--dp-clip-norm", type=float, default=None,
                    help="L2 bound of each participant's whole delta per round")  # fmt: skip
    dp.add_argument("--dp-delta", type=float, default=None,
                    help="the delta epsilon is reported at (default 1e-5)")  # fmt: skip
    run.set_defaults(run=_run)


@dataclass
class Participant:
    name: str
    text: Path
    data: Path = field(default_factory=Path)
    process: subprocess.Popen[bytes] | None = None
    progress_file: Path = field(default_factory=Path)
    log_file: Path = field(default_factory=Path)
    verdict_file: Path = field(default_factory=Path)
    task: TaskID | None = None
    signer: Any = None
    state: str = ""  # its member state at the last look (telemetry: what changed)


def _participants(args: argparse.Namespace, workdir: Path) -> list[Participant]:
    if args.data is not None:
        if not args.data.is_dir():
            raise FileNotFoundError(f"--data {args.data} is not a directory")
        subfolders = sorted(p for p in args.data.iterdir() if p.is_dir())
        if len(subfolders) < args.participants:
            raise FileNotFoundError(
                f"--data {args.data} has {len(subfolders)} sub-folders; "
                f"{args.participants} participants need one each"
            )
        return [Participant(f.name, f) for f in subfolders[: args.participants]]
    from tapestry_trainer.corpus import PACKAGES, prepare_demo_corpus

    languages = ["de", "es", "it", "en"]  # the largest corpora first
    assert set(languages) == set(PACKAGES)
    if args.participants > len(languages):
        raise FileNotFoundError(
            f"the demo corpus has {len(languages)} languages ({', '.join(languages)}); "
            f"use --participants <= {len(languages)} or --data"
        )
    chosen = languages[: args.participants]
    with console.status("fetching the demo corpus (cached after the first run)"):
        folders = prepare_demo_corpus(workdir / "corpus", chosen)
    return [Participant(lang, folders[lang]) for lang in chosen]


def _run(args: argparse.Namespace) -> int:
    if args.fresh and args.workdir.exists():
        shutil.rmtree(args.workdir)
    workdir = args.workdir.absolute()
    from tapestry_trainer.privacy import PrivacyError, Settings

    try:
        args.privacy = Settings.parse(args.dp_noise_multiplier, args.dp_clip_norm, args.dp_delta)
    except PrivacyError as e:
        raise UsageError(f"--dp-*: {e}") from None
    try:
        people = _participants(args, workdir)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    except RuntimeError as e:  # CorpusUnavailable
        raise UsageError(f"demo corpus unavailable: {e}") from None
    try:
        return Federation(args, workdir, people).run()
    except LocalRunError as e:
        raise UsageError(str(e)) from None


def failure_reason(log: str, limit: int = 600) -> str:
    """The line of a participant's log that says why it failed.

    torchrun closes a failed run with its own summary, so the last lines are rarely
    the cause: prefer the participant's own error line, then the last exception."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("tapestry participant"):
            return line[:limit]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) and " " not in head:
            return line[:limit]
    return " | ".join(lines[-5:])[-limit:]


HELD_OUT = 0.1  # the fraction of each participant's data held out for evaluation


def pooled_held_out(texts: list[Path], out: Path) -> Path:
    """The coordinator's held-out set of a local run: every participant's held-out split,
    pooled. The split hashes file names and block numbers, so the pooled set holds out the
    very blocks each participant holds out, and none of it is anyone's training data."""
    from tapestry_trainer.data import prepare_shards

    return prepare_shards(texts, out, val_fraction=HELD_OUT).parent


class LocalRunError(Exception):
    """The local federation cannot go on; the message says why."""


class Federation:
    """The coordinator's side of a local run: plans, processes, aggregation, report."""

    def __init__(self, args: argparse.Namespace, workdir: Path, people: list[Participant]):
        from tapestry_aggregator.strategy import Strategy, robust_from_args
        from tapestry_protocol.layout import Layout
        from tapestry_trainer.specs import ModelSpec, SpecError, inner_config_from_args

        self.args = args
        self.workdir = workdir
        self.people = people
        self.layout = Layout(args.federation)
        try:
            self.spec = ModelSpec.preset(args.preset, seed=args.seed)
            self.config = inner_config_from_args(args)
        except SpecError as e:
            raise LocalRunError(f"bad training settings: {e}") from None
        try:
            self.strategy = Strategy(
                args.optimizer, learning_rate=args.outer_lr, **robust_from_args(args)
            )
        except ValueError as e:
            raise LocalRunError(f"bad aggregation settings: {e}") from None
        if args.validation_margin is not None:
            try:
                self.strategy = replace(self.strategy, validation_margin=args.validation_margin)
            except ValueError as e:
                raise LocalRunError(f"--validation-margin: {e}") from None
        self.validation = workdir / "validation"  # the coordinator's held-out set
        self.store_url = args.store or str(workdir / "store")
        self.threads = max(1, (os.cpu_count() or 1) // (len(people) * args.nproc_per_participant))

    # -- setup ------------------------------------------------------------------------

    def _key_file(self, name: str, suffix: str = ".key") -> Path:
        return self.workdir / "keys" / f"{name}{suffix}"

    def _keys(self) -> Any:
        """Every party's key pair (made once, reused by re-runs); returns the coordinator's."""
        from tapestry_protocol.exchange import COORDINATOR
        from tapestry_protocol.signing import SigningKey, load_signing_key

        for name in [COORDINATOR, *(p.name for p in self.people)]:
            if not self._key_file(name).exists():
                SigningKey.generate(name).save(self._key_file(name).parent)
        return load_signing_key(COORDINATOR, self._key_file(COORDINATOR))

    def _prepare_data(self) -> None:
        from tapestry_trainer.data import prepare_shards

        with console.status("tokenizing each participant's data"):
            for p in self.people:
                p.data = self.workdir / "data" / p.name
                prepare_shards([p.text], p.data, val_fraction=HELD_OUT)
            if self.strategy.validation_margin is not None:
                pooled_held_out([p.text for p in self.people], self.validation)

    def _open_store(self) -> Any:
        from tapestry_protocol.store import StoreError, open_store

        try:
            store = open_store(self.store_url, create=True)
            store.exists(self.layout.plan(0))  # reach it now, not mid-round
        except (StoreError, ValueError, OSError) as e:
            raise LocalRunError(f"cannot use store {self.store_url!r}: {e}") from None
        return store

    # -- the coordinator's side ---------------------------------------------------------

    def _plan(self, store: Any, coordinator: Any, round_number: int, base: Any) -> None:
        from tapestry_protocol.documents import rfc3339
        from tapestry_protocol.exchange import make_plan, publish_plan
        from tapestry_protocol.store import ObjectExists
        from tapestry_telemetry import rounds, tracing
        from tapestry_telemetry.catalog import SpanName

        keys = {p.name: self._key_file(p.name, ".pub").read_text().strip() for p in self.people}
        traceparent = tracing.new_traceparent()  # the round's trace: its span's ids
        plan = make_plan(
            self.layout,
            round_number,
            base,
            model=self.spec.to_dict(),
            hyperparameters=self.config.to_dict(),
            participants=keys,
            min_participants=max(1, (len(self.people) + 1) // 2),
            deadline=rfc3339(datetime.now(UTC) + timedelta(hours=1)),
            encoding=self.args.encoding,
            traceparent=traceparent,
        )
        started = datetime.now(UTC)
        with contextlib.suppress(ObjectExists):  # a re-run: the round was planned before
            publish_plan(store, self.layout, plan, coordinator)
            attributes = rounds.action_attributes(self.layout.federation, round_number)
            tracing.record(SpanName.ROUND_PUBLISH, traceparent, started, None, attributes)

    def _round(self, store: Any, coordinator: Any, round_number: int) -> Any:
        """Drive one round to its result: the same decisions as the operator's
        (`tapestry_lifecycle`), with subprocesses where the operator has Jobs."""
        from tapestry_aggregator.merge import aggregate_round
        from tapestry_lifecycle import coordinator as lifecycle
        from tapestry_lifecycle.coordinator import Action
        from tapestry_lifecycle.states import MemberState
        from tapestry_protocol.documents import CloseTrigger
        from tapestry_telemetry import rounds

        key = coordinator.public_key_text
        federation = self.layout.federation
        progressed = False  # this run saw the round before its result (a re-run may not)
        with Progress(
            TextColumn("  {task.description:>14}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as bars:
            while True:
                now = datetime.now(UTC)
                view = lifecycle.observe_round(store, self.layout, round_number, key, now)
                step = lifecycle.decide(view, suspended=False, base_ready=True, poll=POLL)
                if view.plan is not None:
                    states = [str(s) for s in lifecycle.member_states(view).values()]
                    rounds.record_members(federation, round_number, states, map(str, MemberState))
                if step.action not in (Action.DONE, Action.STALLED):
                    progressed = True
                if step.action == Action.PUBLISH_PLAN:
                    base = lifecycle.round_base(store, self.layout, round_number, key)
                    if base is None:
                        raise LocalRunError(f"round {round_number} has no base to train from")
                    self._plan(store, coordinator, round_number, base)
                elif step.action == Action.CLOSE and view.plan is not None:
                    assert step.trigger is not None
                    self._close(store, coordinator, view.plan, step.trigger, now)
                elif step.action == Action.AGGREGATE:
                    task = bars.add_task("aggregator", total=None, info="merging")

                    def merged(event: ProgressEvent, task: TaskID = task) -> None:
                        bars.update(task, completed=event.done, total=event.total,
                                    info=f"shard {event.done}/{event.total}")  # fmt: skip

                    aggregate_round(
                        store, self.layout, round_number, coordinator, self.strategy,
                        progress=merged, scorer=self._scorer(view.plan),
                    )  # fmt: skip
                elif step.action in (Action.DONE, Action.STALLED):
                    assert view.result is not None and view.plan is not None
                    if progressed:  # the participants' last look, then the round's end
                        self._last_look(store, round_number, key)
                        result = view.result.document
                        rounds.round_over(federation, view.plan, result, now, step.message)
                    return view.result.document
                elif not self._participants(store, round_number, key, bars) and view.plan:
                    # Every local participant has answered or cannot: nothing more can
                    # arrive, so close now instead of waiting for the plan's deadline.
                    self._close(store, coordinator, view.plan, CloseTrigger.MANUAL, now)

    def _close(self, store: Any, coordinator: Any, plan: Any, trigger: Any, now: Any) -> None:
        from tapestry_protocol.exchange import close_round
        from tapestry_telemetry import catalog, rounds, tracing
        from tapestry_telemetry.catalog import SpanName

        attributes = rounds.action_attributes(
            self.layout.federation, plan.document.round, **{catalog.CLOSE_TRIGGER: str(trigger)}
        )
        with tracing.phase(SpanName.ROUND_CLOSE, rounds.round_context(plan), attributes):
            close_round(store, self.layout, plan, coordinator, trigger, now)

    def _scorer(self, plan: Any) -> Any:
        """The held-out scorer of the round's plan, when the validation floor is on."""
        if self.strategy.validation_margin is None:
            return None
        if plan is None:
            raise LocalRunError("the round to aggregate has no plan to score its updates by")
        from tapestry_trainer.scoring import plan_scorer

        return plan_scorer(plan.document, self.validation)

    # -- the participants' side ---------------------------------------------------------

    def _participants(
        self, store: Any, round_number: int, coordinator_key: str, bars: Progress
    ) -> bool:
        """Each participant's next step, as its own operator would take it, then a short
        wait with the progress bars moving. False once none of them has anything left to
        do (all answered, or unable to)."""
        from tapestry_lifecycle import participant as lifecycle
        from tapestry_lifecycle.participant import Admission, Do
        from tapestry_lifecycle.states import MemberState
        from tapestry_protocol.documents import ReceiptState
        from tapestry_protocol.exchange import publish_receipt
        from tapestry_telemetry import rounds

        now = datetime.now(UTC)
        busy = False
        for p in self.people:
            if p.signer is None:
                continue  # its key is unusable: it cannot sign anything, so it is late
            training, message = self._training_state(p)
            view = lifecycle.observe_plan(
                store, self.layout, round_number, p.name, coordinator_key, now,
                training=training, training_message=message,
            )  # fmt: skip
            step = lifecycle.decide(view, Admission.AUTOMATIC)
            busy |= (
                step.do not in (Do.DONE, Do.IGNORE, Do.WAIT) or step.state == MemberState.TRAINING
            )
            if view.plan is not None:
                self._observe_member(store, p, view.plan, str(step.state), now)
            if step.do == Do.ACCEPT and view.plan is not None:
                with self._receipt_span(p, view.plan, ReceiptState.ACCEPTED):
                    publish_receipt(store, self.layout, view.plan, p.signer,
                                    ReceiptState.ACCEPTED, str(step.reason),
                                    "training started")  # fmt: skip
            elif step.do == Do.TRAIN and view.plan is not None:
                self._launch(p, round_number, coordinator_key,
                             rounds.training_traceparent(view.plan, p.name))  # fmt: skip
                if p.task is None:
                    p.task = bars.add_task(p.name, total=self.config.steps, info="starting")
            elif step.do == Do.REPORT_FAILED and view.plan is not None:
                with self._receipt_span(p, view.plan, ReceiptState.FAILED):
                    publish_receipt(store, self.layout, view.plan, p.signer, ReceiptState.FAILED,
                                    str(step.reason), step.message)  # fmt: skip
                console.print(
                    f"  [red]{p.name} failed[/]: {step.message}\n  full log: {p.log_file}",
                    highlight=False,
                )
            elif step.do == Do.DECLINE and view.plan is not None:
                with self._receipt_span(p, view.plan, ReceiptState.DECLINED):
                    publish_receipt(store, self.layout, view.plan, p.signer,
                                    ReceiptState.DECLINED, str(step.reason),
                                    step.message)  # fmt: skip
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            for p in self.people:
                last = self._last_progress(p) if p.task is not None else None
                if last is not None and p.task is not None:
                    bars.update(p.task, completed=last.done, info=self._progress_info(last))
            if any(p.process is not None and p.process.poll() is not None for p in self.people):
                break
            time.sleep(0.3)
        return busy

    def _last_look(self, store: Any, round_number: int, coordinator_key: str) -> None:
        """Each participant's view of the finished round, as its operator's next visit
        would take it (its span and verdict, if not recorded yet)."""
        from tapestry_lifecycle import participant as lifecycle
        from tapestry_lifecycle.participant import Admission

        now = datetime.now(UTC)
        for p in self.people:
            if p.signer is None:
                continue
            training, message = self._training_state(p)
            view = lifecycle.observe_plan(
                store, self.layout, round_number, p.name, coordinator_key, now,
                training=training, training_message=message,
            )  # fmt: skip
            if view.plan is not None:
                step = lifecycle.decide(view, Admission.AUTOMATIC)
                self._observe_member(store, p, view.plan, str(step.state), now)

    def _receipt_span(self, p: Participant, plan: Any, state: Any) -> Any:
        """The span around one of `p`'s signed receipts, as its operator records it."""
        from tapestry_telemetry import catalog, rounds, tracing
        from tapestry_telemetry.catalog import SpanName

        attributes = rounds.action_attributes(
            self.layout.federation, plan.document.round, p.name,
            **{catalog.RECEIPT_STATE: str(state)},
        )  # fmt: skip
        return tracing.phase(
            SpanName.PARTICIPANT_RECEIPT, rounds.participant_context(plan, p.name), attributes
        )

    def _observe_member(
        self, store: Any, p: Participant, plan: Any, state: str, now: datetime
    ) -> None:
        """`p`'s span once its training is over, and its verdict once it is final: the
        same rules as its operator's, with the state of the last look kept in memory."""
        from tapestry_protocol.exchange import read_receipts
        from tapestry_telemetry import rounds, tracing_enabled

        was, p.state = p.state, state
        federation = self.layout.federation
        if state in rounds.FINAL and was not in rounds.FINAL:
            rounds.participant_verdict(federation, p.name, state)
        if state in rounds.TRAINING_OVER and was not in rounds.TRAINING_OVER and tracing_enabled():
            receipts = read_receipts(store, self.layout, plan, p.name).values()
            rounds.participant_over(
                federation, p.name, plan, state, receipts, now,
                failed=state in rounds.UNSUCCESSFUL,
            )  # fmt: skip

    def _training_state(self, p: Participant) -> tuple[Any, str]:
        """The participant's training process as the lifecycle sees a Job."""
        from tapestry_lifecycle.states import JobState
        from tapestry_trainer.launch import read_verdict

        if p.process is None:
            return JobState.ABSENT, ""
        code = p.process.poll()
        if code is None:
            return JobState.RUNNING, ""
        if code == 0:
            return JobState.SUCCEEDED, ""
        _, message = read_verdict(p.verdict_file, code)
        if message.startswith("training exited"):  # no verdict: the log says why
            message = failure_reason(p.log_file.read_text(errors="replace"))
        return JobState.FAILED, f"exit code {code}: {message}"

    def _launch(
        self, p: Participant, round_number: int, coordinator_key: str, traceparent: str | None
    ) -> None:
        """The training process, started as a pod starts it (`tapestry_trainer.launch`),
        with this process's OTEL_* settings and `traceparent` to continue."""
        from tapestry_protocol import pod
        from tapestry_telemetry import rounds, tracing
        from tapestry_telemetry.catalog import SpanName

        logs = self.workdir / "logs" / f"round-{round_number:03d}"
        logs.mkdir(parents=True, exist_ok=True)
        p.log_file = logs / f"{p.name}.log"
        p.progress_file = logs / f"{p.name}.progress"
        p.verdict_file = logs / f"{p.name}.verdict.json"
        p.progress_file.unlink(missing_ok=True)
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(self.threads),
            "PYTHONUNBUFFERED": "1",
            "PET_NNODES": "1",
            "PET_NPROC_PER_NODE": str(self.args.nproc_per_participant),
            pod.STORE: self.store_url,
            pod.FEDERATION: self.layout.federation,
            pod.ROUND: str(round_number),
            pod.PARTICIPANT: p.name,
            pod.KEY: str(self._key_file(p.name)),
            pod.COORDINATOR_KEY: coordinator_key,
            pod.DATA: str(p.data),
            pod.WORKDIR: str(self.workdir),
            pod.PROGRESS: str(p.progress_file),
            pod.VERDICT: str(p.verdict_file),
            pod.ERROR_FEEDBACK: "true" if self.args.error_feedback else "false",
        }
        if traceparent:
            env[pod.TRACEPARENT] = traceparent
        if self.args.privacy is not None:
            env[pod.DP_NOISE_MULTIPLIER] = repr(self.args.privacy.noise_multiplier)
            env[pod.DP_CLIP_NORM] = repr(self.args.privacy.clip_norm)
            env[pod.DP_DELTA] = repr(self.args.privacy.delta)
        command = [sys.executable, "-m", "tapestry_trainer.launch"]
        started = datetime.now(UTC)
        with p.log_file.open("wb") as log:
            p.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        parent = tracing.parse_traceparent(traceparent)
        attributes = rounds.action_attributes(self.layout.federation, round_number, p.name)
        tracing.record(SpanName.PARTICIPANT_JOB, parent, started, None, attributes)

    @staticmethod
    def _last_progress(p: Participant) -> ProgressEvent | None:
        """The newest complete event; only the file's tail is read, however long the run."""
        from tapestry_protocol.progress import last_event

        return last_event(p.progress_file)

    @staticmethod
    def _progress_info(event: ProgressEvent) -> str:
        """The text beside a participant's bar: the step's loss in training, else the phase."""
        from tapestry_protocol.progress import Phase

        if event.phase is Phase.TRAIN and event.loss is not None:
            return f"loss {event.loss:.3f}"
        return event.message or event.phase.value

    def _signers(self) -> None:
        """Each participant's signing key, as its operator holds it; one that cannot be
        loaded leaves that participant unable to answer (it will be late)."""
        from tapestry_protocol.signing import load_signing_key

        for p in self.people:
            try:
                p.signer = load_signing_key(p.name, self._key_file(p.name))
            except ValueError as e:
                p.signer = None
                console.print(f"  [red]{p.name} cannot take part[/]: {e}", highlight=False)

    def run(self) -> int:
        """The whole local federation; its spans and metrics go to the OTEL_*
        environment's collector (if any) and are flushed before it returns."""
        import tapestry_telemetry as telemetry

        with telemetry.process(telemetry.Service.LOCAL, federation=self.layout.federation):
            return self._run()

    def _run(self) -> int:
        from tapestry_aggregator.memory import keep_freed_memory
        from tapestry_protocol.documents import Outcome
        from tapestry_protocol.exchange import read_model
        from tapestry_trainer.bootstrap import publish_initial_base

        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        coordinator = self._keys()
        self._prepare_data()
        from tapestry_telemetry.store import metered

        store = metered(self._open_store(), self.layout.federation)
        keep_freed_memory()
        base = publish_initial_base(store, self.layout, self.spec, coordinator)
        self._signers()
        console.print(
            f"[bold]federation[/] {self.layout.federation}: {len(self.people)} participants "
            f"({', '.join(p.name for p in self.people)}), {self.args.rounds} rounds x "
            f"{self.config.steps} inner steps, model {self.args.preset} "
            f"({self.spec.param_count() or 0:,} parameters), outer {self.strategy.optimizer}, "
            f"store {store.url}"
        )
        key = coordinator.public_key_text
        for r in range(self.args.rounds):
            round_started = time.monotonic()
            for p in self.people:
                p.process, p.task, p.state = None, None, ""
            result = self._round(store, coordinator, r)
            loss = result.metrics.get("trainLoss")
            rejected = ", ".join(f"{x.participant} ({x.reason})" for x in result.rejected)
            succeeded = result.outcome == Outcome.SUCCEEDED
            console.print(
                f"round {r}: [{'green' if succeeded else 'red'}]{result.outcome}[/] — "
                f"{result.message}"
                + (f", train loss {loss:.3f}" if isinstance(loss, float) else "")
                + (f", rejected: {rejected}" if rejected else "")
                + f" [{time.monotonic() - round_started:.0f}s]"
            )
            if result.next_base is not None:
                base = read_model(store, self.layout, result.next_base.manifest, key)
        report = self._report(store, base)
        if self.args.privacy is not None:
            report["privacy"] = self._privacy(store)
        report["seconds"] = round(time.monotonic() - started, 1)
        from tapestry_protocol.files import atomic_write_text

        atomic_write_text(self.workdir / "summary.json", json.dumps(report, indent=2) + "\n")
        console.print(
            f"done in {report['seconds']:.0f}s; summary in {self.workdir / 'summary.json'}"
        )
        return 0

    # -- evaluation -------------------------------------------------------------------

    def _privacy(self, store: Any) -> dict[str, Any]:
        """Each participant's cumulative guarantee, from its newest signed manifest with
        privacy (the figure its operator would put in its status), as a table."""
        from tapestry_protocol.documents import UpdateManifest
        from tapestry_protocol.exchange import read_document
        from tapestry_protocol.signing import verify

        out: dict[str, Any] = {}
        for p in self.people:
            for r in reversed(range(self.args.rounds)):
                key = self.layout.update_manifest(r, p.name)
                if p.signer is None or not store.exists(key):
                    continue
                document, raw, _ = read_document(store, key, UpdateManifest)
                verify(raw, p.name, p.signer.public_key)
                if document.privacy is not None:
                    out[p.name] = {"round": r, **document.privacy.to_json()}
                    break
        table = Table(title="differential privacy: each participant's guarantee so far")
        for column in ("participant", "noise multiplier", "clip norm", "noised rounds", "ε", "δ"):
            table.add_column(column, justify="left" if column == "participant" else "right")
        for name, row in out.items():
            table.add_row(
                name, f"{row['noiseMultiplier']:g}", f"{row['clipNorm']:g}", str(row["rounds"]),
                f"{row['epsilon']:.3g}", f"{row['delta']:g}",
            )  # fmt: skip
        console.print(table)
        return out

    def _baselines(self) -> dict[str, Path]:
        """Train every local-only model in parallel processes (same compute as a member)."""
        out = {
            p.name: self.workdir / "local-only" / p.name / "model.safetensors" for p in self.people
        }
        todo = [p for p in self.people if not out[p.name].exists()]
        threads = max(1, (os.cpu_count() or 1) // max(1, len(todo)))
        procs = []
        with console.status(f"training {len(todo)} local-only baselines with the same compute"):
            for p in todo:
                out[p.name].parent.mkdir(parents=True, exist_ok=True)
                log = (out[p.name].parent / "train.log").open("wb")
                procs.append(
                    (
                        p,
                        log,
                        subprocess.Popen(
                            [
                                sys.executable,
                                "-m",
                                "tapestry_trainer.baseline",
                                "--model",
                                json.dumps(self.spec.to_dict()),
                                "--hyperparameters",
                                json.dumps(self.config.to_dict()),
                                "--rounds",
                                str(self.args.rounds),
                                "--data",
                                str(p.data),
                                "--out",
                                str(out[p.name]),
                                "--threads",
                                str(threads),
                            ],
                            stdout=log,
                            stderr=subprocess.STDOUT,
                        ),
                    )
                )
            for p, log, proc in procs:
                proc.wait()
                log.close()
                if proc.returncode != 0:
                    raise LocalRunError(f"local-only training of {p.name} failed; see {log.name}")
        return out

    def _report(self, store: Any, base: Any) -> dict[str, Any]:
        from tapestry_protocol.exchange import load_tensors
        from tapestry_trainer.baseline import evaluate_arrays
        from tapestry_trainer.inner import load_arrays

        models: dict[str, Any] = {"shared (federated)": load_tensors(store, base)}
        if not self.args.no_baseline:
            for name, path in self._baselines().items():
                models[f"local-only {name}"] = load_arrays(path)
        losses: dict[str, dict[str, float]] = {}
        with console.status("evaluating every model on every participant's held-out data"):
            data = [str(p.data) for p in self.people]
            for label, arrays in models.items():
                values = evaluate_arrays(self.spec, arrays, data, self.config)
                losses[label] = {p.name: v for p, v in zip(self.people, values, strict=True)}
        averages = {label: sum(v.values()) / len(v) for label, v in losses.items()}
        table = Table(title="validation loss (nats/byte) on each participant's held-out data")
        table.add_column("model")
        for p in self.people:
            table.add_column(p.name, justify="right")
        table.add_column("average", justify="right")
        best = min(averages.values())
        for label, row in losses.items():
            average = f"{averages[label]:.3f}"
            table.add_row(
                label,
                *(f"{row[p.name]:.3f}" for p in self.people),
                f"[bold green]{average}[/]" if averages[label] == best else average,
            )
        console.print(table)
        shared = averages["shared (federated)"]
        others = {k: v for k, v in averages.items() if k != "shared (federated)"}
        wins = all(shared < v for v in others.values())
        if others:
            console.print(
                "the shared model "
                + ("[bold green]beats[/]" if wins else "[bold red]does not beat[/]")
                + " every local-only model on the average over all participants' data"
            )
        return {"losses": losses, "averages": averages, "sharedBeatsLocalOnly": wins}
