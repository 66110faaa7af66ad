"""`tapestry rounds list|show`: what a store says about a federation's rounds.

Signatures are verified when the coordinator's public key is given; without it the
tables say "unverified" rather than pretend.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from tapestry_protocol import documents
from tapestry_protocol.exchange import COORDINATOR
from tapestry_protocol.layout import MANIFEST, Layout
from tapestry_protocol.rejections import Rejected
from tapestry_protocol.signing import verify
from tapestry_protocol.store import ObjectNotFound, ObjectStore

console = Console()


def _load(
    store: ObjectStore, key: str, kind: str, signer: str | None, public_key: str | None
) -> tuple[dict[str, Any] | None, str]:
    """The document and a verdict: 'verified', 'unverified', 'absent' or the rejection."""
    try:
        document = documents.parse(store.get(key), kind, key)
    except ObjectNotFound:
        return None, "absent"
    except Rejected as e:
        return None, f"{e.reason}: {e.message}"
    if public_key is None or signer is None:
        return document, "unverified"
    try:
        verify(document, signer, public_key)
    except Rejected as e:
        return document, f"{e.reason}: {e.message}"
    return document, "verified"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def list_rounds(store: ObjectStore, federation: str, coordinator_key: str | None) -> None:
    layout = Layout(federation)
    keys = [info.key for info in store.list(layout.rounds_prefix())]
    rounds = layout.round_numbers(keys)
    if not rounds:
        console.print(f"no rounds of federation {federation!r} in {store.url}")
        return
    table = Table(title=f"federation {federation} — {store.url}")
    for column in ("round", "plan", "updates", "outcome", "accepted", "rejected", "train loss"):
        table.add_column(column)
    for r in rounds:
        plan, plan_verdict = _load(store, layout.plan(r), "RoundPlan", COORDINATOR, coordinator_key)
        updates = sum(
            1 for k in keys if k.startswith(layout.updates_prefix(r)) and k.endswith(MANIFEST)
        )
        result, verdict = _load(
            store, layout.result(r), "RoundResult", COORDINATOR, coordinator_key
        )
        expected = len(plan["participants"]) if plan else "?"
        table.add_row(
            str(r),
            plan_verdict,
            f"{updates}/{expected}",
            result["outcome"] if result else verdict,
            str(len(result["accepted"])) if result else "-",
            str(len(result["rejected"])) if result else "-",
            _fmt(result["metrics"].get("trainLoss")) if result else "-",
        )
    console.print(table)


def show_round(
    store: ObjectStore, federation: str, round_number: int, coordinator_key: str | None
) -> None:
    layout = Layout(federation)
    plan, plan_verdict = _load(
        store, layout.plan(round_number), "RoundPlan", COORDINATOR, coordinator_key
    )
    if plan is None:
        console.print(f"round {round_number} of {federation!r} has no plan ({plan_verdict})")
        return
    hp = plan["hyperparameters"]
    console.print(
        f"[bold]round {round_number}[/] of {federation} — plan {plan_verdict}; "
        f"{hp['innerSteps']} inner steps, lr {hp['learningRate']}, encoding {plan['encoding']}, "
        f"quorum {plan['minParticipants']}, deadline {plan['deadline']}"
    )
    result, verdict = _load(
        store, layout.result(round_number), "RoundResult", COORDINATOR, coordinator_key
    )
    accepted = {a["participant"]: a for a in result["accepted"]} if result else {}
    rejected = {r["participant"]: r for r in result["rejected"]} if result else {}
    table = Table()
    for column in ("participant", "update", "tokens", "train loss", "tokens/s", "verdict"):
        table.add_column(column)
    keys = {p["name"]: p["publicKey"] for p in plan["participants"]}
    for name in sorted(keys):
        manifest, update_verdict = _load(
            store,
            layout.update_manifest(round_number, name),
            "UpdateManifest",
            name,
            keys[name] if coordinator_key else None,
        )
        metrics = manifest["metrics"] if manifest else {}
        if name in accepted:
            outcome = f"[green]accepted[/] weight {accepted[name]['weight']:.3f}"
        elif name in rejected:
            outcome = f"[red]{rejected[name]['reason']}[/]: {rejected[name]['message']}"
        else:
            outcome = "pending" if result is None else "-"
        table.add_row(
            name,
            update_verdict,
            _fmt(manifest["tokens"]) if manifest else "-",
            _fmt(metrics.get("trainLoss")),
            _fmt(metrics.get("tokensPerSecond")),
            outcome,
        )
    console.print(table)
    if result:
        console.print(
            f"result {verdict}: [bold]{result['outcome']}[/] — {result['message']}; "
            f"next base {result['nextBase']['manifest'] if result['nextBase'] else '-'}"
        )
        console.print({k: _fmt(v) for k, v in result["metrics"].items()})
    else:
        console.print(f"result: {verdict}")
