"""FFRecord: byte layout, interop with HFAiLab/ffrecord's writer/reader logic, corruption, fuzzing."""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import threading
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dsjax.io import FFRecordError, FFRecordReader, FFRecordWriter, parse_header, read_header
from dsjax.io.ffrecord import header_size


def _samples(n, seed=0, max_len=3000):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, int(rng.integers(0, max_len)), dtype=np.uint8).tobytes() for _ in range(n)]


def _write(path, samples):
    with FFRecordWriter(path, len(samples)) as w:
        for s in samples:
            w.write_one(s)
    return str(path)


# An independent writer and reader following HFAiLab/ffrecord's fileio.py step by step (header
# zeroed, samples appended, header filled, metadata CRC chained over bytes [4, 12 + 12N) of the
# file), standing in for "other FFRecord implementations" (the ffrecord package needs libaio).
def _hfai_write(path, samples, *, legacy=False):
    n = len(samples)
    pos = 12 + 12 * n
    offsets, crcs = [], []
    with open(path, "wb") as f:
        f.seek(pos)
        for s in samples:
            offsets.append(pos)
            crcs.append(zlib.crc32(s))
            f.write(s)
            pos += len(s)
        f.seek(0)
        f.write(struct.pack("<IQ", 0, n))
        f.write(np.array(crcs, np.uint32).tobytes())
        f.write(np.array(offsets, np.uint64).tobytes())
    if not legacy:
        with open(path, "r+b") as f:
            checksum = zlib.crc32(os.pread(f.fileno(), 8 + 12 * n, 4))
            os.pwrite(f.fileno(), struct.pack("<I", checksum), 0)


def _hfai_read(path, index):
    with open(path, "rb") as f:
        checksum, n = struct.unpack("<IQ", f.read(12))
        meta = f.read(12 * n)
        size = os.fstat(f.fileno()).st_size
    assert checksum == zlib.crc32(meta, zlib.crc32(struct.pack("<Q", n)))
    crcs = np.frombuffer(meta[:4 * n], np.uint32)
    offsets = np.frombuffer(meta[4 * n:], np.uint64)
    end = size if index == n - 1 else int(offsets[index + 1])
    with open(path, "rb") as f:
        f.seek(int(offsets[index]))
        data = f.read(end - int(offsets[index]))
    assert zlib.crc32(data) == crcs[index]
    return data


def test_layout_is_exactly_as_specified(tmp_path):
    samples = [b"abc", b"", b"hello world"]
    raw = open(_write(tmp_path / "a.ffr", samples), "rb").read()
    checksum, n = struct.unpack_from("<Iq", raw, 0)
    crcs = struct.unpack_from("<3I", raw, 12)
    offsets = struct.unpack_from("<3q", raw, 24)
    assert n == 3 and list(crcs) == [zlib.crc32(s) for s in samples]
    assert list(offsets) == [48, 51, 51] and raw[48:] == b"abchello world"
    assert checksum == zlib.crc32(raw[12:48], zlib.crc32(raw[4:12]))


def test_roundtrip_across_files_and_dtypes(tmp_path):
    a, b = _samples(50, 1), _samples(31, 2)
    _write(tmp_path / "x-0.ffr", a)
    _write(tmp_path / "x-1.ffr", b)
    arr = np.arange(10, dtype=np.float32)
    with FFRecordWriter(tmp_path / "x-2.ffr", 1) as w:
        w.write_one(arr)
    (tmp_path / "notes.txt").write_text("ignored: not *.ffr")
    with FFRecordReader(tmp_path) as r:
        assert len(r) == 82 and r.engine == "mmap"
        allrec = a + b + [arr.tobytes()]
        idx = np.random.default_rng(3).integers(0, 82, 200)  # repeats, any order
        got = r.read(idx)
        assert [g.tobytes() for g in got] == [allrec[i] for i in idx]
        assert all(g.dtype == np.uint8 for g in got)
        assert got[0].base is not None and got[0].base is got[-1].base  # views of one batch buffer
        assert r.read([]) == []
        assert r.locate(55) == (str(tmp_path / "x-1.ffr"), 5)
        assert np.array_equal(r.read_one(81).view(np.float32), arr)


def test_empty_file_and_file_list(tmp_path):
    p0 = _write(tmp_path / "e.ffr", [])
    p1 = _write(tmp_path / "f.ffr", [b"z"])
    r = FFRecordReader([p0, p1])
    assert len(r) == 1 and r.read([0])[0].tobytes() == b"z"


@pytest.mark.parametrize("legacy", [False, True])
def test_interop_with_hfai_layout(tmp_path, legacy):
    samples = _samples(40, 4)
    _hfai_write(tmp_path / "h.ffr", samples, legacy=legacy)
    r = FFRecordReader(tmp_path / "h.ffr")
    assert [x.tobytes() for x in r.read(range(40))] == samples
    assert (r.headers[0].checksum_meta == 0) == legacy
    ours = _write(tmp_path / "o.ffr", samples)
    assert [_hfai_read(ours, i) for i in range(40)] == samples
    if not legacy:  # same samples, same bytes
        assert open(ours, "rb").read() == open(tmp_path / "h.ffr", "rb").read()


def _corrupt(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_metadata_checksum_mismatch(tmp_path):
    p = _write(tmp_path / "m.ffr", _samples(5, 5))
    _corrupt(p, 12, b"\x00\x00\x00\x01")  # a sample CRC in the header
    with pytest.raises(FFRecordError, match="metadata checksum mismatch") as e:
        FFRecordReader(p)
    assert e.value.path == p and str(p) in str(e.value)
    FFRecordReader(p, check_data=False)  # opens; the header is only structurally checked


def test_sample_crc_mismatch_names_file_and_sample(tmp_path):
    samples = [b"a" * 100] * 6
    _write(tmp_path / "0.ffr", samples)
    p = _write(tmp_path / "1.ffr", samples)
    _corrupt(p, header_size(6) + 100 * 4 + 7, b"X")  # sample 4 of file 1 = global 10
    r = FFRecordReader(tmp_path)
    assert len(r.read([0, 9, 11])) == 3
    with pytest.raises(FFRecordError, match=r"sample 4: CRC-32 mismatch.*global index 10") as e:
        r.read([3, 10, 2])
    assert (e.value.path, e.value.index) == (p, 4)
    assert FFRecordReader(tmp_path, check_data=False).read([10])[0].tobytes()[7] == ord("X")


def test_offsets_out_of_range_and_decreasing(tmp_path):
    n = 4
    p = _write(tmp_path / "o.ffr", [b"0123456789"] * n)
    base = header_size(n)
    off_at = 12 + 4 * n
    _corrupt(p, off_at + 8 * 2, struct.pack("<q", base + 10**9))
    with pytest.raises(FFRecordError, match=r"sample 2: offset .* beyond the end of the file"):
        FFRecordReader(p, check_data=False)
    _corrupt(p, off_at + 8 * 2, struct.pack("<q", base + 5))
    with pytest.raises(FFRecordError, match=r"sample 1: offsets decrease"):
        FFRecordReader(p, check_data=False)
    _corrupt(p, off_at, struct.pack("<q", 3))
    with pytest.raises(FFRecordError, match=r"sample 0: offset 3 points into the header"):
        FFRecordReader(p, check_data=False)


def test_truncated_files(tmp_path):
    p = _write(tmp_path / "t.ffr", [b"x" * 50] * 3)
    raw = open(p, "rb").read()
    for size, pattern in [(5, "shorter than the 12-byte header"), (30, "needs 48 bytes of metadata"),
                          (48 + 120, r"sample 2: offset 148 is beyond|CRC")]:
        open(p, "wb").write(raw[:size])
        with pytest.raises(FFRecordError, match=pattern):
            FFRecordReader(p).read([0, 1, 2])
    # Truncated after opening: the read comes back short and says which sample.
    open(p, "wb").write(raw)
    r = FFRecordReader(p)
    os.truncate(p, len(raw) - 20)
    with pytest.raises(FFRecordError, match=r"t.ffr: sample 2: file ended after 30 of 50 bytes"):
        r.read([0, 2])


def test_bad_arguments(tmp_path):
    p = _write(tmp_path / "b.ffr", [b"a", b"b"])
    r = FFRecordReader(p)
    with pytest.raises(IndexError, match="sample index 2 out of range for 2"):
        r.read([0, 2])
    with pytest.raises(IndexError, match="-1"):
        r.read([-1])
    with pytest.raises(TypeError, match="integers"):
        r.read([0.5])
    with pytest.raises(FileNotFoundError, match="missing.ffr"):
        FFRecordReader([p, str(tmp_path / "missing.ffr")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.ffr files"):
        FFRecordReader(tmp_path / "empty")
    with pytest.raises(ValueError, match="n must be an integer >= 0"):
        FFRecordWriter(tmp_path / "w.ffr", -1)
    r.close()
    with pytest.raises(ValueError, match="read after close"):
        r.read([0])


def test_writer_is_atomic(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    _write(d / "a.ffr", [b"old"])
    w = FFRecordWriter(d / "b.ffr", 2)
    w.write_one(b"new")
    # A reader opened while the writer is busy sees only complete files.
    assert len(FFRecordReader(d)) == 1 and not (d / "b.ffr").exists()
    w.write_one(b"new2")
    w.close()
    assert len(FFRecordReader(d)) == 3
    with pytest.raises(ValueError, match="1 samples written, expected n=2"):
        with FFRecordWriter(d / "c.ffr", 2) as w2:
            w2.write_one(b"x")
    with pytest.raises(RuntimeError):
        with FFRecordWriter(d / "e.ffr", 1) as w3:
            w3.write_one(b"x")
            raise RuntimeError("boom")
    w4 = FFRecordWriter(d / "f.ffr", 1)
    w4.write_one(b"y")
    with pytest.raises(ValueError, match="exceeds n=1"):
        w4.write_one(b"z")
    w4.abort()
    assert sorted(os.listdir(d)) == ["a.ffr", "b.ffr"]  # no temporaries left behind


def test_reader_pickles_and_survives_fork(tmp_path):
    samples = _samples(20, 6)
    p = _write(tmp_path / "p.ffr", samples)
    r = FFRecordReader(p)
    r2 = pickle.loads(pickle.dumps(r))
    assert r2.read([3])[0].tobytes() == samples[3]
    r.read([0, 1])  # start the pool in the parent
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the native pool's threads are gone; the reader must reopen, not hang
        try:
            ok = [x.tobytes() for x in r.read(range(20))] == samples
            os.write(wfd, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(wfd)
    # A hung child fails the test after 60 s instead of hanging the suite.
    ready = select.select([rfd], [], [], 60)[0]
    got = os.read(rfd, 1) if ready else b""
    if not ready:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(rfd)
    assert got == b"1", "the forked child did not answer within 60 s" if not ready else got


def test_concurrent_reads_share_one_reader(tmp_path):
    samples = _samples(300, 7, max_len=600)
    r = FFRecordReader(_write(tmp_path / "c.ffr", samples))
    errors = []

    def worker(seed):
        rng = np.random.default_rng(seed)
        for _ in range(20):
            idx = rng.integers(0, 300, int(rng.integers(1, 64)))
            if [x.tobytes() for x in r.read(idx)] != [samples[i] for i in idx]:
                errors.append(seed)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def _valid_file(samples):
    n = len(samples)
    pos = header_size(n)
    offsets = np.cumsum([pos] + [len(s) for s in samples[:-1]]).astype("<i8") if n else np.zeros(0, "<i8")
    meta = np.array([zlib.crc32(s) for s in samples], "<u4").tobytes() + offsets.tobytes()
    nb = struct.pack("<q", n)
    return struct.pack("<I", zlib.crc32(meta, zlib.crc32(nb))) + nb + meta + b"".join(samples)


def _parse_bytes(raw, check_data=True):
    prefix = raw[:12]
    n = struct.unpack_from("<q", prefix, 4)[0] if len(prefix) == 12 else 0
    meta = raw[12:12 + 12 * n] if 0 <= n <= len(raw) else b""
    return parse_header("<fuzz>", prefix, meta, len(raw), check_data=check_data)


@given(st.lists(st.binary(max_size=40), max_size=6), st.data())
@settings(max_examples=1000, deadline=None)
def test_fuzz_header_parser(samples, data):
    raw = bytearray(_valid_file(samples))
    # Mutate: flip bytes, overwrite with extreme integers, or truncate.
    for _ in range(data.draw(st.integers(0, 4))):
        kind = data.draw(st.sampled_from(["flip", "int64", "truncate"]))
        if not raw:
            break
        at = data.draw(st.integers(0, len(raw) - 1))
        if kind == "flip":
            raw[at] ^= data.draw(st.integers(1, 255))
        elif kind == "int64":
            v = data.draw(st.sampled_from([-1, -(2**63), 2**63 - 1, 2**31, len(raw), len(raw) + 1]))
            raw[at:at + 8] = struct.pack("<q", v)[:len(raw) - at]
        else:
            del raw[at:]
    check = data.draw(st.booleans())
    try:
        h = _parse_bytes(bytes(raw), check_data=check)
    except FFRecordError as e:
        assert e.path == "<fuzz>"
        return
    # Whatever parses is safe to read: every sample lies inside the file, after the header.
    assert len(h.offsets) == len(h.lengths) == len(h.crcs)
    if len(h):
        assert h.offsets[0] >= header_size(len(h))
        assert (h.lengths >= 0).all() and (h.offsets + h.lengths <= len(raw)).all()


def test_read_header_matches_parse(tmp_path):
    samples = _samples(7, 8)
    p = _write(tmp_path / "r.ffr", samples)
    h = read_header(p)
    assert h.lengths.tolist() == [len(s) for s in samples] and h.file_size == os.path.getsize(p)


def test_batch_buffers_are_recycled_only_when_unreferenced(tmp_path):
    samples = _samples(64, 9, max_len=5000)
    r = FFRecordReader(_write(tmp_path / "buf.ffr", samples))
    kept = r.read(range(0, 32))  # held by the caller: its buffer must never be reused
    kept_one = r.read([40])[0]  # a single view pins its whole batch buffer too
    for k in range(20):
        idx = [(k * 7 + j) % 64 for j in range(32)]
        assert [x.tobytes() for x in r.read(idx)] == [samples[i] for i in idx]
    assert [x.tobytes() for x in kept] == samples[:32] and kept_one.tobytes() == samples[40]
    first = r.read_concat(range(8))[0]
    addr = first.__array_interface__["data"][0]
    del first
    again = r.read_concat(range(8))[0]
    # Unreferenced: the (still listed, hence never freed) buffer is reused.
    assert again.__array_interface__["data"][0] == addr


def test_decreasing_offsets_found_despite_int64_overflow():
    """Found by the fuzzer: offsets [.., 0, -2**63] made np.diff wrap to a positive step, so a
    decreasing pair passed and a sample got a negative length (a read at a negative offset)."""
    raw = bytearray(_valid_file([b""] * 6))
    last = 12 + 4 * 6 + 8 * 5  # the offsets array's last entry
    raw[last:last + 8] = struct.pack("<q", -(2**63))
    with pytest.raises(FFRecordError, match=r"offsets decrease: sample 4 starts at 84, sample 5 at -9223372036854775808"):
        _parse_bytes(bytes(raw), check_data=False)
