"""Byte-level tokenizer, token shards on disk, the streaming loader and held-out evaluation.

Text becomes tokens with :class:`ByteTokenizer` (UTF-8 bytes, ids 0-255, plus BOS=256 and
EOS=257 around each document; nothing to download). :func:`prepare_shards` (also
``python -m tapestry_trainer.data SRC... --out DIR``) writes them as raw little-endian
``uint16`` files plus ``index.json``::

    DIR/index.json                      format, tokenizer, splits with per-file token counts
    DIR/train-00000.bin ...             the training split
    DIR/validation-00000.bin ...        the held-out split

The split is by blocks of ``block_tokens`` consecutive tokens, each assigned to validation
by a seeded hash with probability ``val_fraction``, so it is stable when files are added.

:class:`ShardLoader` memory-maps a split, cuts it into non-overlapping windows of
``seq_len + 1`` tokens and visits them in a seeded permutation per epoch. The global
sample stream is the same on every rank; each call of :meth:`ShardLoader.next_batch` on
rank ``r`` takes samples ``[consumed + r*m, consumed + (r+1)*m)`` and advances ``consumed``
by ``world_size*m``. Its state is that one integer, so a resumed run (even one with another
number of ranks, at the same global batch) continues exactly where it stopped. It starts
at ``LoaderContext.start``: a participant's round *r* starts where its rounds before it
ended (``r * innerSteps * batchSize``), so every round trains on new windows instead of
the first ones again.

Plug-in loaders implement the same :class:`BatchLoader` protocol and receive the same
:class:`LoaderContext` (see :mod:`tapestry_trainer.plugins`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from tapestry_protocol.files import replace_dir

INDEX = "index.json"
FORMAT = "tapestry-token-shards/1"
SPLITS = ("train", "validation")
BOS = 256
EOS = 257

TokenArray = npt.NDArray[np.uint16]


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255; BOS/EOS (256/257) mark document boundaries."""

    vocab_size = 258

    def encode(self, text: str, *, bos: bool = True, eos: bool = True) -> TokenArray:
        body = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
        parts = [np.array([BOS], np.uint16)] if bos else []
        parts.append(body)
        if eos:
            parts.append(np.array([EOS], np.uint16))
        return np.concatenate(parts)

    def decode(self, ids: Sequence[int] | npt.NDArray[Any]) -> str:
        """Bytes back to text; special ids are dropped, broken UTF-8 becomes U+FFFD."""
        data = bytes(int(i) for i in ids if int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "bytes", "vocab_size": self.vocab_size, "bos": BOS, "eos": EOS}


# --------------------------------------------------------------------------- shards


def _source_files(sources: Sequence[Path | str]) -> list[tuple[str, Path]]:
    """(stable name, path) of every ``*.txt`` below the sources, in a sorted order."""
    found: list[tuple[str, Path]] = []
    for src in map(Path, sources):
        if src.is_dir():
            found += [
                (f"{src.name}/{p.relative_to(src).as_posix()}", p)
                for p in sorted(src.rglob("*.txt"))
                if p.is_file()
            ]
        elif src.is_file():
            found.append((src.name, src))
        else:
            raise FileNotFoundError(f"no such file or directory: {src}")
    if not found:
        raise FileNotFoundError(f"no .txt files under {', '.join(map(str, sources))}")
    return sorted(found)


def _in_validation(name: str, block: int, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{name}:{block}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class _ShardWriter:
    def __init__(self, out: Path, split: str, shard_tokens: int) -> None:
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.files: list[dict[str, Any]] = []
        self._fh: Any = None

    def write(self, tokens: TokenArray) -> None:
        while len(tokens):
            if self._fh is None or self.files[-1]["tokens"] >= self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.files[-1]["tokens"]
            chunk, tokens = tokens[:room], tokens[room:]
            self._fh.write(chunk.astype("<u2").tobytes())
            self.files[-1]["tokens"] += len(chunk)

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.files):05d}.bin"
        self._fh = open(self.out / name, "wb")  # noqa: SIM115 - closed in close()
        self.files.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def prepare_shards(
    sources: Sequence[Path | str],
    out_dir: Path | str,
    *,
    val_fraction: float = 0.05,
    block_tokens: int = 2048,
    shard_tokens: int = 1 << 27,
    seed: int = 0,
) -> Path:
    """Tokenize ``*.txt`` files (or directories of them) into a shard set at ``out_dir``.

    Idempotent: if ``out_dir`` already holds a set made from the same files (names, sizes,
    mtimes) with the same parameters, it is returned untouched; otherwise it is rebuilt in a
    temporary directory and swapped in, so a crash never leaves a half-written set behind.
    Returns the path of ``index.json``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out_dir)
    files = _source_files(sources)
    fingerprint = hashlib.sha256(
        json.dumps(
            [[n, p.stat().st_size, p.stat().st_mtime_ns] for n, p in files]
            + [val_fraction, block_tokens, shard_tokens, seed]
        ).encode()
    ).hexdigest()
    index_path = out / INDEX
    if index_path.is_file() and json.loads(index_path.read_text()).get("fingerprint") == (
        fingerprint
    ):
        return index_path

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the shard set is ordinary data
    tokenizer = ByteTokenizer()
    writers = {split: _ShardWriter(tmp, split, shard_tokens) for split in SPLITS}
    try:
        for i, (name, path) in enumerate(files):
            tokens = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
            starts = range(0, len(tokens), block_tokens)
            for block, start in enumerate(starts):
                held_out = _in_validation(name, block, seed, val_fraction) or (
                    # a non-zero fraction always yields a validation split, however small
                    val_fraction > 0
                    and not writers["validation"].files
                    and i == len(files) - 1
                    and block == len(starts) - 1
                )
                writers["validation" if held_out else "train"].write(
                    tokens[start : start + block_tokens]
                )
        for writer in writers.values():
            writer.close()
        index = {
            "format": FORMAT,
            "dtype": "uint16",
            "tokenizer": tokenizer.to_dict(),
            "splits": {split: w.files for split, w in writers.items()},
            "sources": len(files),
            "valFraction": val_fraction,
            "blockTokens": block_tokens,
            "seed": seed,
            "fingerprint": fingerprint,
        }
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        replace_dir(tmp, out)
    finally:
        for writer in writers.values():
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return index_path


def load_index(data_dir: Path | str) -> dict[str, Any]:
    path = Path(data_dir) / INDEX
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: prepare shards with `python -m tapestry_trainer.data`"
        )
    index: dict[str, Any] = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported format {index.get('format')!r}")
    return index


class TokenWindows:
    """A split's shards, memory-mapped, as non-overlapping windows of ``seq_len + 1`` ids."""

    def __init__(self, data_dir: Path | str, split: str, seq_len: int) -> None:
        index = load_index(data_dir)
        if split not in index["splits"]:
            raise KeyError(f"split {split!r} not in {data_dir}; have {list(index['splits'])}")
        self.seq_len = seq_len
        self._maps: list[np.memmap[Any, np.dtype[np.uint16]]] = []
        counts = []
        for entry in index["splits"][split]:
            n = (int(entry["tokens"]) - 1) // seq_len
            if n > 0:
                self._maps.append(
                    np.memmap(
                        Path(data_dir) / entry["file"],
                        dtype="<u2",
                        mode="r",
                        shape=(int(entry["tokens"]),),
                    )
                )
                counts.append(n)
        self._starts = np.cumsum([0, *counts])
        if self.count == 0:
            raise ValueError(f"split {split!r} of {data_dir} has no window of {seq_len + 1} tokens")

    @property
    def count(self) -> int:
        return int(self._starts[-1])

    def window(self, i: int) -> npt.NDArray[np.int64]:
        shard = int(np.searchsorted(self._starts, i, side="right")) - 1
        offset = (i - int(self._starts[shard])) * self.seq_len
        return np.asarray(self._maps[shard][offset : offset + self.seq_len + 1], dtype=np.int64)

    def batch(self, indices: Sequence[int] | npt.NDArray[np.int64]) -> tuple[Tensor, Tensor]:
        """(input_ids, targets) as int64 tensors of shape (len(indices), seq_len)."""
        rows = torch.from_numpy(np.stack([self.window(int(i)) for i in indices]))
        return rows[:, :-1], rows[:, 1:]


# --------------------------------------------------------------------------- loaders


@dataclass(frozen=True)
class LoaderContext:
    """What the trainer tells any loader (built-in or plug-in) about its slice of the work.

    ``micro_batch_size`` sequences of ``seq_len`` tokens per call on this rank;
    ``world_size * micro_batch_size`` sequences per call across ranks. ``options`` carries
    the participant's own loader settings, untouched.
    """

    data: str
    rank: int
    world_size: int
    micro_batch_size: int
    seq_len: int
    seed: int
    split: str = "train"
    options: Mapping[str, Any] = field(default_factory=dict)
    # Global samples of this stream that earlier runs used (a participant's earlier
    # rounds): where this run's first batch begins.
    start: int = 0


@runtime_checkable
class BatchLoader(Protocol):
    """An endless, resumable source of this rank's micro batches."""

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """(input_ids, targets), int64, shape (micro_batch_size, seq_len), on CPU."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position; loading it makes the next batches identical."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class ShardLoader:
    """The built-in loader over a shard set (see the module docstring for the order)."""

    def __init__(self, ctx: LoaderContext) -> None:
        if not 0 <= ctx.rank < ctx.world_size:
            raise ValueError(f"rank {ctx.rank} outside world of size {ctx.world_size}")
        self.ctx = ctx
        self.windows = TokenWindows(ctx.data, ctx.split, ctx.seq_len)
        self.consumed = ctx.start
        self._epoch = -1
        self._order: npt.NDArray[np.int64] = np.empty(0, np.int64)

    def _sample(self, g: int) -> int:
        epoch, pos = divmod(g, self.windows.count)
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.PCG64([self.ctx.seed, epoch]))
            self._order = rng.permutation(self.windows.count)
            self._epoch = epoch
        return int(self._order[pos])

    def next_batch(self) -> tuple[Tensor, Tensor]:
        m = self.ctx.micro_batch_size
        first = self.consumed + self.ctx.rank * m
        indices = [self._sample(g) for g in range(first, first + m)]
        self.consumed += self.ctx.world_size * m
        return self.windows.batch(indices)

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "seed": self.ctx.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["seed"]) != self.ctx.seed:
            raise ValueError(f"loader state has seed {state['seed']}, loader {self.ctx.seed}")
        self.consumed = int(state["consumed"])


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data_dir: Path | str,
    *,
    split: str = "validation",
    batches: int = 8,
    batch_size: int = 16,
    seq_len: int = 128,
    device: torch.device | str | None = None,
) -> float:
    """Mean loss over ``batches * batch_size`` windows spread evenly over the split.

    No randomness: the same model and shard set always give the same figure, so losses of
    different models (federated vs local-only) are compared on identical tokens. Uses all
    windows when the split has fewer. Runs in eval mode and restores the previous mode.
    """
    windows = TokenWindows(data_dir, split, seq_len)
    wanted = min(windows.count, batches * batch_size)
    picks = np.unique(np.linspace(0, windows.count - 1, wanted).round().astype(np.int64))
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for start in range(0, len(picks), batch_size):
            chunk = picks[start : start + batch_size]
            x, y = windows.batch(chunk)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                loss = model(x.to(dev), y.to(dev))
            total += float(loss) * len(chunk)
    finally:
        model.train(was_training)
    return total / len(picks)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m tapestry_trainer.data SRC... --out DIR``: text files to token shards."""
    parser = argparse.ArgumentParser(
        prog="python -m tapestry_trainer.data", description=main.__doc__
    )
    parser.add_argument("sources", nargs="+", type=Path, help="*.txt files or directories")
    parser.add_argument("--out", required=True, type=Path, help="shard set directory")
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--block-tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    index = prepare_shards(
        args.sources,
        args.out,
        val_fraction=args.val_fraction,
        block_tokens=args.block_tokens,
        seed=args.seed,
    )
    splits = load_index(index.parent)["splits"]
    counts = {s: sum(f["tokens"] for f in files) for s, files in splits.items()}
    print(json.dumps({"index": str(index), "tokens": counts}))


if __name__ == "__main__":
    main()
