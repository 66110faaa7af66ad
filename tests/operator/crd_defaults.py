"""Custom resource bodies as the API server stores them: pruned, defaulted and valid
against the CRDs in crds/, without an API server.

`apply_defaults` is the API server's structural defaulting: for each property of an
object that has a `default` and is missing (or null while not nullable), set a copy of
the default; then recurse into every value present, defaulted ones included, so a
defaulted `{}` gets its own properties' defaults. `prune` drops the fields a structural
schema does not declare, as the API server does before storing an object. The body
factories start from the fewest fields the schemas require.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from tapestry_protocol.signing import SigningKey

CRDS = Path(__file__).resolve().parents[2] / "crds"
API_VERSION = "tapestry.dev/v1alpha1"
NAMESPACE = "tapestry"
PRESERVE = "x-kubernetes-preserve-unknown-fields"

Schema = Mapping[str, Any]
Body = dict[str, Any]

COORDINATOR_KEY = SigningKey.generate("coordinator").public_key_text
MEMBER_KEYS = {n: SigningKey.generate(n).public_key_text for n in ("alpha", "beta")}


@cache
def _crds() -> dict[str, dict[str, Any]]:
    """Every CRD in crds/, by kind."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(CRDS.glob("*.yaml")):
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(loaded, dict) and loaded.get("kind") == "CustomResourceDefinition":
            out[loaded["spec"]["names"]["kind"]] = loaded
    return out


def schema(kind: str) -> dict[str, Any]:
    """The openAPIV3Schema of the one served version of `kind`'s CRD."""
    (version,) = _crds()[kind]["spec"]["versions"]
    found: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return found


def _additional(node: Schema) -> Schema | None:
    extra = node.get("additionalProperties")
    return extra if isinstance(extra, Mapping) else None


def apply_defaults(value: Any, node: Schema) -> None:
    """Default `value` in place, top-down, as the API server does."""
    if isinstance(value, dict):
        properties: Mapping[str, Schema] = node.get("properties", {})
        for name, prop in properties.items():
            if "default" not in prop:
                continue
            if name not in value or (value[name] is None and not prop.get("nullable")):
                value[name] = copy.deepcopy(prop["default"])
        extra = _additional(node)
        for name, item in value.items():
            if name in properties:
                apply_defaults(item, properties[name])
            elif extra is not None:
                apply_defaults(item, extra)
    elif isinstance(value, list) and isinstance(node.get("items"), Mapping):
        for item in value:
            apply_defaults(item, node["items"])


def prune(value: Any, node: Schema) -> None:
    """Drop, in place, the fields the schema does not declare (metadata is ObjectMeta,
    which the API server handles itself)."""
    if isinstance(value, dict) and not node.get(PRESERVE):
        properties: Mapping[str, Schema] = node.get("properties", {})
        extra = _additional(node)
        for name in list(value):
            if name in properties:
                if name != "metadata":
                    prune(value[name], properties[name])
            elif extra is not None:
                prune(value[name], extra)
            elif node.get("additionalProperties") is not True:
                del value[name]
    elif isinstance(value, list) and isinstance(node.get("items"), Mapping):
        for item in value:
            prune(item, node["items"])


def stored(kind: str, body: Mapping[str, Any]) -> Body:
    """`body` as the API server would store it: pruned, defaulted, then validated."""
    out = copy.deepcopy(dict(body))
    node = schema(kind)
    prune(out, node)
    apply_defaults(out, node)
    jsonschema.Draft4Validator(node).validate(out)
    return out


def _body(kind: str, name: str, spec: Mapping[str, Any], **metadata: Any) -> Body:
    meta = {
        "name": name,
        "namespace": NAMESPACE,
        "uid": f"uid-{kind.lower()}-{name}",
        "generation": 1,
        **metadata,
    }
    return stored(kind, {"apiVersion": API_VERSION, "kind": kind, "metadata": meta, "spec": spec})


def store_spec(**changes: Any) -> dict[str, Any]:
    return {
        "endpoint": "https://s3.example:9000",
        "bucket": "tapestry-store",
        "credentialsSecret": {"name": "store-credentials"},
        **changes,
    }


def federation(name: str = "fed", metadata: Mapping[str, Any] | None = None, **spec: Any) -> Body:
    """A stored Federation; `spec` replaces top-level spec fields."""
    base = {
        "store": store_spec(),
        "signingKeySecret": {"name": "coordinator-key"},
        "members": [{"name": n, "publicKey": k} for n, k in MEMBER_KEYS.items()],
    }
    return _body("Federation", name, {**base, **spec}, **(metadata or {}))


def federation_round(
    name: str = "fed-r0", metadata: Mapping[str, Any] | None = None, **spec: Any
) -> Body:
    """A stored FederationRound of federation `fed`; `spec` replaces spec fields."""
    return _body(
        "FederationRound", name, {"federation": "fed", "round": 0, **spec}, **(metadata or {})
    )


def participant(
    name: str = "alpha", metadata: Mapping[str, Any] | None = None, **spec: Any
) -> Body:
    """A stored Participant of federation `fed`; `spec` replaces top-level spec fields."""
    base = {
        "federation": "fed",
        "store": store_spec(),
        "coordinatorPublicKey": COORDINATOR_KEY,
        "signingKeySecret": {"name": "alpha-key"},
        "data": {"pvc": "alpha-data"},
    }
    return _body("Participant", name, {**base, **spec}, **(metadata or {}))
