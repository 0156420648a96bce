"""Choice of the batch-read engine: USRBIO on a 3FS mount, else the native POSIX engine.

Every engine offers the same small interface used by :class:`dsjax.io.FFRecordReader`:
``open_file(path) -> fd``, ``close_file(fd)``, ``read(fds, offsets, lengths, dsts, out, crc=None)``
(request i reads ``lengths[i]`` bytes at ``offsets[i]`` of ``fds[i]`` into
``out[dsts[i]:dsts[i] + lengths[i]]``; ``crc``, when given, a uint32 array that receives every
request's CRC-32; returns ``None`` or ``(request index, errno, bytes read)`` for the lowest failing
request, errno 0 meaning end of file) and ``name`` ("mmap", "pread", "io_uring" or "usrbio").

The POSIX kinds: "mmap" (the default for buffered reads) copies batches whose records are in the
page cache straight out of read-only file mappings (no syscall per record; a SIGBUS guard turns a
file truncated under the reader into an end-of-file error) and sends the others to the pread pool;
"pread" is the pread pool alone (page-cache reads tried first with ``preadv2(RWF_NOWAIT)`` on the
calling thread); "io_uring" a ring. ``io/engine.cc`` has the measurements behind the choice.
Mapped page-cache pages show up in the process's RSS (as shared file pages; the kernel can still
reclaim them); use "pread" where that matters. At most ``max_mapped_files`` files are mapped at once
(default: half of ``/proc/sys/vm/max_map_count``, or ``$DSJAX_IO_MAX_MAPPED_FILES``); beyond it the
least recently used are unmapped and mapped again when read. A file that cannot be mapped is read
with pread: a RuntimeWarning names the first such file and its errno, and the engine's ``stats()``
counts them (``map_failed``, ``unmapped``), so the slower path never goes unnoticed.

The USRBIO engine follows 3FS's Python binding ``hf3fs_py_usrbio`` (deepseek-ai/3FS,
``src/lib/py/usrbio_binding.cc`` and ``hf3fs_fuse/io.py``): a shared-memory buffer registered as
an ``iovec`` through a symlink under ``<mount>/3fs-virt/iovs/<uuid>``, an ``ioring`` for reads,
file descriptors registered with ``register_fd``; one batch is one series of ``prepare`` calls, one
``submit`` and one ``wait``. The iovec is reused across batches and grows when a batch needs more.
"""

from __future__ import annotations

import importlib
import os
import threading
import uuid
import warnings
from multiprocessing import shared_memory
from typing import Any, Sequence

import numpy as np

ENGINES = ("auto", "mmap", "pread", "io_uring", "usrbio")


def _native() -> Any:
    try:
        from dsjax import _io  # pylint: disable=import-outside-toplevel
    except ImportError as e:  # pragma: no cover - only without the built extension
        raise ImportError("dsjax.io needs the native module dsjax._io; reinstall dsjax "
                          "(pip install -e . builds it)") from e
    return _io


def default_max_mapped_files() -> int:
    """The cap on mapped files per mmap engine: ``$DSJAX_IO_MAX_MAPPED_FILES`` if set, else half of
    ``/proc/sys/vm/max_map_count`` (which also caps all engines of the process together)."""
    env = os.environ.get("DSJAX_IO_MAX_MAPPED_FILES", "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            value = -1
        if value < 1:
            raise ValueError(f"DSJAX_IO_MAX_MAPPED_FILES: expected a positive integer, got {env!r}")
        return value
    return int(_native().default_max_mapped_files())


def default_threads() -> int:
    """Reads kept in flight by the pread pool: enough for network file systems, not hundreds."""
    return max(8, min(32, 4 * (os.cpu_count() or 1)))


class PosixEngine:
    """The native engine (``dsjax._io.Engine``): mmap fast path, a pread thread pool or an io_uring ring.

    Args:
        kind: "auto" ("mmap" for buffered reads, "pread" with ``direct``), "mmap", "pread" or
            "io_uring".
        threads: reads in flight for the pread pool (the calling thread included).
        direct: open files with O_DIRECT (page cache bypassed; reads go through aligned buffers).
        queue_depth: io_uring submission-queue size.
        max_mapped_files: kind "mmap": most files mapped at once (least recently used ones are
            unmapped beyond it and mapped again when read); default ``default_max_mapped_files()``.

    Raises:
        ValueError: max_mapped_files < 1.
        RuntimeError: the reader threads cannot be started (RLIMIT_NPROC, pids.max, address space);
            the threads already started are joined and no file is open.
    """

    def __init__(self, *, kind: str = "auto", threads: int | None = None, direct: bool = False,
                 queue_depth: int = 256, max_mapped_files: int | None = None) -> None:
        if max_mapped_files is None:
            max_mapped_files = default_max_mapped_files()
        elif isinstance(max_mapped_files, bool) or not isinstance(max_mapped_files, (int, np.integer)) \
                or max_mapped_files < 1:
            raise ValueError(f"max_mapped_files: expected a positive integer or None, got {max_mapped_files!r}")
        self._direct = bool(direct)
        self._native = _native().Engine(threads or default_threads(), kind, queue_depth,
                                        4096 if direct else 0, int(max_mapped_files))
        self.name: str = self._native.kind

    def open_file(self, path: str) -> int:
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        if self._direct:
            flags |= os.O_DIRECT
        try:
            fd = os.open(path, flags)
        except OSError as e:
            if self._direct and e.errno == 22:  # EINVAL: tmpfs and some FUSE mounts refuse O_DIRECT
                raise OSError(e.errno, f"{path}: this file system does not support O_DIRECT "
                              "(direct=True); open it with direct=False", path) from e
            raise
        if self.name == "mmap":
            try:
                # False: mapped on first read (at the cap), or not mappable (read with pread; warned).
                self._native.map_file(fd, path)
            except BaseException:  # e.g. the warning turned into an error: the fd is still ours to close
                self._native.unmap_file(fd)
                os.close(fd)
                raise
        return fd

    def stats(self) -> dict[str, int]:
        """The native engine's counters (see ``dsjax._io.Engine.stats``)."""
        return self._native.stats()

    def close_file(self, fd: int) -> None:
        if self.name == "mmap":
            self._native.unmap_file(fd)
        os.close(fd)

    def read(self, fds: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, dsts: np.ndarray,
             out: np.ndarray, crc: np.ndarray | None = None) -> tuple[int, int, int] | None:
        return self._native.read(fds, offsets, lengths, dsts, out, crc)

    def crc32(self, out: np.ndarray, dsts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        return self._native.crc32_batch(out, dsts, lengths)

    def close(self) -> None:
        pass


class UsrbioEngine:
    """Batched reads through 3FS's native client (``hf3fs_py_usrbio``).

    Args:
        mount: the 3FS mount point the files live on.
        module: the imported ``hf3fs_py_usrbio`` module (a fake one in tests).
        entries: ioring size; larger batches are submitted in rounds of this many reads.
    """

    name = "usrbio"

    def __init__(self, mount: str, module: Any, *, entries: int = 1024) -> None:
        self._h3 = module
        self._mount = mount
        self._ior = module.ioring(mount, entries, True, 0)
        self._entries = int(getattr(self._ior, "entries", entries)) or entries
        self._lock = threading.Lock()
        self._shm: shared_memory.SharedMemory | None = None
        self._link: str | None = None
        self._iov: Any = None
        self._crc = PosixEngine(kind="pread", threads=1)  # CRC-32 helper only
        self._pid = os.getpid()

    def _ensure(self, nbytes: int) -> None:
        """Makes the registered shared-memory iovec at least nbytes long (reused across batches)."""
        if self._shm is not None and self._shm.size >= nbytes:
            return
        size = 1 << max(20, int(nbytes - 1).bit_length())
        self._release_iov()
        shm = shared_memory.SharedMemory(create=True, size=size)
        iov_id = str(uuid.uuid4())
        link = os.path.join(self._mount, "3fs-virt", "iovs", iov_id)
        try:
            os.symlink(os.path.normpath(f"/dev/shm/{shm.name}"), link)
            iov = self._h3.iovec(shm.buf, iov_id, self._mount, 0, -1)
        except BaseException:
            if os.path.islink(link):
                os.unlink(link)
            shm.close()
            shm.unlink()
            raise
        self._shm, self._link, self._iov = shm, link, iov

    def _release_iov(self) -> None:
        self._iov = None
        if self._link is not None and os.path.islink(self._link):
            os.unlink(self._link)
        self._link = None
        if self._shm is not None:
            shm, self._shm = self._shm, None
            shm.unlink()  # the name goes now; the mapping when its last user does
            try:
                shm.close()
            except BufferError:  # a slice of the iovec is still referenced somewhere
                pass

    def open_file(self, path: str) -> int:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self._h3.register_fd(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close_file(self, fd: int) -> None:
        try:
            self._h3.deregister_fd(fd)  # must precede close (3FS docs)
        finally:
            os.close(fd)

    def read(self, fds: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, dsts: np.ndarray,
             out: np.ndarray, crc: np.ndarray | None = None) -> tuple[int, int, int] | None:
        failure = self._read(fds, offsets, lengths, dsts, out)
        if failure is None and crc is not None:
            crc[:] = self._crc.crc32(out, dsts, lengths)
        return failure

    def _read(self, fds: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, dsts: np.ndarray,
              out: np.ndarray) -> tuple[int, int, int] | None:
        n = len(fds)
        if n == 0:
            return None
        extent = int((dsts + lengths).max())
        failure: tuple[int, int, int] | None = None
        with self._lock:
            self._ensure(extent)
            for start in range(0, n, self._entries):
                prepared = 0
                for i in range(start, min(n, start + self._entries)):
                    ln = int(lengths[i])
                    if ln == 0:
                        continue
                    d = int(dsts[i])
                    self._ior.prepare(self._iov[d:d + ln], True, int(fds[i]), int(offsets[i]), userdata=i)
                    prepared += 1
                if prepared == 0:
                    continue
                self._ior.submit()
                done = self._ior.wait(min_results=prepared, max_results=prepared)
                if len(done) != prepared:
                    raise OSError(5, f"USRBIO: waited for {prepared} reads, {len(done)} completed")
                for r in done:
                    i, res = int(r.userdata), int(r.result)
                    if res != int(lengths[i]):
                        f = (i, -res if res < 0 else 0, max(res, 0))
                        failure = f if failure is None or f[0] < failure[0] else failure
            # One copy out of the registered buffer: the caller's arrays must not alias shared
            # memory that the next batch overwrites.
            np.copyto(out[:extent], np.frombuffer(self._shm.buf, np.uint8, extent))
        return failure

    def crc32(self, out: np.ndarray, dsts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        return self._crc.crc32(out, dsts, lengths)

    def close(self) -> None:
        if os.getpid() != self._pid:  # a forked child's copy: the iovec and ring are the parent's
            return
        with self._lock:
            self._release_iov()
            self._ior = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pylint: disable=broad-except  # interpreter shutdown
            pass


def _usrbio_mount(paths: Sequence[str]) -> tuple[Any, str] | None:
    """(module, mount point) when hf3fs_py_usrbio imports and every path is on one 3FS mount."""
    try:
        module = importlib.import_module("hf3fs_py_usrbio")
    except ImportError:
        return None
    mounts = set()
    for p in paths:
        mp = module.extract_mount_point(os.path.realpath(p))
        if not mp:
            return None
        mounts.add(mp)
    return (module, mounts.pop()) if len(mounts) == 1 else None


def open_engine(paths: Sequence[str], *, engine: str = "auto", threads: int | None = None,
                direct: bool = False, max_mapped_files: int | None = None) -> PosixEngine | UsrbioEngine:
    """Returns the engine for these files.

    Args:
        paths: the files that will be read (all of them: USRBIO needs them on one 3FS mount).
        engine: "auto" (USRBIO when ``hf3fs_py_usrbio`` imports and the files are on a 3FS mount,
            else the POSIX "mmap" engine, or "pread" with ``direct``), "mmap", "pread", "io_uring"
            or "usrbio" (raises when impossible).
        threads: pread pool size (POSIX engines).
        direct: O_DIRECT reads (POSIX engines).
        max_mapped_files: cap on mapped files of the "mmap" engine (see :class:`PosixEngine`).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine in ("auto", "usrbio"):
        found = _usrbio_mount(paths)
        if found is not None:
            module, mount = found
            try:
                return UsrbioEngine(mount, module)
            except OSError as e:
                if engine == "usrbio":
                    raise
                warnings.warn(f"dsjax.io: USRBIO setup on {mount} failed ({e}); using POSIX reads",
                              RuntimeWarning, stacklevel=3)
        elif engine == "usrbio":
            raise RuntimeError("engine='usrbio' needs the hf3fs_py_usrbio module and every file on one "
                               f"3FS mount; not the case for {list(paths)[:3]}")
    return PosixEngine(kind="auto" if engine in ("auto", "usrbio") else engine, threads=threads,
                       direct=direct, max_mapped_files=max_mapped_files)
