"""Least-privilege store identities on real MinIO: what each party's key can and cannot do.

One coordinator identity and members alice, bob and alice2 (a name that starts with
another's) per test, in a fresh federation. The pure tests check the policy documents'
wildcards; the rest run the real exchange functions with each party's own key.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from minio import Minio
from minio.error import S3Error

from tapestry_aggregator.merge import aggregate_round
from tapestry_aggregator.strategy import Strategy
from tapestry_cli.main import main
from tapestry_protocol.documents import CloseTrigger, Outcome, ReceiptState
from tapestry_protocol.exchange import (
    close_round,
    load_tensors,
    publish_receipt,
    publish_update,
    read_plan,
    read_plan_base,
)
from tapestry_protocol.layout import Layout
from tapestry_protocol.store import (
    FAST_RETRY,
    AccessDenied,
    DirectoryCredentials,
    S3Credentials,
    S3Location,
    S3Store,
    open_store,
)
from tapestry_protocol.store.access import (
    COORDINATOR,
    Identity,
    MinioIdentities,
    coordinator_policy,
    member_policy,
    user_name,
)
from tests.protocol.federation import CLOSED_AT, Federation, make_federation
from tests.s3servers import S3Server
from tests.store.conftest import TEST_PART_SIZE

BUCKET = "access"
MEMBERS = ("alice", "bob", "alice2")
MiB = 1 << 20


# --- the policy documents, without a server --------------------------------------------


def _allows(policy: dict[str, object], action: str, resource: str) -> bool:
    """IAM wildcard matching (`*` any run of characters, `/` included; `?` one)."""
    for statement in policy["Statement"]:  # type: ignore[attr-defined]
        if (
            action in statement["Action"]
            and "Condition" not in statement
            and any(fnmatch.fnmatchcase(resource, r) for r in statement["Resource"])
        ):
            return True
    return False


def test_member_patterns_match_only_its_own_prefixes() -> None:
    layout = Layout("fed")
    policy = member_policy(layout, BUCKET, "alice")
    arn = f"arn:aws:s3:::{BUCKET}/"
    own = [layout.update_manifest(3, "alice"), layout.receipt(3, "alice", "Accepted")]
    for key in own:
        assert _allows(policy, "s3:PutObject", arn + key)
    others = [
        layout.update_manifest(3, "alice2"),
        layout.update_manifest(3, "bob"),
        layout.update_dir(3, "bob") + "x/updates/alice/y",  # `*` for the round would allow it
        layout.receipt(3, "bob", "Accepted"),
        layout.plan(3),
        layout.base_manifest(3),
        Layout("fed2").update_manifest(3, "alice"),
        Layout("fed", prefix="p").update_manifest(3, "alice"),
    ]
    for key in others:
        assert not _allows(policy, "s3:PutObject", arn + key), key
    assert not _allows(policy, "s3:GetObject", arn + layout.update_manifest(3, "bob"))
    assert _allows(policy, "s3:GetObject", arn + layout.result(3))
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert not {"s3:DeleteObject", "s3:ListBucket", "s3:*"} & actions


def test_coordinator_writes_only_its_own_objects() -> None:
    layout = Layout("fed")
    policy = coordinator_policy(layout, BUCKET)
    arn = f"arn:aws:s3:::{BUCKET}/"
    for key in (layout.plan(1), layout.close(1), layout.result(1), layout.base_manifest(2)):
        assert _allows(policy, "s3:PutObject", arn + key)
    for key in (layout.update_manifest(1, "alice"), layout.receipt(1, "bob", "Failed")):
        assert not _allows(policy, "s3:PutObject", arn + key)
        assert _allows(policy, "s3:GetObject", arn + key)
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert "s3:DeleteObject" not in actions


def test_identity_names_are_unambiguous_and_secrets_hidden() -> None:
    assert user_name(Layout("a"), BUCKET, "b-c") != user_name(Layout("a-b"), BUCKET, "c")
    assert user_name(Layout("a"), BUCKET, "b") != user_name(Layout("a"), "other", "b")
    assert user_name(Layout("a"), BUCKET, "b") != user_name(Layout("a", prefix="p"), BUCKET, "b")
    identity = Identity("alice", "AK", "very-secret")
    assert "very-secret" not in repr(identity) + str(identity)
    with pytest.raises(ValueError, match="coordinator"):
        member_policy(Layout("a"), BUCKET, COORDINATOR)


# --- on MinIO ----------------------------------------------------------------------------


@dataclass
class Parties:
    server: S3Server
    layout: Layout
    ids: MinioIdentities
    identities: dict[str, Identity]
    stores: dict[str, S3Store]
    admin: S3Store

    def store_for(self, identity: Identity) -> S3Store:
        return _store(self.server, identity.credentials())


def _store(server: S3Server, credentials: S3Credentials) -> S3Store:
    location = S3Location.parse(f"s3://{BUCKET}?endpoint={server.endpoint}")
    return S3Store(location, credentials=credentials, retry=FAST_RETRY, part_size=TEST_PART_SIZE)


@pytest.fixture
def parties(minio_server: S3Server) -> Iterator[Parties]:
    admin = minio_server.open(BUCKET)
    layout = Layout(f"f-{uuid.uuid4().hex[:8]}")
    ids = MinioIdentities(minio_server.endpoint, minio_server.credentials, bucket=BUCKET)
    identities = {n: ids.provision(layout, n) for n in (COORDINATOR, *MEMBERS)}
    stores = {n: _store(minio_server, i.credentials()) for n, i in identities.items()}
    yield Parties(minio_server, layout, ids, identities, stores, admin)
    for name in identities:
        ids.remove(layout, name)
    for s in [admin, *stores.values()]:
        s.close()


@dataclass
class Round:
    fed: Federation
    keys: list[str]  # every key the coordinator wrote


@pytest.fixture
def round0(parties: Parties) -> Round:
    """Round 0 run end to end, each party with its own key only."""
    coordinator = parties.stores[COORDINATOR]
    fed = make_federation(coordinator, parties.layout.federation, participants=MEMBERS)
    layout, key = fed.layout, fed.coordinator.public_key_text
    for name in ("alice", "bob"):
        store = parties.stores[name]
        plan = read_plan(store, layout, 0, key)
        base = read_plan_base(store, layout, plan, key)
        assert load_tensors(store, base).keys() == fed.tensors.keys()
        signer = fed.participants[name]
        publish_receipt(store, layout, plan, signer, ReceiptState.ACCEPTED, "Accepted", "")
        publish_update(store, layout, plan, base, fed.delta(seed=len(name)), signer,
                       tokens=100, metrics={})  # fmt: skip
    plan = read_plan(coordinator, layout, 0, key)
    close_round(coordinator, layout, plan, fed.coordinator, CloseTrigger.ALL_REPORTED, CLOSED_AT)
    result = aggregate_round(coordinator, layout, 0, fed.coordinator, Strategy("fedavg"))
    assert result.document.outcome == Outcome.SUCCEEDED
    written = [
        i.key
        for i in parties.admin.list(layout.root)
        if "/updates/" not in i.key and "/receipts/" not in i.key
    ]
    return Round(fed, written)


@pytest.mark.s3
def test_a_round_runs_with_scoped_identities_only(parties: Parties, round0: Round) -> None:
    layout = parties.layout
    close = parties.admin.get(layout.close(0))
    included = [i["participant"] for i in json.loads(close)["included"]]
    assert included == ["alice", "bob"]
    assert parties.admin.exists(layout.result(0))
    assert parties.admin.exists(layout.base_manifest(1))
    # The members read what the round published.
    result = parties.stores["alice"].get(layout.result(0))
    assert result == parties.admin.get(layout.result(0))
    parties.stores["bob"].get(layout.base_manifest(1))


@pytest.mark.s3
def test_member_cannot_read_or_list_another_members_update(parties: Parties, round0: Round) -> None:
    layout = parties.layout
    alice, alice2 = parties.stores["alice"], parties.stores["alice2"]
    pairs = ((alice, "bob"), (alice, "alice2"), (alice2, "alice"), (parties.stores["bob"], "alice"))
    for store, other in pairs:
        with pytest.raises(AccessDenied):
            store.get(layout.update_manifest(0, other))
        with pytest.raises(AccessDenied):
            store.get(layout.receipt(0, other, "Accepted"))
    for prefix in (layout.updates_prefix(0), layout.update_dir(0, "bob"), layout.root, ""):
        with pytest.raises(AccessDenied):
            list(alice.list(prefix))
    # Its own it reads back.
    assert alice.exists(layout.update_manifest(0, "alice"))


@pytest.mark.s3
def test_member_cannot_write_another_members_prefix(parties: Parties) -> None:
    layout = parties.layout
    alice = parties.stores["alice"]
    other_federation = Layout(f"{layout.federation}x")
    keys = [
        layout.update_manifest(0, "bob"),
        layout.update_manifest(0, "alice2"),
        layout.receipt(0, "bob", "Accepted"),
        layout.update_dir(0, "bob") + "x/updates/alice/manifest.json",
        layout.round_prefix(0) + "updates/alice",
        other_federation.update_manifest(0, "alice"),
    ]
    for key in keys:
        with pytest.raises(AccessDenied):
            alice.put(key, b"forged")
        assert not parties.admin.exists(key)
    # The coordinator may not write a member's prefix either.
    with pytest.raises(AccessDenied):
        parties.stores[COORDINATOR].put(layout.update_manifest(0, "alice"), b"forged")
    # Its own prefix works, and so does a large (multipart) update shard.
    own = layout.update_dir(0, "alice") + "part-00000-big.safetensors"
    alice.put(own, os.urandom(3 * TEST_PART_SIZE // 2), if_absent=True)
    assert parties.admin.stat(own).size == 3 * TEST_PART_SIZE // 2


@pytest.mark.s3
def test_member_cannot_overwrite_or_delete_coordinator_objects(
    parties: Parties, round0: Round
) -> None:
    layout = parties.layout
    kinds = {
        "base": layout.base_manifest(0),
        "base shard": next(k for k in round0.keys if "/bases/000000/part-" in k),
        "plan": layout.plan(0),
        "close": layout.close(0),
        "result": layout.result(0),
        "next base": layout.base_manifest(1),
    }
    before = {k: parties.admin.get(k) for k in kinds.values()}
    alice = parties.stores["alice"]
    identity = parties.identities["alice"]
    raw = Minio(
        parties.server.endpoint.split("://", 1)[1],
        access_key=identity.access_key,
        secret_key=identity.secret_key,
        secure=False,
    )
    for kind, key in kinds.items():
        _refused_everything(alice, raw, kind, key)
    # Nor may the coordinator delete them.
    with pytest.raises(AccessDenied):
        parties.stores[COORDINATOR].delete(layout.result(0))
    assert {k: parties.admin.get(k) for k in kinds.values()} == before


def _refused_everything(store: S3Store, raw: Minio, kind: str, key: str) -> None:
    """Every way to replace or remove `key` is refused: the store's conditional and plain
    puts (single and multipart), its delete, and the SDK's plain PutObject and delete."""
    big = os.urandom(3 * TEST_PART_SIZE // 2)
    for what, attempt in (
        ("put", lambda: store.put(key, b"forged")),
        ("conditional put", lambda: store.put(key, b"forged", if_absent=True)),
        ("multipart put", lambda: store.put(key, big)),
        ("delete", lambda: store.delete(key)),
    ):
        with pytest.raises(AccessDenied):
            attempt()
            pytest.fail(f"{what} of the {kind} was allowed")
    for what, raw_attempt in (
        ("raw put", lambda: raw.put_object(BUCKET, key, io.BytesIO(b"forged"), 6)),
        ("raw delete", lambda: raw.remove_object(BUCKET, key)),
    ):
        with pytest.raises(S3Error) as caught:
            raw_attempt()
        assert caught.value.code == "AccessDenied", f"{what} of the {kind}"


@pytest.mark.s3
def test_a_member_finds_its_region_without_being_told(parties: Parties) -> None:
    """The SDK asks GetBucketLocation when no region is configured (as on AWS)."""
    coordinator = parties.stores[COORDINATOR]
    coordinator.put(parties.layout.plan(7), b"{}")
    identity = parties.identities["bob"]
    raw = Minio(
        parties.server.endpoint.split("://", 1)[1],
        access_key=identity.access_key,
        secret_key=identity.secret_key,
        secure=False,
    )
    assert raw.get_object(BUCKET, parties.layout.plan(7)).data == b"{}"


@pytest.mark.s3
def test_a_removed_members_credentials_stop_working(parties: Parties, round0: Round) -> None:
    layout = parties.layout
    bob = parties.stores["bob"]
    bob.get(layout.plan(0))
    parties.ids.remove(layout, "bob")
    parties.ids.remove(layout, "bob")  # idempotent
    for attempt in (
        lambda: bob.get(layout.plan(0)),
        lambda: bob.put(layout.receipt(1, "bob", "Accepted"), b"{}"),
    ):
        with pytest.raises(AccessDenied):
            attempt()
    assert "bob" not in parties.ids.names(layout)
    assert parties.ids.keys(layout, "bob") == []
    parties.stores["alice"].get(layout.plan(0))  # the others are untouched


@pytest.mark.s3
def test_a_revoked_key_stops_working_while_the_new_one_works(
    parties: Parties, round0: Round
) -> None:
    layout = parties.layout
    old = parties.identities["alice"]
    new = parties.ids.provision(layout, "alice")
    assert new.access_key != old.access_key
    assert parties.ids.keys(layout, "alice") == sorted([old.access_key, new.access_key])
    with parties.store_for(new) as store:
        store.get(layout.plan(0))
    parties.ids.revoke(layout, "alice", old.access_key)
    parties.ids.revoke(layout, "alice", old.access_key)  # idempotent
    parties.ids.revoke(layout, "bob", new.access_key)  # not bob's key: left alone
    assert parties.ids.keys(layout, "alice") == [new.access_key]
    with pytest.raises(AccessDenied):
        parties.stores["alice"].get(layout.plan(0))
    with parties.store_for(new) as store:
        store.get(layout.plan(0))
        store.put(layout.receipt(1, "alice", "Accepted"), b"{}")


@pytest.mark.s3
def test_names_lists_this_federations_identities_only(
    minio_server: S3Server, parties: Parties
) -> None:
    layout = parties.layout
    other = Layout(layout.federation, prefix="elsewhere")
    parties.ids.provision(other, "alice")
    try:
        parties.ids._admin.user_add(f"tapestry-{layout.federation}", "not-ours-secret")
        assert parties.ids.names(layout) == sorted([COORDINATOR, *MEMBERS])
        assert parties.ids.names(other) == ["alice"]
    finally:
        parties.ids.remove(other, "alice")
        parties.ids._admin.user_remove(f"tapestry-{layout.federation}")


@pytest.mark.s3
def test_the_longest_names_make_working_identities(minio_server: S3Server) -> None:
    """63-character federation and member names (DNS labels at their limit)."""
    layout = Layout(f"l{uuid.uuid4().hex}".ljust(63, "x"))
    member = "m" * 63
    ids = MinioIdentities(minio_server.endpoint, minio_server.credentials, bucket=BUCKET)
    try:
        identity = ids.provision(layout, member)
        assert ids.names(layout) == [member]
        with _store(minio_server, identity.credentials()) as store:
            store.put(layout.receipt(0, member, "Accepted"), b"{}")
            with pytest.raises(AccessDenied):
                store.put(layout.plan(0), b"{}")
    finally:
        ids.remove(layout, member)
    assert ids.names(layout) == []


@pytest.mark.s3
def test_admin_errors_are_clear_and_hold_no_secret(
    minio_server: S3Server, parties: Parties
) -> None:
    wrong = S3Credentials(minio_server.access_key, "wrong-secret-0123456789")
    member = parties.identities["alice"]
    for credentials in (wrong, member.credentials()):
        ids = MinioIdentities(minio_server.endpoint, credentials, bucket=BUCKET)
        with pytest.raises(AccessDenied) as caught:
            ids.provision(parties.layout, "carol")
        message = str(caught.value)
        assert "MinIO admin API" in message and "carol" in message
        assert credentials.secret_key not in message
        assert minio_server.secret_key not in message


# --- credentials that rotate under a running store -----------------------------------------


def _kubelet_write(directory: Path, identity: Identity, version: str) -> None:
    """What the kubelet does to a mounted Secret: new files in a fresh `..<timestamp>`
    directory, then one atomic rename of the `..data` symlink onto it."""
    data = directory / f"..{version}"
    data.mkdir(parents=True)
    (data / "accessKey").write_text(identity.access_key)
    (data / "secretKey").write_text(identity.secret_key)
    link = directory / "..data_tmp"
    link.symlink_to(data.name)
    os.replace(link, directory / "..data")
    for name in ("accessKey", "secretKey"):
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")


def test_directory_credentials_follow_swaps_and_keep_the_last_good_pair(tmp_path: Path) -> None:
    directory = tmp_path / "secret"
    _kubelet_write(directory, Identity("alice", "AK1", "SK1"), "1")
    provider = DirectoryCredentials(directory)
    assert provider.current() == S3Credentials("AK1", "SK1")
    _kubelet_write(directory, Identity("alice", "AK2", "SK2"), "2")
    assert provider.retrieve().access_key == "AK2"
    (directory / "..data").unlink()  # half-way through an update: nothing to read
    assert provider.current() == S3Credentials("AK2", "SK2")
    assert not provider.reload()
    _kubelet_write(directory, Identity("alice", "AK3", "SK3"), "3")
    assert provider.current() == S3Credentials("AK3", "SK3")


def _url(server: S3Server, credentials_dir: Path) -> str:
    return f"s3://{BUCKET}?endpoint={server.endpoint}&credentials_dir={credentials_dir}"


@pytest.mark.s3
def test_a_store_follows_a_kubelet_swap_of_its_credentials(
    parties: Parties, round0: Round, tmp_path: Path
) -> None:
    layout = parties.layout
    directory = tmp_path / "secret"
    _kubelet_write(directory, parties.identities["alice"], "2030_01_01_00_00_00.1")
    store = open_store(_url(parties.server, directory), retry=FAST_RETRY)
    try:
        plan = store.get(layout.plan(0))
        rotated = parties.ids.provision(layout, "alice")
        _kubelet_write(directory, rotated, "2030_01_01_00_00_00.2")
        assert isinstance(store, S3Store)
        # What the next request is signed with: the new key, before any refusal.
        provider = store._client._provider
        assert provider is not None and provider.retrieve().access_key == rotated.access_key
        parties.ids.revoke(layout, "alice", parties.identities["alice"].access_key)
        assert store.get(layout.plan(0)) == plan  # the same store object, no reopen
        store.put(layout.receipt(1, "alice", "Accepted"), b"{}")
    finally:
        store.close()


@pytest.mark.s3
def test_a_refused_request_rereads_unchanged_looking_credentials(
    parties: Parties, round0: Round, tmp_path: Path
) -> None:
    """Files rewritten in place with their old mtime look unchanged; the AccessDenied
    of the revoked key makes the store re-read them once and retry."""
    layout = parties.layout
    old = parties.identities["alice"]
    directory = tmp_path / "plain"
    directory.mkdir()
    for name, value in (("accessKey", old.access_key), ("secretKey", old.secret_key)):
        (directory / name).write_text(value)
    store = open_store(_url(parties.server, directory), retry=FAST_RETRY)
    try:
        store.get(layout.plan(0))
        new = parties.ids.provision(layout, "alice")
        assert (len(new.access_key), len(new.secret_key)) == (
            len(old.access_key),
            len(old.secret_key),
        )
        for name, value in (("accessKey", new.access_key), ("secretKey", new.secret_key)):
            path = directory / name
            before = path.stat()
            with open(path, "r+") as f:
                f.write(value)
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        parties.ids.revoke(layout, "alice", old.access_key)
        store.get(layout.plan(0))
    finally:
        store.close()


# --- the CLI ---------------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def _manifest(tmp_path: Path, server: S3Server, federation: str, members: list[str]) -> Path:
    path = tmp_path / f"federation-{len(members)}.yaml"
    entries = "".join(f"    - name: {m}\n      publicKey: ed25519:x\n" for m in members)
    path.write_text(
        "apiVersion: tapestry.dev/v1alpha1\nkind: Federation\n"
        f"metadata:\n  name: {federation}\n"
        f"spec:\n  store:\n    endpoint: {server.endpoint}\n    bucket: {BUCKET}\n"
        f"  members:\n{entries}"
    )
    return path


def _secrets_in(out: Path) -> list[str]:
    return [p.read_text() for p in out.glob("*/secretKey")]


@pytest.mark.s3
def test_cli_sync_creates_and_removes_identities(
    minio_server: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    federation = f"c-{uuid.uuid4().hex[:8]}"
    layout = Layout(federation)
    ids = MinioIdentities(minio_server.endpoint, minio_server.credentials, bucket=BUCKET)
    admin = ["--admin-credentials-dir", str(minio_server.credentials_dir)]
    out = tmp_path / "out"
    try:
        manifest = _manifest(tmp_path, minio_server, federation, ["alice", "bob"])
        status, stdout, _ = _cli(
            capsys, "store", "identities", "sync", "--federation-manifest", str(manifest),
            "--out", str(out), *admin,
        )  # fmt: skip
        assert status == 0
        assert ids.names(layout) == ["alice", "bob", COORDINATOR]
        for name in ("alice", "bob", COORDINATOR):
            for file in ("accessKey", "secretKey"):
                assert stat.S_IMODE((out / name / file).stat().st_mode) == 0o600
            assert (out / name / "accessKey").read_text() in stdout
        assert not any(secret in stdout for secret in _secrets_in(out))
        credentials = S3Credentials.from_dir(out / "bob")
        with _store(minio_server, credentials) as bob:
            bob.put(layout.receipt(0, "bob", "Accepted"), b"{}")

        smaller = _manifest(tmp_path, minio_server, federation, ["alice"])
        status, stdout, _ = _cli(
            capsys, "store", "identities", "sync", "--federation-manifest", str(smaller),
            "--out", str(tmp_path / "out2"), *admin,
        )  # fmt: skip
        assert status == 0
        assert ids.names(layout) == ["alice", COORDINATOR]
        assert "removed" in stdout and not (tmp_path / "out2").exists()  # no new keys
        with _store(minio_server, credentials) as bob, pytest.raises(AccessDenied):
            bob.put(layout.receipt(0, "bob", "Declined"), b"{}")
    finally:
        for name in ids.names(layout):
            ids.remove(layout, name)


@pytest.mark.s3
def test_cli_rotate_writes_the_new_key_then_revokes_the_old(
    minio_server: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    federation = f"r-{uuid.uuid4().hex[:8]}"
    layout = Layout(federation)
    ids = MinioIdentities(minio_server.endpoint, minio_server.credentials, bucket=BUCKET)
    store = ["--store", f"s3://{BUCKET}?endpoint={minio_server.endpoint}"]
    common = [*store, "--federation", federation,
              "--admin-credentials-dir", str(minio_server.credentials_dir)]  # fmt: skip
    try:
        status, _, _ = _cli(capsys, "store", "identities", "sync", "--member", "alice",
                            "--out", str(tmp_path / "v1"), *common)  # fmt: skip
        assert status == 0
        first = S3Credentials.from_dir(tmp_path / "v1" / "alice")
        key = layout.receipt(0, "alice", "Accepted")

        status, stdout, _ = _cli(capsys, "store", "identities", "rotate", "--member", "alice",
                                 "--keep-old", "--out", str(tmp_path / "v2"), *common)  # fmt: skip
        assert status == 0
        second = S3Credentials.from_dir(tmp_path / "v2" / "alice")
        assert second.access_key in stdout and second.secret_key not in stdout
        assert ids.keys(layout, "alice") == sorted([first.access_key, second.access_key])

        status, stdout, _ = _cli(capsys, "store", "identities", "rotate", "--member", "alice",
                                 "--out", str(tmp_path / "v3"), *common)  # fmt: skip
        assert status == 0
        third = S3Credentials.from_dir(tmp_path / "v3" / "alice")
        assert ids.keys(layout, "alice") == [third.access_key]
        assert third.secret_key not in stdout
        for old in (first, second):
            with _store(minio_server, old) as s, pytest.raises(AccessDenied):
                s.put(key, b"{}")
        with _store(minio_server, third) as s:
            s.put(key, b"{}")

        status, _, err = _cli(capsys, "store", "identities", "revoke", "--member", "alice",
                              "--access-key", first.access_key, *common)  # fmt: skip
        assert status == 2 and "is not a key of 'alice'" in err and len(err.splitlines()) == 1
    finally:
        for name in ids.names(layout):
            ids.remove(layout, name)


def test_cli_policy_prints_the_documents(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ["--store", f"s3://{BUCKET}/pre?endpoint=https://s3.example", "--federation", "fed"]
    status, stdout, _ = _cli(capsys, "store", "identities", "policy", "--coordinator", *store)
    assert status == 0
    assert json.loads(stdout) == coordinator_policy(Layout("fed", prefix="pre"), BUCKET)
    status, stdout, _ = _cli(capsys, "store", "identities", "policy", "--member", "bob", *store)
    assert json.loads(stdout) == member_policy(Layout("fed", prefix="pre"), BUCKET, "bob")


def test_cli_mistakes_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("TAPESTRY_S3_CREDENTIALS_DIR", "TAPESTRY_S3_ACCESS_KEY", "TAPESTRY_S3_SECRET_KEY",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    store = ["--store", f"s3://{BUCKET}?endpoint=http://127.0.0.1:9", "--federation", "fed"]
    for args, message in (
        (["sync", "--member", "a", "--out", "o", *store], "no admin credentials"),
        (["sync", "--out", "o", *store], "no members"),
        (["sync", "--member", "Bad_Name", "--out", "o", *store], "participant name"),
        (["policy", "--member", "a", "--federation", "fed"], "no store"),
        (["policy", "--member", "a", "--store", "/local/dir", "--federation", "f"], "--store"),
    ):
        status, _, err = _cli(capsys, "store", "identities", *args)
        assert status == 2, err
        assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.s3
def test_the_round_fixture_uses_no_admin_key(parties: Parties) -> None:
    """The stores a round runs on are the scoped ones, not the server's root key."""
    for name, store in parties.stores.items():
        assert store._credentials is not None
        assert store._credentials.access_key == parties.identities[name].access_key
        assert store._credentials.access_key != parties.server.access_key
