"""The Helm chart installed with the real helm on the test cluster: the operator runs as
the chart's Deployment under the chart's ServiceAccount and Roles (not as an admin) and
a full round of the single-cluster example completes, which shows the RBAC is enough.
Then each rule of the Role is removed in turn and the operator restarted, and the
operator's log shows the API server refusing exactly that verb on that resource, which
shows each rule is needed.

The cases are keyed by the rules of `tests.chart.chart.RULES` (the documented set the
chart's Roles must equal): a rule without a case here fails its test.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml

from tapestry_operator.config import HYPERPARAMETERS
from tapestry_protocol.exchange import make_plan, publish_model, publish_plan
from tapestry_protocol.layout import Layout
from tapestry_protocol.shards import DEFAULT_SHARD_BYTES, plan_shards
from tapestry_protocol.signing import SigningKey
from tapestry_trainer.baseline import initial_arrays
from tapestry_trainer.specs import ModelSpec
from tests.chart.chart import ALWAYS, CHART, RULES, Rule, rules_for
from tests.kube import deployment as shared
from tests.kube.client import ApiError, KubeClient, Obj
from tests.kube.cluster import KubeCluster
from tests.kube.deployment import FEDERATION, MEMBERS, Deployment, Setup
from tests.kube.tapestry_env import API, kubectl, signing_secret
from tests.ports import free_port
from tests.s3servers import S3Server
from tests.tools import run_helm

pytestmark = [
    pytest.mark.kube, pytest.mark.s3, pytest.mark.torch, pytest.mark.tools, pytest.mark.slow,
]  # fmt: skip

RELEASE = "tapestry"  # contains the chart's name: objects are named "tapestry"
WORKLOAD_UID = 64000  # a workloads override the training pods must carry
FORBIDDEN_TIMEOUT_S = 90.0


@dataclass
class Release:
    """The chart installed into its own namespace, watching the deployment's namespaces."""

    d: Deployment
    namespace: str
    install_output: str
    roles: dict[str, Obj] = field(default_factory=dict)  # namespace -> the chart's Role

    @property
    def client(self) -> KubeClient:
        return self.d.client

    @property
    def account(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{RELEASE}"

    @property
    def deployment_path(self) -> str:
        return f"/apis/apps/v1/namespaces/{self.namespace}/deployments/{RELEASE}"

    def pods(self) -> list[Obj]:
        listed = self.client.get(
            f"/api/v1/namespaces/{self.namespace}/pods",
            labelSelector="app.kubernetes.io/component=operator",
        )
        return [p for p in listed["items"] if not p["metadata"].get("deletionTimestamp")]

    def running_pod(self, timeout: float = 60.0) -> Obj:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = [p for p in self.pods() if p.get("status", {}).get("phase") == "Running"]
            if running:
                return running[0]
            time.sleep(0.5)
        raise AssertionError(f"no running operator pod after {timeout:.0f}s:\n{self.diagnose()}")

    def scale(self, replicas: int) -> None:
        """Scale the operator; for 0, wait until its pods are gone."""
        self.client.patch(f"{self.deployment_path}/scale", {"spec": {"replicas": replicas}})
        if replicas:
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            listed = self.client.get(
                f"/api/v1/namespaces/{self.namespace}/pods",
                labelSelector="app.kubernetes.io/component=operator",
            )
            if not listed["items"]:
                return
            time.sleep(0.5)
        raise AssertionError("the operator's pod did not go away within 60s")

    def log(self, pod: Obj) -> str:
        """The pod's log, each JSON line's message and exception, with the JSON escapes
        of the API server's messages undone (so `"jobs"` reads as it does in a terminal)."""
        raw = kubectl(self.d.kubeconfig, "-n", self.namespace, "logs", pod["metadata"]["name"])
        lines = []
        for line in raw.splitlines():
            try:
                entry = json.loads(line)
                lines.append(f"{entry.get('message', '')} {entry.get('exception', '')}")
            except (json.JSONDecodeError, AttributeError):
                lines.append(line)
        return re.sub(r'\\+"', '"', "\n".join(lines))

    def set_rules(self, rules: list[Obj]) -> None:
        for namespace in self.roles:
            path = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles/{RELEASE}"
            self.client.patch(path, {"rules": rules})

    def diagnose(self) -> str:
        out = [kubectl(self.d.kubeconfig, "-n", self.namespace, "get", "deploy,rs,pods")]
        for pod in self.pods():
            with contextlib.suppress(AssertionError):
                out.append(self.log(pod)[-6000:])
        return "\n".join(out)


def _values(d: Deployment, minio: S3Server) -> Obj:
    api_port = int(d.client.port)
    store_port = int(minio.endpoint.rsplit(":", 1)[1])
    return {
        "role": "both",
        "watchNamespaces": d.namespaces(),
        "operator": {"healthPort": free_port()},
        "metrics": {"port": free_port()},  # the test node runs pods on the host's network
        "workloads": {"podSecurityContext": {"runAsUser": WORKLOAD_UID}},
        "networkPolicy": {
            "enabled": True,
            "store": {"cidrs": ["127.0.0.0/8"], "ports": [store_port]},
            "apiServer": {"cidrs": ["127.0.0.1/32"], "ports": [api_port]},
        },
    }


@pytest.fixture(scope="module")
def release(
    kube_cluster: KubeCluster, minio_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Release]:
    """The example deployed without an operator process, then the chart installed."""
    tmp = tmp_path_factory.mktemp("chart")
    setup = Setup(bucket="chart", start_operator=False)
    with shared.deploy(kube_cluster, minio_server, tmp, setup) as d:
        namespace = f"tapestry-system{d.suffix}"
        d.client.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": namespace, "labels": {"pod-security.kubernetes.io/enforce": "restricted"},
        }})  # fmt: skip
        values = tmp / "values.yaml"
        values.write_text(yaml.safe_dump(_values(d, minio_server)))
        done = run_helm(
            "install", RELEASE, str(CHART), "--namespace", namespace, "--values", str(values),
            "--wait", "--timeout", "180s", kubeconfig=d.kubeconfig,
        )  # fmt: skip
        r = Release(d, namespace, done.stdout)
        r.roles = {
            ns: d.client.get(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles/{RELEASE}")
            for ns in d.namespaces()
        }
        try:
            yield r
        finally:
            run_helm("uninstall", RELEASE, "--namespace", namespace, "--wait",
                     kubeconfig=d.kubeconfig, check=False)  # fmt: skip
            with contextlib.suppress(ApiError):
                d.client.delete(f"/api/v1/namespaces/{namespace}")


def test_the_chart_s_operator_completes_a_round_under_its_own_service_account(
    release: Release,
) -> None:
    r, d = release, release.d
    assert f"the operator runs as both in namespace {r.namespace}" in r.install_output
    assert "kubectl apply -f examples/single-cluster/" in r.install_output  # the next command
    pod = r.running_pod()
    spec = pod["spec"]
    assert spec["serviceAccountName"] == RELEASE and spec["automountServiceAccountToken"] is True
    assert [v for v in spec["volumes"] if "projected" in v]  # its token, as below it is not
    (container,) = spec["containers"]
    assert container["command"] == ["python", "-m", "tapestry_operator"]
    assert all(e["name"] != "KUBECONFIG" for e in container.get("env", []))
    # The chart's identity is not an admin: it may not even list the Secrets it reads.
    for verb, resource in (("get", "secrets"), ("list", "secrets"), ("create", "pods")):
        allowed = _can_i(d, r.account, verb, resource, d.coordinator_ns)
        assert allowed == (verb == "get"), (verb, resource)
    assert not _can_i(d, r.account, "get", "secrets", "default")  # only watched namespaces

    done = d.wait_round("demo-round-0", "Succeeded")
    assert {m["name"]: m["state"] for m in done["status"]["members"]} == dict.fromkeys(
        MEMBERS, "Merged"
    )
    for member in MEMBERS:
        d.wait_participant(member, lambda o: o["status"].get("state") == "Merged", "merged")
        job = d.job(d.ns(member), f"{member}-r0")
        assert job is not None
        pod_context = job["spec"]["template"]["spec"]["securityContext"]
        assert pod_context["runAsUser"] == WORKLOAD_UID  # values.workloads reached the pods
    for namespace, job_name in [(d.ns(m), f"{m}-r0") for m in MEMBERS] + [
        (d.coordinator_ns, "demo-r0-aggregate"), (d.coordinator_ns, "demo-bootstrap"),
    ]:  # fmt: skip
        selector = f"batch.kubernetes.io/job-name={job_name}"
        pods = d.client.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector=selector)["items"]
        assert pods, job_name
        for p in pods:  # no ServiceAccount token in the pods the operator creates
            assert not [v for v in p["spec"]["volumes"] if "projected" in v], p["metadata"]["name"]
    log = r.log(r.running_pod())
    assert "forbidden" not in log.lower(), log[-4000:]


def _can_i(d: Deployment, user: str, verb: str, resource: str, namespace: str) -> bool:
    review = d.client.create(
        "/apis/authorization.k8s.io/v1/subjectaccessreviews",
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {"user": user, "resourceAttributes": {
                "namespace": namespace, "verb": verb, "resource": resource,
            }},
        },
    )  # fmt: skip
    return bool(review["status"].get("allowed"))


# --- one case per rule ---------------------------------------------------------------


@dataclass
class Probes:
    """Objects a case creates while the operator is down, to reach the code path that
    needs its rule; removed afterwards (finalizers first: the operator is down)."""

    r: Release
    tag: str
    created: list[str] = field(default_factory=list)  # API paths, deleted in reverse

    @property
    def d(self) -> Deployment:
        return self.r.d

    def add(self, obj: Obj) -> Obj:
        made = self.d.client.apply(obj)
        self.created.append(self.d.client.path_of(made))
        return made

    def remove(self) -> None:
        for path in reversed(self.created):
            with contextlib.suppress(ApiError):
                self.d.client.patch(path, {"metadata": {"finalizers": None}})
            self.d.client.delete(path, {"propagationPolicy": "Background"})

    def federation(self, name: str, **spec: Any) -> Obj:
        """A Federation like the example's, under another name (its own store prefix)."""
        (example,) = [doc for doc in self.d.docs if doc["kind"] == "Federation"]
        body = shared.merge(example, {"metadata": {"name": name}, "spec": spec})
        return self.add(body)

    def duplicate_round(self) -> Obj:
        """A second FederationRound for the example's round 0: the operator reads the
        Federation, lists the rounds, and reports DuplicateRound as an event."""
        return self.add(self.d.round_doc(f"{self.tag}-duplicate", 0))

    def participant(self, name: str, federation: str, **spec: Any) -> Obj:
        (example,) = [d for d in self.d.docs if d["kind"] == "Participant"
                      and d["metadata"]["name"] == "de"]  # fmt: skip
        body = shared.merge(example, {
            "metadata": {"name": name},
            "spec": {"memberName": name, "federation": federation, **spec},
        })  # fmt: skip
        return self.add(body)

    def base(self, federation: str) -> Obj:
        """Round 0's base of `federation`, published as `tapestry base publish` does."""
        model = ModelSpec.preset("tiny", seed=3)
        arrays = initial_arrays(model)
        groups = plan_shards([(n, a.nbytes) for n, a in arrays.items()], DEFAULT_SHARD_BYTES)
        base = publish_model(self.d.store, Layout(federation), 0, arrays, groups,
                             self.d.keys.coordinator, model=model.to_dict())  # fmt: skip
        return {"manifest": base.key, "sha256": base.sha256, "verified": base}

    def old_training_job(self, participant: str, round_number: int) -> None:
        """A finished round's Job and Service of `participant` (suspended: no pod runs)."""
        ns = self.d.ns("de")
        name = f"{participant}-r{round_number}"
        labels = {
            "app.kubernetes.io/name": "tapestry", "app.kubernetes.io/component": "trainer",
            "tapestry.dev/participant": participant, "tapestry.dev/round": str(round_number),
        }  # fmt: skip
        self.add(_job(ns, name, labels, suspend=True))
        self.add({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"clusterIP": "None", "selector": {"batch.kubernetes.io/job-name": name},
                     "ports": [{"name": "c10d", "port": 29400}]},
        })  # fmt: skip

    def failed_job(self, namespace: str, name: str) -> None:
        """A Job whose one pod exits 1, waited for until it has Failed."""
        self.add(_job(namespace, name, {"app.kubernetes.io/name": "tapestry"}, suspend=False))
        self.d.wait(
            f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}",
            lambda j: any(c["type"] == "Failed" and c["status"] == "True"
                          for c in j.get("status", {}).get("conditions", [])),
            f"Job {name} to fail", timeout=60,
        )  # fmt: skip


def _job(namespace: str, name: str, labels: dict[str, str], *, suspend: bool) -> Obj:
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "suspend": suspend, "backoffLimit": 0,
            "template": {"metadata": {"labels": labels}, "spec": {
                "restartPolicy": "Never", "automountServiceAccountToken": False,
                "securityContext": {"runAsNonRoot": True, "runAsUser": 65532,
                                    "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{"name": "fail", "image": "none", "command": ["false"],
                                "securityContext": {"allowPrivilegeEscalation": False,
                                                    "capabilities": {"drop": ["ALL"]}}}],
            }},
        },
    }  # fmt: skip


def _startup(p: Probes) -> None:
    """Nothing to add: the operator's start (its watches) or its first visit of the
    example's Federation, round and Participants reaches the code path."""


def _new_objects(p: Probes) -> None:
    """New objects (their Secrets absent, so nothing else happens) that Kopf has to add
    its finalizer to."""
    p.federation(f"{p.tag}-fed", signingKeySecret={"name": "absent"})
    p.duplicate_round()
    p.participant(f"{p.tag}-part", "absent", signingKeySecret={"name": "absent"})


def _duplicate_round(p: Probes) -> None:
    p.duplicate_round()


def _bootstrap(p: Probes) -> None:
    """A Federation with no base yet: the coordinator starts its bootstrap Job."""
    p.federation(f"{p.tag}-fed")


def _failed_bootstrap(p: Probes) -> None:
    """A Federation whose bootstrap Job has failed: the coordinator reads why from its pods."""
    p.failed_job(p.d.coordinator_ns, f"{p.tag}-fed-bootstrap")
    p.federation(f"{p.tag}-fed")


def _auto_rounds(p: Probes) -> None:
    """A Federation with autoRounds, its base published, no round yet: it creates round 0."""
    name = f"{p.tag}-fed"
    base = p.base(name)
    pinned = {"manifest": base["manifest"], "sha256": base["sha256"]}
    p.federation(name, autoRounds={"enabled": True, "maxRounds": 1},
                 model={"initialBase": pinned})  # fmt: skip


def _history(p: Probes) -> None:
    """A Participant at round 5 with round 1's Job and Service left: past historyLimit 3."""
    name = f"{p.tag}-hist"
    p.old_training_job(name, 1)
    made = p.participant(name, f"{p.tag}-none")
    p.d.client.patch(f"{p.d.client.path_of(made)}/status", {"status": {"currentRound": 5}})


def _training(p: Probes) -> None:
    """A plan for a new member, published by the test as the coordinator: the member's
    operator accepts it and creates the rendezvous Service and the training Job."""
    name, federation = f"{p.tag}-member", f"{p.tag}-fed"
    key = SigningKey.generate(name)
    p.add(signing_secret(p.d.ns("de"), f"{name}-key", key))
    base = p.base(federation)["verified"]
    deadline = (datetime.now(UTC) + timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    layout = Layout(federation)
    federation_path = f"/apis/{API}/namespaces/{p.d.coordinator_ns}/federations/{FEDERATION}"
    defaults = p.d.client.get(federation_path)["spec"]["roundDefaults"]  # defaulted by the CRD
    hyperparameters = {k: defaults[k] for k in HYPERPARAMETERS if k in defaults}
    plan = make_plan(layout, 0, base, model=base.document.model, hyperparameters=hyperparameters,
                     participants={name: key.public_key_text}, min_participants=1,
                     deadline=deadline)  # fmt: skip
    publish_plan(p.d.store, layout, plan, p.d.keys.coordinator)
    p.participant(name, federation, signingKeySecret={"name": f"{name}-key"})


CASES: dict[str, Callable[[Probes], None]] = {
    "list-coordinator-resources": _startup,
    "watch-coordinator-resources": _startup,
    "patch-coordinator-resources": _new_objects,
    "patch-coordinator-status": _startup,
    "get-federations": _duplicate_round,
    "create-federationrounds": _auto_rounds,
    "list-participants": _startup,
    "watch-participants": _startup,
    "patch-participants": _new_objects,
    "patch-participant-status": _startup,
    "get-secrets": _startup,
    "get-jobs": _startup,
    "create-jobs": _bootstrap,
    "list-pods": _failed_bootstrap,
    "create-events": _duplicate_round,
    "list-jobs": _startup,
    "delete-jobs": _history,
    "delete-services": _history,
    "create-services": _training,
}


def _refusals(release: Release, rule: Rule) -> list[str]:
    """What the API server says to the chart's ServiceAccount for each resource of the rule."""
    return [
        f'User "{release.account}" cannot {rule.verb} resource "{resource}" '
        f'in API group "{rule.api_group}"'
        for resource in rule.resources
    ]


@pytest.mark.parametrize("rule", ALWAYS, ids=lambda r: r.name)
def test_without_a_rule_the_operator_is_refused_exactly_what_it_grants(
    release: Release, rule: Rule
) -> None:
    case = CASES[rule.name]  # a rule must come with its case
    r = release
    r.scale(0)
    probes = Probes(r, f"p{RULES.index(rule)}")
    full = rules_for("both")
    try:
        r.set_rules([x for x in full if x != rule.as_policy_rule()])
        case(probes)
        r.scale(1)
        pod = r.running_pod()
        expected = _refusals(r, rule)
        deadline = time.monotonic() + FORBIDDEN_TIMEOUT_S
        log = ""
        while time.monotonic() < deadline:
            log = r.log(pod)
            if all(e in log for e in expected):
                break
            time.sleep(1.0)
        missing = [e for e in expected if e not in log]
        assert not missing, f"never refused: {missing}\noperator log:\n{log[-6000:]}"
        others = set(re.findall(r'cannot (\w+) resource "([^"]+)"', log))
        assert others <= {(rule.verb, res) for res in rule.resources}, others
    finally:
        r.scale(0)
        probes.remove()
        r.set_rules(full)


def test_every_rule_has_a_case_and_every_case_a_rule() -> None:
    assert set(CASES) == {r.name for r in ALWAYS}


def test_the_rules_removed_are_the_chart_s_own(release: Release) -> None:
    """The table the cases remove from is what helm installed, in every watched namespace."""
    for namespace, role in release.roles.items():
        assert role["rules"] == rules_for("both"), namespace
    assert set(release.roles) == set(release.d.namespaces())
    assert release.d.coordinator_ns in release.roles and FEDERATION == "demo"
