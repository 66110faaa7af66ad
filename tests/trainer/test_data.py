"""Tokenizer, shard preparation, the streaming loader and held-out evaluation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import Tensor  # noqa: E402

from tapestry_trainer.data import (  # noqa: E402
    BOS,
    EOS,
    BatchLoader,
    ByteTokenizer,
    LoaderContext,
    ShardLoader,
    evaluate,
    load_index,
    main,
    prepare_shards,
)
from tapestry_trainer.model import build_gpt  # noqa: E402
from tapestry_trainer.specs import PRESETS  # noqa: E402

pytestmark = pytest.mark.torch


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    text = "Grüße, ¿qué tal? 日本語 🙂\nline two"
    ids = tok.encode(text)
    assert ids.dtype == np.uint16
    assert ids[0] == BOS and ids[-1] == EOS and len(ids) == len(text.encode()) + 2
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text
    assert tok.vocab_size == 258 <= PRESETS["tiny"].vocab_size
    assert tok.decode([0xC3]) == "\ufffd"  # a cut multi-byte char does not raise


def test_prepare_shards_splits_and_is_idempotent(text_dir: Path, tmp_path: Path) -> None:
    total = sum(len(p.read_bytes()) + 2 for p in text_dir.glob("*.txt"))
    out = tmp_path / "s"
    index_path = prepare_shards(
        [text_dir], out, val_fraction=0.2, block_tokens=256, shard_tokens=10_000
    )
    index = load_index(out)
    counts = {s: sum(f["tokens"] for f in files) for s, files in index["splits"].items()}
    assert counts["train"] + counts["validation"] == total
    assert 0.1 < counts["validation"] / total < 0.3
    assert len(index["splits"]["train"]) > 1  # shard_tokens splits files
    raw = np.concatenate(
        [np.fromfile(out / f["file"], dtype="<u2") for f in index["splits"]["train"]]
    )
    assert raw.max() <= EOS and (raw == BOS).sum() >= 1

    stamp = index_path.stat().st_mtime_ns
    prepare_shards([text_dir], out, val_fraction=0.2, block_tokens=256, shard_tokens=10_000)
    assert index_path.stat().st_mtime_ns == stamp  # same inputs: untouched
    prepare_shards([text_dir], out, val_fraction=0.3, block_tokens=256, shard_tokens=10_000)
    assert load_index(out)["valFraction"] == 0.3  # new parameters: rebuilt


def test_small_input_still_gets_a_validation_split(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world " * 40)
    prepare_shards([tmp_path / "a.txt"], tmp_path / "s", val_fraction=0.01, block_tokens=64)
    assert load_index(tmp_path / "s")["splits"]["validation"]


def test_cli(text_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(text_dir), "--out", str(tmp_path / "cli"), "--val-fraction", "0.1"])
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"]["train"] > 0 and report["tokens"]["validation"] > 0


def _ctx(
    shard_dir: Path, rank: int = 0, world: int = 1, m: int = 4, seed: int = 0
) -> LoaderContext:
    return LoaderContext(
        data=str(shard_dir), rank=rank, world_size=world, micro_batch_size=m, seq_len=32, seed=seed
    )


def _take(loader: BatchLoader, n: int) -> list[Tensor]:
    return [loader.next_batch()[0] for _ in range(n)]


def test_loader_is_deterministic_and_ranks_take_disjoint_slices(shard_dir: Path) -> None:
    single = _take(ShardLoader(_ctx(shard_dir, m=8)), 5)
    again = _take(ShardLoader(_ctx(shard_dir, m=8)), 5)
    assert all(torch.equal(a, b) for a, b in zip(single, again, strict=True))
    other_seed = _take(ShardLoader(_ctx(shard_dir, m=8, seed=1)), 1)
    assert not torch.equal(single[0], other_seed[0])

    rank0 = _take(ShardLoader(_ctx(shard_dir, rank=0, world=2, m=4)), 5)
    rank1 = _take(ShardLoader(_ctx(shard_dir, rank=1, world=2, m=4)), 5)
    for whole, r0, r1 in zip(single, rank0, rank1, strict=True):
        # Together the two ranks see exactly the one-process global batch, in order.
        assert torch.equal(torch.cat([r0, r1]), whole)
        rows0, rows1 = {tuple(r.tolist()) for r in r0}, {tuple(r.tolist()) for r in r1}
        assert not rows0 & rows1


def test_loader_windows_follow_the_stream(shard_dir: Path) -> None:
    x, y = ShardLoader(_ctx(shard_dir)).next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_loader_resumes_from_its_state(shard_dir: Path) -> None:
    loader = ShardLoader(_ctx(shard_dir))
    _take(loader, 200)  # crosses an epoch boundary of this small set
    state = json.loads(json.dumps(loader.state_dict()))
    expected = _take(loader, 3)
    resumed = ShardLoader(_ctx(shard_dir))
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(_take(resumed, 3), expected, strict=True))
    with pytest.raises(ValueError, match="seed"):
        ShardLoader(_ctx(shard_dir, seed=9)).load_state_dict(state)


def test_each_round_continues_the_stream_where_the_rounds_before_it_stopped(
    shard_dir: Path,
) -> None:
    """Round r's loader starts after r rounds of innerSteps x batchSize samples: the
    windows one loader would give after those, not round 0's first windows again."""
    from tapestry_trainer.inner import DistContext
    from tapestry_trainer.plugins import loader_for, round_start
    from tapestry_trainer.specs import InnerConfig

    config = InnerConfig(steps=5, lr=1e-3, batch_size=4, seq_len=32)
    assert round_start(config, 3) == 3 * 5 * 4
    stream = ShardLoader(_ctx(shard_dir))
    _take(stream, 2 * config.steps)  # rounds 0 and 1, one 4-sample batch per step
    round_2 = loader_for(str(shard_dir), config, DistContext(), round_number=2)
    expected = _take(stream, 3)
    assert all(torch.equal(a, b) for a, b in zip(_take(round_2, 3), expected, strict=True))
    first = _take(loader_for(str(shard_dir), config, DistContext()), 1)[0]
    assert not torch.equal(_take(loader_for(str(shard_dir), config, DistContext(),
                                            round_number=1), 1)[0], first)  # fmt: skip


def test_evaluate_is_deterministic(shard_dir: Path) -> None:
    model = build_gpt(replace(PRESETS["tiny"], n_layers=1, max_seq_len=32))
    model.train()
    first = evaluate(model, shard_dir, batches=2, batch_size=4, seq_len=32)
    assert model.training
    assert evaluate(model, shard_dir, batches=2, batch_size=4, seq_len=32) == first
    assert 5.0 < first < 6.5
    with pytest.raises(KeyError, match="split"):
        evaluate(model, shard_dir, split="test", seq_len=32)
