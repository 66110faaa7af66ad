"""Copies the CRDs into the Helm chart and renders docs/resources.md from their schemas.

    .venv/bin/python crds/render.py            # writes what is stale
    .venv/bin/python crds/render.py --check    # exits 1, saying what is stale, writes nothing

The YAML files in crds/ are the one source. The chart carries them in its `crds/` directory,
byte for byte: Helm installs that directory before any template and never templates it, so
the CRDs exist before the operator that watches them starts, and `helm template | kubectl
apply` and `kubectl apply -f crds/` install the same bytes. (Helm never upgrades or deletes
what it installed from `crds/`; upgrading CRDs is a separate `kubectl apply --server-side`.)
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "crds"
CHART_CRDS = ROOT / "charts" / "tapestry" / "crds"
DOC = ROOT / "docs" / "resources.md"
CRD_FILES = (
    "tapestry.dev_federations.yaml",
    "tapestry.dev_federationrounds.yaml",
    "tapestry.dev_participants.yaml",
)
REGENERATE = ".venv/bin/python crds/render.py"
RULES = "x-kubernetes-validations"

Schema = Mapping[str, Any]


def load(name: str) -> dict[str, Any]:
    """One CRD from crds/, parsed."""
    crd: dict[str, Any] = yaml.safe_load((SOURCE / name).read_text(encoding="utf-8"))
    return crd


def served_schema(crd: Mapping[str, Any]) -> Schema:
    """The openAPIV3Schema of the CRD's one version."""
    (version,) = crd["spec"]["versions"]
    schema: Schema = version["schema"]["openAPIV3Schema"]
    return schema


# --------------------------------------------------------------------------- the docs


@dataclass(frozen=True)
class Field:
    path: str
    schema: Schema
    required: bool


def walk(schema: Schema, path: str, required: bool = False) -> Iterator[Field]:
    """Every field below `schema` in document order; list items appear as `path[]`."""
    yield Field(path, schema, required)
    items = schema.get("items")
    if isinstance(items, Mapping) and "properties" in items:
        yield from _children(items, f"{path}[]")
    if "properties" in schema:
        yield from _children(schema, path)


def _children(schema: Schema, path: str) -> Iterator[Field]:
    needed = set(schema.get("required", ()))
    for name, child in schema["properties"].items():
        yield from walk(child, f"{path}.{name}", name in needed)


def type_of(schema: Schema) -> str:
    if schema.get("x-kubernetes-int-or-string"):
        return "quantity" if "pattern" in schema else "integer or string"
    kind = schema.get("type", "any")
    if kind == "array":
        item = type_of(schema["items"])
        shape = schema.get("x-kubernetes-list-type")
        if shape == "map":
            keys = ", ".join(schema["x-kubernetes-list-map-keys"])
            return f"list of {item}, keyed by {keys}"
        return f"list of {item}" + (" (set)" if shape == "set" else "")
    if kind == "object":
        if "additionalProperties" in schema:
            return f"map of {type_of(schema['additionalProperties'])}"
        if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
            return "object (free-form)"
    if "format" in schema:
        return f"{kind} ({schema['format']})"
    return str(kind)


def _number(value: Any) -> str:
    return json.dumps(value)


def _range(schema: Schema) -> str:
    low, high = schema.get("minimum"), schema.get("maximum")
    above = "<" if schema.get("exclusiveMinimum") else "≤"
    below = "<" if schema.get("exclusiveMaximum") else "≤"
    if low is not None and high is not None:
        return f"{_number(low)} {above} x {below} {_number(high)}"
    if low is not None:
        return f"x {'>' if schema.get('exclusiveMinimum') else '≥'} {_number(low)}"
    if high is not None:
        return f"x {below} {_number(high)}"
    return ""


def _count(low: int | None, high: int | None) -> str:
    if low and high is not None:
        return f"{low} to {high}"
    if high is not None:
        return f"at most {high}"
    return f"at least {low}" if low else ""


def allowed(schema: Schema) -> list[str]:
    """Human-readable constraints of one field, each a short phrase."""
    out: list[str] = []
    if "enum" in schema:
        out.append("one of " + ", ".join(f"`{v}`" for v in schema["enum"]))
    if span := _range(schema):
        out.append(span)
    if "pattern" in schema:
        out.append(f"matches `{schema['pattern']}`")
    for low, high, unit in (
        ("minLength", "maxLength", "characters"),
        ("minItems", "maxItems", "items"),
        ("minProperties", "maxProperties", "entries"),
    ):
        if span := _count(schema.get(low), schema.get(high)):
            out.append(f"{span} {unit}")
    out += [f'refused with "{rule["message"]}"' for rule in schema.get(RULES, ())]
    for part, label in (("items", "each item"), ("additionalProperties", "each value")):
        if isinstance(schema.get(part), Mapping) and (inner := allowed(schema[part])):
            out.append(f"{label}: {'; '.join(inner)}")
    return out


def _cell(text: str) -> str:
    """One table cell: one line, pipes escaped, and < > outside code spans as entities."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):  # even parts lie outside code spans
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _default(schema: Schema) -> str:
    if "default" not in schema:
        return ""
    return f"`{json.dumps(schema['default'], separators=(', ', ': '))}`"


def render_kind(crd: Mapping[str, Any]) -> list[str]:
    spec = crd["spec"]
    names = spec["names"]
    (version,) = spec["versions"]
    schema = served_schema(crd)
    out = [
        f"## {names['kind']}",
        "",
        _cell(schema["description"]),
        "",
        f"- API: `{spec['group']}/{version['name']}`, kind `{names['kind']}`, "
        f"{spec['scope'].lower()}; `kubectl get {names['plural']}` "
        f"(short: {', '.join(f'`{s}`' for s in names.get('shortNames', []))}; "
        f"categories: {', '.join(f'`{c}`' for c in names.get('categories', []))})",
        f"- File: `crds/{crd['metadata']['name'].partition('.')[2]}_{names['plural']}.yaml`",
    ]
    for rule in schema.get(RULES, ()):
        when = " on every update" if "oldSelf" in rule["rule"] else ""
        where = f" (reported at `{rule['fieldPath']}`)" if "fieldPath" in rule else ""
        out.append(f'- Checked{when}: refused with "{_cell(rule["message"])}"{where}')
    out += [
        "",
        "Columns of `kubectl get` (those of priority 1 with `-o wide`):",
        "",
        "| column | JSONPath | priority |",
        "| --- | --- | --- |",
    ]
    for col in version.get("additionalPrinterColumns", ()):
        out.append(f"| {col['name']} | `{_cell(col['jsonPath'])}` | {col.get('priority', 0)} |")
    out += [
        "",
        "| field | type | default | allowed | description |",
        "| --- | --- | --- | --- | --- |",
    ]
    for top in ("spec", "status"):
        for field in walk(schema["properties"][top], top, top in schema.get("required", ())):
            kind = type_of(field.schema) + (", **required**" if field.required else "")
            out.append(
                f"| `{field.path}` | {_cell(kind)} | {_cell(_default(field.schema))} "
                f"| {_cell('; '.join(allowed(field.schema)))} "
                f"| {_cell(field.schema.get('description', ''))} |"
            )
    return [*out, ""]


def render_doc(crds: list[dict[str, Any]]) -> str:
    out = [
        "# Custom resources",
        "",
        "<!-- Generated by crds/render.py from crds/*.yaml: do not edit by hand. -->",
        f"Generated from the CRD schemas in `crds/`; after changing one, run `{REGENERATE}`",
        "(a test fails while this file or the chart's copy is stale). Every field has a",
        "description, every default and constraint below is enforced by the API server, and",
        "`kubectl explain <kind>.spec` shows the same descriptions.",
        "",
        "A `Federation` and its `FederationRound`s live in the coordinator's cluster; each",
        "member's `Participant` lives in that member's own cluster. Durations are strings such",
        "as `90s`, `90m` or `1h30m` (units `ms`, `s`, `m`, `h`); `quantity` is a Kubernetes",
        "resource quantity (`500m`, `2`, `1Gi`).",
        "",
    ]
    for crd in crds:
        out += render_kind(crd)
    return "\n".join(out).rstrip("\n") + "\n"


# --------------------------------------------------------------------------- outputs


def outputs() -> dict[Path, bytes]:
    """Every generated file and the bytes it must hold."""
    wanted = {CHART_CRDS / name: (SOURCE / name).read_bytes() for name in CRD_FILES}
    wanted[DOC] = render_doc([load(name) for name in CRD_FILES]).encode("utf-8")
    return wanted


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _diff(path: Path, old: bytes, new: bytes, limit: int = 12) -> list[str]:
    lines = list(
        difflib.unified_diff(
            old.decode("utf-8", "replace").splitlines(),
            new.decode("utf-8", "replace").splitlines(),
            f"{_rel(path)} (on disk)",
            f"{_rel(path)} (expected)",
            lineterm="",
            n=1,
        )
    )
    shown = [f"    {line}" for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"    ... {len(lines) - limit} more diff lines")
    return shown


def main(check: bool) -> int:
    """Writes stale outputs, or with `check` reports them and returns 1; 0 if all current."""
    wanted = outputs()
    present = sorted(CHART_CRDS.iterdir()) if CHART_CRDS.is_dir() else []
    extra = [p for p in present if p.is_file() and p not in wanted]
    stale: list[str] = []
    for path, content in wanted.items():
        current = path.read_bytes() if path.exists() else None
        if current == content:
            continue
        if current is None:
            stale.append(f"{_rel(path)}: missing")
        else:
            stale.append(f"{_rel(path)}: differs from what crds/ says")
            stale += _diff(path, current, content)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
    for path in extra:
        stale.append(f"{_rel(path)}: not one of crds/{{{','.join(CRD_FILES)}}}")
        if not check:
            path.unlink()
    if not stale:
        return 0
    if check:
        print("stale generated files:", *stale, f"run {REGENERATE}", sep="\n", file=sys.stderr)
        return 1
    print("updated:", *stale, sep="\n", file=sys.stderr)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale files, write nothing")
    sys.exit(main(check=parser.parse_args().check))
