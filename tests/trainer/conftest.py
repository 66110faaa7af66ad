"""Fixtures of the trainer tests: a small synthetic text corpus and its shard set."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wise",
    "owls",
    "sing",
    "about",
    "rivers",
    "mountains",
    "bread",
    "and",
    "the",
    "long",
    "winter",
    "nights",
]


def write_text(folder: Path, files: int = 3, sentences: int = 400, seed: int = 0) -> Path:
    """Deterministic pseudo-prose: enough structure for a model to learn something."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        lines = [
            " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
            for _ in range(sentences)
        ]
        (folder / f"doc{i}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text(tmp_path_factory.mktemp("text") / "corpus")


@pytest.fixture(scope="session")
def shard_dir(text_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tapestry_trainer.data import prepare_shards

    out = tmp_path_factory.mktemp("shards") / "set"
    prepare_shards([text_dir], out, val_fraction=0.1, block_tokens=512)
    return out


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread(one_torch_thread: None) -> None:
    """Every trainer test runs with one intra-op thread (see tests/conftest.py)."""
