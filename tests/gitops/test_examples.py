"""examples/gitops/: the consortium's repository and one member's, as GitOps tools see them.

Real kubectl (kubectl kustomize) builds every kustomization of both repositories; what
it builds is valid for the CRDs and self-contained (every namespace it uses it creates);
rounds are one manifest each, named after their number; the member is a member. The
Argo CD Applications and Flux objects that apply each repository are checked against
the required fields, types and patterns of their published schemas (Argo CD's
Application CRD, Flux's GitRepository and Kustomization v1 CRDs), and every path they
name is a kustomization of that repository.
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.gitops.argo_lua import REPO_ROOT
from tests.kube.helpers import kubectl_binary

EXAMPLE = REPO_ROOT / "examples" / "gitops"
REPOSITORIES = {"consortium": EXAMPLE / "consortium", "member": EXAMPLE / "member"}
DURATION = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"

# The parts of the published schemas these manifests use: required fields, types,
# enums and patterns, as the CRDs state them (argoproj.io_applications,
# source.toolkit.fluxcd.io_gitrepositories and kustomize.toolkit.fluxcd.io_kustomizations).
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_DURATION = {"type": "string", "pattern": DURATION}
_META = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {"name": _STR, "namespace": _STR},
}
ARGO_APPLICATION = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "argoproj.io/v1alpha1"},
        "kind": {"const": "Application"},
        "metadata": _META,
        "spec": {
            "type": "object",
            "required": ["destination", "project", "source"],
            "properties": {
                "project": _STR,
                "destination": {
                    "type": "object",
                    "properties": {"server": _STR, "name": _STR, "namespace": _STR},
                    "anyOf": [{"required": ["server"]}, {"required": ["name"]}],
                },
                "source": {
                    "type": "object",
                    "required": ["repoURL", "path"],
                    "properties": {"repoURL": _STR, "path": _STR, "targetRevision": _STR},
                },
                "syncPolicy": {
                    "type": "object",
                    "properties": {
                        "automated": {
                            "type": "object",
                            "properties": {"prune": _BOOL, "selfHeal": _BOOL},
                        },
                        "syncOptions": {
                            "type": "array",
                            "items": {"type": "string", "pattern": r"^[A-Za-z]+=[a-z]+$"},
                        },
                        "retry": {
                            "type": "object",
                            "properties": {
                                "limit": {"type": "integer"},
                                "backoff": {
                                    "type": "object",
                                    "properties": {
                                        "duration": _STR,
                                        "factor": {"type": "integer"},
                                        "maxDuration": _STR,
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
FLUX_GIT_REPOSITORY = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "source.toolkit.fluxcd.io/v1"},
        "kind": {"const": "GitRepository"},
        "metadata": _META,
        "spec": {
            "type": "object",
            "required": ["interval", "url"],
            "properties": {
                "interval": _DURATION,
                "url": {"type": "string", "pattern": "^(http|https|ssh)://.*$"},
                "ref": {"type": "object", "properties": {"branch": _STR, "tag": _STR}},
            },
        },
    },
}
_REF_PROPERTIES: dict[str, Any] = {
    "apiVersion": _STR, "kind": _STR, "name": _STR, "namespace": _STR,
}  # fmt: skip
_REF: dict[str, Any] = {
    "type": "object", "required": ["kind", "name"], "properties": _REF_PROPERTIES,
}  # fmt: skip
FLUX_KUSTOMIZATION = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "kustomize.toolkit.fluxcd.io/v1"},
        "kind": {"const": "Kustomization"},
        "metadata": _META,
        "spec": {
            "type": "object",
            "required": ["interval", "prune", "sourceRef"],
            "properties": {
                "interval": _DURATION,
                "timeout": _DURATION,
                "path": _STR,
                "prune": _BOOL,
                "wait": _BOOL,
                "sourceRef": {
                    **_REF,
                    "properties": {
                        **_REF_PROPERTIES,
                        "kind": {
                            "enum": ["OCIRepository", "GitRepository", "Bucket", "ExternalArtifact"]
                        },
                    },
                },
                "dependsOn": {
                    "type": "array",
                    "items": {"type": "object", "required": ["name"], "properties": {"name": _STR}},
                },
                "healthChecks": {"type": "array", "items": _REF},
            },
        },
    },
}
SCHEMAS = {
    ("argoproj.io/v1alpha1", "Application"): ARGO_APPLICATION,
    ("source.toolkit.fluxcd.io/v1", "GitRepository"): FLUX_GIT_REPOSITORY,
    ("kustomize.toolkit.fluxcd.io/v1", "Kustomization"): FLUX_KUSTOMIZATION,
}


def kustomize(folder: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize folder`, parsed."""
    result = subprocess.run(
        [kubectl_binary(), "kustomize", str(folder)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"kubectl kustomize {folder}: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def roots(repository: Path) -> list[Path]:
    """Every kustomization of a repository."""
    return sorted(p.parent for p in repository.rglob("kustomization.yaml"))


def deploy_docs(repository: Path) -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted((repository / "deploy").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


@functools.cache
def crd_schema(kind: str) -> dict[str, Any]:
    for path in (REPO_ROOT / "crds").glob("*.yaml"):
        doc = yaml.safe_load(path.read_text())
        if doc["spec"]["names"]["kind"] == kind:
            (version,) = doc["spec"]["versions"]
            schema: dict[str, Any] = without_rules(version["schema"]["openAPIV3Schema"])
            return schema
    raise KeyError(kind)


def without_rules(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: without_rules(v) for k, v in schema.items() if k != "x-kubernetes-validations"}
    if isinstance(schema, list):
        return [without_rules(v) for v in schema]
    return schema


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def key(doc: dict[str, Any]) -> tuple[str, str, str]:
    return (doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"])


@pytest.mark.parametrize(
    "root",
    [r for repo in REPOSITORIES.values() for r in roots(repo)],
    ids=lambda p: str(p.relative_to(EXAMPLE)),
)
def test_every_kustomization_builds_valid_self_contained_objects(root: Path) -> None:
    docs = kustomize(root)
    assert docs, f"{root} builds nothing"
    created = {d["metadata"]["name"] for d in of_kind(docs, "Namespace")}
    repository = next(r for r in REPOSITORIES.values() if root.is_relative_to(r))
    # a part of a repository may rely on a namespace another part creates
    everything = {d["metadata"]["name"] for d in of_kind(kustomize(repository), "Namespace")}
    for doc in docs:
        ns = doc["metadata"].get("namespace")
        assert ns is None or ns in (created if root == repository else everything), key(doc)
        if doc["apiVersion"].startswith("tapestry.dev/"):
            jsonschema.Draft4Validator(crd_schema(doc["kind"])).validate(doc)
    assert len({key(d) for d in docs}) == len(docs), "an object is built twice"


def test_the_consortium_is_its_federation_and_its_rounds() -> None:
    consortium = REPOSITORIES["consortium"]
    whole = sorted(map(key, kustomize(consortium)))
    parts = sorted(
        map(key, kustomize(consortium / "federation") + kustomize(consortium / "rounds"))
    )
    assert whole == parts
    (federation,) = of_kind(kustomize(consortium / "federation"), "Federation")
    rounds = kustomize(consortium / "rounds")
    assert rounds and all(d["kind"] == "FederationRound" for d in rounds), rounds
    members = [m["name"] for m in federation["spec"]["members"]]
    assert len(set(members)) == len(members), members


def test_each_round_is_one_manifest_named_after_its_number() -> None:
    folder = REPOSITORIES["consortium"] / "rounds"
    (federation,) = of_kind(kustomize(REPOSITORIES["consortium"] / "federation"), "Federation")
    files = sorted(folder.glob("round-*.yaml"))
    assert files, "no round manifest"
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert [d["kind"] for d in docs] == ["FederationRound"], path
        (doc,) = docs
        number = doc["spec"]["round"]
        assert path.name == f"round-{number:03d}.yaml", path
        assert doc["metadata"]["name"] == f"{federation['metadata']['name']}-round-{number:03d}"
        assert doc["spec"]["federation"] == federation["metadata"]["name"]
        assert doc["metadata"]["namespace"] == federation["metadata"]["namespace"]
    listed = yaml.safe_load((folder / "kustomization.yaml").read_text())["resources"]
    assert set(listed) <= {p.name for p in files}, listed


def test_the_member_is_a_member_of_the_federation() -> None:
    (federation,) = of_kind(kustomize(REPOSITORIES["consortium"]), "Federation")
    (participant,) = of_kind(kustomize(REPOSITORIES["member"]), "Participant")
    assert participant["spec"]["federation"] == federation["metadata"]["name"]
    name = participant["spec"].get("memberName") or participant["metadata"]["name"]
    assert name in {m["name"] for m in federation["spec"]["members"]}
    assert participant["spec"]["store"] == {
        k: v for k, v in federation["spec"]["store"].items() if k in participant["spec"]["store"]
    }, "the member dials the consortium's store"


@pytest.mark.parametrize("name", sorted(REPOSITORIES))
def test_the_argo_cd_application_and_flux_objects_apply_their_repository(name: str) -> None:
    repository = REPOSITORIES[name]
    docs = deploy_docs(repository)
    kinds = sorted({(d["apiVersion"], d["kind"]) for d in docs})
    assert kinds == sorted(SCHEMAS), f"{name}/deploy holds an Application and Flux's objects"
    for doc in docs:
        jsonschema.Draft7Validator(SCHEMAS[(doc["apiVersion"], doc["kind"])]).validate(doc)
    built = kustomize(repository)
    built_keys = {key(d) for d in built}
    namespaces = {d["metadata"]["name"] for d in of_kind(built, "Namespace")}
    for app in of_kind(docs, "Application"):
        source = app["spec"]["source"]
        assert (repository / source["path"] / "kustomization.yaml").is_file(), source
        assert app["spec"]["destination"]["namespace"] in namespaces
    sources = {d["metadata"]["name"]: d for d in of_kind(docs, "GitRepository")}
    flux = {d["metadata"]["name"]: d for d in of_kind(docs, "Kustomization")}
    applied: set[tuple[str, str, str]] = set()
    for kustomization in flux.values():
        spec = kustomization["spec"]
        assert spec["sourceRef"]["kind"] == "GitRepository"
        source = sources[spec["sourceRef"]["name"]]
        assert source["metadata"]["namespace"] == kustomization["metadata"]["namespace"]
        assert {a["spec"]["source"]["repoURL"] for a in of_kind(docs, "Application")} == {
            source["spec"]["url"]
        }, "Argo CD and Flux read the same repository"
        path = repository / spec.get("path", "./")
        assert (path / "kustomization.yaml").is_file(), spec
        for dependency in spec.get("dependsOn", []):
            assert dependency["name"] in flux, dependency
        assert spec.get("wait") or spec.get("healthChecks"), "Flux judges what it applied"
        output = {key(d) for d in kustomize(path)}
        for check in spec.get("healthChecks", []):
            assert (check["kind"], check["namespace"], check["name"]) in output, check
        applied |= output
    assert applied == built_keys, "Flux applies exactly what Argo CD syncs"
    assert not ({key(d) for d in docs} & built_keys), "deploy/ is applied by hand, once"


def test_the_argo_cd_sync_options_are_argo_cds() -> None:
    """Option names as Argo CD spells them (a misspelt one is silently ignored)."""
    known = {"ServerSideApply", "CreateNamespace", "PruneLast", "ApplyOutOfSyncOnly", "Validate"}
    compare = {"ServerSideDiff", "IgnoreExtraneous", "IncludeMutationWebhook"}
    for repository in REPOSITORIES.values():
        for app in of_kind(deploy_docs(repository), "Application"):
            for option in app["spec"].get("syncPolicy", {}).get("syncOptions", []):
                assert option.split("=")[0] in known, option
            annotation = app["metadata"].get("annotations", {})
            for option in re.split(
                r",\s*", annotation.get("argocd.argoproj.io/compare-options", "")
            ):
                assert not option or option.split("=")[0] in compare, option
