"""`tapestry`: run a federation locally, aggregate a round, inspect a store, make keys.

Subcommands import what they need lazily, so `tapestry keys` and `tapestry rounds` work
in the operator image, which has no torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from tapestry_cli.errors import UsageError

if TYPE_CHECKING:
    from tapestry_protocol.store import ObjectStore

console = Console(stderr=True)
STORE_HELP = "object store: a directory, file:///path, or s3://bucket/prefix?endpoint=URL"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        result: int = args.run(args)
        return result
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130
    except UsageError as e:
        console.print(f"[red]error:[/] {e}")
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tapestry",
        description="Sovereign federated training: one shared model, data stays home.",
    )
    sub = parser.add_subparsers(metavar="COMMAND")

    from tapestry_cli import local

    local.add_parser(sub)

    keys = sub.add_parser("keys", help="signing keys").add_subparsers(metavar="ACTION")
    create = keys.add_parser("create", help="create an Ed25519 key pair for a participant")
    create.add_argument("name", help="participant name, or 'coordinator'")
    create.add_argument("--out", type=Path, default=Path("."), help="directory for the files")
    create.set_defaults(run=_keys_create)

    rounds = sub.add_parser("rounds", help="inspect rounds in a store").add_subparsers(
        metavar="ACTION"
    )
    for name, helptext, run in (
        ("list", "one line per round", _rounds_list),
        ("show", "participants, verdicts and metrics of one round", _rounds_show),
    ):
        p = rounds.add_parser(name, help=helptext)
        p.add_argument("--store", required=True, help=STORE_HELP)
        p.add_argument("--federation", required=True)
        p.add_argument(
            "--coordinator-key",
            default=os.environ.get("TAPESTRY_COORDINATOR_KEY"),
            help="coordinator public key (ed25519:...) or .pub file, to verify signatures",
        )
        if name == "show":
            p.add_argument("round", type=int)
        p.set_defaults(run=run)

    agg = sub.add_parser("aggregate", help="merge a round's updates and publish its result")
    agg.add_argument("--store", required=True, help=STORE_HELP)
    agg.add_argument("--federation", required=True)
    agg.add_argument("--round", type=int, required=True)
    agg.add_argument("--key", type=Path, required=True, help="coordinator signing key file or dir")
    from tapestry_aggregator.strategy import OPTIMIZERS, WEIGHTINGS, Strategy

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
    agg.set_defaults(run=_aggregate)
    return parser


def _keys_create(args: argparse.Namespace) -> int:
    from tapestry_protocol.layout import validate_name
    from tapestry_protocol.signing import SigningKey

    try:
        validate_name("participant", args.name)
        private, public = SigningKey.generate(args.name).save(args.out)
    except (ValueError, FileExistsError) as e:
        raise UsageError(str(e)) from None
    console.print(f"private key: {private} (keep it secret; mount it as a Secret)")
    console.print(f"public key:  {public}")
    print(public.read_text().strip())
    return 0


def coordinator_public_key(value: str | None) -> str | None:
    if not value:
        return None
    path = Path(value)
    if not value.startswith("ed25519:") and path.exists():
        return path.read_text().strip()
    return value


def _open(args: argparse.Namespace) -> ObjectStore:
    from tapestry_protocol.store import StoreError, open_store

    try:
        return open_store(args.store)
    except (StoreError, ValueError) as e:
        raise UsageError(f"cannot open store {args.store!r}: {e}") from None


def _rounds_list(args: argparse.Namespace) -> int:
    from tapestry_cli.inspect import list_rounds

    list_rounds(_open(args), args.federation, coordinator_public_key(args.coordinator_key))
    return 0


def _rounds_show(args: argparse.Namespace) -> int:
    from tapestry_cli.inspect import show_round

    show_round(
        _open(args), args.federation, args.round, coordinator_public_key(args.coordinator_key)
    )
    return 0


def _aggregate(args: argparse.Namespace) -> int:
    from tapestry_aggregator.memory import keep_freed_memory
    from tapestry_aggregator.merge import aggregate_round, result_summary
    from tapestry_aggregator.strategy import Strategy
    from tapestry_protocol.exchange import COORDINATOR
    from tapestry_protocol.layout import Layout
    from tapestry_protocol.rejections import Rejected
    from tapestry_protocol.signing import load_signing_key

    try:
        signer = load_signing_key(COORDINATOR, args.key)
        strategy = Strategy(
            optimizer=args.optimizer,
            learning_rate=args.learning_rate,
            weighting=args.weighting,
            max_share=args.max_share,
        )
        layout = Layout(args.federation)
    except ValueError as e:
        raise UsageError(str(e)) from None
    store = _open(args)
    keep_freed_memory()
    try:
        result = aggregate_round(store, layout, args.round, signer, strategy)
    except Rejected as e:
        raise UsageError(f"round {args.round} cannot be aggregated: {e}") from None
    summary = result_summary(result)
    console.print(summary)
    return 0 if summary["outcome"] == "Succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
