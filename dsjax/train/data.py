"""``dsjax prepare``: byte-level token shards for the main job, with nothing to download.

The default corpus is the Python standard library's own ``.py`` sources (``sysconfig``'s
``stdlib`` path), present wherever Python is; ``--input DIR`` takes the user's text files instead.
Files are read in sorted path order, so the same input gives the same shards. Documents are
tokenized as UTF-8 bytes (vocabulary 257 with the end-of-sequence id 256) and written through
:func:`dsjax.io.write_token_shards` as FFRecord shards that :class:`dsjax.io.TokenDataset` reads.
"""

from __future__ import annotations

import os
import sysconfig
from typing import Any, Iterator

from dsjax.train import UsageError

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".c", ".h", ".cc", ".js", ".html", ".csv", ".toml")


def default_corpus_dir() -> str:
    """The directory of the standard library's Python sources."""
    return sysconfig.get_paths()["stdlib"]


def list_documents(root: str, *, suffixes: tuple[str, ...]) -> list[str]:
    """Files under ``root`` ending in one of ``suffixes`` (sorted; hidden dirs and
    ``site-packages`` skipped, so the default corpus is the standard library only)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in ("site-packages", "__pycache__"))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(suffixes))
    return out


def _read(paths: list[str], max_bytes: int | None) -> Iterator[bytes]:
    total = 0
    for p in paths:
        try:
            with open(p, "rb") as f:
                data = f.read()
        except OSError:
            continue  # unreadable files (permissions, dangling links) are not documents
        if not data.strip():
            continue
        if max_bytes is not None and total + len(data) > max_bytes:
            data = data[:max_bytes - total]
        total += len(data)
        yield data
        if max_bytes is not None and total >= max_bytes:
            return


def prepare(out_dir: str, *, input_dir: str | None = None, max_bytes: int | None = 16 << 20,
            shard_size: int = 1 << 22, record_tokens: int = 4096) -> dict[str, Any]:
    """Writes the token shards of the main job.

    Args:
        out_dir: where the shards and ``meta.json`` go (must not already hold a dataset).
        input_dir: a directory of text files (every file with a suffix in :data:`TEXT_SUFFIXES`),
            or None for the standard library's ``.py`` files.
        max_bytes: stop after this many bytes of text (None: everything); the default keeps the
            default dataset at 16 MiB of tokens, plenty for the tiny model.
        shard_size, record_tokens: see :func:`dsjax.io.write_token_shards`.

    Returns:
        The dataset metadata (``num_tokens``, ``num_documents``, ``shards``, ...).

    Raises:
        UsageError: the input directory is missing, holds no text files or only empty ones, or
            ``out_dir`` already holds a dataset.
    """
    from dsjax.io import write_token_shards  # pylint: disable=import-outside-toplevel

    if input_dir is None:
        root, suffixes = default_corpus_dir(), (".py",)
    else:
        root, suffixes = input_dir, TEXT_SUFFIXES
    if not os.path.isdir(root):
        raise UsageError(f"input directory {root} does not exist")
    paths = list_documents(root, suffixes=suffixes)
    if not paths:
        raise UsageError(f"no text files ({', '.join(suffixes)}) under {root}")
    if os.path.exists(os.path.join(out_dir, "meta.json")):
        raise UsageError(f"{out_dir} already holds a token dataset; remove it or pick another --out")
    docs = _read(paths, max_bytes)
    first = next(docs, None)
    if first is None:
        raise UsageError(f"the {len(paths)} text files under {root} are all empty")

    def chain() -> Iterator[bytes]:
        yield first
        yield from docs

    meta = write_token_shards(chain(), out_dir, shard_size=shard_size, record_tokens=record_tokens)
    meta["source"] = root
    return meta
