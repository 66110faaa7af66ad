"""The Helm chart as the tests see it: rendered by the real helm, and the RBAC rules it
must grant, each with the code path that needs it.

`RULES` is the documented expected set (docs/install.md shows the same table): the
chart's Roles must equal it (tests/chart/test_chart.py), and every rule must have a case
in tests/kube/test_chart_install.py that removes it and shows what breaks.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.tools import run_helm

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "tapestry"
EXAMPLE_VALUES = sorted((REPO / "examples" / "values").glob("*.yaml"))
ROLES = ("coordinator", "participant", "both")
RELEASE = "tapestry"
NAMESPACE = "tapestry-system"

Obj = dict[str, Any]


@dataclass(frozen=True)
class Rule:
    """One rule of the operator's Role: which role needs it, and why."""

    name: str
    needed_by: str  # coordinator, participant, or shared (both roles)
    api_group: str
    resources: tuple[str, ...]
    verb: str
    why: str
    when: str = ""  # the chart value that turns the rule on; empty: always there

    def as_policy_rule(self) -> Obj:
        return {"apiGroups": [self.api_group], "resources": list(self.resources),
                "verbs": [self.verb]}  # fmt: skip

    def applies_to(self, role: str) -> bool:
        return self.needed_by == "shared" or role in (self.needed_by, "both")


_CRS = ("federations", "federationrounds")
RULES = (
    Rule("list-coordinator-resources", "coordinator", "tapestry.dev", _CRS, "list",
         "Kopf lists them to start one daemon per object; duplicate_of and autoRounds "
         "list the FederationRounds"),
    Rule("watch-coordinator-resources", "coordinator", "tapestry.dev", _CRS, "watch",
         "Kopf watches them for creations, spec changes and deletions"),
    Rule("patch-coordinator-resources", "coordinator", "tapestry.dev", _CRS, "patch",
         "Kopf adds and removes its finalizer"),
    Rule("patch-coordinator-status", "coordinator", "tapestry.dev",
         ("federations/status", "federationrounds/status"), "patch",
         "kube.patch_status writes status as a merge patch of the status subresource"),
    Rule("get-federations", "coordinator", "tapestry.dev", ("federations",), "get",
         "coordinator.reconcile_round reads the round's Federation"),
    Rule("create-federationrounds", "coordinator", "tapestry.dev", ("federationrounds",),
         "create", "autoRounds: coordinator._next_auto_round creates the next round"),
    Rule("create-secrets", "coordinator", "", ("secrets",), "create",
         "spec.store.identities: identities.sync makes each member's store key Secret",
         "storeIdentities.enabled"),
    Rule("update-secrets", "coordinator", "", ("secrets",), "update",
         "identities.sync replaces a Secret whose key was revoked outside the operator",
         "storeIdentities.enabled"),
    Rule("delete-secrets", "coordinator", "", ("secrets",), "delete",
         "identities.sync deletes the Secret of a member removed from spec.members",
         "storeIdentities.enabled"),
    Rule("list-participants", "participant", "tapestry.dev", ("participants",), "list",
         "Kopf lists them to start one daemon per object"),
    Rule("watch-participants", "participant", "tapestry.dev", ("participants",), "watch",
         "Kopf watches them for creations, spec changes and deletions"),
    Rule("patch-participants", "participant", "tapestry.dev", ("participants",), "patch",
         "Kopf adds and removes its finalizer"),
    Rule("patch-participant-status", "participant", "tapestry.dev",
         ("participants/status",), "patch",
         "kube.patch_status writes status as a merge patch of the status subresource"),
    Rule("get-secrets", "shared", "", ("secrets",), "get",
         "kube.secret_entry reads the signing key and the store's credentials"),
    Rule("get-jobs", "shared", "batch", ("jobs",), "get",
         "kube.job_status follows the Jobs the operator started"),
    Rule("create-jobs", "shared", "batch", ("jobs",), "create",
         "kube.create starts training, bootstrap and aggregator Jobs"),
    Rule("list-pods", "shared", "", ("pods",), "list",
         "kube._pod_failure reads why a Job failed from its pods"),
    Rule("create-events", "shared", "", ("events",), "create",
         "kopf.event reports what the operator did on its objects"),
    Rule("list-jobs", "participant", "batch", ("jobs",), "list",
         "participant._clean_history finds the training Jobs past spec.historyLimit"),
    Rule("delete-jobs", "participant", "batch", ("jobs",), "delete",
         "kube.delete_job deletes them"),
    Rule("delete-services", "participant", "", ("services",), "delete",
         "kube.delete_job deletes their rendezvous Services"),
    Rule("create-services", "participant", "", ("services",), "create",
         "kube.create makes the headless Service for torchrun's rendezvous"),
)  # fmt: skip


def rules_for(role: str, *turned_on: str) -> list[Obj]:
    """The policy rules of the operator's Role for `role`, in the chart's order, with the
    rules of the values in `turned_on` (e.g. storeIdentities.enabled)."""
    return [r.as_policy_rule() for r in RULES
            if r.applies_to(role) and (not r.when or r.when in turned_on)]  # fmt: skip


#: The rules present whatever the values say (each has a removal case on a cluster).
ALWAYS = tuple(r for r in RULES if not r.when)


def template(
    values: Mapping[str, Any] | None = None,
    *,
    values_files: Iterable[Path] = (),
    chart: Path = CHART,
    namespace: str = NAMESPACE,
    check: bool = True,
) -> list[Obj]:
    """`helm template` of the chart with `values` (and files), as parsed objects."""
    done = helm_template(values, values_files=values_files, chart=chart, namespace=namespace,
                         check=check)  # fmt: skip
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def helm_template(
    values: Mapping[str, Any] | None = None,
    *,
    values_files: Iterable[Path] = (),
    chart: Path = CHART,
    namespace: str = NAMESPACE,
    check: bool = True,
) -> Any:
    """The completed `helm template` run (stdout: the manifests; stderr: why not)."""
    args = ["template", RELEASE, str(chart), "--namespace", namespace]
    for f in values_files:
        args += ["--values", str(f)]
    args += ["--values", "-"]
    return run_helm(*args, input=yaml.safe_dump(dict(values or {})), check=check)


def of_kind(objects: Iterable[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: Iterable[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in of_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_specs(objects: Iterable[Obj]) -> list[tuple[str, Obj]]:
    """(object name, pod spec) of every Deployment and Job the chart renders."""
    return [
        (f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"])
        for o in objects
        if o["kind"] in ("Deployment", "Job")
    ]


def chart_copy(dest: Path) -> Path:
    """A copy of the chart to change a file in (dashboards), without touching the real one."""
    target = dest / "tapestry"
    shutil.copytree(CHART, target)
    return target
