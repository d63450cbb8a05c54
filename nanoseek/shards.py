"""Packed token shards on disk and a loader that resumes at an exact position.

A shard directory holds `index.json` and, per shard, `NNNNN.tokens.bin` (uint16 or uint32, memory-mapped) with
documents packed back to back, each followed by the end-of-sentence id; SFT data also has `NNNNN.mask.bin` (uint8,
1 where the token is a target the loss should count: the assistant's reply and its end-of-sentence). Training
windows are seq_len + 1 consecutive tokens of one shard (x = window[:-1], y = window[1:]), one every seq_len tokens
or one at each document's start, visited in a fresh permutation every epoch; the loader's state is (epoch, cursor), so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .errors import DataError
from .rundir import commit, staging

INDEX = "index.json"


def write_shards(documents: Iterable[tuple[list[int], list[int] | None]], out_dir: str | Path, vocab_size: int,
                 eos_id: int, shard_tokens: int = 2**24) -> dict:
    """Pack (token ids, loss mask or None) documents into shards under out_dir, atomically (a `.tmp` sibling renamed
    into place). Either every document has a mask or none does. Returns the index."""
    out_dir = Path(out_dir)
    tmp = staging(out_dir)
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    shards, tokens, masks, n_docs, has_mask = [], [], [], 0, None

    def flush():
        if not tokens:
            return
        name = f"{len(shards):05d}"
        np.concatenate(tokens).astype(dtype).tofile(tmp / f"{name}.tokens.bin")
        if has_mask:
            np.concatenate(masks).astype(np.uint8).tofile(tmp / f"{name}.mask.bin")
        shards.append({"name": name, "tokens": int(sum(len(t) for t in tokens))})
        tokens.clear(), masks.clear()

    for ids, mask in documents:
        if has_mask is None:
            has_mask = mask is not None
        if (mask is not None) != has_mask or (mask is not None and len(mask) != len(ids)):
            raise DataError(f"document {n_docs}: every document needs a loss mask as long as its tokens, or none does")
        tokens.append(np.asarray([*ids, eos_id], dtype=np.int64))
        if has_mask:
            masks.append(np.asarray([*mask, 1], dtype=np.uint8))
        n_docs += 1
        if sum(len(t) for t in tokens) >= shard_tokens:
            flush()
    flush()
    if not shards:
        raise DataError(f"no documents to write to {out_dir}")
    index = {"dtype": np.dtype(dtype).name, "vocab_size": vocab_size, "eos_id": eos_id, "masked": bool(has_mask),
             "documents": n_docs, "tokens": sum(s["tokens"] for s in shards), "shards": shards}
    (tmp / INDEX).write_text(json.dumps(index, indent=2))
    commit(tmp, out_dir)
    return index


@dataclass
class Batch:
    x: torch.Tensor  # (B, T) input ids
    y: torch.Tensor  # (B, T) next-token targets
    mask: torch.Tensor | None  # (B, T) 1.0 where y counts in the loss (SFT), None = every position


class TokenShards:
    """The shards of one directory, memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.index = json.loads((self.path / INDEX).read_text())
            dtype = np.dtype(self.index["dtype"])
            self.tokens = [np.memmap(self.path / f"{s['name']}.tokens.bin", dtype=dtype, mode="r")
                           for s in self.index["shards"]]
            self.masks = ([np.memmap(self.path / f"{s['name']}.mask.bin", dtype=np.uint8, mode="r")
                           for s in self.index["shards"]] if self.index["masked"] else None)
        except FileNotFoundError as e:
            raise DataError(f"token shards in {self.path}: missing file {Path(e.filename).name}") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"token shards in {self.path}: malformed {INDEX} ({e})") from None
        for s, t in zip(self.index["shards"], self.tokens):
            if len(t) != s["tokens"]:
                raise DataError(f"{self.path / (s['name'] + '.tokens.bin')}: {len(t)} tokens, index says {s['tokens']}"
                                " (truncated?)")

    @property
    def vocab_size(self) -> int:
        return self.index["vocab_size"]


class BatchLoader:
    """Batches of windows in a seeded per-epoch permutation. `rank`/`world` give each process its own slice of every
    global batch, so all processes together see what one process would."""

    def __init__(self, shards: TokenShards, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world: int = 1, documents: bool = False):
        """documents=True: a window starts at every document's start (one no longer than the window is seen whole,
        then what follows it), not every seq_len tokens: for long documents that must be read to their end."""
        self.shards, self.batch_size, self.seq_len, self.seed = shards, batch_size, seq_len, seed
        self.rank, self.world = rank, world
        self.windows = np.array([(i, start) for i, t in enumerate(shards.tokens)
                                 for start in self.starts(t, documents)], dtype=np.int64).reshape(-1, 2)
        if len(self.windows) < batch_size * world:
            raise DataError(f"{shards.path}: {len(self.windows)} windows of {seq_len + 1} tokens, fewer than one "
                            f"global batch ({batch_size * world}); use more data or a smaller batch/seq_len")
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation()

    def starts(self, tokens: np.ndarray, documents: bool) -> np.ndarray:
        """Where the windows of one shard start."""
        last = len(tokens) - self.seq_len  # a window needs seq_len + 1 tokens
        if not documents:
            return np.arange(0, last, self.seq_len)
        starts = np.concatenate([[0], np.flatnonzero(tokens == self.shards.index["eos_id"]) + 1])
        return starts[starts < last]

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.windows))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "windows": len(self.windows)}

    def load_state_dict(self, state: dict) -> None:
        if state["windows"] != len(self.windows) or state["seed"] != self.seed:
            raise DataError(f"{self.shards.path}: the saved data position is for {state['windows']} windows and seed "
                            f"{state['seed']}, this data has {len(self.windows)} and seed {self.seed}")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation()

    def next(self) -> Batch:
        step = self.batch_size * self.world
        if self.cursor + step > len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation()
        picked = self.windows[self._order[self.cursor + self.rank * self.batch_size:][:self.batch_size]]
        self.cursor += step
        L = self.seq_len + 1
        tokens = np.stack([self.shards.tokens[i][s:s + L] for i, s in picked]).astype(np.int64)
        t = torch.from_numpy(tokens)
        mask = None
        if self.shards.masks is not None:
            m = np.stack([self.shards.masks[i][s + 1:s + L] for i, s in picked]).astype(np.float32)
            mask = torch.from_numpy(m)
        return Batch(t[:, :-1], t[:, 1:], mask)
