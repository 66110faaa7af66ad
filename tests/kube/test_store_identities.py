"""Store identities end to end, on the test cluster with real MinIO: the coordinator's
operator issues each member its own scoped store key (spec.store.identities), each
member's administrator puts its Secret into the member's namespace, and a round
completes with every participant holding only its own key and the aggregator the
coordinator's; a member's key cannot read another's update; deleting a member's Secret
rotates its key; removing a member from spec.members makes its key stop working, and
deleting the Federation removes every identity it issued.
"""

from __future__ import annotations

import io
import time
import urllib.parse
from collections.abc import Callable

import pytest
from minio import Minio
from minio.error import S3Error

from tests.kube import deployment as shared
from tests.kube.client import ApiError, Obj
from tests.kube.deployment import (
    MEMBERS,
    Deployment,
    hand_over_store_keys,
    issued_store_key,
    with_store_identities,
)
from tests.kube.tapestry_env import API, STORE_SECRET, secret
from tests.s3servers import S3Server

deployment = shared.deployment
pytestmark = [pytest.mark.kube, pytest.mark.s3, pytest.mark.torch, pytest.mark.slow]

PARTIES = ("coordinator", *MEMBERS)
KEY_TIMEOUT_S = 90.0  # a Federation visit comes at least every 30 s


def federation_path(d: Deployment) -> str:
    return f"/apis/{API}/namespaces/{d.coordinator_ns}/federations/demo"


def secret_path(d: Deployment, namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/secrets/{name}"


def issued_secret(d: Deployment, party: str) -> Obj:
    return d.client.get(secret_path(d, d.coordinator_ns, f"demo-store-{party}"))


def rows(federation: Obj) -> dict[str, Obj]:
    return {r["name"]: r for r in federation.get("status", {}).get("storeIdentities", [])}


def wait_identities(d: Deployment, done: Callable[[dict[str, Obj]], bool], what: str) -> Obj:
    return d.wait(federation_path(d), lambda o: done(rows(o)), what, KEY_TIMEOUT_S)


def client_of(minio: S3Server, access: str, secret_key: str) -> Minio:
    parts = urllib.parse.urlsplit(minio.endpoint)
    return Minio(parts.netloc, access_key=access, secret_key=secret_key, secure=False)


def refusal(action: Callable[[], object]) -> str | None:
    """The S3 error code `action` fails with, or None if it succeeds."""
    try:
        result = action()
        close = getattr(result, "close", None)
        if close is not None:
            close()
    except S3Error as e:
        return str(e.code)
    return None


def eventually_refused(action: Callable[[], object], timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        code = refusal(action)
        if code is not None or time.monotonic() > deadline:
            assert code is not None, "the store still accepts the key"
            return code
        time.sleep(1.0)


@pytest.mark.parametrize("deployment", [with_store_identities()], indirect=True)
def test_each_member_trains_with_its_own_scoped_key(
    deployment: Deployment, minio_server: S3Server
) -> None:
    d = deployment
    bucket = f"identities{d.suffix}"
    keys = hand_over_store_keys(d)  # what each member's administrator does
    fed = d.client.get(federation_path(d))
    for party in PARTIES:
        obj = issued_secret(d, party)
        assert obj["metadata"]["ownerReferences"][0]["kind"] == "Federation"
        assert obj["metadata"]["labels"]["app.kubernetes.io/component"] == "store-identity"
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "demo"
        assert rows(fed)[party]["accessKey"] == keys[party][0]
        assert keys[party][0] != minio_server.access_key
    assert not [k for _, k in keys.values() if k in str(fed["status"])]  # ids, no secrets
    assert len({k for k, _ in keys.values()}) == len(PARTIES)
    round_doc = next(x for x in d.docs if x["kind"] == "FederationRound")
    d.client.apply(round_doc)
    done = d.wait_round("demo-round-0", "Succeeded")
    assert {m["name"]: m["state"] for m in done["status"]["members"]} == dict.fromkeys(
        MEMBERS, "Merged"
    )
    # The coordinator's pods held its own identity, not the admin's credentials.
    for job_name in ("demo-bootstrap", "demo-r0-aggregate"):
        job = d.job(d.coordinator_ns, job_name)
        assert job is not None, job_name
        volumes = job["spec"]["template"]["spec"]["volumes"]
        mounted = {v["secret"]["secretName"] for v in volumes if "secret" in v}
        assert "demo-store-coordinator" in mounted and STORE_SECRET not in mounted, mounted

    layout = d.layout
    de, es = (client_of(minio_server, *keys[m]) for m in MEMBERS[:2])
    own = layout.update_manifest(0, MEMBERS[0])
    other = layout.update_manifest(0, MEMBERS[1])
    assert refusal(lambda: de.get_object(bucket, own)) is None
    assert refusal(lambda: de.get_object(bucket, layout.base_manifest(1))) is None
    assert refusal(lambda: es.get_object(bucket, other)) is None
    assert refusal(lambda: de.get_object(bucket, other)) == "AccessDenied"
    assert refusal(lambda: de.stat_object(bucket, other)) is not None
    assert refusal(lambda: de.list_objects(bucket, layout.updates_prefix(0)).__next__()) == (
        "AccessDenied"
    )
    forged = f"{layout.update_dir(0, MEMBERS[1])}forged.json"
    assert refusal(lambda: de.put_object(bucket, forged, io.BytesIO(b"{}"), 2)) == "AccessDenied"
    assert refusal(lambda: de.remove_object(bucket, layout.base_manifest(0))) == "AccessDenied"

    # Deleting a member's Secret rotates its key: a new Secret, the old key refused.
    rotated = MEMBERS[0]
    old_access, old_secret = keys[rotated]
    d.client.delete(secret_path(d, d.coordinator_ns, f"demo-store-{rotated}"))
    fed = wait_identities(
        d, lambda r: r.get(rotated, {}).get("accessKey") not in (None, old_access),
        f"a new store key for {rotated}",
    )  # fmt: skip
    new_access, new_secret = issued_store_key(d, rotated)
    assert rows(fed)[rotated]["accessKey"] == new_access != old_access
    base = layout.base_manifest(1)
    stale = client_of(minio_server, old_access, old_secret)
    assert eventually_refused(lambda: stale.get_object(bucket, base)) == "InvalidAccessKeyId"
    fresh = client_of(minio_server, new_access, new_secret)
    assert refusal(lambda: fresh.get_object(bucket, base)) is None

    # Removing a member from spec.members: its Secret goes and its key stops working.
    removed = MEMBERS[-1]
    leaving = client_of(minio_server, *keys[removed])
    assert refusal(lambda: leaving.get_object(bucket, base)) is None  # works until then
    body = d.client.get(federation_path(d))
    members = [m for m in body["spec"]["members"] if m["name"] != removed]
    d.client.patch(federation_path(d), {"spec": {"members": members}})
    wait_identities(d, lambda r: removed not in r and len(r) == len(PARTIES) - 1,
                    f"{removed}'s store identity to go")  # fmt: skip
    with pytest.raises(ApiError) as gone:
        issued_secret(d, removed)
    assert gone.value.status == 404
    assert eventually_refused(lambda: leaving.get_object(bucket, base)) == "InvalidAccessKeyId"
    assert refusal(lambda: fresh.get_object(bucket, base)) is None  # the others keep theirs
    reasons = {r for _, r, _ in d.events(d.coordinator_ns, "demo")}
    assert {"StoreIdentityIssued", "StoreIdentityRevoked", "StoreIdentityRemoved"} <= reasons

    # Deleting the Federation removes every identity it issued before it goes.
    staying = client_of(minio_server, *keys[MEMBERS[1]])
    assert refusal(lambda: staying.get_object(bucket, base)) is None
    d.client.delete(federation_path(d))
    deadline = time.monotonic() + KEY_TIMEOUT_S
    while True:
        try:
            d.client.get(federation_path(d))
        except ApiError as e:
            assert e.status == 404, e
            break
        assert time.monotonic() < deadline, f"the Federation is still there\n{d.diagnose()}"
        time.sleep(1.0)
    assert refusal(lambda: staying.get_object(bucket, base)) == "InvalidAccessKeyId"
    assert refusal(lambda: fresh.get_object(bucket, base)) == "InvalidAccessKeyId"


@pytest.mark.parametrize("deployment", [with_store_identities()], indirect=True)
def test_wrong_admin_credentials_stall_the_federation_with_a_clear_reason(
    deployment: Deployment, minio_server: S3Server
) -> None:
    d = deployment
    wrong = "not-the-admin-secret-0123456789"
    d.client.apply(secret(d.coordinator_ns, "wrong-admin", {
        "accessKey": b"nobody", "secretKey": wrong.encode()}))  # fmt: skip
    d.client.patch(federation_path(d), {"spec": {"store": {"identities": {
        "adminSecret": {"name": "wrong-admin"}}}}})  # fmt: skip

    def stalled(obj: Obj) -> bool:
        conditions = {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}
        stall = conditions.get("Stalled", {})
        gen = obj["metadata"]["generation"]
        return bool(stall.get("status") == "True" and stall.get("observedGeneration") == gen)

    fed = d.wait(federation_path(d), stalled, "the Federation to be Stalled", KEY_TIMEOUT_S)
    stall = next(c for c in fed["status"]["conditions"] if c["type"] == "Stalled")
    assert stall["reason"] == "StoreIdentityFailed", stall
    assert "admin" in stall["message"] and "InvalidAccessKeyId" in stall["message"], stall
    assert wrong not in str(fed) and minio_server.secret_key not in str(fed)
    warnings = [m for t, r, m in d.events(d.coordinator_ns, "demo")
                if t == "Warning" and r == "StoreIdentityFailed"]  # fmt: skip
    assert warnings and all(wrong not in m for m in warnings), warnings
    assert wrong not in d.operator.log.read_text(errors="replace")
