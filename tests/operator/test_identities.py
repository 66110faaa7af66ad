"""The operator's store identities as pure logic: which keys are issued, kept, revoked
and removed as spec.members and the Secrets change, with an in-memory provider and
Secret store (the real MinIO and API server: tests/kube/test_store_identities.py)."""

from __future__ import annotations

import base64
import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest

from tapestry_operator import builders, identities
from tapestry_operator.config import IDENTITY_PROVIDERS, FederationConfig, RoundConfig
from tapestry_operator.identities import IdentityState, sync
from tapestry_protocol.exchange import COORDINATOR
from tapestry_protocol.layout import Layout
from tapestry_protocol.store import AccessDenied, StoreUnavailable
from tests.operator import crd_defaults
from tests.operator.crd_defaults import MEMBER_KEYS, store_spec

Obj = dict[str, Any]
IDENTITIES = {"adminSecret": {"name": "store-admin"}}


@dataclass(frozen=True)
class Issued:
    name: str
    access_key: str
    secret_key: str


@dataclass
class Provider:
    """MinioIdentities' contract in memory: names → their access keys."""

    issued: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> key -> secret
    layouts: set[Layout] = field(default_factory=set)
    fail: Exception | None = None
    counter: itertools.count[int] = field(default_factory=itertools.count)

    def _check(self, layout: Layout) -> None:
        self.layouts.add(layout)
        if self.fail is not None:
            raise self.fail

    def provision(self, layout: Layout, name: str) -> Issued:
        self._check(layout)
        n = next(self.counter)
        access, secret = f"AK{n:04d}{name}", f"secret-{n}-{name}"
        self.issued.setdefault(name, {})[access] = secret
        return Issued(name, access, secret)

    def keys(self, layout: Layout, name: str) -> list[str]:
        self._check(layout)
        return sorted(self.issued.get(name, {}))

    def revoke(self, layout: Layout, name: str, access_key: str) -> None:
        self._check(layout)
        self.issued.get(name, {}).pop(access_key, None)

    def remove(self, layout: Layout, name: str) -> None:
        self._check(layout)
        self.issued.pop(name, None)

    def names(self, layout: Layout) -> list[str]:
        self._check(layout)
        return sorted(self.issued)


@dataclass
class Secrets:
    """Secrets by name, as the API server keeps them (stringData becomes data)."""

    objects: dict[str, Obj] = field(default_factory=dict)

    def secret_data(self, namespace: str, name: str) -> dict[str, bytes] | None:
        obj = self.objects.get(f"{namespace}/{name}")
        if obj is None:
            return None
        return {k: base64.b64decode(v) for k, v in obj.get("data", {}).items()}

    def _store(self, obj: Obj) -> None:
        stored = {k: v for k, v in obj.items() if k != "stringData"}
        stored["data"] = {k: base64.b64encode(v.encode()).decode()
                          for k, v in obj["stringData"].items()}  # fmt: skip
        meta = obj["metadata"]
        self.objects[f"{meta['namespace']}/{meta['name']}"] = stored

    def create(self, obj: Obj) -> bool:
        meta = obj["metadata"]
        if f"{meta['namespace']}/{meta['name']}" in self.objects:
            return False
        self._store(obj)
        return True

    def replace_secret(self, obj: Obj) -> None:
        self._store(obj)

    def delete_secret(self, namespace: str, name: str) -> None:
        self.objects.pop(f"{namespace}/{name}", None)

    def held(self, name: str) -> tuple[str, str]:
        data = self.secret_data(crd_defaults.NAMESPACE, f"fed-store-{name}")
        assert data is not None, name
        return data["accessKey"].decode(), data["secretKey"].decode()


def federation_body(members: tuple[str, ...] = tuple(MEMBER_KEYS), **store: Any) -> Obj:
    keys = list(MEMBER_KEYS.values())
    listed = [{"name": m, "publicKey": keys[i % len(keys)]} for i, m in enumerate(members)]
    spec = store_spec(identities=IDENTITIES, **store)
    return crd_defaults.federation(store=spec, members=listed)


def run(provider: Provider, secrets: Secrets, body: Obj) -> identities.Outcome:
    return sync(provider, secrets, FederationConfig.from_body(body), body)


def test_every_member_and_the_coordinator_get_a_key_and_a_secret() -> None:
    provider, secrets, body = Provider(), Secrets(), federation_body()
    out = run(provider, secrets, body)
    names = [COORDINATOR, *MEMBER_KEYS]
    assert [r["name"] for r in out.rows] == names
    assert all(r["state"] == IdentityState.READY for r in out.rows)
    assert out.failure is None and out.coordinator_ready
    for row in out.rows:
        access, secret = secrets.held(row["name"])
        assert row["accessKey"] == access and row["secret"] == f"fed-store-{row['name']}"
        assert provider.issued[row["name"]] == {access: secret}  # one key each
        assert secret not in repr(row)  # the status names the key, never its secret
    made = secrets.objects[f"{crd_defaults.NAMESPACE}/fed-store-{next(iter(MEMBER_KEYS))}"]
    assert made["metadata"]["ownerReferences"][0]["kind"] == "Federation"
    assert made["metadata"]["labels"]["app.kubernetes.io/component"] == "store-identity"
    assert set(made["data"]) == {"accessKey", "secretKey"}
    for _, _, message in out.events:
        assert not any(s in message for keys in provider.issued.values() for s in keys.values())


def test_a_second_pass_changes_nothing() -> None:
    provider, secrets, body = Provider(), Secrets(), federation_body()
    run(provider, secrets, body)
    before = (repr(provider.issued), repr(secrets.objects))
    again = run(provider, secrets, body)
    assert (repr(provider.issued), repr(secrets.objects)) == before
    assert again.events == []


def test_a_deleted_secret_rotates_the_key() -> None:
    provider, secrets, body = Provider(), Secrets(), federation_body()
    run(provider, secrets, body)
    member = next(iter(MEMBER_KEYS))
    old, _ = secrets.held(member)
    secrets.delete_secret(crd_defaults.NAMESPACE, f"fed-store-{member}")
    out = run(provider, secrets, body)
    new, secret = secrets.held(member)
    assert new != old and provider.issued[member] == {new: secret}  # the old one revoked
    reasons = [reason for _, reason, _ in out.events]
    assert reasons == ["StoreIdentityIssued", "StoreIdentityRevoked"], out.events


def test_a_secret_whose_key_was_revoked_outside_is_replaced() -> None:
    provider, secrets, body = Provider(), Secrets(), federation_body()
    run(provider, secrets, body)
    member = next(iter(MEMBER_KEYS))
    old, _ = secrets.held(member)
    provider.issued[member].clear()  # e.g. an administrator deleted the key in MinIO
    run(provider, secrets, body)
    new, secret = secrets.held(member)
    assert new != old and provider.issued[member] == {new: secret}


def test_keys_of_a_crashed_pass_are_revoked() -> None:
    """A key issued whose Secret was never written (the operator died in between)."""
    provider, secrets, body = Provider(), Secrets(), federation_body()
    run(provider, secrets, body)
    member = next(iter(MEMBER_KEYS))
    held, _ = secrets.held(member)
    stray = provider.provision(Layout("fed"), member).access_key
    run(provider, secrets, body)
    assert sorted(provider.issued[member]) == [held] and stray != held


def test_a_removed_member_loses_its_identity_and_secret() -> None:
    provider, secrets, body = Provider(), Secrets(), federation_body()
    run(provider, secrets, body)
    first, *rest = MEMBER_KEYS
    out = run(provider, secrets, federation_body(tuple(rest)))
    assert first not in provider.issued
    assert f"{crd_defaults.NAMESPACE}/fed-store-{first}" not in secrets.objects
    assert [r["name"] for r in out.rows] == [COORDINATOR, *rest]
    assert ("Normal", "StoreIdentityRemoved") in {(t, r) for t, r, _ in out.events}


def test_policies_name_keys_below_the_store_prefix() -> None:
    provider = Provider()
    run(provider, Secrets(), federation_body(prefix="tapestry/"))
    assert provider.layouts == {Layout("fed", "tapestry/")}
    assert Layout("fed", "tapestry/").root == "tapestry/federations/fed/"


@pytest.mark.parametrize(
    ("error", "permanent"),
    [(AccessDenied("MinIO admin API refused (InvalidAccessKeyId)"), True),
     (StoreUnavailable("MinIO admin API is unreachable"), False)],
)  # fmt: skip
def test_provider_failures_are_reported_and_only_refusals_are_permanent(
    error: Exception, permanent: bool
) -> None:
    out = run(Provider(fail=error), Secrets(), federation_body())
    assert out.failure is not None and str(error) in out.failure
    assert out.permanent is permanent and not out.coordinator_ready
    assert [(t, r) for t, r, _ in out.events] == [("Warning", "StoreIdentityFailed")]


def test_the_coordinator_s_pods_mount_its_identity_not_the_admin_s() -> None:
    config = FederationConfig.from_body(federation_body())
    body = federation_body()
    round_body = crd_defaults.federation_round()
    jobs = [
        builders.build_bootstrap_job(config, body),
        builders.build_aggregator_job(config, RoundConfig.from_body(round_body), round_body),
    ]
    for job in jobs:
        volumes = job["spec"]["template"]["spec"]["volumes"]
        names = {v["secret"]["secretName"] for v in volumes if "secret" in v}
        assert "fed-store-coordinator" in names and "store-admin" not in names, names
        assert "store-credentials" not in names, names
    plain = FederationConfig.from_body(crd_defaults.federation())
    volumes = builders.build_bootstrap_job(plain, body)["spec"]["template"]["spec"]["volumes"]
    assert {v["secret"]["secretName"] for v in volumes if "secret" in v} >= {"store-credentials"}


def test_identity_providers_are_the_crd_s_enum() -> None:
    store = crd_defaults.schema("Federation")["properties"]["spec"]["properties"]["store"]
    provider = store["properties"]["identities"]["properties"]["provider"]
    assert tuple(provider["enum"]) == IDENTITY_PROVIDERS and provider["default"] in provider["enum"]
    status = crd_defaults.schema("Federation")["properties"]["status"]["properties"]
    states = status["storeIdentities"]["items"]["properties"]["state"]["enum"]
    assert tuple(states) == tuple(IdentityState)


def test_identities_stay_off_unless_set() -> None:
    assert FederationConfig.from_body(crd_defaults.federation()).store.identities is None
    on = FederationConfig.from_body(federation_body()).store.identities
    assert on is not None and on.provider == "minio" and on.admin.name == "store-admin"
