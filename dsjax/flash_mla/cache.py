"""``PagedMLACache``: a jit-able paged latent KV cache for FlashMLA decoding.

The cache is a pytree of device arrays (pages, block table, lengths, free-page stack), so a decode
step that appends and attends can be jitted and carried through ``lax.scan``. Pages are handed out
from a LIFO free stack (like vLLM's block manager); all operations are functional and have static
shapes. Capacity problems cannot raise inside jit: an ``allocate`` or ``append`` that does not fit
(not enough free pages, or a sequence would exceed ``max_blocks_per_seq``) changes nothing for the
affected call and sets the sticky ``overflow`` flag; check it on the host.

Rows are FlashMLA's: 576 = 512 latent + 64 RoPE channels per token and KV head, in bf16, or the
656-byte FP8 format (``fp8=True``; rows are quantized on append).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dsjax._src import checks
from dsjax.flash_mla import api, fp8_format


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedMLACache:
    """Paged latent cache state.

    Attributes:
        pages: ``[num_blocks, page_block_size, h_kv, 576]`` bf16 (or uint8 ``[..., 656]`` if fp8).
        block_table: int32 ``[b, max_blocks_per_seq]``; -1 marks unassigned entries.
        seqlens: int32 ``[b]`` tokens cached per sequence.
        free_pages: int32 ``[num_blocks]``: a stack; entries ``[0, num_free)`` are free pages.
        num_free: int32 scalar.
        overflow: bool scalar, set when an allocation did not fit (sticky).
        fp8: static; pages hold the FP8 format.
    """

    pages: jax.Array
    block_table: jax.Array
    seqlens: jax.Array
    free_pages: jax.Array
    num_free: jax.Array
    overflow: jax.Array
    fp8: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def page_block_size(self) -> int:
        return int(self.pages.shape[1])

    @property
    def max_blocks_per_seq(self) -> int:
        return int(self.block_table.shape[1])

    @staticmethod
    def create(num_blocks: int, page_block_size: int, batch: int, max_blocks_per_seq: int, *,
               h_kv: int = 1, dtype: Any = jnp.bfloat16, fp8: bool = False) -> "PagedMLACache":
        """An empty cache (all pages free, all sequences of length 0)."""
        for name, v in (("num_blocks", num_blocks), ("page_block_size", page_block_size),
                        ("batch", batch), ("max_blocks_per_seq", max_blocks_per_seq),
                        ("h_kv", h_kv)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"PagedMLACache.create: {name} must be a positive int, got {v!r}")
        width = fp8_format.BYTES_PER_TOKEN if fp8 else fp8_format.D_QK
        pdtype = jnp.uint8 if fp8 else dtype
        return PagedMLACache(
            pages=jnp.zeros((num_blocks, page_block_size, h_kv, width), pdtype),
            block_table=jnp.full((batch, max_blocks_per_seq), -1, jnp.int32),
            seqlens=jnp.zeros((batch,), jnp.int32),
            free_pages=jnp.arange(num_blocks, dtype=jnp.int32),
            num_free=jnp.int32(num_blocks),
            overflow=jnp.bool_(False),
            fp8=bool(fp8),
        )

    def _blocks(self, n: jax.Array) -> jax.Array:
        return (n + self.page_block_size - 1) // self.page_block_size

    def allocate(self, num_tokens: jax.Array) -> "PagedMLACache":
        """Makes room for ``num_tokens[i]`` more tokens in sequence i (int32 ``[b]``, >= 0).

        Takes pages from the free stack for every sequence whose new length crosses into pages it
        does not have yet. If the whole request does not fit, nothing changes and ``overflow`` is set.
        Lengths are not changed (``append`` does that).
        """
        return self._allocate(num_tokens)[0]

    def _allocate(self, num_tokens: jax.Array) -> tuple["PagedMLACache", jax.Array]:
        num_tokens = jnp.maximum(jnp.asarray(num_tokens, jnp.int32), 0)
        cur = self._blocks(self.seqlens)
        new = self._blocks(self.seqlens + num_tokens)
        need = new - cur
        total = jnp.sum(need)
        fits = (total <= self.num_free) & jnp.all(new <= self.max_blocks_per_seq)
        offset = jnp.cumsum(need) - need  # exclusive prefix sum
        j = jnp.arange(self.max_blocks_per_seq, dtype=jnp.int32)[None, :]
        fresh = (j >= cur[:, None]) & (j < new[:, None])
        # Pop from the top of the stack: the k-th new page overall is free_pages[num_free - 1 - k].
        k = offset[:, None] + j - cur[:, None]
        src = jnp.clip(self.num_free - 1 - k, 0, self.free_pages.shape[0] - 1)
        bt = jnp.where(fresh & fits, self.free_pages[src], self.block_table)
        return dataclasses.replace(
            self, block_table=bt, num_free=jnp.where(fits, self.num_free - total, self.num_free),
            overflow=self.overflow | ~fits), fits

    def append(self, rows: jax.Array, num_tokens: jax.Array | None = None) -> "PagedMLACache":
        """Appends new cache rows to each sequence (allocating pages as needed).

        Args:
            rows: ``[b, t, h_kv, 576]`` (latent + RoPE, any float dtype); quantized if fp8.
            num_tokens: int32 ``[b]`` in ``[0, t]``: how many of the t rows of each sequence are
                real (default: all t). Rows past it are ignored.
        """
        op = "PagedMLACache.append"
        b, mb = self.block_table.shape
        h_kv = self.pages.shape[2]
        checks.check_rank("rows", rows, op=op, exact=4, layout="[b, t, h_kv, 576]")
        if rows.shape[0] != b or rows.shape[2] != h_kv or rows.shape[3] != fp8_format.D_QK:
            raise ValueError(f"{op}: rows must have shape ({b}, t, {h_kv}, {fp8_format.D_QK}), got "
                             f"{tuple(rows.shape)}")
        t = rows.shape[1]
        n = jnp.full((b,), t, jnp.int32) if num_tokens is None else \
            jnp.clip(jnp.asarray(num_tokens, jnp.int32), 0, t)
        grown, fitted = self._allocate(n)
        data = api.quantize_kvcache(rows) if self.fp8 else rows.astype(self.pages.dtype)
        pos = self.seqlens[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [b, t]
        real = (jnp.arange(t)[None, :] < n[:, None]) & fitted
        page_idx = jnp.take_along_axis(grown.block_table,
                                       jnp.clip(pos // self.page_block_size, 0, mb - 1), axis=1)
        nblk = self.pages.shape[0]
        page_idx = jnp.where(real, page_idx, nblk)  # out of bounds: dropped by the scatter
        slot = pos % self.page_block_size
        pages = self.pages.at[page_idx, slot].set(data, mode="drop")
        return dataclasses.replace(grown, pages=pages,
                                   seqlens=jnp.where(fitted, self.seqlens + n, self.seqlens))

    def free(self, which: jax.Array) -> "PagedMLACache":
        """Releases every page of the sequences where ``which`` (bool ``[b]``) is True.

        Their block-table rows become -1 and their lengths 0; the pages go back on the free stack.
        """
        which = jnp.asarray(which, jnp.bool_)
        mb = self.max_blocks_per_seq
        used = jnp.where(which, self._blocks(self.seqlens), 0)
        used = jnp.minimum(used, mb)
        offset = jnp.cumsum(used) - used
        j = jnp.arange(mb, dtype=jnp.int32)[None, :]
        give = j < used[:, None]
        dst = jnp.where(give, self.num_free + offset[:, None] + j, self.free_pages.shape[0])
        free_pages = self.free_pages.at[dst].set(self.block_table, mode="drop")
        bt = jnp.where(which[:, None], -1, self.block_table)
        return dataclasses.replace(
            self, block_table=bt, seqlens=jnp.where(which, 0, self.seqlens),
            free_pages=free_pages, num_free=self.num_free + jnp.sum(used))

    def attend(self, q: jax.Array, *, head_dim_v: int = fp8_format.D_NOPE,
               softmax_scale: float | None = None, causal: bool = False,
               num_sm_parts: int | None = None,
               implementation: str = "auto") -> tuple[jax.Array, jax.Array]:
        """Decodes ``q [b, s_q, h_q, 576]`` over this cache (metadata computed here, on device).

        Returns ``flash_mla_with_kvcache``'s ``(out, lse)``.
        """
        b, s_q, h_q = q.shape[:3]
        h_kv = self.pages.shape[2]
        md, ns = api.get_mla_metadata(self.seqlens, s_q * h_q // h_kv, h_kv,
                                      num_sm_parts=num_sm_parts)
        return api.flash_mla_with_kvcache(q, self.pages, self.block_table, self.seqlens,
                                          head_dim_v, md, ns, softmax_scale, causal,
                                          is_fp8_kvcache=self.fp8, implementation=implementation)
