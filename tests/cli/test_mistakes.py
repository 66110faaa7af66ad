"""Every mistake a user can type ends in one line that says what to fix, exit status 2."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tapestry_protocol.layout import validate_name
from tests.cli.conftest import assert_error, tapestry

STORE = ["--store", "store", "--federation", "f"]


@pytest.mark.parametrize(
    "args",
    [
        ["rounds", "show", "--", "-1", *STORE],
        ["rounds", "show", "-1", *STORE],
    ],
)
def test_negative_round_in_rounds_show(tmp_path: Path, args: list[str]) -> None:
    done = tapestry(*args, cwd=tmp_path)
    assert_error(
        done,
        "error: argument round: round must be a whole number >= 0, got -1 "
        "(see tapestry rounds show --help)",
    )


def test_negative_round_in_aggregate(tmp_path: Path) -> None:
    done = tapestry("aggregate", "--round", "-1", *STORE, "--key", "k.key", cwd=tmp_path)
    assert_error(
        done,
        "error: argument --round: round must be a whole number >= 0, got -1 "
        "(see tapestry aggregate --help)",
    )


def test_round_that_is_not_a_number(tmp_path: Path) -> None:
    done = tapestry("rounds", "show", "three", *STORE, cwd=tmp_path)
    assert_error(
        done,
        "error: argument round: round must be a whole number >= 0, got three "
        "(see tapestry rounds show --help)",
    )


@pytest.mark.parametrize("action", [["list"], ["show", "0"]])
def test_invalid_federation_name(tmp_path: Path, action: list[str]) -> None:
    with pytest.raises(ValueError) as invalid:
        validate_name("federation", "Bad_Name")
    done = tapestry("rounds", *action, "--store", "store", "--federation", "Bad_Name", cwd=tmp_path)
    command = " ".join(["tapestry", "rounds", action[0]])
    assert_error(done, f"error: argument --federation: {invalid.value} (see {command} --help)")


def test_missing_coordinator_key_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pub"
    done = tapestry("rounds", "show", "0", *STORE, "--coordinator-key", str(missing), cwd=tmp_path)
    assert_error(
        done,
        f"error: argument --coordinator-key: coordinator key file {missing} does not exist "
        "(give a .pub file or the key text ed25519:...) (see tapestry rounds show --help)",
    )


def test_missing_coordinator_key_file_from_the_environment(tmp_path: Path) -> None:
    env = {"TAPESTRY_COORDINATOR_KEY": "/nope.pub"}
    done = tapestry("rounds", "list", *STORE, cwd=tmp_path, env=env)
    assert_error(
        done,
        "error: $TAPESTRY_COORDINATOR_KEY: coordinator key file /nope.pub does not exist "
        "(give a .pub file or the key text ed25519:...)",
    )


def test_unparsable_coordinator_key_text(tmp_path: Path) -> None:
    done = tapestry("rounds", "list", *STORE, "--coordinator-key", "ed25519:abc", cwd=tmp_path)
    assert_error(
        done,
        "error: argument --coordinator-key: coordinator key 'ed25519:abc' is not a valid key: "
        "public key is not 32 bytes of base64 after 'ed25519:' (see tapestry rounds list --help)",
    )


def test_coordinator_key_file_without_a_key(tmp_path: Path) -> None:
    (tmp_path / "junk.pub").write_text("not a key\n")
    done = tapestry("rounds", "list", *STORE, "--coordinator-key", "junk.pub", cwd=tmp_path)
    assert_error(
        done,
        "error: argument --coordinator-key: coordinator key file junk.pub does not hold a "
        "public key: public key must start with 'ed25519:' (see tapestry rounds list --help)",
    )


def test_keys_create_under_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "somefile").write_text("")
    done = tapestry("keys", "create", "alice", "--out", "somefile/sub", cwd=tmp_path)
    assert_error(
        done, "error: --out somefile/sub is under somefile, which is a file, not a directory"
    )


def test_keys_create_into_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "somefile").write_text("")
    done = tapestry("keys", "create", "alice", "--out", "somefile", cwd=tmp_path)
    assert_error(done, "error: --out somefile is a file, not a directory")


def test_keys_create_never_overwrites_a_key(tmp_path: Path) -> None:
    first = tapestry("keys", "create", "alice", "--out", "kd", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    private = (tmp_path / "kd" / "alice.key").read_bytes()
    done = tapestry("keys", "create", "alice", "--out", "kd", cwd=tmp_path)
    assert_error(
        done, "error: alice.key already exists in kd; choose another --out or remove it first"
    )
    assert (tmp_path / "kd" / "alice.key").read_bytes() == private


def test_keys_create_never_overwrites_a_public_key(tmp_path: Path) -> None:
    (tmp_path / "kd").mkdir()
    (tmp_path / "kd" / "alice.pub").write_text("ed25519:kept\n")
    done = tapestry("keys", "create", "alice", "--out", "kd", cwd=tmp_path)
    assert_error(
        done, "error: alice.pub already exists in kd; choose another --out or remove it first"
    )
    assert [p.name for p in (tmp_path / "kd").iterdir()] == ["alice.pub"]
    assert (tmp_path / "kd" / "alice.pub").read_text() == "ed25519:kept\n"


def test_keys_create_refuses_an_invalid_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as invalid:
        validate_name("participant", "Not_A_Name")
    done = tapestry("keys", "create", "Not_A_Name", cwd=tmp_path)
    assert_error(done, f"error: argument name: {invalid.value} (see tapestry keys create --help)")
    assert not list(tmp_path.iterdir())


def test_a_command_without_its_action(tmp_path: Path) -> None:
    done = tapestry("rounds", cwd=tmp_path)
    assert_error(
        done, "error: the following arguments are required: ACTION (see tapestry rounds --help)"
    )


def test_help_documents_the_exit_statuses(tmp_path: Path) -> None:
    done = tapestry("--help", cwd=tmp_path)
    assert done.returncode == 0
    block = done.stdout[done.stdout.index("exit status:") :]
    assert re.findall(r"^  (\d+) ", block, re.MULTILINE) == ["0", "1", "2", "130"]
