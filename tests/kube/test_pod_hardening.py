"""The pods the operator creates, hardened, and nothing secret anywhere after a round.

A round with store identities on (each member holding only its own scoped key, the
coordinator's pods the coordinator's): the training, aggregator and bootstrap pods, as
the API server admitted them, run with the restricted security context, mount no
ServiceAccount token and get no Secret through their environment. Afterwards the
operator's log, every container's log (kept by the node agent, read through the API
server like `kubectl logs`), every Event of the cluster, and the Jobs, Pods,
Federation, FederationRounds and Participants (specs and statuses) are searched for
every store secret key and every private signing key the test used: none is found.
The pure builder checks are tests/operator/test_builders.py.
"""

from __future__ import annotations

import pytest
import yaml

from tests.kube import deployment as shared
from tests.kube.client import Obj
from tests.kube.deployment import Deployment, hand_over_store_keys, with_store_identities
from tests.kube.multicluster import Haystack, Secret
from tests.kube.tapestry_env import API, kubectl
from tests.s3servers import S3Server

deployment = shared.deployment
pytestmark = [pytest.mark.kube, pytest.mark.s3, pytest.mark.torch, pytest.mark.slow]

COMPONENTS = ("trainer", "aggregator", "bootstrap")
RESOURCES = ("federations", "federationrounds", "participants")


def _secrets(
    d: Deployment, minio: S3Server, store_keys: dict[str, tuple[str, str]]
) -> list[Secret]:
    """Everything that must not leak: the store's admin secret, each issued secret key,
    and every party's private signing key, in every form it could be copied in."""
    found = [Secret.of_text("store", "the store's admin secret key", minio.secret_key)]
    found += [Secret.of_text(party, f"{party}'s store secret key", secret_key)
              for party, (_, secret_key) in store_keys.items()]  # fmt: skip
    found.append(Secret.of_signing_key("coordinator", d.keys.coordinator))
    found += [Secret.of_signing_key(m, k) for m, k in d.keys.members.items()]
    return found


def _leaks(hay: Haystack, secrets: list[Secret]) -> list[str]:
    return [f"{hay.where} holds {s.what}" for s in secrets if s.found_in(hay)]


def _pods(d: Deployment) -> list[Obj]:
    pods: list[Obj] = []
    for ns in d.namespaces():
        pods += d.client.get(f"/api/v1/namespaces/{ns}/pods")["items"]
    return pods


def _assert_hardened(pod: Obj) -> None:
    name = pod["metadata"]["name"]
    spec = pod["spec"]
    assert spec.get("automountServiceAccountToken") is False, name
    volumes = spec.get("volumes", [])
    assert not [v for v in volumes if "projected" in v], (name, volumes)  # no token volume
    assert spec["securityContext"]["runAsNonRoot"] is True, name
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
    secret_volumes = {v["name"] for v in volumes if "secret" in v}
    for c in spec.get("initContainers", []) + spec["containers"]:
        security = c["securityContext"]
        assert security["runAsNonRoot"] is True, name
        assert security["allowPrivilegeEscalation"] is False, name
        assert security["capabilities"] == {"drop": ["ALL"]}, name
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not security.get("privileged"), name
        assert "envFrom" not in c, name
        for env in c.get("env", []):
            source = env.get("valueFrom", {})
            assert "secretKeyRef" not in source and "configMapKeyRef" not in source, (name, env)
        mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
        assert secret_volumes <= set(mounts), (name, secret_volumes)
        assert all(mounts[v].get("readOnly") is True for v in secret_volumes), name
        assert not [m for m in mounts if m.startswith("kube-api-access")], name


@pytest.mark.parametrize("deployment", [with_store_identities("hardening")], indirect=True)
def test_pods_are_hardened_and_nothing_secret_leaks(
    deployment: Deployment, minio_server: S3Server
) -> None:
    d = deployment
    store_keys = hand_over_store_keys(d)
    d.client.apply(next(x for x in d.docs if x["kind"] == "FederationRound"))
    d.wait_round("demo-round-0", "Succeeded")

    pods = _pods(d)
    by_component: dict[str, int] = {}
    for pod in pods:
        component = pod["metadata"].get("labels", {}).get("app.kubernetes.io/component", "")
        if component in COMPONENTS:
            by_component[component] = by_component.get(component, 0) + 1
            _assert_hardened(pod)
    assert set(by_component) == set(COMPONENTS), by_component
    assert by_component["trainer"] >= len(d.members), by_component

    secrets = _secrets(d, minio_server, store_keys)
    hay: list[Haystack] = []
    operator_log = d.operator.log.read_bytes()
    assert operator_log.strip(), "the operator's log is empty"
    hay.append(Haystack("the operator's log", operator_log))
    logged: dict[str, int] = {}
    for pod in pods:
        meta = pod["metadata"]
        for c in pod["spec"]["containers"]:
            text = d.client.request_raw(
                "GET", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/log",
                params={"container": c["name"]},
            )  # fmt: skip
            component = meta.get("labels", {}).get("app.kubernetes.io/component", "")
            logged[component] = logged.get(component, 0) + len(text)
            hay.append(Haystack(f"log of {meta['namespace']}/{meta['name']}/{c['name']}", text))
    for component in COMPONENTS:  # the logs were collected, not merely looked for
        assert logged.get(component, 0) > 0, logged
    events = kubectl(d.kubeconfig, "get", "events", "-A", "-o", "yaml")
    listed_events = yaml.safe_load(events)["items"]
    assert listed_events, "no Events at all"
    hay.append(Haystack("kubectl get events -A -o yaml", events.encode()))
    for event in listed_events:  # decoded too, so base64 text in a message is found
        hay.append(Haystack.of_object(f"event {event['metadata']['name']}", event))
    for ns in d.namespaces():
        for plural in ("jobs", "pods"):
            group = "/apis/batch/v1" if plural == "jobs" else "/api/v1"
            for obj in d.client.get(f"{group}/namespaces/{ns}/{plural}")["items"]:
                hay.append(Haystack.of_object(f"{plural} {ns}/{obj['metadata']['name']}", obj))
        for plural in RESOURCES:
            for obj in d.client.get(f"/apis/{API}/namespaces/{ns}/{plural}")["items"]:
                hay.append(Haystack.of_object(f"{plural} {ns}/{obj['metadata']['name']}", obj))
    kinds = {h.where.split()[0] for h in hay}
    assert {"jobs", "pods", *RESOURCES} <= kinds, kinds

    leaks = [leak for h in hay for leak in _leaks(h, secrets)]
    assert not leaks, "\n".join(leaks)
    # The scan finds what it looks for: each secret planted in a log line is reported.
    for s in secrets:
        planted = Haystack("planted", b"INFO connecting with " + s.forms[0] + b" ok")
        assert _leaks(planted, [s]), s.what
