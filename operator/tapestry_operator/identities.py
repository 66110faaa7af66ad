"""Store identities (`spec.store.identities`): one scoped store key per member and one
for the coordinator, each in a Secret the operator keeps.

The provider (MinIO's admin API, `tapestry_protocol.store.access`) holds the policies;
this module only keeps what is issued in line with `spec.members`: an identity and a
Secret per member, a new key when a Secret is deleted (the old key revoked), nothing
left of a member that is removed. Only the operator process reads the admin
credentials; the coordinator's own pods mount the coordinator identity's Secret.

Blocking (admin API and Kubernetes calls): the Federation's reconcile runs it in a
worker thread. Nothing secret reaches a log, an event, a status or an exception message:
only access key ids, which name a key without granting anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from tapestry_lifecycle.states import Reason
from tapestry_operator import builders
from tapestry_operator.config import FederationConfig
from tapestry_operator.kube import Kube
from tapestry_protocol.exchange import COORDINATOR
from tapestry_protocol.layout import Layout
from tapestry_protocol.store import AccessDenied, S3Credentials, StoreError

Obj = dict[str, Any]


class IdentityState(StrEnum):
    """A member's row in the Federation's status.storeIdentities (the CRD's enum)."""

    READY = "Ready"
    FAILED = "Failed"


class IssuedIdentity(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def access_key(self) -> str: ...
    @property
    def secret_key(self) -> str: ...


class Provider(Protocol):
    """What issues and revokes store identities (`MinioIdentities`)."""

    def provision(self, layout: Layout, name: str) -> IssuedIdentity: ...
    def keys(self, layout: Layout, name: str) -> list[str]: ...
    def revoke(self, layout: Layout, name: str, access_key: str) -> None: ...
    def remove(self, layout: Layout, name: str) -> None: ...
    def names(self, layout: Layout) -> list[str]: ...


class Secrets(Protocol):
    """The few Secret calls this needs (`Kube` has them)."""

    def secret_data(self, namespace: str, name: str) -> dict[str, bytes] | None: ...
    def create(self, obj: Obj) -> bool: ...
    def replace_secret(self, obj: Obj) -> None: ...
    def delete_secret(self, namespace: str, name: str) -> None: ...


@dataclass
class Outcome:
    """What one pass did: the status rows, the events, and whether the coordinator's own
    identity is ready (its pods mount that Secret) or why not."""

    rows: list[Obj] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    failure: str | None = None  # a message; None when every identity is in place
    permanent: bool = False  # it cannot succeed without a change by a person

    @property
    def coordinator_ready(self) -> bool:
        return any(
            r["name"] == COORDINATOR and r["state"] == IdentityState.READY for r in self.rows
        )


def policy_layout(federation: FederationConfig) -> Layout:
    """The federation's keys as the policies name them: below the store's prefix (the
    pods' layout leaves the prefix to the store URL; a policy names whole keys)."""
    return Layout(federation.name, federation.store.prefix)


def wanted_names(federation: FederationConfig) -> list[str]:
    """Who holds an identity: the coordinator, then the members in spec order."""
    return [COORDINATOR, *(m for m in federation.members if m != COORDINATOR)]


def sync(
    provider: Provider,
    secrets: Secrets,
    federation: FederationConfig,
    owner: Mapping[str, Any],
) -> Outcome:
    """Bring the issued identities and their Secrets in line with spec.members.

    Per name: no Secret, or a Secret whose key the provider no longer knows, gets a new
    key and a Secret holding it; every other key of that name is revoked (the old key of
    a deleted Secret, or a key issued by a pass that crashed before its Secret was
    written). Names the provider knows that spec.members no longer lists lose their
    Secret, then their identity. Idempotent: a second pass changes nothing."""
    out = Outcome()
    layout = policy_layout(federation)
    try:
        issued = set(provider.names(layout))
    except StoreError as e:
        out.failure = f"cannot list the store identities with the admin credentials: {e}"
        out.permanent = isinstance(e, AccessDenied)
        out.events.append(("Warning", Reason.STORE_IDENTITY_FAILED, out.failure))
        return out
    wanted = wanted_names(federation)
    for name in wanted:
        try:
            out.rows.append(_keep(provider, secrets, federation, owner, name, name in issued, out))
        except StoreError as e:
            message = f"cannot issue the store identity of {name}: {e}"
            out.rows.append({"name": name, "state": str(IdentityState.FAILED),
                             "message": message[:1024]})  # fmt: skip
            out.events.append(("Warning", Reason.STORE_IDENTITY_FAILED, message))
            out.failure = out.failure or message
            out.permanent = out.permanent or isinstance(e, AccessDenied)
    for name in sorted(issued - set(wanted)):
        try:
            secrets.delete_secret(
                federation.namespace, builders.store_identity_secret_name(federation.name, name)
            )
            provider.remove(layout, name)
        except StoreError as e:
            message = f"cannot remove the store identity of former member {name}: {e}"
            out.events.append(("Warning", Reason.STORE_IDENTITY_FAILED, message))
            out.failure = out.failure or message
            continue
        out.events.append(
            ("Normal", Reason.STORE_IDENTITY_REMOVED,
             f"{name} is no longer a member: its store identity and Secret are removed")
        )  # fmt: skip
    return out


def _keep(
    provider: Provider,
    secrets: Secrets,
    federation: FederationConfig,
    owner: Mapping[str, Any],
    name: str,
    known: bool,
    out: Outcome,
) -> Obj:
    """One name's identity and Secret; its status row."""
    layout = policy_layout(federation)
    secret_name = builders.store_identity_secret_name(federation.name, name)
    keys = provider.keys(layout, name) if known else []
    current = secrets.secret_data(federation.namespace, secret_name)
    held = _access_key(current)
    if held is None or held not in keys:
        identity = provider.provision(layout, name)
        secret = builders.build_store_identity_secret(
            federation, name, identity.access_key, identity.secret_key, owner
        )
        if current is None:
            if not secrets.create(secret):  # made meanwhile: that one stands
                held = _access_key(secrets.secret_data(federation.namespace, secret_name))
            else:
                held = identity.access_key
        else:
            secrets.replace_secret(secret)  # its key was revoked outside: a new one
            held = identity.access_key
        keys = [*keys, identity.access_key]
        if held == identity.access_key:
            out.events.append(
                ("Normal", Reason.STORE_IDENTITY_ISSUED,
                 f"store key {identity.access_key} issued to {name} in Secret {secret_name}")
            )  # fmt: skip
    for old in keys:
        if old != held:
            provider.revoke(layout, name, old)
            out.events.append(
                ("Normal", Reason.STORE_IDENTITY_REVOKED, f"store key {old} of {name} revoked")
            )
    row: Obj = {"name": name, "secret": secret_name, "state": str(IdentityState.READY)}
    if held:
        row["accessKey"] = held
    return row


def _access_key(data: Mapping[str, bytes] | None) -> str | None:
    if not data or builders.ACCESS_KEY_ENTRY not in data:
        return None
    if builders.SECRET_KEY_ENTRY not in data:
        return None  # half a credential is none: reissue
    return data[builders.ACCESS_KEY_ENTRY].decode().strip() or None


def provider_for(kube: Kube, federation: FederationConfig, ca_file: str | None) -> Provider:
    """The provider `spec.store.identities` names, with the admin credentials read from
    their Secret (kube.SecretMissing when it is not there)."""
    spec = federation.store.identities
    if spec is None:
        raise ValueError(f"Federation {federation.name} has no spec.store.identities")
    from tapestry_protocol.store.access import MinioIdentities  # the admin client: only here

    access = builders.ACCESS_KEY_ENTRY
    secret = builders.SECRET_KEY_ENTRY
    admin = S3Credentials(
        kube.secret_entry(federation.namespace, spec.admin.name, access).decode().strip(),
        kube.secret_entry(federation.namespace, spec.admin.name, secret).decode().strip(),
    )
    provider: Provider = MinioIdentities(
        federation.store.endpoint, admin, bucket=federation.store.bucket, ca_file=ca_file,
        region=federation.store.region,
    )  # fmt: skip
    return provider


def retire(kube: Kube, body: Mapping[str, Any]) -> list[str]:
    """The Federation is being deleted: remove every store identity it issued (their
    Secrets go with it, through their owner references). Best effort, so that a store
    that cannot be reached never blocks the deletion: what could not be removed is
    returned as messages (without secrets) for the caller to report."""
    federation = FederationConfig.from_body(body)
    if federation.store.identities is None:
        return []
    from tapestry_operator.stores import ca_file_for

    problems: list[str] = []
    try:
        ca_file = ca_file_for(kube, federation.namespace, federation.store)
        provider = provider_for(kube, federation, ca_file)
        layout = policy_layout(federation)
        names = provider.names(layout)
    except Exception as e:  # the admin Secret gone, the store unreachable, ...
        return [f"cannot list the store identities of {federation.name}: {e}"]
    for name in names:
        try:
            provider.remove(layout, name)
        except StoreError as e:
            problems.append(f"cannot remove the store identity of {name}: {e}")
    return problems
