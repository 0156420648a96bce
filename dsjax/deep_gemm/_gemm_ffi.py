"""FFI wrappers of the FP8 GEMMs (CPU twin and CUDA share target names, attributes and layouts).

Optional operands (``c``) travel as a float32 ``[0]`` placeholder with ``has_c=False`` so that a
target has one fixed signature. Under ``jax.vmap`` the calls run once per batch element
(``sequential``): the grouped GEMMs are the batched forms.

CUDA kernel selection for the 1d2d GEMMs (``fp8_gemm_nt``, ``m_grouped_fp8_gemm_nt_contiguous``,
``m_grouped_fp8_gemm_nt_masked``): the environment variable ``DSJAX_DEEP_GEMM_KERNEL`` (read when
the op is traced) is ``mma`` (default: the correctness-first mma.sync kernel,
``ffi/deep_gemm/gemm.cu``) or ``wgmma`` (the Hopper TMA + WGMMA pipeline,
``ffi/deep_gemm/sm90/fp8_gemm_wgmma.cu``; opt-in until validated on a GPU). Any other value
raises ``ValueError``. With ``wgmma``, calls the WGMMA kernel cannot take run on ``mma`` instead
(see :func:`wgmma_unsupported_reason`: 1x128 b scales, i.e. ``fp8_gemm_nt_1d1d``, and ``k`` that
is 0 or not a multiple of 16, since TMA needs 16-byte row strides); the k-grouped GEMM always
uses ``mma``. The selection applies only where the computation is lowered for CUDA: the CPU twin
is the same on either setting.

The WGMMA kernel comes in configurations (:data:`WGMMA_CONFIGS`: tile, cluster, grid), passed to
the target as its ``config`` attribute. :func:`choose_wgmma_config` picks one per shape (the
heuristic is documented there); ``DSJAX_DEEP_GEMM_WGMMA_CONFIG=<name>`` (read when traced) forces
one for every WGMMA GEMM, and unset, empty or ``auto`` means the heuristic. Cluster
configurations (``*_mc2``) apply to the dense GEMM; the grouped GEMMs run the same tile without
the cluster. None of these has run on a GPU yet.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp

from dsjax._src import ffi

Pair = tuple[jax.Array, jax.Array]


def _c_arg(c: jax.Array | None) -> tuple[jax.Array, bool]:
    # The absent accumulator is an empty operand built in the trace (jnp.zeros), not a captured
    # numpy constant: a captured constant becomes an extra operand of the op's
    # custom_partitioning, which XLA (jaxlib 0.11.2) crashes on compiling inside shard_map.
    return (jnp.zeros((0,), jnp.float32), False) if c is None else (c.astype(jnp.float32), True)


KERNEL_ENV = "DSJAX_DEEP_GEMM_KERNEL"
KERNELS = ("mma", "wgmma")
DENSE_TARGET = "dsjax_deep_gemm_fp8_gemm_nt"
WGMMA_TARGET = "dsjax_deep_gemm_fp8_gemm_nt_wgmma"
CONTIGUOUS_TARGET = "dsjax_deep_gemm_m_grouped_fp8_gemm_nt_contiguous"
MASKED_TARGET = "dsjax_deep_gemm_m_grouped_fp8_gemm_nt_masked"
# The WGMMA twin of each mma target: same operands and attributes.
WGMMA_TARGETS = {t: t + "_wgmma" for t in (DENSE_TARGET, CONTIGUOUS_TARGET, MASKED_TARGET)}


def selected_kernel() -> str:
    """The CUDA kernel ``DSJAX_DEEP_GEMM_KERNEL`` asks for: ``"mma"`` (default) or ``"wgmma"``.

    Unset or empty means ``"mma"``; the value is case- and whitespace-insensitive.

    Raises:
        ValueError: any other value (the message names the variable, the choices and the value).
    """
    raw = os.environ.get(KERNEL_ENV, "")
    value = raw.strip().lower() or "mma"
    if value not in KERNELS:
        raise ValueError(f"{KERNEL_ENV} must be one of {', '.join(repr(k) for k in KERNELS)} "
                         f"(unset means 'mma'), got {raw!r}")
    return value


WGMMA_CONFIG_ENV = "DSJAX_DEEP_GEMM_WGMMA_CONFIG"


@dataclasses.dataclass(frozen=True)
class WgmmaConfig:
    """One compiled configuration of the WGMMA kernel (``ffi/deep_gemm/sm90/``).

    Attributes:
        block_m: tile rows (64: one consumer warpgroup; 128: two, with setmaxnreg).
        block_n: tile columns (wgmma N; tiles may straddle two 128-column b-scale blocks).
        cluster: CTAs per cluster along M sharing the B tile by TMA multicast (dense only).
        persistent: grid of one CTA per SM walking tiles, else one CTA per tile.
    """

    block_m: int
    block_n: int
    cluster: int = 1
    persistent: bool = True


# Keep in step with kConfigs in ffi/deep_gemm/sm90/fp8_gemm_wgmma.cu.
WGMMA_CONFIGS: dict[str, WgmmaConfig] = {
    "b64x64": WgmmaConfig(64, 64),
    "b64x128": WgmmaConfig(64, 128),
    "b128x128_grid": WgmmaConfig(128, 128, persistent=False),
    "b128x128": WgmmaConfig(128, 128),
    "b128x160": WgmmaConfig(128, 160),
    "b128x192": WgmmaConfig(128, 192),
    "b128x128_mc2": WgmmaConfig(128, 128, cluster=2),
    "b128x160_mc2": WgmmaConfig(128, 160, cluster=2),
    "b128x192_mc2": WgmmaConfig(128, 192, cluster=2),
}
DEFAULT_NUM_SMS = 132  # H100 / H200 SXM, when no GPU is visible at trace time


def selected_wgmma_config() -> str | None:
    """The configuration ``DSJAX_DEEP_GEMM_WGMMA_CONFIG`` forces, or None for the heuristic.

    Unset, empty or ``auto`` (case- and whitespace-insensitive) mean the heuristic.

    Raises:
        ValueError: any other value that is not a name in :data:`WGMMA_CONFIGS` (the message
            names the variable, the choices and the value).
    """
    raw = os.environ.get(WGMMA_CONFIG_ENV, "")
    value = raw.strip().lower()
    if value in ("", "auto"):
        return None
    if value not in WGMMA_CONFIGS:
        raise ValueError(f"{WGMMA_CONFIG_ENV} must be 'auto' or one of "
                         f"{', '.join(repr(c) for c in WGMMA_CONFIGS)} (unset means 'auto'), "
                         f"got {raw!r}")
    return value


@functools.lru_cache(maxsize=1)
def num_sms() -> int:
    """Multiprocessors of the first CUDA device, or :data:`DEFAULT_NUM_SMS` when none is visible."""
    try:
        return int(getattr(jax.devices("cuda")[0], "core_count", 0)) or DEFAULT_NUM_SMS
    except RuntimeError:
        return DEFAULT_NUM_SMS


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def choose_wgmma_config(kind: str, m: int, n: int, groups: int = 1, *,
                        sms: int | None = None) -> str:
    """The WGMMA configuration the heuristic picks for one GEMM.

    Args:
        kind: ``"dense"``, ``"contiguous"`` or ``"masked"``.
        m: rows of one row space (dense m; contiguous m_sum; masked m_max).
        n: output columns.
        groups: row spaces with their own tiles (masked: G; else 1).
        sms: multiprocessors (default: :func:`num_sms`).

    The heuristic (a model, to be re-tuned from the bench's one-row-per-configuration numbers):
      * ``m <= 64``: 64-row tiles (no MMA rows wasted on decode-sized m). Such GEMMs are bound by
        reading B, so more CTAs pull more bandwidth: ``b64x64`` when 128-wide tiles would leave
        SMs idle (fewer tiles than SMs), else ``b64x128``.
      * else 128-row tiles, BLOCK_N in {128, 160, 192} minimising ``waves * (BLOCK_N + 32)``
        (time of the busiest SM, in units of one 128-row x 1-column tile per K), where
        ``waves = ceil(tiles / sms)`` and the 32 stands for a fixed per-tile, per-K-block cost
        (barrier round trip, scale loads, promotion bookkeeping; a guess until measured); ties
        go to the wider tile (fewer L2 bytes per FLOP).
      * dense GEMMs with at least two 128-row tiles and at least one full wave use the 2-CTA
        cluster twin (``_mc2``): B is multicast to the pair, cutting L2 reads per FLOP by a
        quarter to a third, which is what the large shapes are bound by.
    """
    sms = num_sms() if sms is None else sms
    if m <= 64:
        return "b64x64" if _cdiv(n, 128) * groups < sms else "b64x128"
    m_tiles = _cdiv(m, 128) * groups
    best, best_cost = "b128x128", None
    for bn in (128, 160, 192):
        cost = _cdiv(m_tiles * _cdiv(n, bn), sms) * (bn + 32)
        if best_cost is None or cost <= best_cost:
            best, best_cost = f"b128x{bn}", cost
    if kind == "dense" and _cdiv(m, 128) >= 2 and m_tiles * _cdiv(n, 128) >= sms:
        best += "_mc2"
    return best


def wgmma_config(kind: str, m: int, n: int, groups: int = 1) -> str:
    """The forced configuration (:func:`selected_wgmma_config`) or the heuristic's choice."""
    return selected_wgmma_config() or choose_wgmma_config(kind, m, n, groups)


def wgmma_unsupported_reason(k: int, b_per_row: bool = False) -> str | None:
    """Why the WGMMA kernel cannot run a GEMM with this ``k`` (None when it can).

    Mirrors ``CheckWgmmaSupported`` in ``ffi/deep_gemm/sm90/fp8_gemm_wgmma.cu``; any ``m``, ``n``
    and group count are supported (tails are zero-filled by TMA and guarded on store).
    """
    if b_per_row:
        return "1x128 b scales (fp8_gemm_nt_1d1d) are implemented by the mma kernel only"
    if k <= 0 or k % 16 != 0:
        return f"k must be a positive multiple of 16 for TMA (16-byte row strides), got k={k}"
    return None


def cuda_target(target: str, k: int, b_per_row: bool = False) -> str:
    """The CUDA FFI target a 1d2d GEMM lowers to under the current kernel selection.

    Args:
        target: the mma target (``DENSE_TARGET``, ``CONTIGUOUS_TARGET`` or ``MASKED_TARGET``).
        k: the contraction size.
        b_per_row: 1x128 b scales (the dense 1d1d GEMM).
    """
    if (selected_kernel() == "wgmma" and target in WGMMA_TARGETS
            and wgmma_unsupported_reason(k, b_per_row) is None):
        return WGMMA_TARGETS[target]
    return target


def _call(target: str, k: int, b_per_row: bool, out: Any, args: tuple[Any, ...],
          attrs: dict[str, Any], rows: tuple[str, int, int, int]) -> Any:
    """Calls `target` (the CPU twin's name), or its WGMMA twin where lowered for CUDA when selected.

    ``rows``: (kind, m, n, groups) for :func:`wgmma_config`.
    """
    cuda = cuda_target(target, k, b_per_row)
    selected_wgmma_config()  # validates DSJAX_DEEP_GEMM_WGMMA_CONFIG on every trace
    if cuda == target:
        return ffi.call(target, out, *args, **attrs)
    config = wgmma_config(*rows)
    # The WGMMA targets exist only in the CUDA module, so only the CUDA lowering may name them;
    # every other platform keeps the shared target (the CPU twin).
    return jax.lax.platform_dependent(
        *args,
        default=lambda *xs: ffi.call(target, out, *xs, **attrs),
        cuda=lambda *xs: ffi.call(cuda, out, *xs, **attrs, config=config))


def fp8_gemm_nt(a: Pair, b: Pair, c: jax.Array | None, out_dtype: Any, b_per_row: bool) -> jax.Array:
    """[m, k] x [n, k] -> [m, n]; ``b_per_row`` selects 1x128 (1d1d) instead of 128x128 b scales."""
    (aq, sa), (bq, sb) = a, b
    cc, has_c = _c_arg(c)
    out = jax.ShapeDtypeStruct((aq.shape[0], bq.shape[0]), out_dtype)
    return _call(DENSE_TARGET, aq.shape[1], b_per_row, out, (aq, sa, bq, sb, cc),
                 dict(b_per_row=bool(b_per_row), has_c=has_c),
                 ("dense", aq.shape[0], bq.shape[0], 1))


def m_grouped_contiguous(a: Pair, b: Pair, m_indices: jax.Array, out_dtype: Any) -> jax.Array:
    """[m_sum, k] x [G, n, k] by row group -> [m_sum, n]."""
    (aq, sa), (bq, sb) = a, b
    out = jax.ShapeDtypeStruct((aq.shape[0], bq.shape[1]), out_dtype)
    return _call(CONTIGUOUS_TARGET, aq.shape[1], False, out,
                 (aq, sa, bq, sb, m_indices.astype(jnp.int32)), {},
                 ("contiguous", aq.shape[0], bq.shape[1], 1))


def m_grouped_masked(a: Pair, b: Pair, masked_m: jax.Array, out_dtype: Any) -> jax.Array:
    """[G, m_max, k] x [G, n, k] -> [G, m_max, n], rows past masked_m[g] zero."""
    (aq, sa), (bq, sb) = a, b
    out = jax.ShapeDtypeStruct((aq.shape[0], aq.shape[1], bq.shape[1]), out_dtype)
    return _call(MASKED_TARGET, aq.shape[-1], False, out,
                 (aq, sa, bq, sb, masked_m.astype(jnp.int32)), {},
                 ("masked", aq.shape[1], bq.shape[1], aq.shape[0]))


def k_grouped_contiguous(a: Pair, b: Pair, group_ks: jax.Array, c: jax.Array | None) -> jax.Array:
    """[m, K] x [n, K] split along K by group_ks -> f32 [G, m, n]."""
    (aq, sa), (bq, sb) = a, b
    cc, has_c = _c_arg(c)
    out = jax.ShapeDtypeStruct((group_ks.shape[0], aq.shape[0], bq.shape[0]), jnp.float32)
    return ffi.call("dsjax_deep_gemm_k_grouped_fp8_gemm_nt_contiguous", out, aq, sa, bq, sb,
                    group_ks.astype(jnp.int32), cc, has_c=has_c)
