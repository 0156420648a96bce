"""The native batch-read engine dsjax._io: CRC-32, pread pool, io_uring, O_DIRECT, errors."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import platform
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dsjax import _io

KINDS = ["pread"] + (["io_uring"] if _io.io_uring_available() else [])


@pytest.fixture(scope="module")
def blob(tmp_path_factory):
    """A 300 KiB file of random bytes: (path, contents)."""
    path = tmp_path_factory.mktemp("engine") / "blob.bin"
    data = np.random.default_rng(0).integers(0, 256, 300 * 1024 + 77, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    return str(path), data


@given(st.binary(max_size=3000), st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_crc32_matches_zlib(data, start):
    assert _io.crc32(data, start) == zlib.crc32(data, start)
    assert _io.crc32_portable(data, start) == zlib.crc32(data, start)
    fast = _io.crc32_pclmul(data, start)
    assert fast == zlib.crc32(data, start) or (fast is None and platform.machine() != "x86_64")


def test_crc32_unaligned_and_chained():
    data = np.random.default_rng(1).integers(0, 256, 100_003, dtype=np.uint8)
    for lo in range(17):  # every alignment of the slicing-by-8 and 16-byte PCLMUL loops
        view = data[lo:]
        assert _io.crc32_portable(view) == zlib.crc32(view.tobytes())
        assert _io.crc32(view) == zlib.crc32(view.tobytes())
    assert _io.crc32(data[500:], _io.crc32(data[:500])) == zlib.crc32(data.tobytes())


def _requests(rng, size, n, max_len):
    offs = rng.integers(0, size, n)
    lens = np.minimum(rng.integers(0, max_len, n), size - offs)
    lens[::7] = 0  # zero-length requests are legal and read nothing
    dsts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    return offs.astype(np.int64), lens.astype(np.int64), dsts, int(lens.sum())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("direct", [False, True])
def test_batch_read_matches_file(blob, kind, direct):
    path, data = blob
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    try:
        eng = _io.Engine(4, kind, 64, 4096 if direct else 0)
        assert eng.kind == kind
        rng = np.random.default_rng(2)
        for n, max_len in [(1, 5000), (300, 9000), (40, 70_000)]:  # 300 > queue depth 64
            offs, lens, dsts, total = _requests(rng, len(data), n, max_len)
            out = np.full(total + 5, 0xAB, np.uint8)
            assert eng.read(np.full(n, fd, np.int32), offs, lens, dsts, out) is None
            for o, ln, d in zip(offs, lens, dsts):
                assert out[d:d + ln].tobytes() == data[o:o + ln]
            assert (out[total:] == 0xAB).all()  # nothing written past the requests
            crc = eng.crc32_batch(out, dsts, lens)
            assert crc.tolist() == [zlib.crc32(data[o:o + ln]) for o, ln in zip(offs, lens)]
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("direct", [False, True])
def test_end_of_file_reports_lowest_failing_request(blob, kind, direct):
    path, data = blob
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        eng = _io.Engine(3, kind, 16, 4096 if direct else 0)
        n = len(data)
        offs = np.array([0, n - 10, 100, n - 3, 5], np.int64)
        lens = np.array([10, 50, 10, 10, 10], np.int64)
        dsts = np.arange(5, dtype=np.int64) * 64
        idx, err, got = eng.read(np.full(5, fd, np.int32), offs, lens, dsts, np.zeros(320, np.uint8))
        assert (idx, err) == (1, 0)  # errno 0: end of file; request 3 fails too but 1 is lower
        assert got == 10  # bytes of request 1 that were there
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_fd_reports_errno(kind):
    eng = _io.Engine(2, kind)
    bad = 1 << 30  # above any open-file limit: never a valid descriptor
    fds = np.array([bad, bad], np.int32)
    res = eng.read(fds, np.zeros(2, np.int64), np.full(2, 8, np.int64), np.array([0, 8]), np.zeros(16, np.uint8))
    assert res is not None and res[0] == 0 and res[1] == errno.EBADF


def test_arguments_checked_before_reading(blob):
    path, _ = blob
    fd = os.open(path, os.O_RDONLY)
    eng = _io.Engine(2)
    one = np.array([fd], np.int32)
    z, ln = np.zeros(1, np.int64), np.array([16], np.int64)
    try:
        with pytest.raises(ValueError, match="exceeds the output buffer"):
            eng.read(one, z, ln, np.array([1]), np.zeros(16, np.uint8))
        with pytest.raises(ValueError, match="must be >= 0"):
            eng.read(one, np.array([-1]), ln, z, np.zeros(16, np.uint8))
        with pytest.raises(ValueError, match="lengths: expected 1 entries"):
            eng.read(one, z, np.array([1, 2]), z, np.zeros(16, np.uint8))
        with pytest.raises(ValueError, match="uint8 buffer"):
            eng.read(one, z, ln, z, np.zeros(4, np.int32))
        ro = np.zeros(16, np.uint8)
        ro.flags.writeable = False
        with pytest.raises((ValueError, BufferError)):
            eng.read(one, z, ln, z, ro)
        with pytest.raises(ValueError, match="C-contiguous"):
            eng.read(one, z, np.array([4]), z, np.zeros(32, np.uint8)[::2])
        with pytest.raises(ValueError, match="kind must be"):
            _io.Engine(2, "aio")
        with pytest.raises(ValueError, match="power of two"):
            _io.Engine(2, "pread", 8, 1000)
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_batches_from_many_threads(blob, kind):
    path, data = blob
    fd = os.open(path, os.O_RDONLY)
    eng = _io.Engine(4, kind, 32)

    def job(seed):
        rng = np.random.default_rng(seed)
        offs, lens, dsts, total = _requests(rng, len(data), 200, 3000)
        out = np.empty(total, np.uint8)
        assert eng.read(np.full(len(offs), fd, np.int32), offs, lens, dsts, out) is None
        return all(out[d:d + ln].tobytes() == data[o:o + ln] for o, ln, d in zip(offs, lens, dsts))

    try:
        with concurrent.futures.ThreadPoolExecutor(6) as ex:
            assert all(ex.map(job, range(24)))
    finally:
        os.close(fd)


def test_pool_survives_many_small_batches(blob):
    """O_DIRECT batches bypass the page-cache fast path, so every one goes through the thread pool
    (wake-up, slot hand-out, cancellation of unclaimed slots); thousands of them must neither
    hang nor mix up results."""
    path, data = blob
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    eng = _io.Engine(8, "pread", 8, 4096)

    def job(seed):
        rng = np.random.default_rng(seed)
        for _ in range(150):
            offs, lens, dsts, total = _requests(rng, len(data), int(rng.integers(1, 12)), 700)
            out = np.empty(total, np.uint8)
            assert eng.read(np.full(len(offs), fd, np.int32), offs, lens, dsts, out) is None
            assert all(out[d:d + ln].tobytes() == data[o:o + ln] for o, ln, d in zip(offs, lens, dsts))
        return True

    try:
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            assert all(ex.map(job, range(8)))
    finally:
        os.close(fd)
