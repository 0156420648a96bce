"""The mmap fast path of the native engine: routing by page-cache residency, fused CRC-32, files
truncated under an open reader (SIGBUS guard), and that the guard leaves other SIGBUS handling alone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest

from dsjax import _io
from dsjax.io import FFRecordError, FFRecordReader, FFRecordWriter

PAGE = os.sysconf("SC_PAGE_SIZE")


def _write(path, samples):
    with FFRecordWriter(path, len(samples)) as w:
        for s in samples:
            w.write_one(s)
    return str(path)


RECORDS = ("mapped", "deferred", "unmapped", "faulted")


def _records(reader):
    """The engine's per-record counters (where each record of each batch was read from)."""
    st = reader._engine.stats()
    return {k: st[k] for k in RECORDS}


def _drop(path):
    """Evicts an unmapped file from the page cache (the writer fsyncs, so its pages are clean)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_cached_records_come_from_the_mapping_with_fused_crc(tmp_path):
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, 256, int(n), dtype=np.uint8).tobytes() for n in rng.integers(0, 9000, 300)]
    p = _write(tmp_path / "a.ffr", samples)
    for check_data in (False, True):
        r = FFRecordReader(p, check_data=check_data)
        assert r.engine == "mmap"
        idx = rng.integers(0, 300, 500)  # repeats and any order
        got = r.read(idx)
        assert [g.tobytes() for g in got] == [samples[i] for i in idx]
        assert _records(r) == {"mapped": 500, "deferred": 0, "unmapped": 0, "faulted": 0}
        r.close()
    # The crc argument of the native call, for every request (zero-length ones too).
    fd = os.open(p, os.O_RDONLY)
    eng = _io.Engine(2, "mmap")
    try:
        assert eng.map_file(fd)
        raw = open(p, "rb").read()
        offs = np.array([12, 100, 5000, len(raw) - 7, 64], np.int64)
        lens = np.array([0, 4000, 7000, 7, 1], np.int64)
        dsts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        out = np.empty(int(lens.sum()), np.uint8)
        crc = np.zeros(5, np.uint32)
        assert eng.read(np.full(5, fd, np.int32), offs, lens, dsts, out, crc) is None
        assert crc.tolist() == [zlib.crc32(raw[o:o + n]) for o, n in zip(offs, lens)]
        with pytest.raises(ValueError, match="crc: expected a writable contiguous 1-D uint32"):
            eng.read(np.full(5, fd, np.int32), offs, lens, dsts, out, np.zeros(5, np.int64))
        with pytest.raises(ValueError, match="crc: expected 5 entries"):
            eng.read(np.full(5, fd, np.int32), offs, lens, dsts, out, np.zeros(4, np.uint32))
        with pytest.raises(ValueError, match="cannot be combined with O_DIRECT"):
            _io.Engine(2, "mmap", 8, 4096)
    finally:
        eng.unmap_file(fd)
        os.close(fd)


def test_uncached_records_go_to_the_pread_path(tmp_path):
    """Large records are routed one by one: cached ones are copied from the mapping, the others
    read with pread (many in flight) instead of faulting in one at a time."""
    rng = np.random.default_rng(1)
    samples = [rng.integers(0, 256, 64 << 10, dtype=np.uint8).tobytes() for _ in range(24)]
    p = _write(tmp_path / "big.ffr", samples)
    _drop(p)
    warm = [3, 10, 17]
    fd = os.open(p, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead: cache exactly these records
    r = FFRecordReader(p, check_data=True)
    for i in warm:
        os.pread(fd, int(r.lengths[i]), int(r.headers[0].offsets[i]))
    os.close(fd)
    got = r.read(range(24))
    assert [g.tobytes() for g in got] == samples
    st = r._engine._native.stats()
    assert st["mapped"] >= len(warm) and st["deferred"] >= 24 - len(warm) - 4, st
    assert st["mapped"] + st["deferred"] == 24 and st["unmapped"] == 0
    # Small records are judged on a sample: an uncached stretch of a file goes to pread as a whole.
    small = [bytes([i % 256]) * 1000 for i in range(4000)]
    ps = _write(tmp_path / "small.ffr", small)
    _drop(ps)
    r2 = FFRecordReader(ps, check_data=True)  # reads the header (and read-ahead: the first ~100s of KiB)
    idx = list(range(3999, 2000, -7))  # megabytes past the header: not cached
    assert [g.tobytes() for g in r2.read(idx)] == [small[i] for i in idx]
    assert _records(r2) == {"mapped": 0, "deferred": len(idx), "unmapped": 0, "faulted": 0}


def _truncated_batch(tmp_path):
    """(reader, samples, batch): 80 records of 5000 bytes, cached and mapped, then the file cut at
    sample 70 + 100 bytes. The batch puts sample 75 (wholly past the new end) at position 1: small
    records are judged on a sample of every (batch // 16)-th one, positions 0, 4, 8, ... here, all
    cached, so the mapped copy of sample 75 really runs and raises SIGBUS."""
    samples = [bytes([i]) * 5000 for i in range(80)]
    p = _write(tmp_path / "t.ffr", samples)
    r = FFRecordReader(p, check_data=True)
    assert [g.tobytes() for g in r.read(range(80))] == samples
    os.truncate(p, int(r.headers[0].offsets[70]) + 100)
    batch = [0] * 64
    batch[0::2] = range(32)
    batch[1::2] = [75] + list(range(32, 63))
    return r, samples, batch


def test_file_truncated_under_the_mapping(tmp_path):
    """Pages wholly past the new end raise SIGBUS inside the copy (caught); the zero-filled tail of
    the last page is caught by the size check. Either way: the end-of-file error, no crash."""
    r, samples, batch = _truncated_batch(tmp_path)
    with pytest.raises(FFRecordError, match=r"t.ffr: sample 75: file ended after 0 of 5000 bytes"):
        r.read(batch)
    st = r._engine._native.stats()
    assert st["faulted"] == 1, st  # the SIGBUS path really ran
    assert [g.tobytes() for g in r.read(range(70))] == samples[:70]  # records before the cut still read
    # A record inside the last, partly cut page reads as zeros past the end without any fault.
    tiny = [bytes([7 + i]) * 50 for i in range(3)]
    p = _write(tmp_path / "tiny.ffr", tiny)
    r2 = FFRecordReader(p)
    r2.read([0, 1, 2])
    os.truncate(p, os.path.getsize(p) - 20)
    with pytest.raises(FFRecordError, match=r"tiny.ffr: sample 2: file ended after 30 of 50 bytes"):
        r2.read([0, 2])
    assert _records(r2) == {"mapped": 5, "deferred": 0, "unmapped": 0, "faulted": 0}


_CHILD = textwrap.dedent("""
    import faulthandler, mmap, os, pathlib, signal, sys
    sys.path.insert(0, os.path.dirname(sys.argv[2]))
    from test_io_mmap import _truncated_batch
    from dsjax.io import FFRecordError
    d = pathlib.Path(sys.argv[1])
    hits = []
    signal.signal(signal.SIGBUS, lambda *a: hits.append(1))  # a handler installed before ours
    r, _, batch = _truncated_batch(d)  # its reads install the guard, chaining to the handler above
    os.kill(os.getpid(), signal.SIGBUS)  # not a fault in a guarded copy: goes to the Python handler
    print("chained", len(hits), flush=True)
    signal.signal(signal.SIGBUS, signal.SIG_DFL)
    faulthandler.enable()  # replaces our handler; the next guarded batch installs it again
    try:
        r.read(batch)
    except FFRecordError as e:
        print("guarded", "sample 75" in str(e), r._engine._native.stats()["faulted"], flush=True)
    # An unguarded fault (Python's own mmap) still gets faulthandler's report and the default
    # action, as without dsjax.
    q = d / "q.bin"
    q.write_bytes(b"x" * 4 * mmap.PAGESIZE)
    f = open(q, "rb")
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    os.truncate(q, 0)
    print("unreachable", m[3 * mmap.PAGESIZE], flush=True)
""")


def test_sigbus_guard_chains_to_other_handlers(tmp_path):
    res = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), __file__], capture_output=True, text=True,
                         timeout=120)
    assert "chained 1" in res.stdout, res.stdout + res.stderr
    assert "guarded True 1" in res.stdout, res.stdout + res.stderr
    assert "unreachable" not in res.stdout
    assert res.returncode == -7 and "Bus error" in res.stderr, (res.returncode, res.stderr[-2000:])


def test_split_makes_views_like_slicing():
    buf = np.arange(40, dtype=np.uint8)
    out = buf[:30]
    bounds = np.array([0, 0, 7, 7, 30], np.int64)
    views = _io.split(out, bounds)
    assert [v.tobytes() for v in views] == [out[a:b].tobytes() for a, b in zip(bounds[:-1], bounds[1:])]
    assert all(v.dtype == np.uint8 and v.flags.c_contiguous and v.flags.writeable for v in views)
    assert all(np.shares_memory(v, buf) for v in views if v.size)
    del out, buf
    views[1][0] = 99  # the buffer stays alive through the views' base
    assert views[3][0] == 7 and views[1][0] == 99 and views[1][1] == 1
    with pytest.raises(ValueError, match=r"bounds: expected non-decreasing offsets within \[0, 10\]"):
        _io.split(np.zeros(10, np.uint8), np.array([0, 5, 3]))
    with pytest.raises(ValueError, match=r"bounds: expected non-decreasing offsets within \[0, 10\]"):
        _io.split(np.zeros(10, np.uint8), np.array([0, 11]))
    with pytest.raises(ValueError, match="out: expected a contiguous 1-D uint8 array"):
        _io.split(np.zeros(10, np.int32), np.array([0, 1]))
    assert _io.split(np.zeros(0, np.uint8), np.array([0])) == []


# A handler installed on top of ours and later removed (faulthandler enable -> disable) leaves
# our saved predecessor pointing at a function that returns without fixing the fault; an
# unguarded fault must still kill the process (SIGBUS), not re-fault forever.
_STALE = r"""
import faulthandler, mmap, os, sys
import numpy as np
from dsjax import _io
d = sys.argv[1]
p = os.path.join(d, "a.bin"); open(p, "wb").write(b"y" * 8192)
fd = os.open(p, os.O_RDONLY)
e = _io.Engine(2, "mmap"); assert e.map_file(fd)
out = np.empty(10, np.uint8)
rd = lambda: e.read(np.array([fd], np.int32), np.array([0], np.int64), np.array([10], np.int64),
                    np.array([0], np.int64), out)
rd()                      # installs our handler
faulthandler.enable()     # faulthandler on top of ours
rd()                      # ours again on top, faulthandler saved as predecessor
faulthandler.disable()    # faulthandler puts ours back: the saved predecessor is now stale
q = os.path.join(d, "q.bin"); open(q, "wb").write(b"x" * 4 * mmap.PAGESIZE)
f = open(q, "rb"); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ); os.truncate(q, 0)
print("setup done", flush=True)
print("unreachable", m[3 * mmap.PAGESIZE], flush=True)
"""


def test_unguarded_fault_after_stale_chained_handler_still_dies(tmp_path):
    res = subprocess.run([sys.executable, "-c", _STALE, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert "setup done" in res.stdout, res.stdout + res.stderr
    assert "unreachable" not in res.stdout
    assert res.returncode == -7, (res.returncode, res.stderr[-2000:])
