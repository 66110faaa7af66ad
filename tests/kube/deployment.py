"""The single-cluster example deployed on the test cluster, as the end-to-end tests use it.

`deploy` applies the example (coordinator and one restricted namespace per member) with
real keys, Secrets, data volumes and MinIO, starts the operator as its own process,
watching only the deployment's namespaces, and yields a `Deployment` with the waits and
looks the tests need. `Setup` says what a test varies: which members get an empty data
directory, which have no Participant at all, extra members, per-member Participant spec
overrides, round 0's spec, the Federation's round defaults.

A test module takes the `deployment` fixture as `deployment = shared.deployment` (after
`from tests.kube import deployment as shared`); `@pytest.mark.parametrize("deployment",
[Setup(...)], indirect=True)` chooses the setup.
Each deployment has its own bucket and namespace suffix, so tests share nothing but the
cluster.
"""

from __future__ import annotations

import base64
import contextlib
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tapestry_protocol.layout import Layout
from tapestry_protocol.store import ObjectStore, open_store
from tapestry_trainer.data import prepare_shards
from tests.e2e.texts import write_corpora
from tests.kube.client import ApiError, KubeClient, Obj
from tests.kube.cluster import KubeCluster
from tests.kube.tapestry_env import (
    API,
    COORDINATOR_SECRET,
    EXAMPLE,
    SIGNING_SECRET,
    STORE_SECRET,
    Keys,
    OperatorProcess,
    data_volume,
    install_crds,
    kubectl,
    load_yaml,
    render_example,
    secret,
    signing_secret,
    store_secret,
    wait_for,
)
from tests.s3servers import S3Server

FEDERATION = "demo"
MEMBERS = ("de", "es", "it")
CORPORA = {
    "de": ["json", "csv", "argparse"],
    "es": ["asyncio", "collections", "itertools"],
    "it": ["logging", "pathlib", "functools"],
    "fr": ["dataclasses", "textwrap", "string"],
    "pt": ["contextlib", "heapq", "bisect"],
}
FAST = {"innerSteps": 6, "batchSize": 4, "seqLen": 32, "warmupSteps": 1}
ROUND_TIMEOUT_S = 420.0


@dataclass(frozen=True)
class Setup:
    """What a deployment changes in the example. Defaults: the example as it is, with
    the fast round defaults, every member with valid data and a Participant."""

    bucket: str = "single"
    extra_members: tuple[str, ...] = ()  # more members, made like the example's `de`
    no_data: frozenset[str] = frozenset()  # their data PVC is an empty directory
    absent: frozenset[str] = frozenset()  # members without a Participant: nobody trains
    participants: Mapping[str, Obj] = field(default_factory=dict)  # member -> spec patch
    round: Obj = field(default_factory=dict)  # demo-round-0's spec patch
    round_defaults: Obj = field(default_factory=dict)  # on top of FAST
    apply_round: bool = True  # apply demo-round-0 with the rest
    # Called with the store and the keys before anything is applied; returns a patch of
    # the Federation's spec (e.g. an initialBase the test published).
    prepare: Callable[[ObjectStore, Keys], Obj] | None = None
    isolated: bool = True  # suffix namespaces and bucket, so tests share nothing
    fast: bool = True  # FAST round defaults instead of the example's
    operator_env: Mapping[str, str] = field(default_factory=dict)  # e.g. OTEL_* settings
    start_operator: bool = True  # False: the test runs the operator itself (the chart's)
    # False: members get no store Secret; the test hands each its own (store identities)
    member_store_secrets: bool = True

    @property
    def members(self) -> tuple[str, ...]:
        return (*MEMBERS, *self.extra_members)


def merge(base: Obj, patch: Mapping[str, Any]) -> Obj:
    """`patch` merged into a copy of `base`, recursively for mappings (a JSON merge patch
    without deletions)."""
    out = dict(base)
    for k, v in patch.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _example_docs(setup: Setup) -> list[Obj]:
    """The example's manifests, with the extra members cloned from `de`."""
    docs = load_yaml(sorted(EXAMPLE.glob("*.yaml")))
    extra: list[Obj] = []
    for member in setup.extra_members:
        for doc in docs:
            name = doc["metadata"]["name"]
            if doc["kind"] == "Namespace" and name == "tapestry-de":
                extra.append(merge(doc, {"metadata": {"name": f"tapestry-{member}"}}))
            if doc["kind"] == "Participant" and name == "de":
                meta = {"name": member, "namespace": f"tapestry-{member}"}
                extra.append(merge(doc, {"metadata": meta}))
            if doc["kind"] == "Federation":
                doc["spec"]["members"].append(
                    {"name": member, "publicKey": doc["spec"]["members"][0]["publicKey"]}
                )
    return docs + extra


@dataclass
class Deployment:
    client: KubeClient
    kubeconfig: Path
    keys: Keys
    store: ObjectStore
    coordinator_ns: str
    suffix: str
    operator: OperatorProcess
    setup: Setup
    docs: list[Obj]

    @property
    def members(self) -> tuple[str, ...]:
        return self.setup.members

    @property
    def layout(self) -> Layout:
        return Layout(FEDERATION)

    @property
    def coordinator_key(self) -> str:
        return self.keys.coordinator.public_key_text

    def ns(self, member: str) -> str:
        return f"tapestry-{member}{self.suffix}"

    def round_path(self, name: str) -> str:
        return f"/apis/{API}/namespaces/{self.coordinator_ns}/federationrounds/{name}"

    def participant_path(self, member: str) -> str:
        return f"/apis/{API}/namespaces/{self.ns(member)}/participants/{member}"

    def job(self, namespace: str, name: str) -> Obj | None:
        try:
            return self.client.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def events(self, namespace: str, name: str) -> list[tuple[str, str, str]]:
        """(type, reason, message) of the events about object `name`, oldest first."""
        listed = self.client.get(
            f"/api/v1/namespaces/{namespace}/events",
            fieldSelector=f"involvedObject.name={name}",
        )
        items = sorted(listed.get("items", []), key=lambda e: e["metadata"]["creationTimestamp"])
        return [(e.get("type", ""), e.get("reason", ""), e.get("message", "")) for e in items]

    def namespaces(self) -> list[str]:
        return [self.coordinator_ns, *(self.ns(m) for m in self.members)]

    def diagnose(self) -> str:
        out = [f"operator log tail:\n{self.operator.tail(60)}"]
        for ns in self.namespaces():
            try:
                out.append(kubectl(self.kubeconfig, "-n", ns, "get", "jobs,pods,tapestry"))
            except AssertionError as e:
                out.append(str(e))
        return "\n".join(out)

    def wait(
        self, path: str, done: Callable[[Obj], bool], what: str, timeout: float = ROUND_TIMEOUT_S
    ) -> Obj:
        """Poll `path` until `done`; on timeout fail with the operator's log tail and
        `kubectl get` of every namespace."""
        return wait_for(self.client, path, done, timeout, what, self.diagnose)

    def wait_round(self, name: str, phase: str, timeout: float = ROUND_TIMEOUT_S) -> Obj:
        return self.wait(
            self.round_path(name),
            lambda o: o.get("status", {}).get("phase") == phase,
            f"FederationRound {name} to be {phase}",
            timeout,
        )

    def wait_participant(
        self, member: str, done: Callable[[Obj], bool], what: str, timeout: float = ROUND_TIMEOUT_S
    ) -> Obj:
        return self.wait(
            self.participant_path(member), done, f"Participant {member} {what}", timeout
        )

    def round_doc(self, name: str, number: int, spec: Mapping[str, Any] | None = None) -> Obj:
        return {
            "apiVersion": API,
            "kind": "FederationRound",
            "metadata": {"name": name, "namespace": self.coordinator_ns},
            "spec": {"federation": FEDERATION, "round": number, **(spec or {})},
        }

    def apply_round(self, name: str, number: int, spec: Mapping[str, Any] | None = None) -> Obj:
        return self.client.apply(self.round_doc(name, number, spec))

    def participant_doc(self, member: str) -> Obj:
        for doc in self.docs:
            if doc["kind"] == "Participant" and doc["metadata"]["name"] == member:
                return doc
        raise KeyError(member)

    def change_participant(self, member: str, spec: Mapping[str, Any]) -> Obj:
        """Apply the member's Participant again with `spec` merged in: what a commit to
        the member's own repository does through GitOps."""
        old = self.participant_doc(member)
        doc = merge(old, {"spec": spec})
        self.docs = [doc if d is old else d for d in self.docs]
        return self.client.apply(doc)


@contextlib.contextmanager
def deploy(
    cluster: KubeCluster, minio: S3Server, tmp_path: Path, setup: Setup | None = None
) -> Iterator[Deployment]:
    """The example on `cluster`, per `setup`; the operator stops and the namespaces go
    (unless TAPESTRY_KUBE_KEEP=1) when the block ends."""
    setup = setup or Setup()
    client = cluster.client()
    suffix = f"-{uuid.uuid4().hex[:6]}" if setup.isolated else ""
    store = open_store(minio.url_for(f"{setup.bucket}{suffix}"), create=True)
    keys = Keys.generate(setup.members)
    install_crds(cluster.kubeconfig)
    defaults = {**(FAST if setup.fast else {}), **setup.round_defaults}
    docs = render_example(
        _example_docs(setup), keys, minio.endpoint, bucket=f"{setup.bucket}{suffix}",
        suffix=suffix, overrides=defaults,
    )  # fmt: skip
    federation = setup.prepare(store, keys) if setup.prepare else {}
    for i, doc in enumerate(docs):
        name = doc["metadata"]["name"]
        if doc["kind"] == "Federation" and federation:
            docs[i] = merge(doc, {"spec": federation})
        if doc["kind"] == "Participant" and name in setup.participants:
            docs[i] = merge(doc, {"spec": setup.participants[name]})
        if doc["kind"] == "FederationRound" and setup.round:
            docs[i] = merge(doc, {"spec": setup.round})
    namespaces = [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"]
    for doc in docs:
        if doc["kind"] == "Namespace":
            client.apply(doc)
    coordinator_ns = f"tapestry-coordinator{suffix}"
    corpora = write_corpora(tmp_path / "corpora", {m: CORPORA[m] for m in setup.members})
    client.apply(store_secret(coordinator_ns, minio))
    client.apply(signing_secret(coordinator_ns, COORDINATOR_SECRET, keys.coordinator))
    for member in setup.members:
        ns = f"tapestry-{member}{suffix}"
        data = tmp_path / "data" / member
        if member in setup.no_data:
            data.mkdir(parents=True)
        else:
            prepare_shards([corpora / member], data, val_fraction=0.1)
        if setup.member_store_secrets:
            client.apply(store_secret(ns, minio))
        client.apply(signing_secret(ns, SIGNING_SECRET, keys.members[member]))
        for obj in data_volume(ns, data):
            client.apply(obj)
    operator = OperatorProcess(
        cluster.kubeconfig, tmp_path / "operator.log", namespaces=namespaces,
        env=dict(setup.operator_env),
    )  # fmt: skip
    if setup.start_operator:
        operator.start()
    try:
        for doc in docs:
            kind, name = doc["kind"], doc["metadata"]["name"]
            if kind == "Namespace" or (kind == "Participant" and name in setup.absent):
                continue
            if kind == "FederationRound" and not setup.apply_round:
                continue
            client.apply(doc)
        yield Deployment(
            client, cluster.kubeconfig, keys, store, coordinator_ns, suffix, operator, setup, docs
        )
    finally:
        operator.stop()
        if os.environ.get("TAPESTRY_KUBE_KEEP") != "1":
            for ns in namespaces:  # its pods stop; nothing of it is left running
                with contextlib.suppress(ApiError):
                    client.delete(f"/api/v1/namespaces/{ns}")


@pytest.fixture
def deployment(
    kube_cluster: KubeCluster,
    minio_server: S3Server,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Deployment]:
    """The example deployed per the test's `Setup` (indirect parametrisation), or as is."""
    setup = getattr(request, "param", None)
    with deploy(kube_cluster, minio_server, tmp_path, setup) as d:
        yield d


# spec.store.identities with the test MinIO's root credentials as the admin's.
STORE_IDENTITIES = {"store": {"identities": {"adminSecret": {"name": STORE_SECRET}}}}


def with_store_identities(bucket: str = "identities") -> Setup:
    """The example with store identities on and no member given a store Secret: each
    gets the one the coordinator issues it (`hand_over_store_keys`); round 0 is applied
    by the test."""
    return Setup(bucket=bucket, member_store_secrets=False, apply_round=False,
                 prepare=lambda store, keys: STORE_IDENTITIES)  # fmt: skip


def issued_store_key(d: Deployment, party: str) -> tuple[str, str]:
    """The access key and secret key of the Secret the operator issued `party`."""
    obj = d.client.get(f"/api/v1/namespaces/{d.coordinator_ns}/secrets/demo-store-{party}")
    data = obj["data"]
    return (base64.b64decode(data["accessKey"]).decode(),
            base64.b64decode(data["secretKey"]).decode())  # fmt: skip


def hand_over_store_keys(d: Deployment, timeout: float = 90.0) -> dict[str, tuple[str, str]]:
    """Wait for every member's issued Secret and put each into that member's namespace as
    its Participant's credentialsSecret, as the member's own administrator would; the
    keys by party (the coordinator's too)."""
    parties = ("coordinator", *d.members)

    def ready(obj: Obj) -> bool:
        rows = {r["name"]: r for r in obj.get("status", {}).get("storeIdentities", [])}
        return set(rows) == set(parties) and all(r["state"] == "Ready" for r in rows.values())

    path = f"/apis/{API}/namespaces/{d.coordinator_ns}/federations/{FEDERATION}"
    d.wait(path, ready, "every party's store identity to be Ready", timeout)
    keys = {party: issued_store_key(d, party) for party in parties}
    for member in d.members:
        access, secret_key = keys[member]
        d.client.apply(secret(d.ns(member), STORE_SECRET, {
            "accessKey": access.encode(), "secretKey": secret_key.encode()}))  # fmt: skip
    return keys


def dump(obj: Obj) -> str:
    """An object as YAML, for assertion messages."""
    return yaml.safe_dump(obj, sort_keys=False)
