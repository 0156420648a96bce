"""Token shards and TokenDataset: packing across documents, shuffling, process sharding, resuming."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dsjax.io import BYTE_EOS_ID, TokenDataset, write_token_shards

DOCS = [f"document {i}: " + "lorem ipsum " * (i % 7) + "é" * (i % 3) for i in range(60)]


def _stream(docs):
    out = []
    for d in docs:
        out.extend(d.encode("utf-8"))
        out.append(BYTE_EOS_ID)
    return np.array(out, np.int64)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "ds"
    meta = write_token_shards(iter(DOCS), d, shard_size=256, record_tokens=64)
    return str(d), meta


def test_shards_hold_the_document_stream(shard_dir):
    d, meta = shard_dir
    stream = _stream(DOCS)
    assert meta["num_tokens"] == len(stream) and meta["dtype"] == "uint16" and meta["eos_id"] == 256
    assert len(meta["shards"]) == -(-len(stream) // 256)
    assert json.load(open(os.path.join(d, "meta.json"))) == meta
    ds = TokenDataset(d, seq_len=50, seed=0, process_index=0, process_count=1)
    assert len(ds) == (len(stream) - 1) // 50
    items = np.arange(len(ds))
    w = ds.windows(items)
    got = ds.read_batch(items)
    assert got.dtype == np.int32 and got.shape == (len(ds), 51)
    for k, win in enumerate(w):  # windows cross record (64) and shard (256) boundaries
        assert np.array_equal(got[k], stream[win * 50:win * 50 + 51])
    assert np.array_equal(ds[3], got[3])


def test_shuffle_is_deterministic_and_per_epoch(shard_dir):
    d, _ = shard_dir
    a = TokenDataset(d, seq_len=32, seed=7, process_index=0, process_count=1)
    b = TokenDataset(d, seq_len=32, seed=7, process_index=0, process_count=1)
    c = TokenDataset(d, seq_len=32, seed=8, process_index=0, process_count=1)
    n = len(a)
    e0, e1 = a.windows(np.arange(n)), a.windows(np.arange(n, 2 * n))
    assert sorted(e0) == list(range(n)) and sorted(e1) == list(range(n))
    assert not np.array_equal(e0, e1)  # reshuffled each epoch
    assert np.array_equal(e0, b.windows(np.arange(n))) and not np.array_equal(e0, c.windows(np.arange(n)))


def test_processes_get_disjoint_equal_shares(shard_dir):
    d, _ = shard_dir
    parts = [TokenDataset(d, seq_len=20, seed=1, process_index=p, process_count=3) for p in range(3)]
    total = parts[0].num_windows
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == total // 3
    seen = np.concatenate([p.windows(np.arange(len(p))) for p in parts])
    assert len(np.unique(seen)) == len(seen) and seen.max() < total


def test_custom_tokenizer_and_wide_vocab(tmp_path):
    class Tok:
        vocab_size = 70_000
        eos_id = 69_999

        def __call__(self, text):
            return [60_000 + ord(ch) for ch in text]

    meta = write_token_shards(["ab", "cde"], tmp_path / "t", tokenizer=Tok(), shard_size=8, record_tokens=4)
    assert meta["dtype"] == "uint32" and meta["num_tokens"] == 7
    ds = TokenDataset(tmp_path / "t", seq_len=3, seed=0, process_index=0, process_count=1)
    stream = [60097, 60098, 69999, 60099, 60100, 60101, 69999]
    for i in range(len(ds)):
        w = int(ds.windows([i])[0])
        assert ds[i].tolist() == stream[w * 3:w * 3 + 4]


def test_bad_input(tmp_path, shard_dir):
    with pytest.raises(ValueError, match="multiple of record_tokens"):
        write_token_shards(["x"], tmp_path / "a", shard_size=100, record_tokens=64)
    with pytest.raises(ValueError, match=r"inputs\[1\]: token id 300 outside \[0, 257\)"):
        write_token_shards(["ok", "bad"], tmp_path / "b", tokenizer=lambda s: [300] if s == "bad" else [1], eos_id=0, vocab_size=257)
    with pytest.raises(ValueError, match="eos_id: required"):
        write_token_shards(["x"], tmp_path / "c", tokenizer=lambda s: [1])
    d, _ = shard_dir
    with pytest.raises(FileExistsError):
        write_token_shards(["x"], d)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        TokenDataset(tmp_path, seq_len=8, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        TokenDataset(d, seq_len=0, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="fewer than process_count"):
        TokenDataset(d, seq_len=10**6, seed=0, process_index=0, process_count=1)


def test_default_process_sharding_uses_jax(shard_dir):
    d, _ = shard_dir
    ds = TokenDataset(d, seq_len=40, seed=0)
    assert (ds.process_index, ds.process_count) == (0, 1)


def test_grain_dataset_resumes_exactly(shard_dir):
    d, _ = shard_dir
    ds = TokenDataset(d, seq_len=16, seed=3, process_index=0, process_count=1)
    it = iter(ds.dataset(4, num_epochs=None).to_iter_dataset())
    for _ in range(5):
        next(it)
    state = it.get_state()
    after = [next(it) for _ in range(len(ds) // 4 + 3)]  # runs into the next epoch
    it2 = iter(TokenDataset(d, seq_len=16, seed=3, process_index=0, process_count=1)
               .dataset(4, num_epochs=None).to_iter_dataset())
    it2.set_state(state)
    for want in after:
        assert np.array_equal(next(it2), want)
    one_epoch = np.concatenate(list(ds.dataset(4, num_epochs=1)))
    assert one_epoch.shape == (len(ds) // 4 * 4, 17)
