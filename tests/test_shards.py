import json

import numpy as np
import pytest

from nanoseek.errors import DataError
from nanoseek.shards import BatchLoader, TokenShards, write_shards


def docs(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(2, 300, rng.integers(5, 40)).tolist(), None) for _ in range(n)]


def test_documents_are_packed_with_eos_and_split_into_shards(tmp_path):
    d = docs(50)
    index = write_shards(d, tmp_path / "s", vocab_size=300, eos_id=1, shard_tokens=200)
    shards = TokenShards(tmp_path / "s")
    assert len(index["shards"]) > 1 and index["documents"] == 50
    assert index["dtype"] == "uint16"
    flat = np.concatenate(shards.tokens).tolist()
    expected = [t for ids, _ in d for t in ids + [1]]
    assert flat == expected and not (tmp_path / "s.tmp").exists()


def test_masks_and_mixed_documents(tmp_path):
    write_shards([([5, 6, 7], [0, 1, 1])], tmp_path / "m", vocab_size=10, eos_id=1)
    shards = TokenShards(tmp_path / "m")
    assert shards.masks[0].tolist() == [0, 1, 1, 1]  # the end-of-sentence is a target too
    with pytest.raises(DataError, match="loss mask"):
        write_shards([([5], [1]), ([6], None)], tmp_path / "x", vocab_size=10, eos_id=1)


def test_loader_covers_every_window_once_per_epoch_and_resumes_exactly(tmp_path):
    write_shards(docs(200), tmp_path / "s", vocab_size=300, eos_id=1)
    shards = TokenShards(tmp_path / "s")
    loader = BatchLoader(shards, batch_size=4, seq_len=16, seed=3)
    n_batches = len(loader.windows) // 4
    seen = [tuple(b.x[i, :3].tolist()) for b in (loader.next() for _ in range(n_batches)) for i in range(4)]
    assert len(set(seen)) == len(seen)
    a = BatchLoader(shards, 4, 16, seed=3)
    for _ in range(n_batches - 2):  # stop just before the epoch boundary, save, and go on past it
        a.next()
    state = a.state_dict()
    expected = [a.next() for _ in range(5)]
    b = BatchLoader(shards, 4, 16, seed=3)
    b.load_state_dict(json.loads(json.dumps(state)))
    for want in expected:
        got = b.next()
        assert (got.x == want.x).all() and (got.y == want.y).all()
    assert (expected[0].y[:, :-1] == expected[0].x[:, 1:]).all()


def test_document_windows_start_at_every_document_that_fits(tmp_path):
    d = docs(100)
    write_shards(d, tmp_path / "s", vocab_size=300, eos_id=1)
    loader = BatchLoader(TokenShards(tmp_path / "s"), batch_size=4, seq_len=32, documents=True)
    total = sum(len(ids) + 1 for ids, _ in d)
    starts = np.cumsum([0] + [len(ids) + 1 for ids, _ in d])[:-1]
    assert loader.windows[:, 1].tolist() == [s for s in starts if s < total - 32]
    first = dict(zip(starts.tolist(), (ids[0] for ids, _ in d)))
    assert all(loader.shards.tokens[0][s] == first[s] for s in loader.windows[:, 1])  # each window opens a document
    packed = BatchLoader(TokenShards(tmp_path / "s"), batch_size=4, seq_len=32)
    assert packed.windows[:, 1].tolist() == list(range(0, total - 32, 32))


def test_two_ranks_split_the_global_batch(tmp_path):
    write_shards(docs(100), tmp_path / "s", vocab_size=300, eos_id=1)
    shards = TokenShards(tmp_path / "s")
    one = BatchLoader(shards, 4, 8).next()
    r0, r1 = BatchLoader(shards, 2, 8, rank=0, world=2).next(), BatchLoader(shards, 2, 8, rank=1, world=2).next()
    assert (one.x[:2] == r0.x).all() and (one.x[2:] == r1.x).all()


def test_bad_data_is_named(tmp_path):
    write_shards(docs(3), tmp_path / "s", vocab_size=300, eos_id=1)
    with pytest.raises(DataError, match="fewer than one global batch"):
        BatchLoader(TokenShards(tmp_path / "s"), batch_size=64, seq_len=64)
    (tmp_path / "s" / "00000.tokens.bin").write_bytes(b"\0\0")
    with pytest.raises(DataError, match="truncated"):
        TokenShards(tmp_path / "s")
    with pytest.raises(DataError, match="missing file index.json"):
        TokenShards(tmp_path / "nothing")
