"""`tapestry base publish`: round 0's base from a user's own weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tapestry_protocol.exchange import COORDINATOR, load_tensors, read_model
from tapestry_protocol.layout import Layout
from tapestry_protocol.shards import Tensor, encode_safetensors
from tapestry_protocol.signing import SigningKey
from tapestry_protocol.store.filesystem import FilesystemStore
from tests.cli.conftest import assert_error, tapestry

SPEC = json.dumps({"kind": "plugin", "factory": "my_model:build", "options": {}, "seed": 0})


def _weights(path: Path, dtype: str = "float32") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {"emb": rng.standard_normal((8, 4)).astype(dtype), "head": np.ones(4, dtype)}
    path.write_bytes(encode_safetensors({n: Tensor.of(a) for n, a in arrays.items()}))
    return arrays


def test_publish_a_base_that_verifies(tmp_path: Path) -> None:
    coordinator = SigningKey.generate(COORDINATOR)
    coordinator.save(tmp_path / "keys")
    arrays = _weights(tmp_path / "model.safetensors")
    (tmp_path / "store").mkdir()
    done = tapestry(
        "base", "publish", "model.safetensors", "--store", "store", "--federation", "demo",
        "--key", "keys/coordinator.key", "--model-spec", SPEC, "--shard-mib", "1",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    store, layout = FilesystemStore(tmp_path / "store"), Layout("demo")
    base = read_model(store, layout, layout.base_manifest(0), coordinator.public_key_text)
    assert f"initialBase: {{manifest: {base.key}, sha256: {base.sha256}}}" in done.stdout
    assert base.document.model == json.loads(SPEC)
    loaded = load_tensors(store, base)
    assert all(np.array_equal(loaded[n], a) for n, a in arrays.items())


def test_only_float32_weights_make_a_base(tmp_path: Path) -> None:
    SigningKey.generate(COORDINATOR).save(tmp_path / "keys")
    _weights(tmp_path / "model.safetensors", dtype="float64")
    done = tapestry(
        "base", "publish", "model.safetensors", "--store", "store", "--federation", "demo",
        "--key", "keys/coordinator.key", "--model-spec", SPEC, cwd=tmp_path,
    )  # fmt: skip
    assert_error(
        done, "error: model.safetensors: tensors must be float32 (F32); not ['emb', 'head']"
    )
