"""A participant whose training goes through Kueue: the real Kueue controller manager
(built from its Go module, `tests/kube/kueue.py`) admits the training Job from a
ClusterQueue, and the round completes.

Member `de`'s Participant names a LocalQueue (`compute.kueueQueue`), so the operator
creates its training Job suspended with the `kueue.x-k8s.io/queue-name` label. While the
ClusterQueue's quota is smaller than the Job's requests, Kueue keeps the Workload
pending: the Job stays suspended, the member's state says it is training that Job, and
the round waits for it. Raising the quota to the node's capacity lets Kueue admit the
Workload and unsuspend the Job (Kueue does it: the operator never writes `suspend`
again), and the round succeeds with every member merged.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator

import pytest

from tapestry_operator.builders import training_job_name
from tests.kube import deployment as shared
from tests.kube.client import KubeClient, Obj
from tests.kube.cluster import NODE_NAME, KubeCluster
from tests.kube.deployment import MEMBERS, ROUND_TIMEOUT_S, Deployment, Setup, dump
from tests.kube.kueue import (
    Kueue,
    KueueError,
    condition,
    delete_all,
    ensure_kueue,
    queue_objects,
    workloads,
)
from tests.kube.tapestry_env import wait_for

deployment = shared.deployment  # the shared fixture: the example, deployed per Setup
pytestmark = [
    pytest.mark.kube,
    pytest.mark.s3,
    pytest.mark.torch,
    pytest.mark.slow,
    # A cold build of Kueue (`make testbin` does it ahead) runs in the fixture.
    pytest.mark.timeout(3600),
]

QUEUED = "de"  # the member whose Participant names the LocalQueue
LOCAL_QUEUE = "tapestry-training"
REQUESTS = {"cpu": "500m", "memory": "256Mi"}  # each training pod's, counted by Kueue
TOO_SMALL = {"cpu": "100m", "memory": "1Gi"}
ROUND = "demo-round-0"


@pytest.fixture(scope="module")
def kueue(
    kube_cluster: KubeCluster,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[Kueue]:
    capman = request.config.pluginmanager.getplugin("capturemanager")
    try:
        with capman.global_and_fixture_disabled():  # a cold build shows its progress
            assets = ensure_kueue(sys.stderr)
        manager = Kueue(assets, kube_cluster.kubeconfig, tmp_path_factory.mktemp("kueue"))
        manager.start()
    except KueueError as err:
        pytest.fail(f"cannot run Kueue: {err}", pytrace=False)
    yield manager
    manager.stop()


def _node_capacity(client: KubeClient) -> dict[str, str]:
    allocatable = client.get(f"/api/v1/nodes/{NODE_NAME}")["status"]["allocatable"]
    return {r: str(allocatable[r]) for r in ("cpu", "memory")}


def _suspend_owner(job: Obj) -> str:
    """The field manager that last set the Job's spec.suspend."""
    owners = [
        entry["manager"]
        for entry in job["metadata"].get("managedFields", [])
        if "f:suspend" in entry.get("fieldsV1", {}).get("f:spec", {})
    ]
    assert len(owners) == 1, job["metadata"].get("managedFields")
    return str(owners[0])


QUEUED_SETUP = Setup(
    bucket="kueue",
    participants={
        QUEUED: {"compute": {"kueueQueue": LOCAL_QUEUE, "resources": {"requests": REQUESTS}}}
    },
)


@pytest.mark.parametrize("deployment", [QUEUED_SETUP], indirect=True)
def test_kueue_admits_the_training_job_from_a_cluster_queue(
    kueue: Kueue, deployment: Deployment
) -> None:
    d = deployment
    ns = d.ns(QUEUED)
    job_name = training_job_name(QUEUED, 0)
    cluster_queue = f"tapestry-{uuid.uuid4().hex[:6]}"
    queues = queue_objects(cluster_queue, ns, TOO_SMALL, LOCAL_QUEUE)
    try:
        for obj in queues:
            d.client.apply(obj)

        def diagnose() -> str:
            return (
                f"{d.diagnose()}\nworkloads in {ns}:\n{dump({'items': workloads(d.client, ns)})}"
                f"\nkueue log tail:\n{kueue.tail()}"
            )

        def pending_for_quota(_: Obj) -> bool:
            found = [w for w in workloads(d.client, ns) if _owned_by(w, job_name)]
            reserved = condition(found[0], "QuotaReserved") if found else {}
            assert reserved.get("status") != "True", f"admitted over quota:\n{dump(found[0])}"
            return reserved.get("status") == "False" and "insufficient quota" in reserved.get(
                "message", ""
            )

        # Too small a quota: Kueue holds the Workload back, the Job stays suspended, and
        # the round waits with the member training that Job.
        d.wait(d.participant_path(QUEUED), pending_for_quota,
               f"Kueue to hold {job_name}'s Workload for quota", timeout=300)  # fmt: skip
        job = d.job(ns, job_name)
        assert job is not None and job["spec"]["suspend"] is True, job
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == LOCAL_QUEUE
        assert not job.get("status", {}).get("active"), job["status"]
        participant = d.client.get(d.participant_path(QUEUED))["status"]
        assert (participant["state"], participant["job"]) == ("Training", job_name), participant

        # The coordinator sees the member's receipt on its next visit of the round.
        def member_accepted(obj: Obj) -> bool:
            members = obj.get("status", {}).get("members") or []
            return {m["name"]: m["state"] for m in members}.get(QUEUED) == "Accepted"

        current = d.wait(d.round_path(ROUND), member_accepted, f"{QUEUED} Accepted")["status"]
        assert current["phase"] == "Training", dump(current)

        # Enough quota: Kueue admits the Workload and starts the Job; the round completes.
        capacity = _node_capacity(d.client)
        d.client.apply(queue_objects(cluster_queue, ns, capacity, LOCAL_QUEUE)[1])
        done = wait_round(d, diagnose)
        assert {m["name"]: m["state"] for m in done["status"]["members"]} == dict.fromkeys(
            MEMBERS, "Merged"
        ), dump(done["status"])
        (workload,) = [w for w in workloads(d.client, ns) if _owned_by(w, job_name)]
        assert condition(workload, "Admitted").get("status") == "True", dump(workload)
        assert workload["status"]["admission"]["clusterQueue"] == cluster_queue
        assert workload["spec"]["queueName"] == LOCAL_QUEUE
        job = d.job(ns, job_name)
        assert job is not None and job["spec"]["suspend"] is False
        assert job["status"].get("succeeded") == 1, job["status"]
        assert _suspend_owner(job).startswith("kueue"), job["metadata"]["managedFields"]
        started = [m for _, reason, m in d.events(ns, job_name) if reason == "Started"]
        assert any(cluster_queue in m for m in started), d.events(ns, job_name)
        # The other members' Jobs name no queue: Kueue leaves them alone.
        for member in MEMBERS:
            if member != QUEUED:
                assert workloads(d.client, d.ns(member)) == [], member
    finally:
        delete_all(d.client, reversed(queues))


def _owned_by(workload: Obj, job_name: str) -> bool:
    return any(
        ref.get("kind") == "Job" and ref.get("name") == job_name
        for ref in workload["metadata"].get("ownerReferences", [])
    )


def wait_round(d: Deployment, diagnose: Callable[[], str]) -> Obj:
    """The round once Succeeded; on timeout, the Workloads and Kueue's log too."""
    return wait_for(
        d.client,
        d.round_path(ROUND),
        lambda o: o.get("status", {}).get("phase") == "Succeeded",
        ROUND_TIMEOUT_S,
        f"FederationRound {ROUND} to be Succeeded",
        diagnose,
    )
