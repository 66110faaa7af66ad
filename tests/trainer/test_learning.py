"""The ``tiny`` preset genuinely learns real text on a CPU within seconds."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tapestry_trainer.corpus import prepare_demo_corpus  # noqa: E402
from tapestry_trainer.data import LoaderContext, ShardLoader, evaluate, prepare_shards  # noqa: E402
from tapestry_trainer.inner import train_inner  # noqa: E402
from tapestry_trainer.plugins import build_model  # noqa: E402
from tapestry_trainer.specs import InnerConfig, ModelSpec  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.mark.slow
@pytest.mark.network  # the demo corpus: apt-get download, unless cached
@pytest.mark.skipif(
    not (shutil.which("apt-get") and shutil.which("dpkg-deb")),
    reason="the demo corpus comes from Debian packages",
)
def test_tiny_beats_a_uniform_byte_model_after_60_steps(tmp_path: Path) -> None:
    folder = prepare_demo_corpus(tmp_path / "corpus", ["es"])["es"]
    shards = prepare_shards([folder], tmp_path / "shards")
    config = InnerConfig(steps=60, lr=3e-3, batch_size=16, seq_len=128, warmup_steps=10)
    model = build_model(ModelSpec.preset("tiny"))
    before = evaluate(model, shards.parent, batches=4)
    loader = ShardLoader(
        LoaderContext(
            data=str(shards.parent), rank=0, world_size=1, micro_batch_size=16, seq_len=128, seed=0
        )
    )
    result = train_inner(model, loader, config)
    after = evaluate(model, shards.parent, batches=4)
    assert before > math.log(256)
    assert after < 3.0 < math.log(256)  # ~2.6 in practice; uniform bytes is 5.55
    assert result.tokens == 60 * 16 * 128 and result.tokens_per_s > 0
