"""grain data source over FFRecord files, with a batch path that turns one grain batch of indices
into one engine submission (one USRBIO ioring submission on 3FS, many preads in flight elsewhere).

grain calls ``__getitem__`` one record at a time; 3FS pays off only with many reads in flight.
Two ways to get batched reads:

* grain's batch pushdown: ``MapDataset.source(src)`` calls ``src._getitems(indices)`` when grain
  batches with pushdown enabled;
* explicitly, which works in every grain version: batch the *indices* and read in the map::

      ds = (grain.MapDataset.range(len(src))
            .shuffle(seed=0)
            .batch(256)
            .map(src.read_batch))     # one submission per batch of 256 records

The source opens its files lazily and again in every process it is unpickled in (grain workers).
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Sequence

import numpy as np

from dsjax.io.ffrecord import FFRecordReader, PathLike, resolve_paths


class ThreeFSDataSource:
    """A grain ``RandomAccessDataSource`` over FFRecord files (on 3FS or any file system).

    Args:
        paths: a file, a list of files, or a directory of ``*.ffr`` files (sorted by name).
        check_data: verify metadata checksums and each record's CRC-32.
        decode: applied to every record (a uint8 numpy array viewing the batch buffer); None
            returns the arrays themselves. Must be picklable for multi-process grain.
        engine: "auto" | "mmap" | "pread" | "io_uring" | "usrbio" (see :class:`dsjax.io.FFRecordReader`).
        threads: reads in flight for the pread pool.
        direct: O_DIRECT reads (page cache bypassed; POSIX engines only).

    Records are uint8 arrays of their stored bytes (or ``decode(array)``); a batch's records are
    views of one buffer filled by one engine call, so no per-record copy is made.
    """

    def __init__(self, paths: PathLike | Sequence[PathLike], *, check_data: bool = True,
                 decode: Callable[[np.ndarray], Any] | None = None, engine: str = "auto",
                 threads: int | None = None, direct: bool = False) -> None:
        if decode is not None and not callable(decode):
            raise TypeError(f"ThreeFSDataSource: decode must be callable or None, got {type(decode).__name__}")
        self._paths = [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        resolve_paths(self._paths)  # fail now (FileNotFoundError with the path), not in a worker
        self._check_data = bool(check_data)
        self._decode = decode
        self._engine = engine
        self._threads = threads
        self._direct = bool(direct)
        self._reader: FFRecordReader | None = None
        self._lock = threading.Lock()

    @property
    def reader(self) -> FFRecordReader:
        """The underlying reader, opened on first use in this process."""
        r = self._reader
        if r is None:
            with self._lock:
                if self._reader is None:
                    self._reader = FFRecordReader(self._paths, check_data=self._check_data, engine=self._engine,
                                                  threads=self._threads, direct=self._direct)
                r = self._reader
        return r

    @property
    def engine(self) -> str:
        """The engine in use: "mmap", "pread", "io_uring" or "usrbio"."""
        return self.reader.engine

    def __len__(self) -> int:
        return len(self.reader)

    def _finish(self, records: list[np.ndarray]) -> list[Any]:
        return records if self._decode is None else [self._decode(r) for r in records]

    def __getitem__(self, index: int) -> Any:
        if isinstance(index, slice):
            return self.read_batch(np.arange(len(self))[index])
        i = int(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"ThreeFSDataSource: index {index} out of range for {n} records")
        return self._finish(self.reader.read([i]))[0]

    def read_batch(self, indices: Sequence[int] | np.ndarray) -> list[Any]:
        """Reads many records in one engine submission; the batch path for grain pipelines.

        Args:
            indices: int[B] record indices (a grain batch of indices, a list, any order, repeats
                allowed).

        Returns:
            B records in the order of ``indices``.
        """
        return self._finish(self.reader.read(indices))

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        return self.read_batch(indices)

    def _getitems(self, indices: Sequence[int]) -> list[Any]:
        return self.read_batch(indices)

    def __repr__(self) -> str:
        decode = "None" if self._decode is None else getattr(self._decode, "__qualname__", type(self._decode).__name__)
        return (f"ThreeFSDataSource(paths={self._paths!r}, check_data={self._check_data}, decode={decode}, "
                f"engine={self._engine!r})")

    def __getstate__(self) -> dict:
        return {"paths": self._paths, "check_data": self._check_data, "decode": self._decode,
                "engine": self._engine, "threads": self._threads, "direct": self._direct}

    def __setstate__(self, state: dict) -> None:
        self._paths = state["paths"]
        self._check_data = state["check_data"]
        self._decode = state["decode"]
        self._engine = state["engine"]
        self._threads = state["threads"]
        self._direct = state["direct"]
        self._reader = None
        self._lock = threading.Lock()
