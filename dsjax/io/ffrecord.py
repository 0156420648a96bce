"""FFRecord files: the record format used with 3FS (HFAiLab/ffrecord), read and written.

Byte layout, little-endian::

    uint32 checksum_meta | int64 N | uint32 crc32[N] | int64 offsets[N] | sample 0 | ... | sample N-1

``offsets`` are absolute file positions; sample i ends where sample i+1 starts, the last one at the
end of the file. ``crc32[i]`` is zlib's CRC-32 of sample i. ``checksum_meta`` is CRC-32 chained over
the 8 bytes of N, then the crc32 array, then the offsets array; 0 marks a legacy file whose
metadata is not checked. This is what HFAiLab/ffrecord's ``FileWriter``/``FileReader`` write and
read (``ffrecord/src/writer.cpp``, ``ffrecord/fileio.py``), so files move freely between them.

Every corruption (metadata checksum, truncation, offsets out of range or decreasing, a sample's
CRC) raises :class:`FFRecordError` naming the file and the sample; no read ever leaves the file.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import struct
import sys
import threading
import uuid
import zlib
from typing import Iterable, Sequence, Union

import numpy as np

from dsjax.io._engine import _native, open_engine

PathLike = Union[str, os.PathLike]
_PREFIX = struct.Struct("<Iq")  # checksum_meta, N
_PREFIX_BYTES = _PREFIX.size  # 12


def _split(out: np.ndarray, bounds: np.ndarray) -> list[np.ndarray]:
    """[out[bounds[k]:bounds[k + 1]] for k ...]: the views are made in native code (~2x faster)."""
    return _native().split(out, bounds)


class FFRecordError(ValueError):
    """A corrupt FFRecord file. ``path`` and ``index`` (the sample in that file, or None for the
    header as a whole) say where."""

    def __init__(self, path: str, message: str, index: int | None = None) -> None:
        where = f"{path}: sample {index}: " if index is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.index = index


@dataclasses.dataclass(frozen=True)
class FFRecordHeader:
    """The parsed, validated metadata of one FFRecord file.

    Attributes:
        path: the file.
        checksum_meta: stored metadata checksum (0 for legacy files).
        crcs: uint32[N], CRC-32 of every sample.
        offsets: int64[N], absolute start of every sample.
        lengths: int64[N], byte length of every sample.
        file_size: bytes in the file.
    """

    path: str
    checksum_meta: int
    crcs: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    file_size: int

    def __len__(self) -> int:
        return len(self.offsets)


def header_size(n: int) -> int:
    """Bytes taken by the header of a file with n samples (where sample 0 starts)."""
    return _PREFIX_BYTES + 12 * n


def _check_prefix(path: str, n: int, file_size: int) -> None:
    if n < 0 or header_size(n) > file_size:
        raise FFRecordError(path, f"header says N={n} samples, which needs {header_size(max(n, 0))} bytes of "
                            f"metadata, but the file has {file_size} bytes (truncated or not an FFRecord file)")


def parse_header(path: str, prefix: bytes, meta: bytes, file_size: int, *,
                 check_data: bool = True) -> FFRecordHeader:
    """Validates an FFRecord header.

    Args:
        path: file name, for messages.
        prefix: the first 12 bytes of the file.
        meta: the 12*N bytes that follow (crc32 then offsets arrays).
        file_size: size of the whole file in bytes.
        check_data: verify checksum_meta (unless 0).

    Raises:
        FFRecordError: on any inconsistency; nothing is trusted before it is checked.
    """
    if len(prefix) < _PREFIX_BYTES:
        raise FFRecordError(path, f"truncated file: {file_size} bytes, shorter than the {_PREFIX_BYTES}-byte header")
    checksum_meta, n = _PREFIX.unpack(prefix[:_PREFIX_BYTES])
    _check_prefix(path, n, file_size)
    if len(meta) != 12 * n:
        raise FFRecordError(path, f"truncated header: expected {12 * n} bytes of metadata, got {len(meta)}")
    if check_data and checksum_meta != 0:
        computed = zlib.crc32(meta, zlib.crc32(prefix[4:12]))
        if computed != checksum_meta:
            raise FFRecordError(path, f"metadata checksum mismatch: stored {checksum_meta:#010x}, "
                                f"computed {computed:#010x} (corrupt header)")
    crcs = np.frombuffer(meta, "<u4", n, 0).astype(np.uint32)
    offsets = np.frombuffer(meta, "<i8", n, 4 * n).astype(np.int64)
    if n:
        data_start = header_size(n)
        if offsets[0] < data_start:
            raise FFRecordError(path, f"offset {int(offsets[0])} points into the header (data starts at "
                                f"{data_start})", 0)
        bad = np.flatnonzero(offsets > file_size)
        if bad.size:
            i = int(bad[0])
            raise FFRecordError(path, f"offset {int(offsets[i])} is beyond the end of the file ({file_size} bytes; "
                                "truncated file?)", i)
        # Compared, not subtracted: np.diff overflows int64 for extreme offsets (e.g. -2**63 after a
        # large one) and would let a decreasing pair through.
        dec = np.flatnonzero(offsets[1:] < offsets[:-1])
        if dec.size:
            i = int(dec[0])
            raise FFRecordError(path, f"offsets decrease: sample {i} starts at {int(offsets[i])}, sample {i + 1} "
                                f"at {int(offsets[i + 1])}", i)
    ends = np.append(offsets[1:], np.int64(file_size)) if n else offsets
    return FFRecordHeader(path, checksum_meta, crcs, offsets, ends - offsets, file_size)


def read_header(path: str, *, check_data: bool = True) -> FFRecordHeader:
    """Reads and validates the header of one FFRecord file (FileNotFoundError names the path)."""
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        prefix = f.read(_PREFIX_BYTES)
        if len(prefix) < _PREFIX_BYTES:
            raise FFRecordError(path, f"truncated file: {file_size} bytes, shorter than the "
                                f"{_PREFIX_BYTES}-byte header")
        _, n = _PREFIX.unpack(prefix)
        _check_prefix(path, n, file_size)
        meta = f.read(12 * n)
    return parse_header(path, prefix, meta, file_size, check_data=check_data)


class FFRecordWriter:
    """Writes one FFRecord file of exactly n samples.

    Samples stream to a hidden temporary file next to ``path`` (``.<name>.<uuid>.tmp``, which no
    ``*.ffr`` glob matches); :meth:`close` writes the header and renames it into place, so a reader
    never sees a partial file. Leaving the ``with`` block by an exception removes the temporary.

    Args:
        path: the file to create (replaced if it exists).
        n: the number of samples that will be written (checked on close).

    Example:
        >>> with FFRecordWriter("/tmp/x.ffr", 2) as w:
        ...     w.write_one(b"hello")
        ...     w.write_one(np.arange(4, dtype=np.int32))
    """

    def __init__(self, path: PathLike, n: int) -> None:
        self._f = None
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise ValueError(f"FFRecordWriter: n must be an integer >= 0, got {n!r}")
        self.path = os.fspath(path)
        self.n = int(n)
        self.count = 0
        head, tail = os.path.split(os.path.abspath(self.path))
        if not os.path.isdir(head):
            raise FileNotFoundError(2, f"FFRecordWriter: directory {head} does not exist", head)
        self._tmp = os.path.join(head, f".{tail}.{uuid.uuid4().hex}.tmp")
        self._f = open(self._tmp, "wb")
        self._crcs = np.zeros(self.n, np.uint32)
        self._offsets = np.zeros(self.n, np.int64)
        self._pos = header_size(self.n)
        self._f.seek(self._pos)

    def write_one(self, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        """Appends one sample (any contiguous buffer; arrays are written as their raw bytes)."""
        if self._f is None:
            raise ValueError(f"FFRecordWriter({self.path}): write_one after close")
        if self.count >= self.n:
            raise ValueError(f"FFRecordWriter({self.path}): sample {self.count} exceeds n={self.n}")
        view = memoryview(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data).cast("B")
        self._crcs[self.count] = zlib.crc32(view)
        self._offsets[self.count] = self._pos
        self._f.write(view)
        self._pos += view.nbytes
        self.count += 1

    def close(self) -> None:
        """Writes the header and renames the file into place; raises if fewer than n samples came."""
        if self._f is None:
            return
        if self.count != self.n:
            self.abort()
            raise ValueError(f"FFRecordWriter({self.path}): {self.count} samples written, expected n={self.n}; "
                             "file discarded")
        meta = self._crcs.astype("<u4").tobytes() + self._offsets.astype("<i8").tobytes()
        n_bytes = struct.pack("<q", self.n)
        checksum = zlib.crc32(meta, zlib.crc32(n_bytes))
        self._f.seek(0)
        self._f.write(struct.pack("<I", checksum) + n_bytes + meta)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Discards the file being written."""
        if self._f is not None:
            self._f.close()
            self._f = None
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)

    def __enter__(self) -> "FFRecordWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def __del__(self) -> None:
        self.abort()


def resolve_paths(paths: PathLike | Sequence[PathLike]) -> list[str]:
    """A file, a list of files, or a directory (its ``*.ffr`` files, sorted) -> list of files."""
    items: Iterable[PathLike] = [paths] if isinstance(paths, (str, os.PathLike)) else paths
    out: list[str] = []
    for p in items:
        p = os.fspath(p)
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(glob.escape(p), "*.ffr")))
            if not found:
                raise FileNotFoundError(2, f"no *.ffr files in directory {p}", p)
            out.extend(found)
        elif os.path.exists(p):
            out.append(p)
        else:
            raise FileNotFoundError(2, f"FFRecord file not found: {p}", p)
    if not out:
        raise ValueError(f"paths: expected a file, a list of files or a directory of *.ffr, got {paths!r}")
    return out


class FFRecordReader:
    """Reads samples from one or more FFRecord files by global index, a batch per engine call.

    Args:
        paths: a file, a list of files, or a directory of ``*.ffr`` files (sorted by name). Samples
            are numbered across files in that order.
        check_data: verify the metadata checksum on open and every sample's CRC-32 on read.
        engine: "auto" (USRBIO on a 3FS mount with ``hf3fs_py_usrbio`` installed, else the native
            "mmap" engine: page-cache copies from read-only mappings, the pread pool for what is
            not cached; "pread" with ``direct``), "mmap", "pread", "io_uring" or "usrbio".
        threads: reads in flight for the pread pool (default: see ``_engine.default_threads``).
        direct: O_DIRECT reads (bypass the page cache).
        max_mapped_files: engine "mmap": at most this many files mapped at once; the least recently
            used are unmapped beyond it and mapped again when read (default: half of
            ``/proc/sys/vm/max_map_count``, or ``$DSJAX_IO_MAX_MAPPED_FILES``). A file that cannot
            be mapped is read with pread, with a RuntimeWarning naming it and its errno.

    The reader is thread-safe. It pickles as its arguments and reopens files in the new process;
    a reader used after ``fork`` reopens as well (the native thread pool does not survive fork).
    """

    def __init__(self, paths: PathLike | Sequence[PathLike], *, check_data: bool = True, engine: str = "auto",
                 threads: int | None = None, direct: bool = False, max_mapped_files: int | None = None) -> None:
        self._args = (paths, bool(check_data), engine, threads, bool(direct), max_mapped_files)
        self.paths = resolve_paths(paths)
        self.check_data = bool(check_data)
        headers = [read_header(p, check_data=self.check_data) for p in self.paths]
        self.headers = headers
        counts = np.array([len(h) for h in headers], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._offsets = np.concatenate([h.offsets for h in headers]) if headers else np.zeros(0, np.int64)
        self._lengths = np.concatenate([h.lengths for h in headers]) if headers else np.zeros(0, np.int64)
        self._crcs = np.concatenate([h.crcs for h in headers]) if headers else np.zeros(0, np.uint32)
        self._engine = open_engine(self.paths, engine=engine, threads=threads, direct=direct,
                                   max_mapped_files=max_mapped_files)
        self._fds = self._open_all()
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._closed = False
        self._spare: list[np.ndarray] = []
        self._max_spare = 4

    @property
    def engine(self) -> str:
        """The engine in use: "mmap", "pread", "io_uring" or "usrbio"."""
        return self._engine.name

    def __len__(self) -> int:
        return int(self._starts[-1])

    def stats(self) -> dict[str, int]:
        """The native engine's counters in this process (``{}`` for USRBIO): where records were read
        from ("mapped", "deferred": not cached, "unmapped": no usable mapping, "faulted") and what
        happened to the file mappings ("map_failed", "evicted", "remapped", "mapped_files",
        "populated"); see ``dsjax._io.Engine.stats``."""
        stats = getattr(self._engine, "stats", None)
        return dict(stats()) if stats is not None else {}

    @property
    def lengths(self) -> np.ndarray:
        """int64[len(self)]: byte length of every sample (from the headers, no I/O)."""
        return self._lengths

    def locate(self, index: int) -> tuple[str, int]:
        """(file, index within that file) of a global sample index."""
        f = int(np.searchsorted(self._starts, index, side="right") - 1)
        return self.paths[f], int(index - self._starts[f])

    def _indices(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.dtype == object or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise TypeError(f"indices: expected integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        if idx.size:
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= len(self):
                bad = lo if lo < 0 else hi
                raise IndexError(f"indices: sample index {bad} out of range for {len(self)} samples")
        return idx

    def read_concat(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reads samples into one buffer: (uint8[total bytes], int64[len(indices) + 1] bounds).

        Sample ``indices[k]`` is ``data[bounds[k]:bounds[k + 1]]``. One engine submission.
        """
        if self._closed:
            raise ValueError(f"{self!r}: read after close")
        if os.getpid() != self._pid:
            self._reopen()
        idx = self._indices(indices)
        lengths = self._lengths[idx]
        bounds = np.zeros(idx.size + 1, np.int64)
        np.cumsum(lengths, out=bounds[1:])
        out = self._buffer(int(bounds[-1]))
        if idx.size == 0:
            return out, bounds
        files = np.searchsorted(self._starts, idx, side="right") - 1
        fds = self._fds[files]
        # CRC-32s come back from the same call: the engine computes each one right after the copy,
        # while the record is still in the CPU caches.
        crc = np.empty(idx.size, np.uint32) if self.check_data else None
        failure = self._engine.read(fds, self._offsets[idx], lengths, bounds[:-1], out, crc)
        if failure is not None:
            k, err, got = failure
            g = int(idx[k])
            path, local = self.locate(g)
            if err == 0:
                raise FFRecordError(path, f"file ended after {got} of {int(lengths[k])} bytes (global index {g}; "
                                    "truncated since it was opened?)", local)
            raise OSError(err, f"{path}: sample {local} (global index {g}): read failed: {os.strerror(err)}", path)
        if crc is not None:
            bad = np.flatnonzero(crc != self._crcs[idx])
            if bad.size:
                k = int(bad[0])
                g = int(idx[k])
                path, local = self.locate(g)
                raise FFRecordError(path, f"CRC-32 mismatch: stored {int(self._crcs[g]):#010x}, read "
                                    f"{int(crc[k]):#010x} (global index {g}; corrupt data)", local)
        return out, bounds

    def _open_all(self) -> np.ndarray:
        fds: list[int] = []
        try:
            for p in self.paths:
                fds.append(self._engine.open_file(p))
        except BaseException:
            for fd in fds:
                self._engine.close_file(fd)
            raise
        return np.array(fds, np.int32)

    def _buffer(self, nbytes: int) -> np.ndarray:
        """A batch buffer of nbytes, recycled once no array from an earlier batch refers to it.

        A fresh multi-MiB array costs a page fault per 4 KiB on first write, as much as the reads
        themselves for small records; a recycled one is already mapped. Returned records are views
        that keep their buffer alive (numpy's ``base``), so a buffer is reused only when its
        reference count shows nobody else holds it.
        """
        with self._lock:
            for k in range(len(self._spare)):
                buf = self._spare[k]
                # References: the list, `buf`, getrefcount's argument -> 3 means unused elsewhere.
                if buf.size >= nbytes and sys.getrefcount(buf) <= 3:
                    del self._spare[k]
                    break
            else:
                buf = np.empty(max(1 << 16, 1 << max(0, nbytes - 1).bit_length()), np.uint8)
            out = buf[:nbytes]  # taken under the lock: from here on the view pins the buffer
            self._spare.insert(0, buf)
            del self._spare[self._max_spare:]
        return out

    def read(self, indices: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        """Reads samples: a list of uint8 arrays, views into one buffer filled by one submission."""
        out, bounds = self.read_concat(indices)
        return _split(out, bounds)

    def read_one(self, index: int) -> np.ndarray:
        """One sample as a uint8 array."""
        return self.read([index])[0]

    def _reopen(self) -> None:
        with self._lock:
            if os.getpid() == self._pid:
                return
            # The parent's fds are inherited and still valid, but the native pool's threads are not.
            paths, check_data, engine, threads, direct, max_mapped_files = self._args
            self._engine = open_engine(self.paths, engine=engine, threads=threads, direct=direct,
                                       max_mapped_files=max_mapped_files)
            self._fds = self._open_all()
            self._pid = os.getpid()

    def close(self) -> None:
        """Closes the files; further reads fail."""
        self._closed = True
        fds, self._fds = getattr(self, "_fds", None), np.zeros(0, np.int32)
        if fds is not None and getattr(self, "_pid", None) == os.getpid():
            for fd in fds:
                self._engine.close_file(int(fd))
            self._engine.close()

    def __enter__(self) -> "FFRecordReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pylint: disable=broad-except  # interpreter shutdown
            pass

    def __getstate__(self) -> dict:
        return {"args": self._args}

    def __setstate__(self, state: dict) -> None:
        args = tuple(state["args"])
        args += (None,) * (6 - len(args))  # pickled before max_mapped_files existed: the default
        paths, check_data, engine, threads, direct, max_mapped_files = args
        self.__init__(paths, check_data=check_data, engine=engine, threads=threads, direct=direct,
                      max_mapped_files=max_mapped_files)

    def __repr__(self) -> str:
        return f"FFRecordReader({self.paths!r}, check_data={self.check_data})"
