"""`tapestry verify`: check a federation's whole history with the coordinator's public key.

It prints one table per round (who was merged with what weight and tokens, who was
refused and why), then `verified N rounds, M objects`. The first object that does not
verify ends the command with one `error:` line naming it and its rejection reason, and
exit status 2, as for `tapestry rounds show`: a table alone is too easy to misread as a
pass. `--json` prints the whole report as JSON instead of the tables.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from tapestry_cli.errors import RefusedInput, UsageError
from tapestry_protocol.layout import Layout
from tapestry_protocol.verify import FederationReport, RoundReport, VerifyProgress

console = Console()
stderr = Console(stderr=True)


def add_parser(sub: Any) -> None:
    from tapestry_cli.main import (
        COORDINATOR_KEY_ENV,
        STORE_HELP,
        coordinator_key_arg,
        federation_name,
    )

    p = sub.add_parser(
        "verify",
        help="check every signature and hash of a federation, from its first base to its "
        "latest round",
        description="Walk the federation from round 0's base to its latest round: every "
        "plan, receipt, close record, merged update, result, base and optimizer state, "
        "and every shard's sha256. Exit status 2 names the first object that fails.",
    )
    p.add_argument("--store", required=True, help=STORE_HELP)
    p.add_argument("--federation", required=True, type=federation_name)
    p.add_argument(
        "--coordinator-key",
        type=coordinator_key_arg,
        default=None,
        help="coordinator public key (ed25519:...) or .pub file; required "
        f"(default: ${COORDINATOR_KEY_ENV})",
    )
    p.add_argument(
        "--prefix", default="", help="key prefix the federation lives under in the bucket"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tapestry_cli.main import COORDINATOR_KEY_ENV, EXIT_OK, _coordinator_key, _open
    from tapestry_protocol.verify import verify_federation

    key = _coordinator_key(args)
    if key is None:
        raise UsageError(
            "verify needs the coordinator's public key: --coordinator-key ed25519:... or a "
            f".pub file (or ${COORDINATOR_KEY_ENV})"
        )
    try:
        layout = Layout(args.federation, args.prefix)
    except ValueError as e:
        raise UsageError(str(e)) from None
    store = _open(args)
    if stderr.is_terminal and not args.json:
        with Progress(
            TextColumn("verifying round {task.fields[round]}"),
            BarColumn(),
            TextColumn("{task.fields[objects]} objects"),
            console=stderr,
            transient=True,
        ) as bars:
            task = bars.add_task("verify", total=None, round=0, objects=0)

            def seen(event: VerifyProgress) -> None:
                bars.update(
                    task, completed=event.round, total=event.last_round + 1,
                    round=f"{event.round} of 0..{event.last_round}", objects=event.objects,
                )  # fmt: skip

            report = verify_federation(store, layout, key, progress=seen)
    else:
        report = verify_federation(store, layout, key)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for r in report.rounds:
            console.print(_round_table(r))
        if report.ok:
            console.print(_summary(report), soft_wrap=True)
    if report.failure is not None:
        raise RefusedInput(f"federation {args.federation}: verification failed at {report.failure}")
    return EXIT_OK


def _summary(report: FederationReport) -> str:
    open_round = "" if report.completed == len(report.rounds) else ", the latest still open"
    latest = report.latest_base
    base = "" if latest is None else f"; latest base {latest.manifest} ({latest.sha256[:16]}…)"
    return (
        f"verified {report.completed} round{'s' if report.completed != 1 else ''}"
        f"{open_round}, {report.objects} objects{escape(base)}"
    )


def _round_table(r: RoundReport) -> Table:
    outcome = r.outcome or ("open: closed, no result yet" if r.closed else "open")
    table = Table(
        title=f"round {r.round} — {escape(outcome)} — base {escape(r.base.manifest)}",
        title_justify="left",
    )
    for column in ("participant", "verdict", "weight", "tokens", "detail"):
        table.add_column(column)
    for c in r.contributors:
        adjusted = f"adjusted: {', '.join(c.adjustments)}" if c.adjustments else ""
        table.add_row(
            escape(c.participant), "merged", f"{c.weight:.4f}", str(c.tokens), escape(adjusted)
        )
    for x in r.refused:
        table.add_row(escape(x.participant), escape(x.reason), "-", "-", escape(x.message))
    if not r.contributors and not r.refused:
        for name, states in sorted(r.receipts.items()):
            table.add_row(escape(name), escape("/".join(states)), "-", "-", "receipt")
    return table
