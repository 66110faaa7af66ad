"""What crosses a border: after a real local run, every object in the store is one of the
protocol's documents or a safetensors shard of a model or a delta, and no byte of a
participant's training text is among them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tapestry_protocol.layout import Layout
from tapestry_protocol.shards import decode_safetensors, stored_names
from tests.e2e.test_local_run import _local_run
from tests.e2e.texts import write_corpora

pytestmark = [pytest.mark.torch, pytest.mark.slow]

# A sentence only alice's corpus holds; if any object carried her text, it would show.
SENTINEL = "Sovereign sentinel: the quick brown fox keeps its data at home."

_ROUND = r"[0-9]{6}"
_MEMBER = r"(?P<member>[a-z0-9-]+)"
_SHARD = r"part-[0-9]{5}-[0-9a-f]{16}\.safetensors"


def _kinds(layout: Layout) -> dict[str, re.Pattern[str]]:
    root = re.escape(layout.root)
    return {
        kind: re.compile(root + pattern + "$")
        for kind, pattern in {
            "plan": rf"rounds/{_ROUND}/plan\.json",
            "receipt": rf"rounds/{_ROUND}/receipts/{_MEMBER}/(accepted|declined|failed)\.json",
            "update manifest": rf"rounds/{_ROUND}/updates/{_MEMBER}/manifest\.json",
            "update shard": rf"rounds/{_ROUND}/updates/{_MEMBER}/{_SHARD}",
            "close record": rf"rounds/{_ROUND}/close\.json",
            "result": rf"rounds/{_ROUND}/result\.json",
            "model manifest": rf"(bases|optimizer)/{_ROUND}/manifest\.json",
            "model shard": rf"(bases|optimizer)/{_ROUND}/{_SHARD}",
        }.items()
    }


def _classify(kinds: dict[str, re.Pattern[str]], key: str) -> str | None:
    return next((kind for kind, pattern in kinds.items() if pattern.match(key)), None)


def test_only_protocol_objects_and_no_training_text_reach_the_store(tmp_path: Path) -> None:
    data = write_corpora(tmp_path / "text")
    for copy in range(20):  # enough copies that the sentence is in every training shard
        (data / "alice" / f"sentinel-{copy}.txt").write_text((SENTINEL + "\n") * 50)
    workdir = tmp_path / "w"
    run = _local_run(data, workdir, "--no-baseline", rounds=1)
    assert run.returncode == 0, run.stdout + run.stderr
    assert any(SENTINEL.encode() in p.read_bytes() for p in (workdir / "data").rglob("*.txt")) or (
        any(SENTINEL.encode() in p.read_bytes() for p in data.rglob("*.txt"))
    ), "the sentinel must be in alice's training text for this test to mean anything"

    store = workdir / "store"
    layout = Layout("local")
    kinds = _kinds(layout)
    objects = {p.relative_to(store).as_posix(): p for p in store.rglob("*") if p.is_file()}
    objects = {k: p for k, p in objects.items() if not Path(k).name.startswith(".")}
    assert len(objects) > 10, sorted(objects)

    unknown = [k for k in objects if _classify(kinds, k) is None]
    assert unknown == [], f"objects that are not protocol objects: {unknown}"

    base_manifest = json.loads((store / layout.base_manifest(0)).read_text())
    base_tensors = {t for shard in base_manifest["shards"] for t in shard["tensors"]}
    seen = {kind: 0 for kind in kinds}
    for key, path in sorted(objects.items()):
        kind = _classify(kinds, key)
        assert kind is not None
        seen[kind] += 1
        body = path.read_bytes()
        assert SENTINEL.encode() not in body, f"{key} holds alice's training text"
        assert SENTINEL.split(":")[1].strip().encode() not in body, key
        if kind == "update shard":
            tensors, metadata = decode_safetensors(body)
            manifest = json.loads((path.parent / "manifest.json").read_text())
            allowed = set(stored_names(base_tensors, manifest["encoding"]))
            assert set(tensors) <= allowed, f"{key} holds tensors the base does not: {tensors}"
            assert all(len(v) <= 64 for v in metadata.values()), (key, metadata)
        if kind == "update manifest":  # training figures only: numbers and short labels
            manifest = json.loads(body)
            for name, value in manifest["metrics"].items():
                assert (
                    value is None
                    or isinstance(value, int | float)
                    or (isinstance(value, str) and len(value) <= 32)
                ), (key, name, value)
    for kind in ("plan", "receipt", "update manifest", "update shard", "close record", "result"):
        assert seen[kind] > 0, f"the run wrote no {kind}: {seen}"
