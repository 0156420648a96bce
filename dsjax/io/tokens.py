"""Token shards for pretraining: documents -> tokens -> FFRecord shards, read back as fixed-length
windows packed across document boundaries (the GPT/DeepSeek-V3 pretraining layout: every document
ends with an end-of-sequence token and sequences are cut from the concatenated stream).

On disk (``out_dir``)::

    meta.json            {"format": "dsjax-tokens", "dtype", "vocab_size", "eos_id",
                          "record_tokens", "num_tokens", "num_documents", "shards": [{"file", "tokens"}]}
    tokens-00000.ffr     FFRecord; each record holds ``record_tokens`` consecutive tokens
    tokens-00001.ffr     (the last record of the last shard may be shorter)

Window w of :class:`TokenDataset` is tokens ``[w*seq_len, w*seq_len + seq_len + 1)`` of the stream:
inputs are ``window[:-1]``, next-token targets ``window[1:]``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from dsjax.io.ffrecord import FFRecordError, FFRecordReader, FFRecordWriter, PathLike

BYTE_VOCAB_SIZE = 257  # bytes 0..255 and the end-of-sequence token
BYTE_EOS_ID = 256
_META = "meta.json"


def byte_tokenize(text: str | bytes) -> np.ndarray:
    """The default tokenizer: UTF-8 bytes as token ids 0..255 (nothing to download)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, np.uint8).astype(np.int64)


def write_token_shards(inputs: Iterable[str | bytes], out_dir: PathLike, *,
                       tokenizer: Callable[[str | bytes], Sequence[int]] | None = None,
                       shard_size: int = 1 << 24, record_tokens: int = 4096, eos_id: int | None = None,
                       vocab_size: int | None = None) -> dict[str, Any]:
    """Tokenizes documents and writes them as FFRecord token shards plus ``meta.json``.

    Args:
        inputs: documents (str or bytes), streamed; each is followed by ``eos_id`` in the stream.
        out_dir: created if missing; must not already hold a token dataset.
        tokenizer: callable document -> token ids; None is the byte-level tokenizer
            (vocab 257, eos 256).
        shard_size: tokens per shard file (a multiple of ``record_tokens``; the last shard is shorter).
        record_tokens: tokens per FFRecord record, the unit of I/O (4096 uint16 tokens = 8 KiB).
        eos_id: end-of-sequence id; default 256 for bytes, else ``tokenizer.eos_id`` /
            ``tokenizer.eos_token_id`` when present (required otherwise).
        vocab_size: default 257 for bytes, else ``tokenizer.vocab_size`` when present, else
            1 + the largest id seen. Tokens are stored as uint16 when vocab_size <= 65536.

    Returns:
        The metadata written to ``meta.json``.
    """
    if record_tokens <= 0 or shard_size <= 0 or shard_size % record_tokens:
        raise ValueError(f"shard_size must be a positive multiple of record_tokens={record_tokens}, "
                         f"got {shard_size}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, _META)):
        raise FileExistsError(17, f"{out_dir} already holds a token dataset ({_META})", out_dir)
    if tokenizer is None:
        tokenizer, eos_id, vocab_size = byte_tokenize, BYTE_EOS_ID if eos_id is None else eos_id, vocab_size or BYTE_VOCAB_SIZE
    else:
        if eos_id is None:
            eos_id = getattr(tokenizer, "eos_id", getattr(tokenizer, "eos_token_id", None))
        if eos_id is None:
            raise ValueError("eos_id: required with a tokenizer that has no eos_id/eos_token_id attribute")
        vocab_size = vocab_size or getattr(tokenizer, "vocab_size", None)
    eos_id = int(eos_id)
    # Without a known vocabulary the width must fit any id; uint32 it is.
    dtype = np.dtype(np.uint16 if vocab_size is not None and vocab_size <= 1 << 16 else np.uint32)
    limit = vocab_size if vocab_size is not None else np.iinfo(dtype).max + 1

    shards: list[dict[str, Any]] = []
    pending: list[np.ndarray] = []
    pending_len = 0
    num_docs = 0
    max_id = eos_id

    def flush(count: int) -> None:
        nonlocal pending, pending_len
        stream = np.concatenate(pending) if len(pending) > 1 else pending[0]
        chunk, rest = stream[:count], stream[count:]
        name = f"tokens-{len(shards):05d}.ffr"
        n_rec = -(-count // record_tokens)
        with FFRecordWriter(os.path.join(out_dir, name), n_rec) as w:
            for r in range(n_rec):
                w.write_one(chunk[r * record_tokens:(r + 1) * record_tokens])
        shards.append({"file": name, "tokens": int(count)})
        pending, pending_len = ([rest] if rest.size else []), int(rest.size)

    for doc_i, doc in enumerate(inputs):
        ids = np.asarray(tokenizer(doc), dtype=np.int64).reshape(-1)
        ids = np.append(ids, eos_id)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= limit:
            raise ValueError(f"inputs[{doc_i}]: token id {lo if lo < 0 else hi} outside [0, {limit}) "
                             f"(vocab_size={vocab_size}, dtype {dtype.name})")
        max_id = max(max_id, hi)
        pending.append(ids.astype(dtype))
        pending_len += ids.size
        num_docs += 1
        while pending_len >= shard_size:
            flush(shard_size)
    if pending_len:
        flush(pending_len)
    meta = {"format": "dsjax-tokens", "version": 1, "dtype": dtype.name,
            "vocab_size": int(vocab_size if vocab_size is not None else max_id + 1), "eos_id": eos_id,
            "record_tokens": int(record_tokens), "num_tokens": int(sum(s["tokens"] for s in shards)),
            "num_documents": num_docs, "shards": shards}
    tmp = os.path.join(out_dir, f".{_META}.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, _META))  # the dataset exists once meta.json does
    return meta


class TokenDataset:
    """Fixed-length token windows from :func:`write_token_shards` output, shuffled and sharded.

    Args:
        directory: the shard directory (with ``meta.json``).
        seq_len: tokens per training sequence; each item holds seq_len + 1 tokens (inputs and
            shifted targets).
        seed: shuffle seed; epoch e uses the permutation drawn from (seed, e).
        process_index / process_count: data-parallel shard (default ``jax.process_index()`` /
            ``jax.process_count()``). Process p owns windows p, p + P, ...; every process gets the
            same number of windows (the remainder is dropped) so SPMD steps stay in lockstep.
        check_data: verify FFRecord checksums.
        engine: reader engine (see :class:`dsjax.io.FFRecordReader`).

    Item i (any i >= 0; i // len(self) is the epoch) is int32[seq_len + 1].
    """

    def __init__(self, directory: PathLike, *, seq_len: int, seed: int, process_index: int | None = None,
                 process_count: int | None = None, check_data: bool = True, engine: str = "auto") -> None:
        if not isinstance(seq_len, (int, np.integer)) or seq_len <= 0:
            raise ValueError(f"TokenDataset: seq_len must be a positive integer, got {seq_len!r}")
        if process_index is None or process_count is None:
            import jax  # pylint: disable=import-outside-toplevel
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"TokenDataset: process_index must be in [0, {process_count}), got {process_index}")
        self.directory = os.fspath(directory)
        meta_path = os.path.join(self.directory, _META)
        if not os.path.exists(meta_path):
            raise FileNotFoundError(2, f"no token dataset in {self.directory} ({_META} missing)", meta_path)
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.dtype = np.dtype(self.meta["dtype"])
        self.seq_len, self.seed = int(seq_len), int(seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.reader = FFRecordReader([os.path.join(self.directory, s["file"]) for s in self.meta["shards"]],
                                     check_data=check_data, engine=engine)
        lengths = self.reader.lengths
        if np.any(lengths % self.dtype.itemsize):
            r = int(np.flatnonzero(lengths % self.dtype.itemsize)[0])
            path, local = self.reader.locate(r)
            raise FFRecordError(path, f"{int(lengths[r])} bytes is not a whole number of {self.dtype.name} tokens", local)
        counts = lengths // self.dtype.itemsize
        self._rec_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_tokens = int(self._rec_start[-1])
        if self.num_tokens != self.meta["num_tokens"]:
            raise ValueError(f"{meta_path}: says {self.meta['num_tokens']} tokens, shards hold {self.num_tokens}")
        self.num_windows = max(0, (self.num_tokens - 1) // self.seq_len)
        self._len = self.num_windows // self.process_count
        if self._len == 0:
            raise ValueError(f"TokenDataset: {self.num_tokens} tokens give {self.num_windows} windows of "
                             f"seq_len={seq_len}, fewer than process_count={self.process_count}")

    def __len__(self) -> int:
        """Windows per epoch for this process."""
        return self._len

    @functools.lru_cache(maxsize=4)
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self._len)

    def windows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Global window numbers of items (epoch-aware shuffle, then this process's stride)."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and idx.min() < 0:
            raise IndexError(f"TokenDataset: indices must be >= 0, got {int(idx.min())}")
        epochs, k = np.divmod(idx, self._len)
        local = np.empty_like(idx)
        for e in np.unique(epochs):
            sel = epochs == e
            local[sel] = self._permutation(int(e))[k[sel]]
        return local * self.process_count + self.process_index

    def read_batch(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """int32[B, seq_len + 1] windows for items ``indices``; one engine submission for the batch."""
        w = self.windows(indices)
        span = self.seq_len + 1
        starts = w * self.seq_len
        first = np.searchsorted(self._rec_start, starts, side="right") - 1
        last = np.searchsorted(self._rec_start, starts + span - 1, side="right") - 1
        needed = np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(first, last)])) if w.size else \
            np.zeros(0, np.int64)
        data, bounds = self.reader.read_concat(needed)
        tokens = data.view(self.dtype)
        # Records with consecutive ids sit next to each other in `data`, so each window is one slice.
        tok_pos = bounds[:-1] // self.dtype.itemsize
        pos = tok_pos[np.searchsorted(needed, first)] + (starts - self._rec_start[first])
        return tokens[pos[:, None] + np.arange(span)].astype(np.int32)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.read_batch([index])[0]

    def dataset(self, batch_size: int, *, num_epochs: int | None = 1) -> Any:
        """A grain MapDataset of int32[batch_size, seq_len + 1] batches (remainder dropped).

        Indices run across epochs (``num_epochs=None``: practically endless), so each epoch is
        reshuffled; the dataset is checkpointable through grain's iterator state.
        """
        import grain  # pylint: disable=import-outside-toplevel
        total = self._len * num_epochs if num_epochs is not None else self._len * (sys.maxsize // (4 * self._len))
        return grain.MapDataset.range(total).batch(batch_size, drop_remainder=True).map(self.read_batch)

    def __repr__(self) -> str:
        return (f"TokenDataset({self.directory!r}, seq_len={self.seq_len}, seed={self.seed}, "
                f"process={self.process_index}/{self.process_count})")
