"""The CRDs in crds/, without a cluster: generated copies current, schemas structural and
documented, and every enum, default and range equal to the Python code that consumes it.

tests/kube/test_crds.py checks the same files against a real API server.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

from tapestry_aggregator.strategy import DEFAULT_LR, OPTIMIZERS, WEIGHTINGS, Strategy
from tapestry_lifecycle.states import READY, RECONCILING, STALLED, MemberState, Reason, RoundPhase
from tapestry_protocol.shards import ENCODINGS
from tapestry_trainer.specs import PRESETS

REPO = Path(__file__).resolve().parent.parent
PROTOCOL_SCHEMAS = REPO / "protocol" / "tapestry_protocol" / "schemas"
KINDS = ("Federation", "FederationRound", "Participant")
FILES = {
    "Federation": "tapestry.dev_federations.yaml",
    "FederationRound": "tapestry.dev_federationrounds.yaml",
    "Participant": "tapestry.dev_participants.yaml",
}
RULES = "x-kubernetes-validations"
# What the API server's metav1.Condition and Kubernetes' own CRDs use.
CONDITION_REASON = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
CONDITION_TYPE = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
DURATION = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"

Schema = dict[str, Any]


def _load_render() -> ModuleType:
    spec = importlib.util.spec_from_file_location("crds_render", REPO / "crds" / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


render = _load_render()


@functools.cache
def crd(kind: str) -> dict[str, Any]:
    """One CRD, parsed once per session; callers only read it (or copy it with `without`)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    loaded: dict[str, Any] = yaml.load((REPO / "crds" / FILES[kind]).read_text(), loader)
    return loaded


def schema_of(kind: str) -> Schema:
    (version,) = crd(kind)["spec"]["versions"]
    schema: Schema = version["schema"]["openAPIV3Schema"]
    return schema


def at(kind: str, path: str) -> Schema:
    """The schema node at a dotted path; `[]` steps into a list's items."""
    node = schema_of(kind)
    for part in path.split("."):
        name, into_items, _ = part.partition("[]")
        node = node["properties"][name]
        if into_items:
            node = node["items"]
    return node


def nodes(schema: Schema, path: str = "") -> Iterator[tuple[str, Schema]]:
    """Every schema node with its path: properties, list items and map values."""
    yield path or "<root>", schema
    for name, child in schema.get("properties", {}).items():
        yield from nodes(child, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), Mapping):
        yield from nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), Mapping):
        yield from nodes(schema["additionalProperties"], f"{path}{{}}")


def all_nodes() -> Iterator[tuple[str, str, Schema]]:
    for kind in KINDS:
        for path, node in nodes(schema_of(kind)):
            yield kind, path, node


def without(schema: Any, *keys: str) -> Any:
    """A deep copy of schema with the given keywords removed at every level."""
    if isinstance(schema, dict):
        return {k: without(v, *keys) for k, v in schema.items() if k not in keys}
    if isinstance(schema, list):
        return [without(v, *keys) for v in schema]
    return schema


# --------------------------------------------------------------------------- generated files


def test_render_check_passes() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "crds" / "render.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for name in FILES.values():
        chart_copy = REPO / "charts" / "tapestry" / "crds" / name
        assert chart_copy.read_bytes() == (REPO / "crds" / name).read_bytes(), name
    assert sorted(p.name for p in (REPO / "charts" / "tapestry" / "crds").iterdir()) == sorted(
        FILES.values()
    )


def test_render_check_names_what_is_stale_and_a_write_fixes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(REPO / "crds", tmp_path / "crds")
    monkeypatch.setattr(render, "ROOT", tmp_path)
    monkeypatch.setattr(render, "SOURCE", tmp_path / "crds")
    monkeypatch.setattr(render, "CHART_CRDS", tmp_path / "charts" / "tapestry" / "crds")
    monkeypatch.setattr(render, "DOC", tmp_path / "docs" / "resources.md")
    assert render.main(check=True) == 1
    err = capsys.readouterr().err
    assert "charts/tapestry/crds/tapestry.dev_federations.yaml: missing" in err
    assert "docs/resources.md: missing" in err
    assert render.main(check=False) == 0
    assert render.main(check=True) == 0
    capsys.readouterr()

    source = tmp_path / "crds" / FILES["FederationRound"]
    source.write_text(source.read_text().replace("default: false", "default: true"))
    (tmp_path / "charts" / "tapestry" / "crds" / "old.yaml").write_text("{}\n")
    assert render.main(check=True) == 1
    err = capsys.readouterr().err
    assert "tapestry.dev_federationrounds.yaml: differs" in err
    assert "+                  default: true" in err
    assert "docs/resources.md: differs" in err
    assert "old.yaml: not one of" in err
    assert render.main(check=False) == 0
    assert not (tmp_path / "charts" / "tapestry" / "crds" / "old.yaml").exists()
    assert render.main(check=True) == 0


def test_docs_list_every_field_with_its_description() -> None:
    doc = (REPO / "docs" / "resources.md").read_text()
    assert "Generated" in doc and "crds/render.py" in doc.split("\n## ")[0]
    for kind in KINDS:
        section = doc.split(f"\n## {kind}\n", 1)[1].split("\n## ", 1)[0]
        for top in ("spec", "status"):
            for path, node in nodes(schema_of(kind)["properties"][top], top):
                if path.endswith("{}") or path.endswith("[]"):
                    continue  # map values and scalar list items are described in their row
                row = next((r for r in section.splitlines() if r.startswith(f"| `{path}` |")), "")
                assert row, f"{kind}: no row for {path}"
                said = node.get("description")
                assert said and render._cell(said) in row, f"{kind}: {path} undescribed"


# --------------------------------------------------------------------------- shape


@pytest.mark.parametrize("kind", KINDS)
def test_names_version_and_subresources(kind: str) -> None:
    definition = crd(kind)
    spec = definition["spec"]
    plural = spec["names"]["plural"]
    assert definition["metadata"]["name"] == f"{plural}.tapestry.dev"
    assert FILES[kind] == f"tapestry.dev_{plural}.yaml"
    assert spec["group"] == "tapestry.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == kind and spec["names"]["listKind"] == f"{kind}List"
    assert spec["names"]["categories"] == ["tapestry"]
    assert (
        spec["names"]["shortNames"]
        == {
            "Federation": ["tfed"],
            "FederationRound": ["fr"],
            "Participant": ["tpart"],
        }[kind]
    )
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    schema = version["schema"]["openAPIV3Schema"]
    assert set(schema["properties"]) == {"apiVersion", "kind", "metadata", "spec", "status"}
    assert schema["required"] == ["spec"]


def test_every_field_has_a_description() -> None:
    # The API server refuses anything but `type: object` on metadata, a description too.
    missing = [
        f"{kind}: {path}"
        for kind, path, node in all_nodes()
        if path != "metadata" and not str(node.get("description", "")).strip()
    ]
    assert not missing, missing
    for kind in KINDS:
        assert at(kind, "metadata") == {"type": "object"}


def test_every_schema_is_structural() -> None:
    """The rules of apiextensions' structural schemas, plus the project's own bounds."""
    junctors = ("allOf", "anyOf", "oneOf", "not")
    for kind, path, node in all_nodes():
        where = f"{kind}: {path}"
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, where
            assert node.get("anyOf") == [{"type": "integer"}, {"type": "string"}], where
        else:
            assert node.get("type") in (
                "object", "array", "string", "integer", "number", "boolean"
            ), where  # fmt: skip
            for junctor in junctors:
                assert junctor not in node, f"{where}: {junctor} outside int-or-string"
        if "additionalProperties" in node:
            assert "properties" not in node, where
            assert isinstance(node["additionalProperties"], dict), f"{where}: must be a schema"
        if node.get("x-kubernetes-preserve-unknown-fields"):
            assert node.get("type") == "object", where
        if node.get("type") == "array":
            assert isinstance(node.get("items"), dict), where
            assert node.get("x-kubernetes-list-type") in ("atomic", "set", "map"), where
            assert "maxItems" in node, f"{where}: unbounded lists cost unbounded CEL and etcd"
            if node["x-kubernetes-list-type"] == "map":
                keys = node["x-kubernetes-list-map-keys"]
                assert set(keys) <= set(node["items"].get("required", [])), where
        if node.get("type") == "object" and "properties" in node:
            assert set(node.get("required", [])) <= set(node["properties"]), where
        assert "nullable" not in node and "$ref" not in node, where


def test_defaults_are_valid_for_their_fields_and_numbers_are_numbers() -> None:
    for kind, path, node in all_nodes():
        if "default" not in node:
            continue
        value = node["default"]
        jsonschema.Draft4Validator(without(node, RULES)).validate(value)
        if node.get("type") == "number":
            assert isinstance(value, float), f"{kind}: {path} default {value!r} parsed as text"


def test_every_rule_has_a_static_message() -> None:
    """A static message documents the rule and stands in if a messageExpression fails."""
    for kind, path, node in all_nodes():
        for rule in node.get(RULES, []):
            assert rule.get("message"), f"{kind}: {path}: {rule['rule']}"


def test_shared_shapes_are_identical() -> None:
    coordinator_store = copy.deepcopy(at("Federation", "spec.store"))
    del coordinator_store["properties"]["identities"]  # the coordinator issues them
    assert coordinator_store == at("Participant", "spec.store")
    conditions = at("Federation", "status.conditions")
    assert at("FederationRound", "status.conditions") == conditions
    assert at("Participant", "status.conditions") == conditions
    secret_ref = at("Federation", "spec.store.credentialsSecret")
    refs = [
        at("Federation", "spec.signingKeySecret"),
        at("Participant", "spec.signingKeySecret"),
    ]
    assert [without(r, "description") for r in refs] == [without(secret_ref, "description")] * 2
    resources = without(at("Federation", "spec.aggregator.resources"), "default", "description")
    assert without(at("Participant", "spec.compute.resources"), "description") == resources
    base_ref = without(at("Federation", "status.base"), "description")
    for kind, path in [
        ("Federation", "spec.model.initialBase"),
        ("FederationRound", "status.result.nextBase"),
    ]:
        assert without(at(kind, path), "description") == base_ref, path
    names = without(at("Federation", "spec.members[].name"), "description")
    for kind, path in [
        ("FederationRound", "spec.federation"),
        ("FederationRound", "status.members[].name"),
        ("Participant", "spec.federation"),
        ("Participant", "spec.memberName"),
    ]:
        assert without(at(kind, path), "description", RULES) == names, path


def test_round_overrides_are_the_round_defaults_without_defaults() -> None:
    defaults = at("Federation", "spec.roundDefaults")["properties"]
    spec = at("FederationRound", "spec")["properties"]
    for name, node in defaults.items():
        assert "default" in node, name
        assert without(spec[name], "description") == without(node, "default", "description")
        assert (
            f"Unset means the Federation's spec.roundDefaults.{name}."
            in (spec[name]["description"])
        )
    assert set(spec) == {*defaults, "federation", "round", "suspend"}


def test_conditions_are_metav1_conditions() -> None:
    conditions = at("Federation", "status.conditions")
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert item["required"] == ["type", "status", "lastTransitionTime", "reason", "message"]
    props = item["properties"]
    assert props["reason"]["pattern"] == CONDITION_REASON
    assert (props["reason"]["minLength"], props["reason"]["maxLength"]) == (1, 1024)
    assert props["message"]["maxLength"] == 32768
    assert props["type"]["pattern"] == CONDITION_TYPE and props["type"]["maxLength"] == 316
    assert props["status"]["enum"] == ["True", "False", "Unknown"]
    assert props["lastTransitionTime"]["format"] == "date-time"
    assert props["observedGeneration"]["format"] == "int64"
    # Everything the lifecycle will write fits the schema.
    for reason in Reason:
        assert re.fullmatch(CONDITION_REASON, reason.value), reason
    for condition in (READY, RECONCILING, STALLED):
        assert re.fullmatch(CONDITION_TYPE, condition), condition


# --------------------------------------------------------------------------- the Python side


def test_enums_equal_the_python_definitions() -> None:
    assert at("Federation", "spec.roundDefaults.encoding")["enum"] == list(ENCODINGS)
    assert at("FederationRound", "spec.encoding")["enum"] == list(ENCODINGS)
    assert at("Federation", "spec.aggregation.optimizer")["enum"] == list(OPTIMIZERS)
    assert at("Federation", "spec.aggregation.weighting")["enum"] == list(WEIGHTINGS)
    assert at("Federation", "spec.model.preset")["enum"] == list(PRESETS)
    assert at("Federation", "spec.model.preset")["default"] in PRESETS
    states = [s.value for s in MemberState]
    assert at("FederationRound", "status.members[].state")["enum"] == states
    assert at("Participant", "status.state")["enum"] == states
    assert at("Participant", "status.rounds[].state")["enum"] == states
    assert at("FederationRound", "status.phase")["enum"] == [p.value for p in RoundPhase]


def test_aggregation_defaults_equal_the_strategy_defaults() -> None:
    aggregation = at("Federation", "spec.aggregation")["properties"]
    strategy = Strategy()
    for field, attr in [
        ("optimizer", "optimizer"),
        ("momentum", "momentum"),
        ("beta1", "beta1"),
        ("beta2", "beta2"),
        ("tau", "tau"),
        ("weighting", "weighting"),
    ]:
        assert aggregation[field]["default"] == getattr(strategy, attr), field
    assert "default" not in aggregation["learningRate"]  # None: the optimizer's own default
    assert "default" not in aggregation["maxShare"]
    said = aggregation["learningRate"]["description"]
    for optimizer, lr in DEFAULT_LR.items():
        assert f"{optimizer} {lr}" in said, (optimizer, lr)


def _plan_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    plan = json.loads((PROTOCOL_SCHEMAS / "round-plan.v1.json").read_text())
    defs = json.loads((PROTOCOL_SCHEMAS / "defs.v1.json").read_text())["$defs"]
    return plan, defs


def _bounds(node: Mapping[str, Any]) -> tuple[Any, Any, bool]:
    """(minimum, maximum, exclusive minimum) whether written as draft 4 or draft 2020-12."""
    if isinstance(node.get("exclusiveMinimum"), bool) or "exclusiveMinimum" not in node:
        return node.get("minimum"), node.get("maximum"), bool(node.get("exclusiveMinimum"))
    return node["exclusiveMinimum"], node.get("maximum"), True


def test_ranges_are_those_of_the_signed_plan() -> None:
    """A spec the API server admits never makes a plan the protocol refuses."""
    plan, defs = _plan_schema()
    hyper = plan["properties"]["hyperparameters"]["properties"]
    for name in ("innerSteps", "learningRate", "batchSize", "seqLen", "warmupSteps"):
        node = at("Federation", f"spec.roundDefaults.{name}")
        assert node["type"] == hyper[name]["type"], name
        assert _bounds(node) == _bounds(hyper[name]), name
    quorum = at("Federation", "spec.roundDefaults.quorum")
    assert _bounds(quorum) == _bounds(plan["properties"]["minParticipants"])
    members = at("Federation", "spec.members")
    assert members["maxItems"] == plan["properties"]["participants"]["maxItems"]
    member = plan["properties"]["participants"]["items"]["properties"]
    publics = [
        at("Federation", "spec.members[].publicKey")["pattern"],
        at("Participant", "spec.coordinatorPublicKey")["pattern"],
    ]
    assert publics == [member["publicKey"]["pattern"]] * 2
    member_name = at("Federation", "spec.members[].name")
    assert member_name["pattern"] == defs["name"]["pattern"]
    assert member_name["maxLength"] == defs["name"]["maxLength"]
    round_range = (defs["round"]["minimum"], defs["round"]["maximum"])
    for kind, path in [
        ("FederationRound", "spec.round"),
        ("Federation", "status.latestRound"),
        ("Participant", "status.currentRound"),
        ("Participant", "spec.admission.approvedRounds[]"),
        ("Participant", "spec.admission.deniedRounds[]"),
    ]:
        node = at(kind, path)
        assert (node["minimum"], node["maximum"]) == round_range, path
    assert at("Federation", "spec.roundDefaults.encoding")["enum"] == defs["encoding"]["enum"]


# --------------------------------------------------------------------------- rules, as text


def test_duration_fields_share_one_pattern_and_cel_guard() -> None:
    fields = [
        ("Federation", "spec.roundDefaults.deadline", "1m", "720h"),
        ("FederationRound", "spec.deadline", "1m", "720h"),
        ("Participant", "spec.pollInterval", "1s", "1h"),
    ]
    guard = DURATION.replace(r"\.", "[.]")  # CEL strings would need \\. for \.
    for kind, path, low, high in fields:
        node = at(kind, path)
        assert node["pattern"] == DURATION, path
        (rule,) = node[RULES]
        text = " ".join(rule["rule"].split())
        assert f"!self.matches('{guard}')" in text, path  # no CEL error on a bad string
        assert f"duration(self) >= duration('{low}')" in text, path
        assert f"duration(self) <= duration('{high}')" in text, path
        assert f"between {low} and {high}" in rule["message"], path
    for good in ("90m", "1h30m", "1.5h", "100ms", "30s", "720h"):
        assert re.fullmatch(DURATION, good), good
    for bad in ("soon", "5", "1d", "-1h", "1h 30m", "h", ".5h"):
        assert not re.fullmatch(DURATION, bad), bad


def test_immutable_fields() -> None:
    for kind, path, message in [
        ("FederationRound", "spec.federation", "spec.federation is immutable"),
        ("FederationRound", "spec.round", "spec.round is immutable"),
        ("Participant", "spec.federation", "spec.federation is immutable"),
    ]:
        (rule,) = at(kind, path)[RULES]
        assert rule["rule"] == "self == oldSelf", path
        assert rule["message"].startswith(message), path
    (member_rule,) = schema_of("Participant")[RULES]
    assert member_rule["fieldPath"] == ".spec.memberName"
    assert "oldSelf.spec.memberName" in member_rule["rule"]
    assert "metadata.name" in member_rule["rule"]


def test_printer_columns_point_at_declared_fields() -> None:
    expected = {
        "Federation": ["Members", "Latest", "Ready", "Age"],
        "FederationRound": ["Federation", "Round", "Phase", "Reported", "Age", "Next Base", "Loss"],
        "Participant": ["Federation", "Round", "State", "Ready", "Age"],
    }
    for kind in KINDS:
        (version,) = crd(kind)["spec"]["versions"]
        columns = version["additionalPrinterColumns"]
        assert [c["name"] for c in columns] == expected[kind]
        for col in columns:
            path = col["jsonPath"]
            if path == ".metadata.creationTimestamp":
                assert col["type"] == "date"
                continue
            assert col.get("description"), (kind, col["name"])
            if path == '.status.conditions[?(@.type=="Ready")].status':
                continue
            node = at(kind, path.lstrip("."))
            assert col["type"] == node["type"], (kind, col["name"])
        wide = [c["name"] for c in columns if c.get("priority", 0) == 1]
        assert wide == (["Next Base", "Loss"] if kind == "FederationRound" else [])


# --------------------------------------------------------------------------- local validation


KEY = "ed25519:" + "A" * 43 + "="
STORE = {"endpoint": "https://minio.example:9000", "bucket": "tapestry",
         "credentialsSecret": {"name": "s3"}}  # fmt: skip


def _validator(kind: str) -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(without(schema_of(kind), RULES))


def test_minimal_objects_validate_and_bad_ones_do_not() -> None:
    """The schemas as JSON Schema (draft 4, which Kubernetes' OpenAPI v3 subset follows)."""
    federation: dict[str, Any] = {"spec": {"store": STORE, "signingKeySecret": {"name": "coord"},
                           "members": [{"name": "de", "publicKey": KEY}]}}  # fmt: skip
    rnd = {"spec": {"federation": "demo", "round": 0}}
    participant = {"spec": {"federation": "demo", "store": STORE, "coordinatorPublicKey": KEY,
                            "signingKeySecret": {"name": "me"},
                            "data": {"pvc": "corpus"}}}  # fmt: skip
    for kind, obj in zip(KINDS, (federation, rnd, participant), strict=True):
        _validator(kind).validate(obj)
    bad = copy.deepcopy(federation)
    bad["spec"]["store"]["bucket"] = "Tapestry_Bucket"
    with pytest.raises(jsonschema.ValidationError, match="does not match"):
        _validator("Federation").validate(bad)
