"""USRBIO backend selection and reads, against a fake ``hf3fs_py_usrbio`` (no 3FS mount here).

The fake implements the binding's documented Python API (deepseek-ai/3FS src/lib/py/
usrbio_binding.cc): ``extract_mount_point``, ``register_fd``/``deregister_fd``, ``iovec(buf, id,
mount, block_size, numa)`` with slicing, ``ioring(mount, entries, for_read, io_depth)`` with
``prepare(iov, read, fd, off, userdata=)``, ``submit()`` and ``wait(min_results=, max_results=)``
returning iovecs carrying ``result`` and ``userdata``. Reads are real preads into the iovec memory,
and the fake checks the invariants 3FS enforces (registered fds, the iovec symlink).
"""

from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest

from dsjax.io import FFRecordError, FFRecordReader, FFRecordWriter, ThreeFSDataSource, open_engine


class _Iov:
    def __init__(self, buf, start, size, root):
        self.buf, self.start, self.size, self.root = buf, start, size, root
        self.result, self.userdata = 0, None

    def __getitem__(self, sl):
        lo, hi, step = sl.indices(self.size)
        assert step == 1
        return _Iov(self.buf, self.start + lo, hi - lo, self.root)


def make_fake(mount: str) -> types.ModuleType:
    m = types.ModuleType("hf3fs_py_usrbio")
    m.registered, m.iovecs, m.submits, m.rings = set(), [], 0, []

    def extract_mount_point(path):
        return mount if os.path.realpath(path).startswith(os.path.realpath(mount) + os.sep) else None

    def register_fd(fd, flags=0):
        assert fd not in m.registered, "3FS: an fd may not be registered twice"
        m.registered.add(fd)

    def deregister_fd(fd):
        m.registered.discard(fd)

    def iovec(buf, iov_id, mount_point, block_size=0, numa=-1):
        link = os.path.join(mount_point, "3fs-virt", "iovs", iov_id)
        assert os.path.islink(link) and os.readlink(link).startswith("/dev/shm/"), "iovec must be linked"
        mv = memoryview(buf)
        iov = _Iov(mv, 0, mv.nbytes, iov_id)
        m.iovecs.append(iov_id)
        return iov

    class ioring:  # noqa: N801 - the binding's name
        def __init__(self, mount_point, entries, for_read=True, io_depth=0, priority=None, timeout=None,
                     numa=-1, flags=0):
            assert for_read
            self.entries, self.queue, self.done = entries, [], []
            m.rings.append(self)

        def prepare(self, iov, read, fd, off, userdata=None):
            assert read and fd in m.registered, "3FS reads only from registered fds"
            assert len(self.queue) < self.entries
            self.queue.append((iov, fd, off, userdata))
            return self

        def submit(self):
            m.submits += 1
            for iov, fd, off, userdata in self.queue:
                data = os.pread(fd, iov.size, off)
                iov.buf[iov.start:iov.start + len(data)] = data
                iov.result, iov.userdata = len(data), userdata
                self.done.append(iov)
            self.queue = []
            return self

        def wait(self, *, max_results=0, min_results=0, timeout=None):
            k = max(max_results, min_results) or len(self.done)
            out, self.done = self.done[:k], self.done[k:]
            return out

    m.extract_mount_point, m.register_fd, m.deregister_fd = extract_mount_point, register_fd, deregister_fd
    m.iovec, m.ioring = iovec, ioring
    return m


@pytest.fixture
def mount(tmp_path, monkeypatch):
    root = tmp_path / "3fs"
    (root / "3fs-virt" / "iovs").mkdir(parents=True)
    (root / "data").mkdir()
    fake = make_fake(str(root))
    monkeypatch.setitem(sys.modules, "hf3fs_py_usrbio", fake)
    return root, fake


def _write(path, records):
    with FFRecordWriter(path, len(records)) as w:
        for r in records:
            w.write_one(r)
    return str(path)


def _records(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, int(rng.integers(1, 9000)), dtype=np.uint8).tobytes() for _ in range(n)]


def test_selected_on_a_3fs_mount(mount, tmp_path):
    root, fake = mount
    recs = _records(50)
    p = _write(root / "data" / "a.ffr", recs)
    r = FFRecordReader(p)
    assert r.engine == "usrbio" and fake.registered
    idx = np.random.default_rng(1).integers(0, 50, 300)
    assert [x.tobytes() for x in r.read(idx)] == [recs[i] for i in idx]
    assert fake.submits == 1  # one batch -> one ioring submission
    # Not on the mount -> POSIX engine, even with the module importable.
    q = _write(tmp_path / "b.ffr", recs)
    assert FFRecordReader(q).engine == "mmap"
    assert ThreeFSDataSource(p).engine == "usrbio"


def test_iovec_reused_and_grown_and_cleaned_up(mount):
    root, fake = mount
    recs = _records(30, 2)
    r = FFRecordReader(_write(root / "data" / "a.ffr", recs))
    r.read([0, 1])
    r.read([2, 3, 4])
    assert len(fake.iovecs) == 1  # the iovec is reused across batches
    big = list(range(30)) * 16  # ~2 MiB: the iovec must grow
    assert [x.tobytes() for x in r.read(big)] == [recs[i] for i in big]
    assert len(fake.iovecs) == 2
    links = os.listdir(root / "3fs-virt" / "iovs")
    assert links == [fake.iovecs[-1]]  # the outgrown one was unlinked
    r.close()
    assert not fake.registered and not os.listdir(root / "3fs-virt" / "iovs")


def test_batches_larger_than_the_ring(mount):
    root, fake = mount
    recs = _records(20, 3)
    p = _write(root / "data" / "a.ffr", recs)
    eng = open_engine([p])
    eng._entries = 7  # 3 submission rounds for 20 reads
    fds = np.array([eng.open_file(p)] * 20, np.int32)
    r = FFRecordReader(p)
    h = r.headers[0]
    bounds = np.concatenate([[0], np.cumsum(h.lengths)])
    out = np.empty(int(bounds[-1]), np.uint8)
    before = fake.submits
    assert eng.read(fds, h.offsets, h.lengths, bounds[:-1], out) is None
    assert fake.submits - before == 3
    assert [out[bounds[i]:bounds[i + 1]].tobytes() for i in range(20)] == recs
    eng.close_file(int(fds[0]))
    eng.close()


def test_errors_name_file_and_sample(mount):
    root, _ = mount
    recs = [b"x" * 100] * 5
    p = _write(root / "data" / "a.ffr", recs)
    r = FFRecordReader(p)
    os.truncate(p, os.path.getsize(p) - 30)  # sample 4 now short
    with pytest.raises(FFRecordError, match=r"a.ffr: sample 4: file ended after 70 of 100 bytes"):
        r.read([0, 4])
    with open(p, "r+b") as f:
        f.seek(os.path.getsize(p) - 150)
        f.write(b"Y")  # inside sample 3
    with pytest.raises(FFRecordError, match="sample 3: CRC-32 mismatch"):
        r.read([3])


def test_explicit_choices(mount, tmp_path, monkeypatch):
    root, _ = mount
    p = _write(root / "data" / "a.ffr", [b"a"])
    q = _write(tmp_path / "b.ffr", [b"b"])
    assert FFRecordReader(p, engine="pread").engine == "pread"
    with pytest.raises(RuntimeError, match="one 3FS mount"):
        FFRecordReader(q, engine="usrbio")
    monkeypatch.setitem(sys.modules, "hf3fs_py_usrbio", None)  # makes the import fail
    assert FFRecordReader(p).engine == "mmap"
    with pytest.raises(ValueError, match="engine must be one of"):
        FFRecordReader(p, engine="aio")
