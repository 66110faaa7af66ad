"""The chart's Argo CD health checks (charts/tapestry/health/, Argo CD's own layout).

Every case of every kind's health_test.yaml runs under Lua 5.1 in Argo CD's sandbox
(tests/gitops/argo_lua.py); every kind in crds/ has a check with a case for each health
it can have; the testdata are valid objects of their CRDs; and the real kstatus library
reads each testdata object as docs/gitops.md's table says.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jsonschema
import pytest
import yaml

from tests.gitops.argo_lua import (
    GROUP,
    HEALTH_ROOT,
    REPO_ROOT,
    HealthCase,
    HealthScriptError,
    cases,
    health_of,
    kinds,
    load,
    run_health,
    script_path,
)

CRDS = sorted((REPO_ROOT / "crds").glob("*.yaml"))
# What holds a kind (all three conditions False, Suspended): a round's spec.suspend, a
# participant's manual admission of a round. The Federation's Suspended case, like the
# Participant's Degraded one, pins the shared reading of a state today's operator never
# writes for that kind (its testdata says so).
HELD_BY = {"FederationRound": "spec.suspend", "Participant": "spec.admission.mode"}
STATUSES = ("Healthy", "Progressing", "Degraded", "Suspended")
SHARED = re.compile(r"^-- >>> shared.*?^-- <<< shared$", re.M | re.S)
# kstatus's reading of what Argo CD calls each status (docs/gitops.md): a held object's
# Ready=False is InProgress to kstatus, which falls back to Ready when Reconciling and
# Stalled are both False.
KSTATUS_OF = {"Healthy": "Current", "Progressing": "InProgress", "Degraded": "Failed",
              "Suspended": "InProgress"}  # fmt: skip


@functools.cache
def crd_docs() -> dict[str, dict[str, Any]]:
    """The CRDs of crds/, by kind (parsed once; callers only read them)."""
    out = {}
    for path in CRDS:
        doc = yaml.safe_load(path.read_text())
        if doc and doc.get("kind") == "CustomResourceDefinition":
            out[doc["spec"]["names"]["kind"]] = doc
    return out


def all_cases() -> list[HealthCase]:
    return [case for kind in kinds() for case in cases(kind)]


def without(schema: Any, key: str) -> Any:
    if isinstance(schema, dict):
        return {k: without(v, key) for k, v in schema.items() if k != key}
    if isinstance(schema, list):
        return [without(v, key) for v in schema]
    return schema


def has_path(schema: dict[str, Any], dotted: str) -> bool:
    node = schema
    for part in dotted.split("."):
        props = node.get("properties", {})
        if part not in props:
            return False
        node = props[part]
    return True


@pytest.mark.parametrize("case", all_cases(), ids=lambda c: c.id)
def test_health_case(case: HealthCase) -> None:
    """One health_test.yaml case: the script's status and message on its testdata."""
    assert health_of(load(case.input_path)) == case.expected


def test_every_kind_of_the_crds_has_a_check_with_a_case_for_each_status() -> None:
    crds = crd_docs()
    assert sorted(crds) == kinds(), (
        "each kind in crds/ needs charts/tapestry/health/<group>/<Kind>/"
    )
    for kind, crd in crds.items():
        assert crd["spec"]["group"] == GROUP
        (version,) = crd["spec"]["versions"]
        schema = version["schema"]["openAPIV3Schema"]
        held = HELD_BY.get(kind)
        assert held is None or has_path(schema, held), f"{kind} has no {held} any more"
        listed = cases(kind)
        missing = set(STATUSES) - {c.expected.status for c in listed}
        assert not missing, f"{kind} lacks cases for {sorted(missing)}"
        objects = [load(c.input_path) for c in listed]
        assert any("status" not in o for o in objects), f"{kind}: no case before any status"
        assert any(
            "status" in o and o["status"].get("observedGeneration") != o["metadata"]["generation"]
            for o in objects
        ), f"{kind}: no case where the status lags the spec"
        for c in listed:
            assert c.expected.message, f"{c.id}: every case states the message"
        testdata = {p.name for p in (HEALTH_ROOT / GROUP / kind / "testdata").glob("*.yaml")}
        used = [c.input_path.name for c in listed]
        assert sorted(used) == sorted(testdata), f"{kind}: every testdata file is one case"


@pytest.mark.parametrize("case", all_cases(), ids=lambda c: c.id)
def test_testdata_is_a_valid_object_of_its_crd(case: HealthCase) -> None:
    """What the cases feed the scripts is what the API server would hold."""
    obj = load(case.input_path)
    crd = crd_docs()[case.kind]
    (version,) = crd["spec"]["versions"]
    assert obj["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
    assert obj["kind"] == case.kind
    schema = without(version["schema"]["openAPIV3Schema"], "x-kubernetes-validations")
    jsonschema.Draft4Validator(schema).validate(obj)


def test_the_shared_reading_is_the_same_for_every_kind() -> None:
    """The conditions are read by one block of Lua, copied into each kind's script
    (argocd-cm holds one self-contained script per kind)."""
    blocks = {kind: SHARED.findall(script_path(kind).read_text()) for kind in kinds()}
    assert all(len(b) == 1 for b in blocks.values()), blocks.keys()
    first = next(iter(blocks.values()))[0]
    for kind, (block,) in blocks.items():
        assert block == first, f"{kind}'s shared block differs from {kinds()[0]}'s"


@pytest.mark.parametrize(
    ("script", "error"),
    [
        ('return {status = string.format("%s", "Healthy")}', "global 'string'"),
        ('return {status = ("Healthy"):upper()}', "index a string value"),
        ("return {status = tostring(math.floor(1.5))}", "global 'math'"),
        ('return {status = os.getenv("HOME")}', "global 'os'"),
        ('return {status = io.read("*a")}', "global 'io'"),
        ('local f = loadstring("return 1") return {status = "Healthy"}', "loadstring"),
        ('require("io") return {status = "Healthy"}', "module 'io' not found"),
        ("while true do end", "ran too long"),
        ("return 1", "expect table output"),
    ],
)
def test_the_sandbox_offers_only_what_argo_cd_offers(script: str, error: str) -> None:
    with pytest.raises(HealthScriptError, match=re.escape(error)):
        run_health(script, {"kind": "Probe"})


def test_the_sandbox_has_what_argo_cd_offers() -> None:
    script = """
    local os = require("os")
    local words = {}
    for _, c in ipairs(obj.status.conditions) do table.insert(words, c.type) end
    table.sort(words)
    assert(os.time() > 0 and type(os.date("!%Y")) == "string")
    return {status = "Healthy", message = table.concat(words, ",") .. " " .. tostring(#words)}
    """
    conditions = [{"type": "Stalled"}, {"type": "Ready"}]
    result = run_health(script, {"status": {"conditions": conditions, "absent": None}})
    assert (result.status, result.message) == ("Healthy", "Ready,Stalled 2")


def test_a_status_argo_cd_does_not_know_is_refused() -> None:
    with pytest.raises(HealthScriptError, match="'Fine'"):
        run_health('return {status = "Fine", message = "ok"}', {})


@pytest.mark.tools
def test_kstatus_reads_each_testdata_object_as_the_docs_say() -> None:
    """The real kstatus library (as Flux's wait uses it) on the same objects: Current
    where Argo CD says Healthy, InProgress where Progressing or Suspended (with the Ready
    message), Failed with the Stalled message where Degraded. One difference: an object
    the operator has not written a status for yet is Current to kstatus, which has
    nothing to read."""
    from tests.tools import kstatus

    listed = all_cases()
    objects = [load(c.input_path) for c in listed]
    for case, obj, verdict in zip(listed, objects, kstatus(objects), strict=True):
        expected = "Current" if "status" not in obj else KSTATUS_OF[case.expected.status]
        assert verdict.status == expected, (case.id, verdict)
        held = {"Degraded": "Stalled", "Suspended": "Ready"}.get(case.expected.status)
        if held is not None:
            (condition,) = [c for c in obj["status"]["conditions"] if c["type"] == held]
            assert verdict.message == condition["message"], (case.id, verdict)
