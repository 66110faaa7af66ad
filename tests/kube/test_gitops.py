"""GitOps on the real test cluster: examples/gitops applied as Flux applies it, then read
as kstatus (the real library) and Argo CD (the chart's health Lua, under Lua 5.1) read
the live objects, and diffed as a GitOps tool diffs them.

One deployment of the single-cluster example (its MinIO, Secrets, data volumes and
operator; de's Participant and round 0 come from examples/gitops instead) runs round 0
to success and round 1 to failure, and along the way holds the objects a GitOps tool
sees: a running round and a training participant, a suspended round, a refused
duplicate round, a succeeded round, a round that failed for want of quorum. After
round 0 `kubectl diff --server-side` of the applied manifests shows nothing: the
operator never touches spec, and the defaults the API server adds are the schema's.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.gitops.argo_lua import health_of
from tests.kube import deployment as shared
from tests.kube.client import Obj
from tests.kube.cluster import REPO_ROOT
from tests.kube.deployment import FAST, FEDERATION, Deployment, Setup, dump, merge
from tests.kube.helpers import kubectl_binary
from tests.kube.tapestry_env import API, kubectl, render_example

deployment = shared.deployment  # the shared fixture: the example, deployed per Setup
pytestmark = [
    pytest.mark.kube, pytest.mark.s3, pytest.mark.torch, pytest.mark.slow, pytest.mark.tools,
]  # fmt: skip

EXAMPLE = REPO_ROOT / "examples" / "gitops"
MANAGER = "kustomize-controller"  # the field manager Flux applies with
MEMBER = "de"  # the member whose own repository examples/gitops/member is
ROUND_0 = "demo-round-000"
ROUND_1 = "demo-round-001"
DUPLICATE = "demo-round-000-again"


def kustomize(folder: Path) -> list[Obj]:
    out = kubectl(Path("/dev/null"), "kustomize", str(folder))
    return [doc for doc in yaml.safe_load_all(out) if doc]


def gitops_docs(d: Deployment) -> list[Obj]:
    """Both repositories as the deployment runs them: the consortium's namespace is the
    coordinator's, the member's is de's; real keys, the test store, the fast round
    defaults and a short poll, as the single-cluster example gets them."""
    (example,) = [doc for doc in d.docs if doc["kind"] == "Federation"]
    store = example["spec"]["store"]
    placed = []
    for repository, namespace in (("consortium", d.coordinator_ns), ("member", d.ns(MEMBER))):
        for doc in kustomize(EXAMPLE / repository):
            if doc["kind"] == "Namespace":
                doc = merge(doc, {"metadata": {"name": namespace}})
            else:
                doc = merge(doc, {"metadata": {"namespace": namespace}})
            if doc["kind"] == "Participant":
                doc = merge(doc, {"spec": {"pollInterval": "5s"}})
            placed.append(doc)
    return render_example(
        placed, d.keys, store["endpoint"], bucket=store["bucket"], overrides=dict(FAST)
    )


def write(docs: list[Obj], path: Path) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def kstatus_of(obj: Obj) -> tuple[str, str]:
    from tests.tools import kstatus

    (verdict,) = kstatus([obj])
    return verdict.status, verdict.message


def condition(obj: Obj, kind: str) -> dict[str, Any]:
    (found,) = [c for c in obj["status"]["conditions"] if c["type"] == kind]
    return dict(found)


def expect(obj: Obj, kstatus: str, argo: str, *, containing: str = "") -> None:
    """One live object read as kstatus `kstatus` and Argo CD `argo`, whose message says
    `containing`."""
    (ks, ks_message), argo_health = kstatus_of(obj), health_of(obj)
    where = f"{obj['kind']} {obj['metadata']['name']}:\n{dump(obj.get('status', {}))}"
    assert ks == kstatus, f"kstatus {ks} ({ks_message}), not {kstatus}; {where}"
    assert argo_health.status == argo, f"Argo CD {argo_health}, not {argo}; {where}"
    assert containing in (argo_health.message or ""), f"{argo_health}; {where}"


@pytest.mark.parametrize(
    "deployment",
    [Setup(bucket="gitops", apply_round=False, absent=frozenset({MEMBER}))],
    indirect=True,
    ids=["gitops"],
)
def test_gitops_health_and_no_drift(deployment: Deployment, tmp_path: Path) -> None:
    d = deployment
    applied = write(gitops_docs(d), tmp_path / "applied.yaml")
    kubeconfig = str(d.kubeconfig)
    kubectl(
        d.kubeconfig, "apply", "--server-side", f"--field-manager={MANAGER}", "-f", str(applied)
    )
    # A later round committed held (spec.suspend), and a second manifest for round 0.
    d.apply_round(ROUND_1, 1, {"suspend": True})
    d.apply_round(DUPLICATE, 0)

    # While round 0 trains: the round and de's Participant are in progress.
    training = d.wait(
        d.round_path(ROUND_0),
        lambda o: o.get("status", {}).get("phase") == "Training",
        f"{ROUND_0} to train",
    )
    expect(training, "InProgress", "Progressing", containing="Round 0 Training")
    de = d.wait_participant(
        MEMBER, lambda o: o.get("status", {}).get("state") == "Training", "to train"
    )
    expect(de, "InProgress", "Progressing", containing="Round 0 Training")
    federation = d.client.get(f"/apis/{API}/namespaces/{d.coordinator_ns}/federations/{FEDERATION}")
    expect(federation, "Current", "Healthy", containing="base published")
    held = d.wait_round(ROUND_1, "Suspended")
    # Held: nothing to do and nothing wrong. kstatus falls back to Ready=False.
    expect(held, "InProgress", "Suspended", containing="spec.suspend is true")
    assert kstatus_of(held)[1] == condition(held, "Ready")["message"]
    duplicate = d.wait_round(DUPLICATE, "Failed")
    expect(duplicate, "Failed", "Degraded", containing="DuplicateRound")
    assert kstatus_of(duplicate)[1] == condition(duplicate, "Stalled")["message"]

    # Round 0 succeeded: current and healthy, the round, the Federation, every member.
    done = d.wait_round(ROUND_0, "Succeeded")
    expect(done, "Current", "Healthy", containing="Round 0 Succeeded")
    de = d.wait_participant(
        MEMBER, lambda o: o.get("status", {}).get("state") == "Merged", "to be merged"
    )
    expect(de, "Current", "Healthy", containing="Round 0 Merged")
    for member in d.members:
        merged = d.wait_participant(
            member, lambda o: o.get("status", {}).get("state") == "Merged", "to be merged"
        )
        expect(merged, "Current", "Healthy", containing="Round 0 Merged")

    # No drift: the server-side diff of what was applied is empty (without
    # --force-conflicts: a field another manager took over is a conflict, exit 2), and
    # nobody but the appliers owns a field of spec, which catches what a diff cannot, a
    # field someone else added (the operator writes status and its own metadata only).
    shutil.which("diff") or pytest.fail("kubectl diff needs diff(1) on PATH")
    diff = subprocess.run(
        [kubectl_binary(), f"--kubeconfig={kubeconfig}", "diff", "--server-side",
         f"--field-manager={MANAGER}", "-f", str(applied)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert (diff.returncode, diff.stdout) == (0, ""), f"drift:\n{diff.stdout}{diff.stderr}"
    for doc in yaml.safe_load_all(applied.read_text()):
        path = d.client.path_of(doc)
        live = d.client.get(path)
        owners = {
            m["manager"]
            for m in live["metadata"].get("managedFields", [])
            if "f:spec" in m.get("fieldsV1", {})
        }
        assert owners <= {MANAGER, "tapestry-tests"}, (path, owners)
        # and nobody changed it: the first generation (the consortium's Federation is the
        # single-cluster example's, so applying it again changed nothing either)
        assert doc["kind"] == "Namespace" or live["metadata"]["generation"] == 1, path

    # Round 1 fails for want of quorum: each member declines it in its own repository
    # (spec.admission.deniedRounds), and the consortium lets it go.
    (member_doc,) = [doc for doc in yaml.safe_load_all(applied.read_text())
                     if doc["kind"] == "Participant"]  # fmt: skip
    denied = merge(member_doc, {"spec": {"admission": {"deniedRounds": [1]}}})
    kubectl(d.kubeconfig, "apply", "--server-side", f"--field-manager={MANAGER}", "-f",
            str(write([denied], tmp_path / "denied.yaml")))  # fmt: skip
    for member in d.members:
        if member != MEMBER:
            d.change_participant(member, {"admission": {"deniedRounds": [1]}})
    d.apply_round(ROUND_1, 1, {"suspend": False})
    failed = d.wait_round(ROUND_1, "Failed")
    expect(failed, "Failed", "Degraded", containing="Round 1 Failed: NoQuorum")
    assert kstatus_of(failed)[1] == condition(failed, "Stalled")["message"]
    for member in d.members:
        declined = d.wait_participant(
            member,
            lambda o: (
                (o.get("status", {}).get("currentRound"), o["status"].get("state"))
                == (1, "Declined")
            ),
            "to have declined round 1",
        )
        expect(declined, "Current", "Healthy", containing="Round 1 Declined")
