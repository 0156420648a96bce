"""The mmap engine's mappings: the cap on mapped files (least recently used unmapped, mapped again
on use, safe under concurrent batches), visible mmap failures (ENOMEM answered by eviction, else a
warning naming the file and errno plus counters), no GIL held while mapping, the page-table
population fallback, thread-start failures without crashes or leaked descriptors, and forked
children that read by pread without touching the parent's lock."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from dsjax import _io
from dsjax.io import FFRecordReader, FFRecordWriter, _engine

PAGE = os.sysconf("SC_PAGE_SIZE")


def _write(path, samples):
    with FFRecordWriter(path, len(samples)) as w:
        for s in samples:
            w.write_one(s)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """8 FFRecord files of 40 records (3000 bytes, distinct per file and record): (paths, samples)."""
    d = tmp_path_factory.mktemp("maps")
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, 256, 3000, dtype=np.uint8).tobytes() for _ in range(8 * 40)]
    paths = [_write(d / f"f{k}.ffr", samples[40 * k:40 * (k + 1)]) for k in range(8)]
    return paths, samples


def _mapped_paths(paths):
    """Which of `paths` this process maps now, from /proc/self/maps (the kernel's view)."""
    with open("/proc/self/maps") as f:
        text = f.read()
    return {p for p in paths if p in text}


def test_cap_unmaps_the_least_recently_used_file(files):
    paths, samples = files
    r = FFRecordReader(paths, max_mapped_files=2)
    eng = r._engine
    assert eng._native.max_mapped_files == 2
    st = r.stats()
    assert st["mapped_files"] == 2 and _mapped_paths(paths) == set(paths[:2])  # the rest: mapped on use
    for k in (2, 3, 1):  # one file per batch: each batch maps its file, evicting the oldest
        idx = list(range(40 * k, 40 * k + 40, 3))
        assert [g.tobytes() for g in r.read(idx)] == [samples[i] for i in idx]
        assert len(_mapped_paths(paths)) <= 2
    assert _mapped_paths(paths) == {paths[3], paths[1]}  # 2 went first: least recently used
    st = eng.stats()
    assert (st["evicted"], st["remapped"], st["mapped_files"], st["map_failed"]) == (3, 3, 2, 0), st
    assert st["unmapped"] == 0 and st["mapped"] == 3 * 14, st  # every record from a mapping
    # A batch over more files than the cap: its first two files are mapped, the rest read by pread
    # (counted), and everything is correct.
    idx = [5, 45, 85, 125, 165, 205, 245, 285, 6]
    assert [g.tobytes() for g in r.read(idx)] == [samples[i] for i in idx]
    st2 = eng.stats()
    assert st2["mapped_files"] == 2 and len(_mapped_paths(paths)) == 2
    assert st2["unmapped"] - st["unmapped"] + st2["mapped"] - st["mapped"] == len(idx)
    assert st2["unmapped"] - st["unmapped"] >= len(idx) - 3, st2
    r.close()
    assert _mapped_paths(paths) == set()


def test_cap_holds_under_concurrent_batches(files):
    """Four threads read random batches of one or two files each with room for two mappings:
    evictions happen while other batches run; every record and its CRC is still right."""
    paths, samples = files
    r = FFRecordReader(paths, max_mapped_files=2, check_data=True)
    errors: list[BaseException] = []
    counts: list[int] = []

    def work(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(40):
                ks = rng.choice(8, size=int(rng.integers(1, 3)), replace=False)
                idx = np.concatenate([40 * k + rng.integers(0, 40, 12) for k in ks])
                got = r.read(idx)
                counts.append(len(idx))
                if [g.tobytes() for g in got] != [samples[i] for i in idx]:
                    raise AssertionError(f"wrong bytes for {idx}")
        except BaseException as e:  # pylint: disable=broad-except
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    st = r._engine.stats()
    assert st["evicted"] > 10 and st["mapped_files"] <= 2 and st["mapped"] > 0, st
    assert st["mapped"] + st["deferred"] + st["unmapped"] == sum(counts), st  # every record counted once
    r.close()


def test_default_cap_and_its_settings(monkeypatch, files):
    with open("/proc/sys/vm/max_map_count") as f:
        assert _io.default_max_mapped_files() == max(1, int(f.read()) // 2)
    monkeypatch.delenv("DSJAX_IO_MAX_MAPPED_FILES", raising=False)
    assert _engine.PosixEngine()._native.max_mapped_files == _io.default_max_mapped_files()
    monkeypatch.setenv("DSJAX_IO_MAX_MAPPED_FILES", "3")
    r = FFRecordReader(files[0])
    assert r._engine._native.max_mapped_files == 3 and r._engine.stats()["mapped_files"] == 3
    r.close()
    monkeypatch.setenv("DSJAX_IO_MAX_MAPPED_FILES", "lots")
    with pytest.raises(ValueError, match="DSJAX_IO_MAX_MAPPED_FILES: expected a positive integer, got 'lots'"):
        _engine.PosixEngine()
    with pytest.raises(ValueError, match="max_mapped_files: expected a positive integer or None, got 0"):
        FFRecordReader(files[0], max_mapped_files=0)
    with pytest.raises(ValueError, match="max_mapped_files must be >= 0"):
        _io.Engine(2, "mmap", 8, 0, -1)
    assert _io.Engine(2, "pread").max_mapped_files == 0


def test_unmappable_file_is_named_in_a_warning_and_counted(tmp_path):
    e = _io.Engine(2, "mmap")
    paths = [str(tmp_path / f"w{k}.bin") for k in range(2)]
    fds = []
    for p in paths:
        open(p, "wb").write(b"z" * 10000)
        fds.append(os.open(p, os.O_WRONLY))  # mmap(PROT_READ) of a write-only fd: EACCES
    try:
        with pytest.warns(RuntimeWarning, match=rf"could not mmap {paths[0]} \(errno 13, Permission denied\); "
                          r"its records are read with pread"):
            assert e.map_file(fds[0], paths[0]) is False
        import warnings  # pylint: disable=import-outside-toplevel
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per engine: the second failure is only counted
            assert e.map_file(fds[1], paths[1]) is False
        st = e.stats()
        assert (st["map_failed"], st["mapped_files"]) == (2, 0), st
        # Its reads go to pread (and fail there: the fd is write-only), counted as unmapped.
        out = np.empty(10, np.uint8)
        res = e.read(np.array([fds[0]], np.int32), np.array([0], np.int64), np.array([10], np.int64),
                     np.array([0], np.int64), out)
        assert res is not None and res[:2] == (0, 9)  # EBADF from pread: an error, not a crash
        assert e.stats()["unmapped"] == 1
    finally:
        for fd in fds:
            e.unmap_file(fd)
            os.close(fd)


def test_map_file_releases_the_gil(tmp_path):
    """map_file waits for the mappings' lock (batches in flight) without the GIL: another Python
    thread keeps running meanwhile. Held, the GIL would freeze it for the whole wait."""
    p = tmp_path / "g.bin"
    p.write_bytes(b"g" * 20000)
    e = _io.Engine(2, "mmap")
    fd = os.open(p, os.O_RDONLY)
    stamps: list[float] = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            stamps.append(time.monotonic())
            time.sleep(0.005)

    t = threading.Thread(target=ticker)
    t.start()
    try:
        assert e._hold_maps_lock(0.6)
        t0 = time.monotonic()
        assert e.map_file(fd, str(p))
        t1 = time.monotonic()
        assert t1 - t0 > 0.3  # it did wait for the lock
        inside = [s for s in stamps if t0 + 0.1 < s < t1 - 0.1]
        assert len(inside) >= 5, (t1 - t0, len(inside))
        assert e._hold_maps_lock(0.6)
        t0 = time.monotonic()
        e.unmap_file(fd)
        t1 = time.monotonic()
        assert len([s for s in stamps if t0 + 0.1 < s < t1 - 0.1]) >= 5
    finally:
        stop.set()
        t.join()
        os.close(fd)


def _mapping_rss(path):
    """Resident bytes (page-table entries present) of this process's mapping(s) of path."""
    rss, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                rss += int(line.split()[1]) * 1024
    return rss


@pytest.mark.parametrize("mode", ["madvise", "touch"])
def test_page_tables_are_populated_with_or_without_madv_populate_read(tmp_path, mode):
    """A fresh mapping of a cached file gets its page-table entries filled in the background:
    MADV_POPULATE_READ, or (kernels < 5.14, which answer EINVAL) one read per cached page."""
    data = np.random.default_rng(2).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    p = str(tmp_path / f"pop-{mode}.bin")
    open(p, "wb").write(data)  # just written: every page in the page cache
    e = _io.Engine(2, "mmap")
    if mode == "touch":
        e._force_touch_populate()
    fd = os.open(p, os.O_RDONLY)
    try:
        assert e.map_file(fd, p)
        pages = -(-len(data) // PAGE)
        deadline = time.monotonic() + 20  # the thread runs at nice 19 on a possibly busy machine
        while e.stats()["populated"] < pages and time.monotonic() < deadline:
            time.sleep(0.01)
        assert e.stats()["populated"] == pages and e.populate_mode == mode
        assert _mapping_rss(p) >= 0.95 * len(data), _mapping_rss(p)  # no read has touched it yet
        out = np.empty(5000, np.uint8)
        assert e.read(np.array([fd], np.int32), np.array([123457], np.int64), np.array([5000], np.int64),
                      np.array([0], np.int64), out) is None
        assert out.tobytes() == data[123457:128457]
    finally:
        e.unmap_file(fd)
        os.close(fd)


def test_failed_registration_closes_the_descriptor(monkeypatch, files):
    """A failure after a file was opened (here: map_file raising for the third file) closes it and
    the ones before: no descriptor leaks out of a failed FFRecordReader()."""
    real = _io

    class Engine:  # the native engine with map_file failing on its third call
        def __init__(self, *args):
            self._e, self._calls = real.Engine(*args), 0

        def __getattr__(self, name):
            return getattr(self._e, name)

        def map_file(self, fd, path):
            self._calls += 1
            if self._calls == 3:
                raise MemoryError("simulated failure while registering")
            return self._e.map_file(fd, path)

    class Native:
        def __getattr__(self, name):
            return Engine if name == "Engine" else getattr(real, name)

    monkeypatch.setattr(_engine, "_native", lambda: Native())
    before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(MemoryError, match="simulated"):
        FFRecordReader(files[0])
    assert sorted(os.listdir("/proc/self/fd")) == before


def _run(script, *args, timeout=90):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


# Threads that cannot start (8 MiB stacks with almost no address space left): the engine joins the
# threads it started and raises; it must not abort (a std::vector of joinable threads unwinding
# calls std::terminate) nor leak a descriptor, and works once the limit is lifted.
_THREADS = r"""
import os, resource, sys
from dsjax import _io
from dsjax.io import FFRecordReader, FFRecordWriter
p = os.path.join(sys.argv[1], "t.ffr")
with FFRecordWriter(p, 3) as w:
    for i in range(3):
        w.write_one(bytes([i]) * 100)
fds = sorted(os.listdir("/proc/self/fd"))
vm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:")][0]
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (vm + (12 << 20), hard))
for make in (lambda: _io.Engine(8, "mmap"), lambda: FFRecordReader(p, threads=8)):
    try:
        make()
        print("no error", flush=True)
    except RuntimeError as e:
        print("refused:", "could not start 7 reader threads" in str(e), flush=True)
resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
print("fds kept:", sorted(os.listdir("/proc/self/fd")) == fds, flush=True)
r = FFRecordReader(p, threads=8)
print("reads:", [x.tobytes() for x in r.read([2, 0])] == [b"\x02" * 100, b"\x00" * 100], flush=True)
"""


def test_thread_start_failure_raises_without_abort_or_leak(tmp_path):
    res = _run(_THREADS, tmp_path)
    out = res.stdout
    assert res.returncode == 0, (res.returncode, out, res.stderr[-3000:])
    assert out.count("refused: True") == 2 and "fds kept: True" in out and "reads: True" in out, out


# mmap answering ENOMEM (address space exhausted: RLIMIT_AS): the engine unmaps its least recently
# used file and tries again; a file that still cannot be mapped is read with pread, warned about.
_ENOMEM = r"""
import os, resource, sys, warnings
import numpy as np
from dsjax import _io
d = sys.argv[1]
MiB = 1 << 20
def make(name, size):
    p = os.path.join(d, name)
    with open(p, "wb") as f:
        f.truncate(size)
        f.seek(size // 2)
        f.write(name.encode() * 1000)  # cached pages in the middle of a sparse file
    return p, os.open(p, os.O_RDONLY)
(pa, fa), (pb, fb), (pc, fc) = make("a", 48 * MiB), make("b", 48 * MiB), make("c", 400 * MiB)
e = _io.Engine(2, "mmap")
vm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:")][0]
resource.setrlimit(resource.RLIMIT_AS, (vm + 80 * MiB, resource.getrlimit(resource.RLIMIT_AS)[1]))
def read(fd, size, name):
    out = np.empty(1000, np.uint8)
    res = e.read(np.array([fd], np.int32), np.array([size // 2], np.int64), np.array([1000], np.int64),
                 np.array([0], np.int64), out)
    return res is None and out.tobytes() == (name.encode() * 1000)[:1000]
print("a", e.map_file(fa, pa), flush=True)
print("b", e.map_file(fb, pb), e.stats()["evicted"], e.stats()["mapped_files"], flush=True)  # ENOMEM -> a evicted
print("read a", read(fa, 48 * MiB, "a"), e.stats()["remapped"], e.stats()["mapped"], flush=True)  # a again, b out
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    ok = e.map_file(fc, pc)
print("c", ok, e.stats()["map_failed"], len(w), flush=True)
print("warning:", w[0].category.__name__, w[0].message, flush=True)
print("read c", read(fc, 400 * MiB, "c"), e.stats()["unmapped"], flush=True)
"""


def test_enomem_evicts_then_falls_back_visibly(tmp_path):
    res = _run(_ENOMEM, tmp_path)
    out = res.stdout
    assert res.returncode == 0, (res.returncode, out, res.stderr[-3000:])
    assert "a True" in out and "b True 1 1" in out and "read a True 1 1" in out, out
    c = str(tmp_path / "c")
    assert "c False 1 1" in out, out
    assert f"warning: RuntimeWarning dsjax.io: could not mmap {c} (errno 12, Cannot allocate memory); its records " \
           "are read with pread instead" in out, out
    assert "read c True 1" in out, out


# fork() while another thread of the parent holds the mappings' lock exclusively: in the child that
# lock stays held forever (its holder does not exist there), so a child that touched it would hang.
# The child must read by pread through the inherited engine, and through the reader (which reopens),
# then grain-style worker processes (multiprocessing "fork") read through the data source.
_FORK = r"""
import multiprocessing, os, pickle, sys, time
import numpy as np
from dsjax.io import FFRecordReader, FFRecordWriter, ThreeFSDataSource
d = sys.argv[1]
samples = [bytes([i % 251]) * (1000 + 37 * i) for i in range(120)]
paths = []
for k in range(3):
    p = os.path.join(d, f"s{k}.ffr")
    with FFRecordWriter(p, 40) as w:
        for s in samples[40 * k:40 * k + 40]:
            w.write_one(s)
    paths.append(p)
r = FFRecordReader(paths)
idx = np.arange(0, 120, 7)
assert [x.tobytes() for x in r.read(idx)] == [samples[i] for i in idx]
eng = r._engine._native
before = eng.stats()
assert before["mapped"] == len(idx), before
assert eng._hold_maps_lock(1.5)
pid = os.fork()
if pid == 0:
    ok = True
    fds = r._fds[np.searchsorted(r._starts, idx, side="right") - 1]
    lens = r.lengths[idx]
    dsts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    out = np.empty(int(lens.sum()), np.uint8)
    crc = np.empty(len(idx), np.uint32)
    ok &= eng.read(fds, r._offsets[idx], lens, dsts, out, crc) is None
    ok &= [out[a:a + n].tobytes() for a, n in zip(dsts, lens)] == [samples[i] for i in idx]
    ok &= (crc == r._crcs[idx]).all()
    st = eng.stats()
    ok &= st["mapped"] == before["mapped"] and st["unmapped"] == before["unmapped"] + len(idx)
    ok &= [x.tobytes() for x in r.read(idx[::-1])] == [samples[i] for i in idx[::-1]]  # reopened
    os._exit(0 if ok else 3)
t0 = time.monotonic()
while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("child", os.waitstatus_to_exitcode(status), flush=True)
        break
    if time.monotonic() - t0 > 30:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        print("child hung", flush=True)
        break
    time.sleep(0.01)
src = ThreeFSDataSource(paths)
assert [x.tobytes() for x in src.read_batch([3, 50, 100])] == [samples[3], samples[50], samples[100]]
batches = [list(range(b, 120, 9)) for b in range(9)]
def inherited(batch):  # the forked worker's copy of the parent's source (opened in the parent)
    return [x.tobytes() for x in src.read_batch(batch)]
def pickled(args):  # grain's way: the source travels pickled and opens lazily in the worker
    s, batch = args
    return [x.tobytes() for x in s.read_batch(batch)]
with multiprocessing.get_context("fork").Pool(2) as pool:
    a = pool.map(inherited, batches)
    b = pool.map(pickled, [(src, bt) for bt in batches])
want = [[samples[i] for i in bt] for bt in batches]
print("workers", a == want, b == want, flush=True)
"""


def test_forked_children_read_by_pread_without_the_parents_lock(tmp_path):
    res = _run(_FORK, tmp_path, timeout=120)
    assert "child 0" in res.stdout, (res.stdout, res.stderr[-3000:])
    assert "workers True True" in res.stdout, (res.stdout, res.stderr[-3000:])
    assert res.returncode == 0, res.stderr[-3000:]
