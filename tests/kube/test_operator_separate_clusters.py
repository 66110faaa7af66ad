"""Sovereignty, tested: a coordinator and two members, each on its own control plane
(its own etcd, API server, controller-manager and node agent) with its own operator
holding only its own cluster's credentials, share nothing but the object store, and
train two rounds.

The coordinator's cluster holds the Federation (the members' public keys only) and the
rounds; each member's cluster holds its Participant (the coordinator's public key only),
its signing key and its data. Afterwards every object of every cluster, every object in
the store, and each operator's environment, command line, open files and connections are
searched for another party's CA, certificates, keys, kubeconfig, ServiceAccount tokens,
API server address and private signing key: none is found.

The manifests are examples/multi-cluster/ (coordinator/ and participant/), with real
public keys and the test store's endpoint; docs/multi-cluster.md runs the same by hand.
"""

from __future__ import annotations

import base64
import os
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tapestry_protocol.exchange import COORDINATOR, read_model, read_plan, read_result
from tapestry_protocol.layout import Layout
from tapestry_protocol.signing import SigningKey
from tapestry_protocol.store import ObjectStore, open_store
from tapestry_trainer.data import prepare_shards
from tests.e2e.texts import write_corpora
from tests.kube.client import KubeClient, Obj
from tests.kube.cluster import ClusterError, KubeCluster, ensure_binaries
from tests.kube.multicluster import (
    COORDINATOR_EXAMPLE,
    PARTICIPANT_EXAMPLE,
    ClusterIdentity,
    ClusterSet,
    Haystack,
    IsolatedOperator,
    ProcessView,
    Secret,
    cluster_objects,
    listable_resources,
    load_docs,
    render_coordinator,
    render_participant,
    store_objects,
)
from tests.kube.tapestry_env import (
    API,
    COORDINATOR_SECRET,
    SIGNING_SECRET,
    data_volume,
    install_crds,
    kubectl,
    secret,
    signing_secret,
    store_secret,
    verdict_seen,
    wait_for,
)
from tests.s3servers import S3Server

pytestmark = [pytest.mark.kube, pytest.mark.s3, pytest.mark.torch, pytest.mark.slow]

MEMBERS = ("de", "es")
PARTIES = (COORDINATOR, *MEMBERS)
CORPORA = {"de": ["json", "csv", "argparse"], "es": ["asyncio", "collections", "itertools"]}
FAST = {"innerSteps": 6, "batchSize": 4, "seqLen": 32, "warmupSteps": 1}
NAMESPACE = "tapestry"  # the same name in every cluster: nothing is shared to collide
FEDERATION = "demo"


@dataclass
class Party:
    name: str
    cluster: KubeCluster
    client: KubeClient
    operator: IsolatedOperator
    signing_key: SigningKey  # made by this party; only its public half leaves it

    @property
    def role(self) -> str:
        return "coordinator" if self.name == COORDINATOR else "participant"


@dataclass
class Consortium:
    parties: dict[str, Party]
    store: ObjectStore
    minio: S3Server

    @property
    def coordinator(self) -> Party:
        return self.parties[COORDINATOR]

    @property
    def coordinator_public_key(self) -> str:
        return self.coordinator.signing_key.public_key_text

    def diagnose(self) -> str:
        out = []
        for party in self.parties.values():
            out.append(f"== {party.name}: operator log tail\n{party.operator.tail(40)}")
            cache = f"--cache-dir={party.operator.home.parent / (party.name + '-kubectl-cache')}"
            for what in ("jobs,pods,federations,federationrounds,participants", "events"):
                try:
                    out.append(kubectl(party.cluster.kubeconfig, cache, "-n", NAMESPACE, "get",
                                       what))  # fmt: skip
                except AssertionError as e:
                    out.append(str(e))
        return "\n".join(out)

    def wait_round(self, name: str, phase: str, timeout: float = 300) -> Obj:
        """Wait until the round is `phase`; fail at once if it ends otherwise."""
        path = f"/apis/{API}/namespaces/{NAMESPACE}/federationrounds/{name}"
        ended = {phase, "Succeeded", "Failed"}
        body = wait_for(
            self.coordinator.client, path,
            lambda o: o.get("status", {}).get("phase") in ended,
            timeout, f"FederationRound {name} to be {phase}", self.diagnose,
        )  # fmt: skip
        if body["status"]["phase"] != phase:
            raise AssertionError(f"round {name} ended {body['status']}\n{self.diagnose()}")
        return body


@pytest.fixture(scope="module")
def consortium(
    minio_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Consortium]:
    if os.environ.get("TAPESTRY_SKIP_KUBE") == "1":
        pytest.skip("TAPESTRY_SKIP_KUBE=1: the Kubernetes control plane tests were switched off")
    try:
        bin_dir = ensure_binaries()
    except ClusterError as err:
        pytest.fail(f"cannot build the Kubernetes binaries: {err}", pytrace=False)
    root = tmp_path_factory.mktemp("separate-clusters")
    bucket = f"multi-{uuid.uuid4().hex[:8]}"
    store = open_store(minio_server.url_for(bucket), create=True)
    endpoint = minio_server.endpoint
    keys = {name: SigningKey.generate(name) for name in PARTIES}
    # What crosses between parties: the public key texts (through the consortium's Git).
    member_public = {m: keys[m].public_key_text for m in MEMBERS}
    coordinator_public = keys[COORDINATOR].public_key_text
    corpora = write_corpora(root / "corpora", CORPORA)
    clusters = ClusterSet(bin_dir, PARTIES)
    with ExitStack() as stack:
        stack.callback(clusters.stop)  # every cluster, also when anything below fails
        started = time.monotonic()
        try:
            clusters.start()
        except ClusterError as err:
            pytest.fail(f"cannot start the parties' clusters: {err}", pytrace=False)
        print(f"\n{len(PARTIES)} control planes up in {time.monotonic() - started:.1f}s")
        parties: dict[str, Party] = {}
        manifests: dict[str, list[Obj]] = {}
        for name in PARTIES:
            cluster = clusters.clusters[name]
            client = cluster.client()
            install_crds(cluster.kubeconfig)
            if name == COORDINATOR:
                docs = render_coordinator(
                    load_docs(COORDINATOR_EXAMPLE), member_public, endpoint=endpoint,
                    bucket=bucket, round_defaults=FAST,
                )  # fmt: skip
                own = [signing_secret(NAMESPACE, COORDINATOR_SECRET, keys[name])]
            else:
                docs = render_participant(
                    load_docs(PARTICIPANT_EXAMPLE), name, coordinator_public,
                    endpoint=endpoint, bucket=bucket, poll_interval="2s",
                )  # fmt: skip
                shards = root / "data" / name
                prepare_shards([corpora / name], shards, val_fraction=0.1)
                own = [signing_secret(NAMESPACE, SIGNING_SECRET, keys[name]),
                       *data_volume(NAMESPACE, shards)]  # fmt: skip
            for doc in docs:
                if doc["kind"] == "Namespace":
                    client.apply(doc)
            for obj in [store_secret(NAMESPACE, minio_server), *own]:
                client.apply(obj)
            operator = IsolatedOperator(
                cluster.kubeconfig, root / f"{name}-operator.log",
                role="coordinator" if name == COORDINATOR else "participant",
                namespaces=[NAMESPACE], home=root / f"{name}-operator-home",
            )  # fmt: skip
            stack.callback(operator.stop)
            operator.start()
            parties[name] = Party(name, cluster, client, operator, keys[name])
            manifests[name] = [d for d in docs if d["kind"] != "Namespace"]
        for name, docs in manifests.items():
            for doc in docs:
                parties[name].client.apply(doc)
        yield Consortium(parties, store, minio_server)


def _jobs(party: Party) -> list[Obj]:
    items: list[Obj] = party.client.get(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs")["items"]
    return items


def test_two_rounds_across_separate_clusters(consortium: Consortium) -> None:
    c = consortium
    started = time.monotonic()
    done = c.wait_round("demo-round-0", "Succeeded")
    status = done["status"]
    assert status["progress"] == f"{len(MEMBERS)}/{len(MEMBERS)}"
    assert {m["name"]: m["state"] for m in status["members"]} == dict.fromkeys(MEMBERS, "Merged")
    assert {x["type"]: x["status"] for x in status["conditions"]} == {
        "Ready": "True", "Reconciling": "False", "Stalled": "False",
    }  # fmt: skip
    layout = Layout(FEDERATION)
    key = c.coordinator_public_key
    result = read_result(c.store, layout, 0, key).document
    assert result.next_base is not None
    assert status["result"]["nextBase"]["sha256"] == result.next_base.sha256
    assert read_model(c.store, layout, result.next_base.manifest, key).sha256 == (
        result.next_base.sha256
    )
    print(f"round 0 succeeded after {time.monotonic() - started:.1f}s")

    # Each member's own operator recorded the verdict on its update, in its own cluster.
    for member in MEMBERS:
        party = c.parties[member]
        path = f"/apis/{API}/namespaces/{NAMESPACE}/participants/{member}"
        body = wait_for(party.client, path, verdict_seen(0), 120,
                        f"Participant {member} to see round 0's result", c.diagnose)  # fmt: skip
        rounds = {r["round"]: r for r in body["status"].get("rounds", [])}
        assert rounds[0]["state"] == "Merged" and rounds[0]["weight"] > 0, body["status"]
    # The work ran where it belongs: training in each member's cluster, only its own;
    # the bootstrap and the merge in the coordinator's.
    component = "app.kubernetes.io/component"
    coordinator_jobs = {j["metadata"]["labels"][component] for j in _jobs(c.coordinator)}
    assert coordinator_jobs == {"bootstrap", "aggregator"}, coordinator_jobs
    for member in MEMBERS:
        jobs = _jobs(c.parties[member])
        assert [j["metadata"]["name"] for j in jobs] == [f"{member}-r0"], jobs
        assert jobs[0]["metadata"]["labels"][component] == "trainer"

    for doc in load_docs(COORDINATOR_EXAMPLE / "next"):  # a round manifest names no party
        c.coordinator.client.apply(doc)
    c.wait_round("demo-round-1", "Succeeded")
    plan = read_plan(c.store, layout, 1, key).document
    assert plan.base.sha256 == result.next_base.sha256  # round 1 trained from round 0's base
    assert read_result(c.store, layout, 1, key).document.next_base is not None
    for member in MEMBERS:
        path = f"/apis/{API}/namespaces/{NAMESPACE}/participants/{member}"
        body = wait_for(c.parties[member].client, path, verdict_seen(1), 120,
                        f"Participant {member} to see round 1's result", c.diagnose)  # fmt: skip
        assert {r["round"]: r["state"] for r in body["status"]["rounds"]} == {
            0: "Merged", 1: "Merged",
        }, body["status"]  # fmt: skip
    print(f"two rounds succeeded after {time.monotonic() - started:.1f}s")


def test_no_party_holds_another_partys_credentials(consortium: Consortium) -> None:
    c = consortium
    identities = {n: ClusterIdentity.of(n, p.cluster) for n, p in c.parties.items()}
    private = {n: Secret.of_signing_key(n, p.signing_key) for n, p in c.parties.items()}
    violations: list[str] = []

    # The detectors detect: a token and the admin certificate of each cluster are
    # recognised as that cluster's and no other's.
    for name, party in c.parties.items():
        token = party.client.create(
            f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/default/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}},
        )["status"]["token"]
        admin = Haystack("admin.crt", (party.cluster.control_plane.admin.cert).read_bytes())
        assert admin.certificates()
        for other, ident in identities.items():
            assert ident.signed_token(token) == (other == name), (name, other)
            assert ident.issued(admin.certificates()[0]) == (other == name), (name, other)

    # Every object of every kind, in every namespace of every cluster.
    for name, party in c.parties.items():
        kinds = listable_resources(party.client)
        assert {"/api/v1/secrets", "/api/v1/configmaps"} <= set(kinds)
        own_ca_seen = own_key_seen = False
        scanned = 0
        for hay in cluster_objects(party.client):
            scanned += 1
            own_ca_seen |= identities[name].ca_secret.found_in(hay)
            own_key_seen |= private[name].found_in(hay)
            violations += _foreign(name, hay, identities, private)
        assert scanned > 100, f"{name}: only {scanned} objects listed"
        assert own_ca_seen, f"{name}: its own CA is not even in kube-root-ca.crt"
        assert own_key_seen, f"{name}: its own signing key Secret was not found"

    # The one shared channel carries none of it either.
    stored = 0
    for hay in store_objects(c.store):
        stored += 1
        violations += _foreign("store", hay, identities, private)
    assert stored > 10, stored

    # Each operator sees its own cluster only: environment, command line, working
    # directory, open files, and the connections it holds.
    minio = urllib.parse.urlsplit(c.minio.endpoint)
    for name, party in c.parties.items():
        view = ProcessView.of(party.operator.pid)
        home = party.operator.home
        assert view.environ.get("KUBECONFIG") == str(party.cluster.kubeconfig), view.environ
        assert not [k for k in view.environ if k.startswith("KUBERNETES_")], view.environ
        assert view.cwd == str(home) and not (home / ".kube").exists()
        assert view.environ["HOME"] == str(home)
        assert not [a for a in view.cmdline if "kubeconfig" in a.lower()], view.cmdline
        assert view.cmdline[view.cmdline.index("--role") + 1] == party.role, view.cmdline
        facts = "\n".join([*view.cmdline, *(f"{k}={v}" for k, v in view.environ.items()),
                           view.cwd, *view.open_files])  # fmt: skip
        violations += _foreign(name, Haystack(f"operator {view.pid}", facts.encode()),
                               identities, private, of_process=True)  # fmt: skip
        api = urllib.parse.urlsplit(party.cluster.server)
        allowed = {("127.0.0.1", api.port), (minio.hostname, minio.port)}
        assert view.remote_endpoints, f"{name}: the operator holds no connection at all"
        assert view.remote_endpoints <= allowed, (name, view.remote_endpoints, allowed)
        assert ("127.0.0.1", api.port) in view.remote_endpoints, (name, view.remote_endpoints)

    assert not violations, "\n".join(violations)


def _foreign(
    holder: str,
    hay: Haystack,
    identities: dict[str, ClusterIdentity],
    private: dict[str, Secret],
    of_process: bool = False,
) -> list[str]:
    """What `hay`, held by `holder`, has of any other party's: its cluster's credentials,
    certificates its CA issued, tokens its ServiceAccount key signed, its private key."""
    found = []
    for owner, ident in identities.items():
        if owner == holder:
            continue
        found += [f"{holder}: {hay.where} holds {s.what}" for s in ident.secrets
                  if s.found_in(hay)]  # fmt: skip
        if not of_process:
            found += [f"{holder}: {hay.where} holds a certificate issued by {owner}'s CA"
                      for cert in hay.certificates() if ident.issued(cert)]  # fmt: skip
            found += [f"{holder}: {hay.where} holds a ServiceAccount token of {owner}"
                      for token in hay.tokens() if ident.signed_token(token)]  # fmt: skip
    for owner, key in private.items():
        if owner != holder and key.found_in(hay):
            found.append(f"{holder}: {hay.where} holds {key.what}")
    return found


def test_parties_share_no_control_plane(consortium: Consortium) -> None:
    """Separate in fact, not only in name: different API servers, CAs and etcd data."""
    servers = {p.cluster.server for p in consortium.parties.values()}
    work_dirs = {p.cluster.work_dir for p in consortium.parties.values()}
    cas = {
        Path(p.cluster.control_plane.pki.pair.cert).read_bytes()
        for p in consortium.parties.values()
    }
    assert len(servers) == len(work_dirs) == len(cas) == len(PARTIES)
    for name, party in consortium.parties.items():
        kinds = {
            plural: len(party.client.get(f"/apis/{API}/{plural}")["items"])
            for plural in ("federations", "federationrounds", "participants")
        }
        if name == COORDINATOR:
            assert kinds["federations"] == 1 and kinds["federationrounds"] >= 1, kinds
            assert kinds["participants"] == 0, kinds
        else:
            assert kinds == {"federations": 0, "federationrounds": 0, "participants": 1}, kinds


def test_the_scan_finds_a_planted_leak(consortium: Consortium) -> None:
    """The negative control: the coordinator's credentials planted in a member's cluster
    the way a careless administrator would (a kubeconfig with embedded certificates in a
    Secret, a token and the CA bundle in a ConfigMap, the signing key in a Secret) are
    every one reported by the same scan."""
    c = consortium
    holder, victim = c.parties[MEMBERS[0]], c.coordinator
    pki = victim.cluster.control_plane.pki.dir
    b64 = {n: base64.b64encode((pki / n).read_bytes()).decode() for n in
           ("ca.crt", "admin.crt", "admin.key")}  # fmt: skip
    embedded = {
        "apiVersion": "v1", "kind": "Config", "current-context": "stolen",
        "clusters": [{"name": "stolen", "cluster": {
            "server": victim.cluster.server, "certificate-authority-data": b64["ca.crt"]}}],
        "users": [{"name": "stolen", "user": {
            "client-certificate-data": b64["admin.crt"], "client-key-data": b64["admin.key"]}}],
        "contexts": [{"name": "stolen", "context": {"cluster": "stolen", "user": "stolen"}}],
    }  # fmt: skip
    token = victim.client.create(
        f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/default/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}},
    )["status"]["token"]
    ns = "leak-control"
    planted: list[Obj] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
        secret(ns, "kubeconfig", {"config": yaml.safe_dump(embedded).encode()}),
        secret(ns, "stolen-key", {"signing.key": victim.signing_key.private_pem()}),
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "notes", "namespace": ns},
         "data": {"token": token, "ca.crt": (pki / "ca.crt").read_text()}},
    ]  # fmt: skip
    identities = {n: ClusterIdentity.of(n, p.cluster) for n, p in c.parties.items()}
    private = {n: Secret.of_signing_key(n, p.signing_key) for n, p in c.parties.items()}
    for obj in planted:
        holder.client.apply(obj)
    try:
        found: list[str] = []
        for hay in cluster_objects(holder.client):
            if f" {ns}/" in hay.where:
                found += _foreign(holder.name, hay, identities, private)
    finally:
        holder.client.delete(f"/api/v1/namespaces/{ns}")
    report = "\n".join(found)
    for what in (
        "ca.crt of coordinator",
        "admin.crt of coordinator",
        "admin.key of coordinator",
        "coordinator's API server address",
        "a certificate issued by coordinator's CA",
        "a ServiceAccount token of coordinator",
        "private signing key of coordinator",
    ):
        assert what in report, f"the scan missed {what}:\n{report}"  # fmt: skip
    assert all(f"{ns}/" in line for line in found), report
