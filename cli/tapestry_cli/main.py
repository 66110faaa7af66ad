"""`tapestry`: run a federation locally, aggregate a round, inspect a store, make keys.

Subcommands import what they need lazily, so `tapestry keys` and `tapestry rounds` work
in the operator image, which has no torch.

A mistake in what was typed, a store that cannot be used, or a document in the store
that is refused ends with one line `error: ...` and exit status 2; a traceback would
only hide the sentence that says what to fix. Anything else escaping a command is a
bug: one line says so and where its traceback went (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from rich.console import Console
from rich.text import Text

from tapestry_cli.errors import RefusedInput, UsageError

if TYPE_CHECKING:
    from tapestry_aggregator.strategy import Strategy
    from tapestry_aggregator.validation import Scorer
    from tapestry_protocol.layout import Layout
    from tapestry_protocol.store import ObjectStore

console = Console(stderr=True)
STORE_HELP = "object store: a directory, file:///path, or s3://bucket/prefix?endpoint=URL"

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEBUG_ENV = "TAPESTRY_DEBUG"
COORDINATOR_KEY_ENV = "TAPESTRY_COORDINATOR_KEY"

EPILOG = f"""\
exit status:
  0    done
  1    internal error, a bug in tapestry: one line says where the traceback was
       written ({DEBUG_ENV}=1 prints it instead)
  2    a usage mistake, a store that cannot be used, or a document in the store that
       is refused (such as a signature that does not verify): one line "error: ..."
       says what to fix
  130  interrupted

docs/cli.md has examples of each.
"""


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not hasattr(args, "run"):
            parser.print_help()
            return EXIT_USAGE
        status: int = args.run(args)
        return status
    except KeyboardInterrupt:
        console.print(Text("interrupted", style="yellow"), soft_wrap=True)
        return EXIT_INTERRUPTED
    except (UsageError, RefusedInput) as e:
        _error_line(str(e))
        return EXIT_USAGE
    except Exception as e:
        refused = _store_error(e)
        if refused is not None:
            _error_line(refused)
            return EXIT_USAGE
        return _internal_error(e)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _error_line(message: str) -> None:
    """`error: <message>` on stderr as one line: never wrapped, never read as markup."""
    console.print(Text.assemble(("error:", "bold red"), " ", _one_line(message)), soft_wrap=True)


def _store_error(error: Exception) -> str | None:
    """The message of a failure of the store or a refusal of its contents, else None.

    Imported here rather than at the top, so that `tapestry --help` stays quick."""
    try:
        from tapestry_protocol.rejections import Rejected
        from tapestry_protocol.store import StoreError
    except ImportError:
        return None
    if isinstance(error, Rejected):
        return f"refused: {error}"
    if isinstance(error, StoreError):
        return f"store: {error}"
    return None


def _internal_error(error: Exception) -> int:
    """A bug: one line, with the traceback in a file (or on stderr with TAPESTRY_DEBUG=1)."""
    what = _one_line(f"{type(error).__name__}: {error}")
    trace = traceback.format_exc()
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        sys.stderr.write(trace)
        console.print(f"internal error (a bug in tapestry): {what}", markup=False, soft_wrap=True)
        return EXIT_INTERNAL
    written = _write_traceback(trace)
    where = f"traceback in {written}" if written else "the traceback could not be saved"
    console.print(
        f"internal error (a bug in tapestry): {what}; {where}; "
        f"re-run with {DEBUG_ENV}=1 to print it",
        markup=False,
        soft_wrap=True,
    )
    return EXIT_INTERNAL


def _write_traceback(trace: str) -> Path | None:
    try:
        fd, name = tempfile.mkstemp(prefix="tapestry-traceback-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(f"tapestry {' '.join(sys.argv[1:])}\n\n{trace}")
    except OSError:
        return None
    return Path(name)


class _Parser(argparse.ArgumentParser):
    """Argument mistakes become UsageErrors, so they read like every other mistake."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def round_number(text: str) -> int:
    """argparse type: rounds are whole numbers from 0 (keys are zero-padded numbers)."""
    from tapestry_protocol.layout import round_dir

    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"round must be a whole number >= 0, got {text}")
    try:
        round_dir(int(text))  # the layout's own bounds
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return int(text)


def federation_name(text: str) -> str:
    """argparse type: a federation name is a DNS label, checked before any store access."""
    return _name("federation", text)


def participant_name(text: str) -> str:
    """argparse type: participant names are DNS labels, like the plans that list them."""
    return _name("participant", text)


def _name(kind: str, text: str) -> str:
    from tapestry_protocol.layout import validate_name

    try:
        return validate_name(kind, text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def coordinator_key_arg(text: str) -> str | None:
    """argparse type for --coordinator-key: the key text, checked before any store access."""
    try:
        return coordinator_public_key(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def coordinator_public_key(value: str | None) -> str | None:
    """The key text from `ed25519:...` or from a file that holds it; None for no key.

    Anything else is a ValueError saying what is wrong: a path that does not exist is
    never taken for key text, nor a file for a key."""
    from tapestry_protocol.signing import PUBLIC_KEY_PREFIX, public_key_from_text

    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.startswith(PUBLIC_KEY_PREFIX):
        try:
            public_key_from_text(text)
        except ValueError as e:
            raise ValueError(f"coordinator key {text!r} is not a valid key: {e}") from None
        return text
    path = Path(value)
    if not path.exists():
        raise ValueError(
            f"coordinator key file {path} does not exist "
            f"(give a .pub file or the key text {PUBLIC_KEY_PREFIX}...)"
        )
    try:
        content = path.read_text().strip()
    except OSError as e:
        raise ValueError(f"cannot read coordinator key file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        content = ""
    if "PRIVATE KEY" in content:
        raise ValueError(
            f"coordinator key file {path} holds a private key; give the public one (.pub)"
        )
    try:
        public_key_from_text(content)
    except ValueError as e:
        raise ValueError(f"coordinator key file {path} does not hold a public key: {e}") from None
    return content


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tapestry",
        description="Sovereign federated training: one shared model, data stays home.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(metavar="COMMAND")

    from tapestry_cli import local

    local.add_parser(sub)

    from tapestry_cli import identities

    store = sub.add_parser("store", help="the object store: its parties' identities")
    identities.add_parser(store.add_subparsers(metavar="TOPIC", required=True))

    keys = sub.add_parser("keys", help="signing keys").add_subparsers(
        metavar="ACTION", required=True
    )
    create = keys.add_parser("create", help="create an Ed25519 key pair for a participant")
    create.add_argument("name", type=participant_name, help="participant name, or 'coordinator'")
    create.add_argument("--out", type=Path, default=Path("."), help="directory for the files")
    create.set_defaults(run=_keys_create)

    base = sub.add_parser("base", help="the shared model's round-0 base").add_subparsers(
        metavar="ACTION", required=True
    )
    publish = base.add_parser(
        "publish",
        help="publish your own weights as round 0's base, instead of a preset's initialisation",
    )
    publish.add_argument(
        "weights", type=Path, help=".safetensors of float32 tensors, named as the model's state"
    )
    publish.add_argument("--store", required=True, help=STORE_HELP)
    publish.add_argument("--federation", required=True, type=federation_name)
    publish.add_argument(
        "--key", type=Path, required=True, help="coordinator signing key file or dir"
    )
    publish.add_argument(
        "--model-spec",
        required=True,
        help="what the trainer builds (ModelSpec JSON text or file), e.g. "
        '\'{"kind": "gpt", "gpt": {...}, "seed": 0}\'',
    )
    publish.add_argument("--shard-mib", type=int, default=64, help="shard size (default: 64)")
    publish.set_defaults(run=_base_publish)

    rounds = sub.add_parser("rounds", help="inspect rounds in a store").add_subparsers(
        metavar="ACTION", required=True
    )
    for name, helptext, run in (
        ("list", "one line per round", _rounds_list),
        ("show", "participants, verdicts and metrics of one round", _rounds_show),
    ):
        p = rounds.add_parser(
            name,
            help=helptext,
            description=f"{helptext}. With a coordinator key, exit status 2 if a signature "
            "does not verify; without one, nothing is verified and every verdict says so.",
        )
        p.add_argument("--store", required=True, help=STORE_HELP)
        p.add_argument("--federation", required=True, type=federation_name)
        p.add_argument(
            "--coordinator-key",
            type=coordinator_key_arg,
            default=None,
            help="coordinator public key (ed25519:...) or .pub file, to verify signatures "
            f"(default: ${COORDINATOR_KEY_ENV})",
        )
        if name == "show":
            p.add_argument("round", type=round_number)
        p.set_defaults(run=run)

    from tapestry_cli import verify

    verify.add_parser(sub)

    agg = sub.add_parser("aggregate", help="merge a round's updates and publish its result")
    agg.add_argument("--store", required=True, help=STORE_HELP)
    agg.add_argument("--federation", required=True, type=federation_name)
    agg.add_argument("--round", type=round_number, required=True)
    agg.add_argument("--key", type=Path, required=True, help="coordinator signing key file or dir")
    from tapestry_aggregator.strategy import (
        OPTIMIZERS,
        WEIGHTINGS,
        Strategy,
        add_robust_arguments,
    )

    agg.add_argument(
        "--optimizer",
        default=Strategy.optimizer,
        choices=OPTIMIZERS,
        help="outer optimizer (default: %(default)s)",
    )
    agg.add_argument("--learning-rate", type=float, default=None)
    agg.add_argument(
        "--weighting",
        default=Strategy.weighting,
        choices=WEIGHTINGS,
        help="how updates are weighted (default: %(default)s)",
    )
    agg.add_argument("--max-share", type=float, default=None)
    add_robust_arguments(agg)
    agg.add_argument(
        "--strategy",
        default=None,
        metavar="JSON",
        help="the whole strategy as JSON (as a result records it); replaces the flags above",
    )
    agg.add_argument(
        "--close",
        action="store_true",
        help="close the round first if it is not closed: the updates committed so far are in",
    )
    _add_validation_arguments(agg)
    _add_parts_arguments(agg)
    agg.set_defaults(run=_aggregate)
    return parser


def _base_publish(args: argparse.Namespace) -> int:
    """Round 0's base from the user's weights; prints what spec.model.initialBase names."""
    from tapestry_protocol.exchange import COORDINATOR, publish_model
    from tapestry_protocol.layout import Layout
    from tapestry_protocol.shards import ShardFormatError, decode_safetensors, plan_shards
    from tapestry_protocol.signing import load_signing_key
    from tapestry_trainer.specs import model_spec_arg

    try:
        signer = load_signing_key(COORDINATOR, args.key)
        spec = model_spec_arg(args.model_spec)
        tensors, _ = decode_safetensors(args.weights.read_bytes())
    except OSError as e:
        raise UsageError(f"cannot read {args.weights}: {e.strerror}") from None
    except (ValueError, argparse.ArgumentTypeError, ShardFormatError) as e:
        raise UsageError(str(e)) from None
    if args.shard_mib < 1:
        raise UsageError(f"--shard-mib must be at least 1, got {args.shard_mib}")
    wrong = sorted(name for name, t in tensors.items() if t.dtype != "F32")
    if wrong:
        raise UsageError(f"{args.weights}: tensors must be float32 (F32); not {wrong[:3]}")
    arrays = {name: t.array for name, t in tensors.items()}
    groups = plan_shards([(n, a.nbytes) for n, a in arrays.items()], args.shard_mib << 20)
    layout = Layout(args.federation)
    base = publish_model(_open(args), layout, 0, arrays, groups, signer, model=spec.to_dict())
    console.print(f"round 0 base published: {base.key}")
    print(f"initialBase: {{manifest: {base.key}, sha256: {base.sha256}}}")
    return EXIT_OK


def _keys_create(args: argparse.Namespace) -> int:
    from tapestry_protocol.signing import SigningKey

    out: Path = args.out
    _check_out(out)
    where = out.absolute() if str(out) == "." else out
    for suffix in (".key", ".pub"):
        if (out / f"{args.name}{suffix}").exists():
            raise UsageError(_exists(f"{args.name}{suffix}", where))
    try:
        private, public = SigningKey.generate(args.name).save(out)
    except FileExistsError:  # created since the check above
        raise UsageError(_exists(f"{args.name}.key", where)) from None
    except OSError as e:
        raise UsageError(f"cannot write keys into --out {out}: {e.strerror}") from None
    console.print(f"private key: {private} (keep it secret; mount it as a Secret)")
    console.print(f"public key:  {public}")
    print(public.read_text().strip())
    return EXIT_OK


def _exists(name: str, where: Path) -> str:
    return f"{name} already exists in {where}; choose another --out or remove it first"


def _check_out(out: Path) -> None:
    """--out must be a writable directory, or creatable as one; name what is in the way."""
    for path in (out, *out.parents):
        try:
            is_dir = path.is_dir()
            exists = is_dir or os.path.lexists(path)
        except OSError as e:
            raise UsageError(f"--out {out}: cannot look at {path}: {e.strerror}") from None
        if not exists:
            continue
        if not is_dir:
            if path == out:
                raise UsageError(f"--out {out} is a file, not a directory")
            raise UsageError(f"--out {out} is under {path}, which is a file, not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            if path == out:
                raise UsageError(f"--out {out} is not writable")
            raise UsageError(f"--out {out} cannot be created: {path} is not writable")
        return


def _coordinator_key(args: argparse.Namespace) -> str | None:
    """--coordinator-key, else $TAPESTRY_COORDINATOR_KEY, checked the same way."""
    if args.coordinator_key is not None:
        key: str = args.coordinator_key
        return key
    try:
        return coordinator_public_key(os.environ.get(COORDINATOR_KEY_ENV))
    except ValueError as e:
        raise UsageError(f"${COORDINATOR_KEY_ENV}: {e}") from None


def _open(args: argparse.Namespace) -> ObjectStore:
    from tapestry_protocol.store import StoreError, open_store

    try:
        return open_store(args.store)
    except (StoreError, ValueError) as e:
        raise UsageError(f"cannot open store {args.store!r}: {e}") from None


def _rounds_list(args: argparse.Namespace) -> int:
    from tapestry_cli.inspect import list_rounds

    key = _coordinator_key(args)
    failures = list_rounds(_open(args), args.federation, key)
    if failures:
        raise RefusedInput(f"federation {args.federation}: {'; '.join(failures)}")
    return EXIT_OK


def _rounds_show(args: argparse.Namespace) -> int:
    from tapestry_cli.inspect import show_round

    key = _coordinator_key(args)
    failures = show_round(_open(args), args.federation, args.round, key)
    if failures:
        where = f"round {args.round} of federation {args.federation}"
        raise RefusedInput(f"{where}: {'; '.join(failures)}")
    return EXIT_OK


def _aggregate(args: argparse.Namespace) -> int:
    import tapestry_telemetry as telemetry
    from tapestry_aggregator.memory import keep_freed_memory
    from tapestry_aggregator.merge import aggregate_round
    from tapestry_aggregator.parts import PartError, PartsMissing, aggregate_part, commit_parts
    from tapestry_aggregator.strategy import Strategy, robust_from_args
    from tapestry_aggregator.validation import ValidationError
    from tapestry_protocol import pod, rejections
    from tapestry_protocol.documents import CloseTrigger, Outcome, RoundResult
    from tapestry_protocol.exchange import COORDINATOR, Verified, close_round, read_plan
    from tapestry_protocol.layout import Layout
    from tapestry_protocol.rejections import Rejected
    from tapestry_protocol.signing import load_signing_key
    from tapestry_telemetry import Service

    try:
        signer = load_signing_key(COORDINATOR, args.key)
        if args.strategy is not None:
            strategy = Strategy.from_json(json.loads(args.strategy))
        else:
            strategy = Strategy(
                optimizer=args.optimizer,
                learning_rate=args.learning_rate,
                weighting=args.weighting,
                max_share=args.max_share,
                **robust_from_args(args),
            )
        strategy = _with_validation_margin(args, strategy)
        layout = Layout(args.federation)
        part = _part(args, strategy)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    store = _open(args)
    keep_freed_memory()
    # Spans and metrics go to the OTEL_* environment's collector, flushed before exit;
    # the span continues TRACEPARENT (the round's context the operator gives the Job).
    exporting = telemetry.process(Service.AGGREGATOR, federation=args.federation)
    try:
        with exporting:
            if args.close:
                plan = read_plan(store, layout, args.round, signer.public_key_text)
                close_round(store, layout, plan, signer, CloseTrigger.MANUAL, datetime.now(UTC))
            scorer = _validation_scorer(args, strategy, store, layout, signer.public_key_text)
            wait = {} if args.wait is None else {"wait": args.wait}
            part_result: Verified[RoundResult] | None
            if args.commit:
                part_result = commit_parts(
                    store, layout, args.round, signer, strategy, args.parts, **wait
                )
            elif args.parts > 1:
                part_result = aggregate_part(
                    store, layout, args.round, signer, strategy, part, args.parts,
                    traceparent=os.environ.get(pod.TRACEPARENT), **wait,
                )  # fmt: skip
            else:
                part_result = aggregate_round(
                    store, layout, args.round, signer, strategy,
                    traceparent=os.environ.get(pod.TRACEPARENT), scorer=scorer,
                )  # fmt: skip
    except PartsMissing as e:
        _error_line(str(e))
        return int(pod.ExitCode.CRASH)  # not permanent: the Job re-runs this index
    except PartError as e:
        raise UsageError(f"round {args.round} cannot be aggregated in parts: {e}") from None
    except Rejected as e:
        hint = ""
        if e.reason == rejections.NOT_CLOSED:
            hint = " (--close closes it now, with the updates committed so far)"
        raise UsageError(f"round {args.round} cannot be aggregated: {e}{hint}") from None
    except ValidationError as e:
        raise UsageError(f"round {args.round} cannot be validated: {e}") from None
    if part_result is None:
        console.print(f"round {args.round}: part {part} of {args.parts} is stored; part 0 commits")
        return EXIT_OK
    doc = part_result.document
    console.print(
        {
            "round": doc.round,
            "outcome": str(doc.outcome),
            "message": doc.message,
            "accepted": {a.participant: a.weight for a in doc.accepted},
            "rejected": {r.participant: f"{r.reason}: {r.message}" for r in doc.rejected},
            "metrics": doc.metrics,
        }
    )
    if doc.outcome != Outcome.SUCCEEDED:
        where = f"round {args.round} of federation {args.federation}"
        raise RefusedInput(f"{where} {doc.outcome}: {doc.message}")
    return EXIT_OK


def _add_parts_arguments(agg: argparse.ArgumentParser) -> None:
    """Scale-out: this process merges one part of the shards; part 0 commits."""
    from tapestry_protocol import pod

    def count(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
        return int(text)

    agg.add_argument(
        "--parts",
        type=count,
        default=1,
        metavar="K",
        help="merge in K parts, each a process of its own on a disjoint set of shards; "
        "part 0 commits the result once every part is stored (default: %(default)s)",
    )
    agg.add_argument(
        "--part",
        type=int,
        default=None,
        metavar="I",
        help=f"this process's part, 0 to K-1 (default: ${pod.JOB_COMPLETION_INDEX}, "
        "which an Indexed Job sets, else 0)",
    )
    agg.add_argument(
        "--commit",
        action="store_true",
        help="with --parts: only commit, once every part is stored (instead of --part)",
    )
    agg.add_argument(
        "--wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long a part waits for the others (default: 3600)",
    )


def _add_validation_arguments(agg: argparse.ArgumentParser) -> None:
    """The validation floor's flags: the coordinator's held-out set scores each update."""
    agg.add_argument(
        "--validation-margin",
        type=float,
        default=None,
        metavar="NATS",
        help="refuse an update whose model's held-out loss exceeds the base's by more than "
        "this (needs --validation-data; overrides the --strategy JSON's validation_margin)",
    )
    agg.add_argument(
        "--validation-data",
        type=Path,
        default=None,
        metavar="DIR",
        help="the coordinator's held-out set: a shard set (its validation split is scored), "
        "or the data of --validation-loader; needs torch (the trainer image)",
    )
    agg.add_argument(
        "--validation-loader",
        default=None,
        metavar="MODULE:FUNCTION",
        help="a plug-in loader factory for --validation-data (default: the shard set loader)",
    )
    agg.add_argument(
        "--validation-loader-options",
        default=None,
        metavar="JSON",
        help="options handed to --validation-loader as ctx.options",
    )


def _part(args: argparse.Namespace, strategy: Strategy) -> int:
    """This process's part index, checked against --parts (ValueError: a usage error)."""
    from tapestry_aggregator.parts import check_parallel
    from tapestry_protocol import pod
    from tapestry_protocol.layout import check_part

    if args.part is not None:
        part = int(args.part)
    else:
        index = os.environ.get(pod.JOB_COMPLETION_INDEX, "0")
        if not index.isdigit():
            raise ValueError(f"${pod.JOB_COMPLETION_INDEX} is {index!r}, not a part index")
        part = int(index)
    check_part(part, args.parts)
    check_parallel(strategy, args.parts)
    if args.parts > 1 and args.close:
        raise ValueError(
            "--close closes the round in one process only: close it first "
            "(tapestry aggregate --close, or the coordinator), then run the parts"
        )
    if args.commit and args.parts == 1:
        raise ValueError("--commit commits a round merged in parts: give --parts K (K > 1)")
    return part


def _with_validation_margin(args: argparse.Namespace, strategy: Strategy) -> Strategy:
    """The strategy with --validation-margin, if given (the Strategy checks the value)."""
    import dataclasses

    if args.validation_margin is None:
        return strategy
    return dataclasses.replace(strategy, validation_margin=args.validation_margin)


def _validation_scorer(
    args: argparse.Namespace, strategy: Strategy, store: ObjectStore, layout: Layout, key: str
) -> Scorer | None:
    """The round's held-out scorer when the strategy sets a margin (else None), built from
    the plan's model spec; torch is imported only here, so the command without a margin
    runs in the operator image."""
    from tapestry_protocol.exchange import read_plan

    if strategy.validation_margin is None:
        if args.validation_data is not None:
            raise UsageError(
                "--validation-data is used only with a validation margin "
                "(--validation-margin, or validation_margin in --strategy)"
            )
        return None
    if args.validation_data is None:
        raise UsageError(
            "a validation margin needs the coordinator's held-out set: give --validation-data DIR"
        )
    try:
        options = json.loads(args.validation_loader_options or "{}")
    except ValueError as e:
        raise UsageError(f"--validation-loader-options is not JSON: {e}") from None
    if not isinstance(options, dict):
        raise UsageError("--validation-loader-options must be a JSON object")
    try:
        from tapestry_trainer.scoring import ScoringError, plan_scorer
    except ImportError as e:
        raise UsageError(
            f"--validation-data needs the trainer's torch ({e}); run the aggregator in the "
            "trainer image, or install tapestry[trainer]"
        ) from None
    plan = read_plan(store, layout, args.round, key).document
    try:
        return plan_scorer(
            plan, args.validation_data, loader=args.validation_loader, loader_options=options
        )
    except ScoringError as e:
        raise UsageError(str(e)) from None


if __name__ == "__main__":
    sys.exit(main())
