"""`tapestry rounds list|show` verify with the given key, say plainly what fails, and exit
2 when anything does not verify. Verdicts are compared whole: "verified" is a substring
of "unverified" and of "NOT verified (...)"."""

from __future__ import annotations

import json
from pathlib import Path

from tapestry_protocol.signing import SigningKey
from tests.cli.conftest import SignedRound, assert_error, cells, tapestry

STORE = ["--store", "store", "--federation", "f"]


def _other_key() -> str:
    return SigningKey.generate("coordinator").public_key_text


def _updates(stdout: str) -> dict[str, str]:
    """Participant -> update verdict, from the `rounds show` table."""
    return {row[0]: row[1] for row in cells(stdout)}


def _header_verdict(stdout: str) -> str:
    first = stdout.splitlines()[0]
    return first.split(" — plan ", 1)[1].split(";", 1)[0]


def _result_verdict(stdout: str) -> str:
    line = next(x for x in stdout.splitlines() if x.startswith("result "))
    return line[len("result ") :].split(":", 1)[0]


def _tamper_with_bobs_update(signed_round: SignedRound) -> None:
    manifest = signed_round.store / "federations/f/rounds/000000/updates/bob/manifest.json"
    document = json.loads(manifest.read_text())
    document["tokens"] += 1
    manifest.write_text(json.dumps(document))


def test_show_with_the_right_key_verifies_everything(signed_round: SignedRound) -> None:
    key = signed_round.coordinator_key
    done = tapestry("rounds", "show", "0", *STORE, "--coordinator-key", key, cwd=signed_round.root)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert _header_verdict(done.stdout) == "verified"
    assert _updates(done.stdout) == {"alice": "verified", "bob": "verified"}
    assert _result_verdict(done.stdout) == "verified"


def test_show_with_a_key_file(signed_round: SignedRound) -> None:
    (signed_round.root / "coordinator.pub").write_text(signed_round.coordinator_key + "\n")
    args = ["--coordinator-key", "coordinator.pub"]
    done = tapestry("rounds", "show", "0", *STORE, *args, cwd=signed_round.root)
    assert done.returncode == 0, done.stderr
    assert _updates(done.stdout) == {"alice": "verified", "bob": "verified"}


def test_show_with_the_wrong_key_verifies_nothing(signed_round: SignedRound) -> None:
    args = ["--coordinator-key", _other_key()]
    done = tapestry("rounds", "show", "0", *STORE, *args, cwd=signed_round.root)
    assert_error(
        done,
        "error: round 0 of federation f: plan signature does NOT verify with the given "
        "coordinator key, so no update can be verified; result signature does NOT verify "
        "with the given coordinator key",
    )
    assert _header_verdict(done.stdout) == "NOT verified (BadSignature)"
    untrusted = "NOT verified (plan untrusted)"
    assert _updates(done.stdout) == {"alice": untrusted, "bob": untrusted}
    assert _result_verdict(done.stdout) == "NOT verified (BadSignature)"


def test_show_without_a_key_verifies_nothing_and_says_so(signed_round: SignedRound) -> None:
    done = tapestry("rounds", "show", "0", *STORE, cwd=signed_round.root)
    assert done.returncode == 0, done.stderr
    assert _header_verdict(done.stdout) == "unverified"
    assert _updates(done.stdout) == {"alice": "unverified", "bob": "unverified"}
    assert _result_verdict(done.stdout) == "unverified"


def test_show_names_a_tampered_update(signed_round: SignedRound) -> None:
    _tamper_with_bobs_update(signed_round)
    key = signed_round.coordinator_key
    done = tapestry("rounds", "show", "0", *STORE, "--coordinator-key", key, cwd=signed_round.root)
    assert_error(
        done,
        "error: round 0 of federation f: bob's update signature does NOT verify with "
        "bob's key in the plan",
    )
    assert _updates(done.stdout) == {"alice": "verified", "bob": "NOT verified (BadSignature)"}


def test_show_checks_nothing_against_an_untrusted_plan(signed_round: SignedRound) -> None:
    """With the wrong key, the plan's participant keys are not used: bob's tampered update
    is as untrusted as alice's intact one, and the error names the plan."""
    _tamper_with_bobs_update(signed_round)
    args = ["--coordinator-key", _other_key()]
    done = tapestry("rounds", "show", "0", *STORE, *args, cwd=signed_round.root)
    assert_error(
        done,
        "error: round 0 of federation f: plan signature does NOT verify with the given "
        "coordinator key, so no update can be verified; result signature does NOT verify "
        "with the given coordinator key",
    )
    untrusted = "NOT verified (plan untrusted)"
    assert _updates(done.stdout) == {"alice": untrusted, "bob": untrusted}


def test_show_a_round_that_does_not_exist(signed_round: SignedRound) -> None:
    done = tapestry("rounds", "show", "7", *STORE, cwd=signed_round.root)
    assert_error(
        done,
        f"error: round 7 of federation f has no plan in file://{signed_round.store} "
        "(`tapestry rounds list` shows the rounds there)",
    )


def _listed(stdout: str) -> list[tuple[str, str, str]]:
    """(round, plan verdict, result verdict) per row of `rounds list`."""
    return [(row[0], row[1], row[2]) for row in cells(stdout)]


def test_list_with_the_right_key(signed_round: SignedRound) -> None:
    key = signed_round.coordinator_key
    done = tapestry("rounds", "list", *STORE, "--coordinator-key", key, cwd=signed_round.root)
    assert done.returncode == 0, done.stderr
    assert _listed(done.stdout) == [("0", "verified", "verified")]


def test_list_with_the_wrong_key(signed_round: SignedRound) -> None:
    args = ["--coordinator-key", _other_key()]
    done = tapestry("rounds", "list", *STORE, *args, cwd=signed_round.root)
    assert_error(
        done,
        "error: federation f: plan signature does NOT verify with the given coordinator key "
        "in round 0; result signature does NOT verify with the given coordinator key in round 0",
    )
    bad = "NOT verified (BadSignature)"
    assert _listed(done.stdout) == [("0", bad, bad)]


def test_list_without_a_key(signed_round: SignedRound) -> None:
    done = tapestry("rounds", "list", *STORE, cwd=signed_round.root)
    assert done.returncode == 0, done.stderr
    assert _listed(done.stdout) == [("0", "unverified", "unverified")]


def test_a_store_that_does_not_exist(tmp_path: Path) -> None:
    done = tapestry("rounds", "list", "--store", "nowhere", "--federation", "f", cwd=tmp_path)
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stderr.startswith("error: cannot open store 'nowhere': ")
    assert done.stderr.count("\n") == 1 and done.returncode == 2
