"""ThreeFSDataSource as a grain data source: protocol, batch path, pickling, threads, resuming."""

from __future__ import annotations

import concurrent.futures
import pickle

import grain
import numpy as np
import pytest

from dsjax.io import FFRecordWriter, ThreeFSDataSource

N_FILES, PER_FILE = 3, 40
N = N_FILES * PER_FILE


def _record(i: int) -> bytes:
    return i.to_bytes(4, "little") * (1 + i % 5)  # variable length, index recoverable


def _decode(a: np.ndarray) -> int:
    return int(a[:4].view("<u4")[0])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    for f in range(N_FILES):
        with FFRecordWriter(d / f"part-{f}.ffr", PER_FILE) as w:
            for i in range(f * PER_FILE, (f + 1) * PER_FILE):
                w.write_one(_record(i))
    return str(d)


def test_protocol(shards):
    src = ThreeFSDataSource(shards)
    assert isinstance(src, grain.sources.RandomAccessDataSource)
    assert len(src) == N and src.engine == "mmap"
    assert src[7].tobytes() == _record(7) and src[-1].tobytes() == _record(N - 1)
    assert src[np.int64(3)].tobytes() == _record(3)
    with pytest.raises(IndexError, match="out of range"):
        src[N]
    idx = [5, 99, 5, 0, 119]
    for got in (src.__getitems__(idx), src._getitems(idx), src.read_batch(np.array(idx))):
        assert [g.tobytes() for g in got] == [_record(i) for i in idx]
    dec = ThreeFSDataSource(shards, decode=_decode)
    assert dec.read_batch(idx) == idx and dec[42] == 42


def test_repr_is_deterministic_and_pickles(shards):
    src = ThreeFSDataSource([shards], check_data=False, decode=_decode)
    want = f"ThreeFSDataSource(paths=[{shards!r}], check_data=False, decode=_decode, engine='auto')"
    assert repr(src) == want
    len(src)  # opens the reader
    clone = pickle.loads(pickle.dumps(src))
    assert repr(clone) == want and clone._reader is None  # reopens lazily
    assert clone.read_batch([1, 2, 3]) == [1, 2, 3]


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ffr"):
        ThreeFSDataSource(str(tmp_path / "nope.ffr"))
    with pytest.raises(TypeError, match="decode must be callable"):
        ThreeFSDataSource(str(tmp_path), decode=3)


@pytest.mark.parametrize("engine", ["pread", "io_uring"])
def test_direct_io_and_engines(shards, engine):
    from dsjax import _io
    if engine == "io_uring" and not _io.io_uring_available():
        with pytest.raises(RuntimeError, match="io_uring is not usable"):
            ThreeFSDataSource(shards, engine=engine).engine
        return
    src = ThreeFSDataSource(shards, engine=engine, direct=True, decode=_decode)
    assert src.engine == engine and src.read_batch([117, 3, 64]) == [117, 3, 64]


def test_thread_safe_getitem(shards):
    src = ThreeFSDataSource(shards, decode=_decode)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, N, 400).tolist()
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        singles = list(ex.map(src.__getitem__, idx))
        batches = list(ex.map(src.read_batch, [idx[k:k + 16] for k in range(0, 400, 16)]))
    assert singles == idx and sum(batches, []) == idx


def _pipeline(src, seed=3, batch=8):
    return grain.MapDataset.range(len(src)).shuffle(seed=seed).batch(batch).map(src.read_batch)


def test_batch_pipeline_reads_each_record_once_per_epoch(shards):
    src = ThreeFSDataSource(shards, decode=_decode)
    out = [x for b in _pipeline(src) for x in b]
    assert sorted(out) == list(range(N)) and out != list(range(N))
    # grain's own source path (per-record __getitem__, or _getitems with batch pushdown) agrees.
    ds = grain.MapDataset.source(src).shuffle(seed=3).batch(8, batch_fn=list)
    assert [x for b in ds for x in b] == out


def test_resume_from_iterator_state(shards):
    src = ThreeFSDataSource(shards, decode=_decode)
    ds = _pipeline(src).repeat(2).to_iter_dataset()
    it = iter(ds)
    head = [next(it) for _ in range(7)]
    state = it.get_state()
    rest = [next(it) for _ in range(12)]
    # A fresh pipeline (a restarted job, with the source unpickled) restored from the checkpoint.
    src2 = pickle.loads(pickle.dumps(src))
    it2 = iter(_pipeline(src2).repeat(2).to_iter_dataset())
    it2.set_state(state)
    resumed = [next(it2) for _ in range(12)]
    assert resumed == rest  # exactly the next records: nothing lost, nothing repeated
    epoch = [x for b in head + rest[:8] for x in b]  # 15 batches of 8 = one epoch of 120
    assert sorted(epoch) == list(range(N))
