"""`tapestry rounds list|show`: what a store says about a federation's rounds.

Signatures are verified when the coordinator's public key is given; without it the
tables say "unverified" rather than pretend. Participants' keys come from the plan, so
when the plan does not verify no update can be verified either. Both commands return
what was refused, one sentence each, so that `tapestry` can exit non-zero: a table
alone is too easy to misread as a pass.

Verdicts are whole strings, compared exactly: "verified", "unverified", "absent",
"NOT verified (<reason>)". ("verified" is a substring of the other two.)
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tapestry_cli.errors import UsageError
from tapestry_protocol import documents, rejections
from tapestry_protocol.exchange import COORDINATOR
from tapestry_protocol.layout import MANIFEST, Layout
from tapestry_protocol.rejections import Rejected
from tapestry_protocol.signing import verify
from tapestry_protocol.store import ObjectNotFound, ObjectStore

console = Console()

VERIFIED = "verified"
UNVERIFIED = "unverified"
ABSENT = "absent"
PLAN_UNTRUSTED = "NOT verified (plan untrusted)"
PLAN, UPDATE, RESULT = "RoundPlan", "UpdateManifest", "RoundResult"
COORDINATOR_KEY = "the given coordinator key"


def not_verified(reason: str) -> str:
    return f"NOT verified ({reason})"


@dataclass(frozen=True)
class Loaded:
    """A stored document and its verdict; `refusal` says why it cannot be trusted.

    `document` is None when the object is absent or unreadable; a document whose
    signature fails is kept, so that the table can still show what it claims."""

    document: dict[str, Any] | None
    verdict: str
    refusal: Rejected | None = None


def _load(
    store: ObjectStore,
    key: str,
    kind: str,
    layout: Layout,
    round_number: int,
    signer: str,
    public_key: str | None,
) -> Loaded:
    """Read, validate, check where it belongs, and verify `signer`'s signature when a
    key is given."""
    try:
        document = documents.parse(store.get(key), kind, key)
    except ObjectNotFound:
        return Loaded(None, ABSENT)
    except Rejected as e:
        return Loaded(None, not_verified(e.reason), e)
    try:
        _check_place(document, key, layout, round_number, signer if kind == UPDATE else None)
        if public_key is None:
            return Loaded(document, UNVERIFIED)
        verify(document, signer, public_key)
    except Rejected as e:
        return Loaded(document, not_verified(e.reason), e)
    except ValueError as e:  # the plan lists a key that is not an Ed25519 key
        refusal = Rejected(rejections.MALFORMED_DOCUMENT, f"the key for {signer!r}: {e}")
        return Loaded(document, not_verified(refusal.reason), refusal)
    return Loaded(document, VERIFIED)


def _check_place(
    document: dict[str, Any], key: str, layout: Layout, round_number: int, participant: str | None
) -> None:
    """A document must say it belongs where it was found, or a valid signature could be
    replayed from another round or federation."""
    said = (document.get("federation"), document.get("round"), document.get("participant"))
    if said[0] != layout.federation:
        raise Rejected(rejections.WRONG_FEDERATION, f"{key} belongs to federation {said[0]!r}")
    if said[1] != round_number:
        raise Rejected(rejections.WRONG_ROUND, f"{key} belongs to round {said[1]!r}")
    if participant is not None and said[2] != participant:
        raise Rejected(rejections.WRONG_PARTICIPANT, f"{key} names participant {said[2]!r}")


def _failure(what: str, loaded: Loaded, key_source: str) -> str:
    """One sentence for the error line: what was refused and why."""
    assert loaded.refusal is not None
    if loaded.refusal.reason == rejections.BAD_SIGNATURE:
        return f"{what} signature does NOT verify with {key_source}"
    return f"{what} is refused: {loaded.refusal}"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _fmt(value: Any) -> str:
    """A value for rich markup; values come from the store, so they are never markup."""
    return escape(_value(value))


def list_rounds(store: ObjectStore, federation: str, coordinator_key: str | None) -> list[str]:
    """Print one line per round; return what did not verify (updates are counted, not
    read: `rounds show` verifies them)."""
    layout = Layout(federation)
    keys = [info.key for info in store.list(layout.rounds_prefix())]
    rounds = layout.round_numbers(keys)
    if not rounds:
        console.print(f"no rounds of federation {federation!r} in {escape(store.url)}")
        return []
    table = Table(title=f"federation {federation} — {escape(store.url)}")
    columns = ("round", "plan", "result", "updates", "outcome", "accepted", "rejected")
    for column in (*columns, "train loss"):
        table.add_column(column)
    failures: dict[str, list[int]] = defaultdict(list)
    for r in rounds:
        plan = _load(store, layout.plan(r), PLAN, layout, r, COORDINATOR, coordinator_key)
        result = _load(store, layout.result(r), RESULT, layout, r, COORDINATOR, coordinator_key)
        for what, loaded in (("plan", plan), ("result", result)):
            if loaded.refusal is not None:
                failures[_failure(what, loaded, COORDINATOR_KEY)].append(r)
        updates = sum(
            1 for k in keys if k.startswith(layout.updates_prefix(r)) and k.endswith(MANIFEST)
        )
        expected = len(plan.document["participants"]) if plan.document else "?"
        doc = result.document
        table.add_row(
            str(r),
            plan.verdict,
            result.verdict,
            f"{updates}/{expected}",
            _fmt(doc["outcome"]) if doc else "-",
            str(len(doc["accepted"])) if doc else "-",
            str(len(doc["rejected"])) if doc else "-",
            _fmt(doc["metrics"].get("trainLoss")) if doc else "-",
        )
    console.print(table)
    return [f"{sentence} in {_rounds_text(rs)}" for sentence, rs in failures.items()]


def _rounds_text(rounds: list[int], most: int = 8) -> str:
    shown = ", ".join(str(r) for r in rounds[:most])
    more = f" and {len(rounds) - most} more" if len(rounds) > most else ""
    return f"round{'s' if len(rounds) > 1 else ''} {shown}{more}"


def show_round(
    store: ObjectStore, federation: str, round_number: int, coordinator_key: str | None
) -> list[str]:
    """Print the plan, every listed participant's update and the result; return what
    did not verify."""
    layout = Layout(federation)
    r = round_number
    plan = _load(store, layout.plan(r), PLAN, layout, r, COORDINATOR, coordinator_key)
    failures = []
    if plan.refusal is not None:
        failures.append(f"{_failure('plan', plan, COORDINATOR_KEY)}, so no update can be verified")
    if plan.document is None:
        if plan.refusal is None:
            raise UsageError(
                f"round {r} of federation {federation} has no plan in {store.url} "
                "(`tapestry rounds list` shows the rounds there)"
            )
        console.print(f"[bold]round {r}[/] of {federation} — plan {plan.verdict}")
        return failures
    hp = plan.document["hyperparameters"]
    console.print(
        f"[bold]round {r}[/] of {federation} — plan {plan.verdict}; "
        f"{_fmt(hp['innerSteps'])} inner steps, lr {_fmt(hp['learningRate'])}, "
        f"encoding {_fmt(plan.document['encoding'])}, "
        f"quorum {_fmt(plan.document['minParticipants'])}, "
        f"deadline {_fmt(plan.document['deadline'])}"
    )
    result = _load(store, layout.result(r), RESULT, layout, r, COORDINATOR, coordinator_key)
    if result.refusal is not None:
        failures.append(_failure("result", result, COORDINATOR_KEY))
    doc = result.document
    accepted = {a["participant"]: a for a in doc["accepted"]} if doc else {}
    rejected = {x["participant"]: x for x in doc["rejected"]} if doc else {}
    table = Table()
    outcome_title = "outcome" if result.refusal is None else "outcome (result NOT verified)"
    for column in ("participant", "update", "tokens", "train loss", "tokens/s", outcome_title):
        table.add_column(column)
    keys = {p["name"]: p["publicKey"] for p in plan.document["participants"]}
    for name in sorted(keys):
        trusted_key = keys[name] if plan.verdict == VERIFIED else None
        update = _load(store, layout.update_manifest(r, name), UPDATE, layout, r, name, trusted_key)
        verdict = update.verdict
        if update.refusal is not None:
            failures.append(_failure(f"{name}'s update", update, f"{name}'s key in the plan"))
        elif plan.refusal is not None and update.document is not None:
            verdict = PLAN_UNTRUSTED
        manifest = update.document
        metrics = manifest["metrics"] if manifest else {}
        if name in accepted:
            outcome = f"[green]accepted[/] weight {accepted[name]['weight']:.3f}"
        elif name in rejected:
            outcome = f"[red]{_fmt(rejected[name]['reason'])}[/]: {_fmt(rejected[name]['message'])}"
        else:
            outcome = "pending" if doc is None else "-"
        table.add_row(
            name,
            verdict,
            _fmt(manifest["tokens"]) if manifest else "-",
            _fmt(metrics.get("trainLoss")),
            _fmt(metrics.get("tokensPerSecond")),
            outcome,
        )
    console.print(table)
    if doc:
        next_base = doc["nextBase"]["manifest"] if doc["nextBase"] else None
        console.print(
            f"result {result.verdict}: [bold]{_fmt(doc['outcome'])}[/] — {_fmt(doc['message'])}; "
            f"next base {_fmt(next_base)}"
        )
        console.print({k: _value(v) for k, v in doc["metrics"].items()})
    else:
        console.print(f"result: {result.verdict}")
    return failures
