"""Public FlashMLA decoding API: ``get_mla_metadata`` and ``flash_mla_with_kvcache``.

Names and argument order follow deepseek-ai/FlashMLA (flash_mla/flash_mla_interface.py). Each call
validates its static arguments (shapes, dtypes, flags) before any kernel runs, picks an
implementation (``auto`` | ``cuda`` | ``cpu`` | ``reference``, see :mod:`dsjax._src.dispatch`) and
runs it. Decoding is forward-only: differentiating through it raises TypeError.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax._src import checks, dispatch
from dsjax.flash_mla import _ffi, fp8_format, metadata, reference

_HAS = ("reference", "cpu", "cuda")
# The CUDA kernel compiles here but has not yet been run on a Hopper GPU by this project, so
# "auto" does not pick it: it runs only when asked for (implementation="cuda"). Flip this once the
# gpu-marked tests have passed on an H200.
_CUDA_IN_AUTO = False
_OP = "flash_mla_with_kvcache"
_FLOATS = (jnp.bfloat16, jnp.float16, jnp.float32)


def get_mla_metadata(cache_seqlens: jax.Array, num_heads_per_head_k: int, num_heads_k: int, *,
                     num_sm_parts: int | None = None) -> tuple[jax.Array, jax.Array]:
    """FlashMLA's tile-scheduler metadata, computed on device (works inside jit).

    Args:
        cache_seqlens: int32 ``[b]`` (b >= 1), the key count of each request.
        num_heads_per_head_k: query rows per KV head, ``s_q * h_q // h_kv`` (as in FlashMLA).
        num_heads_k: h_kv.
        num_sm_parts: number of work parts (static). Default: FlashMLA's
            ``sm_count // h_kv // ceil(num_heads_per_head_k / 64)`` with the GPU's SM count, or
            ``4 * cpu_count`` on the CPU.

    Returns:
        ``(tile_scheduler_metadata int32 [num_sm_parts, 8], num_splits int32 [b + 1])``; see
        :mod:`dsjax.flash_mla.metadata` for the row layout. Pass both, computed from the same
        ``cache_seqlens``, to :func:`flash_mla_with_kvcache`.

    Raises:
        TypeError / ValueError: wrong dtype, rank or non-positive counts.
    """
    op = "get_mla_metadata"
    checks.check_dtype("cache_seqlens", cache_seqlens, (jnp.int32,), op=op)
    checks.check_rank("cache_seqlens", cache_seqlens, op=op, exact=1, layout="[b]")
    if cache_seqlens.shape[0] < 1:
        raise ValueError(f"{op}: cache_seqlens must hold at least one request, got shape "
                         f"{tuple(cache_seqlens.shape)}")
    for name, v in (("num_heads_per_head_k", num_heads_per_head_k), ("num_heads_k", num_heads_k)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{op}: {name} must be a positive int, got {v!r}")
    if num_sm_parts is None:
        num_sm_parts = metadata.default_num_sm_parts(int(num_heads_per_head_k), int(num_heads_k))
    elif not isinstance(num_sm_parts, (int, np.integer)) or isinstance(num_sm_parts, bool) \
            or num_sm_parts < 1:
        raise ValueError(f"{op}: num_sm_parts must be a positive int or None, got {num_sm_parts!r}")
    return metadata.compute_metadata(cache_seqlens, int(num_sm_parts))


def _not_differentiable(params, primals, tangents):
    raise TypeError(
        "flash_mla_with_kvcache is decode-only and has no gradient (FlashMLA has no backward "
        "pass). Differentiate dsjax.flash_mla.reference.flash_mla_with_kvcache for a reference "
        "gradient, or stop_gradient the inputs.")


@functools.partial(jax.custom_jvp, nondiff_argnums=(6,))
def _decode(q, k_cache, block_table, cache_seqlens, md, num_splits, params):
    impl, head_dim_v, scale, causal, fp8 = params
    if impl == "reference":
        return reference.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
                                                scale, causal, fp8)
    return _ffi.decode(q, k_cache, block_table, cache_seqlens, md, num_splits,
                       softmax_scale=scale, causal=causal, is_fp8=fp8)


_decode.defjvp(_not_differentiable)


def _native_unsupported(q: Any, k_cache: Any, head_dim_v: int, fp8: bool) -> str | None:
    """Why the CPU/CUDA kernels cannot take these operands (None when they can)."""
    if np.dtype(q.dtype) != np.dtype(jnp.bfloat16):
        return f"the kernels take bfloat16 q (got {np.dtype(q.dtype).name}); use the reference"
    if q.shape[-1] != fp8_format.D_QK or head_dim_v != fp8_format.D_NOPE:
        return (f"the kernels are specialised for d=576, head_dim_v=512 (got d={q.shape[-1]}, "
                f"head_dim_v={head_dim_v})")
    return None


def flash_mla_with_kvcache(
    q: jax.Array,
    k_cache: jax.Array,
    block_table: jax.Array,
    cache_seqlens: jax.Array,
    head_dim_v: int,
    tile_scheduler_metadata: jax.Array,
    num_splits: jax.Array,
    softmax_scale: float | None = None,
    causal: bool = False,
    *,
    is_fp8_kvcache: bool = False,
    implementation: dispatch.Implementation = "auto",
) -> tuple[jax.Array, jax.Array]:
    """MLA decoding attention over a paged latent cache (FlashMLA).

    Query head ``h`` attends over the latent rows of KV head ``h // (h_q // h_kv)``; K is the whole
    576-wide row, V its first ``head_dim_v`` channels.

    Args:
        q: ``[b, s_q, h_q, d]`` bfloat16 (float16/float32 on the reference), d = 576 for the
            kernels; s_q >= 1 query tokens per request (1 for plain decoding, 2..8 for MTP).
        k_cache: ``[num_blocks, page_block_size, h_kv, d]`` in q's dtype; or, with
            ``is_fp8_kvcache``, uint8 / float8_e4m3fn ``[num_blocks, page_block_size, h_kv, 656]``
            (see :func:`quantize_kvcache`). Any page size (FlashMLA's CUDA kernel needs 64).
        block_table: int32 ``[b, max_blocks_per_seq]``: page indices of each request, in order.
            Entries past a request's used pages may hold anything (they are clamped, never used).
        cache_seqlens: int32 ``[b]``: keys per request; 0 gives out = 0 and lse = +inf. Values past
            ``max_blocks_per_seq * page_block_size`` are clamped to it, negative ones to 0. Cache
            slots past a request's length may hold anything, NaN included.
        head_dim_v: width of V (512 for DeepSeek-V3).
        tile_scheduler_metadata: int32 ``[num_sm_parts, 8]`` from :func:`get_mla_metadata`.
        num_splits: int32 ``[b + 1]`` from :func:`get_mla_metadata` (same cache_seqlens).
        softmax_scale: score scale; default ``d ** -0.5``. DeepSeek-V3 uses
            :func:`deepseek_softmax_scale` (qk_head_dim 192 and YaRN's mscale), not the default.
        causal: mask bottom-right aligned: query i sees keys ``j < s_k - s_q + i + 1``. A query row
            that sees no key gets out = 0, lse = +inf. No effect when s_q == 1.
        is_fp8_kvcache: k_cache is in FlashMLA's 656-byte FP8 format.
        implementation: ``"auto"`` | ``"cuda"`` | ``"cpu"`` | ``"reference"``. ``auto`` picks the
            CPU kernel on the CPU backend and the reference elsewhere; the CUDA kernel (sm_90a,
            not yet validated on a GPU) runs only when asked for explicitly.

    Returns:
        ``(out [b, s_q, h_q, head_dim_v] in q.dtype, lse float32 [b, h_q, s_q])``; lse is the
        natural-log log-sum-exp of the scaled scores.

    Raises:
        TypeError: wrong dtypes or flags; on differentiation (decode-only).
        ValueError: inconsistent shapes, or an implementation that cannot run here.
    """
    op = _OP
    checks.check_rank("q", q, op=op, exact=4, layout="[b, s_q, h_q, d]")
    checks.check_rank("k_cache", k_cache, op=op, exact=4,
                      layout="[num_blocks, page_block_size, h_kv, d]")
    checks.check_dtype("q", q, _FLOATS, op=op)
    if not isinstance(is_fp8_kvcache, bool):
        raise TypeError(f"{op}: is_fp8_kvcache must be a bool, got {type(is_fp8_kvcache).__name__}")
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")
    b, s_q, h_q, d = q.shape
    num_blocks, page, h_kv, kd = k_cache.shape
    if is_fp8_kvcache:
        checks.check_dtype("k_cache", k_cache, (jnp.uint8, jnp.float8_e4m3fn), op=op)
        if kd != fp8_format.BYTES_PER_TOKEN:
            raise ValueError(f"{op}: an FP8 k_cache must have last dim {fp8_format.BYTES_PER_TOKEN} "
                             f"(bytes per token), got shape {tuple(k_cache.shape)}")
        if d != fp8_format.D_QK:
            raise ValueError(f"{op}: with an FP8 cache q's last dim must be {fp8_format.D_QK}, got {d}")
    else:
        if np.dtype(k_cache.dtype) != np.dtype(q.dtype):
            raise TypeError(f"{op}: k_cache must have q's dtype {np.dtype(q.dtype).name}, got "
                            f"{np.dtype(k_cache.dtype).name} (pass is_fp8_kvcache=True for FP8)")
        if kd != d:
            raise ValueError(f"{op}: k_cache's last dim must equal q's ({d}), got shape "
                             f"{tuple(k_cache.shape)}")
    if b < 1 or s_q < 1 or h_q < 1:
        raise ValueError(f"{op}: q must have b, s_q, h_q >= 1, got shape {tuple(q.shape)}")
    if num_blocks < 1 or page < 1 or h_kv < 1:
        raise ValueError(f"{op}: k_cache must have at least one block, page and head, got shape "
                         f"{tuple(k_cache.shape)}")
    if h_q % h_kv:
        raise ValueError(f"{op}: h_q must be a multiple of h_kv, got h_q={h_q}, h_kv={h_kv}")
    if not isinstance(head_dim_v, (int, np.integer)) or isinstance(head_dim_v, bool) \
            or not 0 < head_dim_v <= d:
        raise ValueError(f"{op}: head_dim_v must be an int in [1, {d}], got {head_dim_v!r}")
    head_dim_v = int(head_dim_v)
    checks.check_dtype("block_table", block_table, (jnp.int32,), op=op)
    checks.check_rank("block_table", block_table, op=op, exact=2, layout="[b, max_blocks_per_seq]")
    if block_table.shape[0] != b or block_table.shape[1] < 1:
        raise ValueError(f"{op}: block_table must have shape ({b}, max_blocks_per_seq >= 1), got "
                         f"{tuple(block_table.shape)}")
    checks.check_dtype("cache_seqlens", cache_seqlens, (jnp.int32,), op=op)
    checks.check_shape("cache_seqlens", cache_seqlens, (b,), op=op, layout="[b]")
    checks.check_dtype("tile_scheduler_metadata", tile_scheduler_metadata, (jnp.int32,), op=op)
    checks.check_rank("tile_scheduler_metadata", tile_scheduler_metadata, op=op, exact=2)
    if tile_scheduler_metadata.shape[1] != metadata.METADATA_SIZE or \
            tile_scheduler_metadata.shape[0] < 1:
        raise ValueError(f"{op}: tile_scheduler_metadata must have shape (num_sm_parts >= 1, 8), "
                         f"got {tuple(tile_scheduler_metadata.shape)}")
    checks.check_dtype("num_splits", num_splits, (jnp.int32,), op=op)
    checks.check_shape("num_splits", num_splits, (b + 1,), op=op, layout="[b + 1]")
    if softmax_scale is None:
        softmax_scale = reference.default_softmax_scale(d)
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float, np.floating)):
        raise TypeError(f"{op}: softmax_scale must be a Python float or None, got "
                        f"{type(softmax_scale).__name__}")
    elif not np.isfinite(softmax_scale):
        raise ValueError(f"{op}: softmax_scale must be finite, got {softmax_scale!r}")

    native_reason = _native_unsupported(q, k_cache, head_dim_v, is_fp8_kvcache)
    if implementation in ("cpu", "cuda") and native_reason is not None:
        raise ValueError(f"{op}: implementation={implementation!r} cannot run these operands: "
                         f"{native_reason}")
    has = _HAS if native_reason is None else ("reference",)
    if implementation == "auto" and not _CUDA_IN_AUTO:
        has = tuple(h for h in has if h != "cuda")
    impl = dispatch.choose(implementation, op=op, has=has)
    params = (impl, head_dim_v, float(softmax_scale), bool(causal and s_q > 1), is_fp8_kvcache)
    return _decode(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                   params)


def quantize_kvcache(k_cache: jax.Array) -> jax.Array:
    """Quantizes a bf16/f16/f32 latent cache ``[..., 576]`` into FlashMLA's FP8 format.

    Returns:
        uint8 ``[..., 656]``: 512 float8_e4m3fn codes (4 tiles of 128), 4 float32 tile scales
        (``amax / 448``), 64 bfloat16 RoPE values. See :mod:`dsjax.flash_mla.fp8_format`.
    """
    op = "quantize_kvcache"
    checks.check_dtype("k_cache", k_cache, _FLOATS, op=op)
    checks.check_rank("k_cache", k_cache, op=op, at_least=1)
    if k_cache.shape[-1] != fp8_format.D_QK:
        raise ValueError(f"{op}: k_cache's last dim must be {fp8_format.D_QK}, got shape "
                         f"{tuple(k_cache.shape)}")
    return fp8_format.quantize_rows(k_cache)


def dequantize_kvcache(k_cache_fp8: jax.Array, dtype: Any = jnp.bfloat16) -> jax.Array:
    """Inverse of :func:`quantize_kvcache`: uint8/float8_e4m3fn ``[..., 656]`` -> ``[..., 576]``.

    The default bf16 result is exactly what the FP8 decode computes with, so decoding the FP8
    cache equals decoding ``dequantize_kvcache(cache)`` with a bf16 cache (up to summation order).
    """
    op = "dequantize_kvcache"
    checks.check_dtype("k_cache_fp8", k_cache_fp8, (jnp.uint8, jnp.float8_e4m3fn), op=op)
    checks.check_rank("k_cache_fp8", k_cache_fp8, op=op, at_least=1)
    if k_cache_fp8.shape[-1] != fp8_format.BYTES_PER_TOKEN:
        raise ValueError(f"{op}: k_cache_fp8's last dim must be {fp8_format.BYTES_PER_TOKEN}, got "
                         f"shape {tuple(k_cache_fp8.shape)}")
    return fp8_format.dequantize_rows(k_cache_fp8).astype(dtype)
