"""Public FP8 GEMMs with fine-grained scaling: DeepGEMM's dense, grouped and weight-gradient ops.

All GEMMs are "NT": ``D = A · Bᵀ``, both operands K-major float8_e4m3fn with float32 scales, as
produced by :func:`dsjax.deep_gemm.per_token_cast_to_fp8` (1x128) and
:func:`dsjax.deep_gemm.per_block_cast_to_fp8` (128x128). Partial sums are promoted to float32 every
128 elements of K with the block's scales (DeepSeek-V3 §3.3.2); see
:mod:`dsjax.deep_gemm.gemm_reference` for the exact semantics.

Each call validates its arguments (errors name the argument, the expected and the given), picks
an implementation (``auto`` | ``cuda`` | ``cpu`` | ``reference``; see :mod:`dsjax._src.dispatch`)
and runs it. The FFI implementations run through :mod:`dsjax.deep_gemm.partition`, so under
``jax.jit`` with sharded operands each device multiplies its own rows (and 128-aligned columns,
groups) without gathering them; a sharded K is summed per shard and all-reduced.
Data-dependent layout rules (group indices, masked counts, group sizes) are checked here when the
values are concrete, and by the CPU twin at run time under ``jit`` (it returns an error); the
reference and the CUDA kernels cannot check traced values and follow the documented edge-case
semantics instead (out-of-range group indices are padding, masked counts are clamped).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsjax._src import checks, dispatch
from dsjax.deep_gemm import _gemm_ffi, gemm_reference, partition

GROUP = gemm_reference.GROUP
_HAS = ("reference", "cpu", "cuda")
_OUT_DTYPES = (jnp.bfloat16, jnp.float32)

Fp8Pair = tuple[jax.Array, jax.Array]


def get_m_alignment_for_contiguous_layout() -> int:
    """Row alignment of each group in the m-grouped contiguous layout (128, as in DeepGEMM)."""
    return GROUP


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _concrete(x: Any) -> np.ndarray | None:
    """The value of `x` as numpy when it is concrete (not traced), else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except Exception:  # noqa: BLE001 -- any tracer-conversion error means "not concrete"
        return None


def _check_pair(op: str, name: str, pair: Any, *, rank: int,
                layout: str) -> tuple[jax.Array, jax.Array]:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{op}: {name} must be a (values, scales) pair, got {type(pair).__name__}"
                        + (f" of length {len(pair)}" if isinstance(pair, (tuple, list)) else ""))
    q, s = pair
    checks.check_dtype(f"{name}[0] (values)", q, (jnp.float8_e4m3fn,), op=op)
    checks.check_rank(f"{name}[0] (values)", q, op=op, exact=rank, layout=layout)
    checks.check_dtype(f"{name}[1] (scales)", s, (jnp.float32,), op=op)
    return q, s


def _check_scales(op: str, name: str, s: jax.Array, expected: tuple[int, ...], layout: str) -> None:
    checks.check_shape(f"{name}[1] (scales)", s, expected, op=op, layout=layout)


def _lhs(op: str, a: Any, rank: int = 2) -> tuple[jax.Array, jax.Array]:
    layout = "[m, k]" if rank == 2 else "[G, m_max, k]"
    q, s = _check_pair(op, "a", a, rank=rank, layout=layout)
    _check_scales(op, "a", s, (*q.shape[:-1], _cdiv(q.shape[-1], GROUP)),
                  layout[:-2] + "ceil(k/128)] (1x128 scales)")
    return q, s


def _rhs(op: str, b: Any, *, rank: int = 2, per_row: bool = False) -> tuple[jax.Array, jax.Array]:
    layout = "[n, k]" if rank == 2 else "[G, n, k]"
    q, s = _check_pair(op, "b", b, rank=rank, layout=layout)
    n, k = q.shape[-2:]
    lead = q.shape[:-2]
    if per_row:
        _check_scales(op, "b", s, (*lead, n, _cdiv(k, GROUP)), "[n, ceil(k/128)] (1x128 scales)")
    else:
        _check_scales(op, "b", s, (*lead, _cdiv(n, GROUP), _cdiv(k, GROUP)),
                      ("[G, " if rank == 3 else "[") + "ceil(n/128), ceil(k/128)] (128x128 scales)")
    return q, s


def _check_k(op: str, aq: jax.Array, bq: jax.Array) -> None:
    if aq.shape[-1] != bq.shape[-1]:
        raise ValueError(f"{op}: a and b must share k (both K-major, NT GEMM), got a k="
                         f"{aq.shape[-1]} and b k={bq.shape[-1]}")


def _check_out_dtype(op: str, out_dtype: Any) -> Any:
    try:
        dt = np.dtype(out_dtype)
    except TypeError:
        raise TypeError(f"{op}: out_dtype must be bfloat16 or float32, got {out_dtype!r}") from None
    if dt not in tuple(np.dtype(d) for d in _OUT_DTYPES):
        raise TypeError(f"{op}: out_dtype must be bfloat16 or float32, got {dt.name}")
    return dt


def _check_c(op: str, c: Any, shape: tuple[int, ...], layout: str) -> None:
    if c is None:
        return
    checks.check_dtype("c", c, (jnp.float32,), op=op)
    checks.check_shape("c", c, shape, op=op, layout=layout)


def _check_int_vector(op: str, name: str, x: Any, length: int, layout: str) -> None:
    checks.check_dtype(name, x, (jnp.int32,), op=op)
    checks.check_shape(name, x, (length,), op=op, layout=layout)


def _dense_ffi(aq: jax.Array, sa: jax.Array, bq: jax.Array, sb: jax.Array, c: jax.Array | None,
               dt: Any, per_row: bool) -> jax.Array:
    """The dense FFI GEMM, partitioned (see :mod:`dsjax.deep_gemm.partition`)."""
    cc = () if c is None else (c,)

    def local(aq, sa, bq, sb, *cc):
        return _gemm_ffi.fp8_gemm_nt((aq, sa), (bq, sb), cc[0] if cc else None, dt, per_row)

    def partial(aq, sa, bq, sb, *cc):  # this shard's K blocks, float32, no accumulator
        return _gemm_ffi.fp8_gemm_nt((aq, sa), (bq, sb), None, jnp.float32, per_row)

    def finish(total, aq, sa, bq, sb, *cc):
        return (total + cc[0] if cc else total).astype(dt)

    layout = partition.gemm_layout("dense", c is not None, n_blocked=not per_row)
    return partition.partitioned(layout, local, partial=partial, finish=finish,
                                 key=("dense", dt, per_row))(aq, sa, bq, sb, *cc)


def _grouped_ffi(kind: str, fn: Any, aq: jax.Array, sa: jax.Array, bq: jax.Array, sb: jax.Array,
                 rows: jax.Array, dt: Any) -> jax.Array:
    """An m-grouped FFI GEMM (``kind`` ``contiguous`` | ``masked``), partitioned."""

    def local(aq, sa, bq, sb, rows):
        return fn((aq, sa), (bq, sb), rows, dt)

    def partial(aq, sa, bq, sb, rows):
        return fn((aq, sa), (bq, sb), rows, jnp.float32)

    def finish(total, *_):
        return total.astype(dt)

    return partition.partitioned(partition.gemm_layout(kind, False), local, partial=partial,
                                 finish=finish, key=(kind, fn, dt))(aq, sa, bq, sb, rows)


def fp8_gemm_nt(a: Fp8Pair, b: Fp8Pair, *, c: jax.Array | None = None,
                out_dtype: Any = jnp.bfloat16,
                implementation: dispatch.Implementation = "auto") -> jax.Array:
    """Dense FP8 GEMM ``D = A · Bᵀ (+ c)`` with 1x128 LHS and 128x128 RHS scales (DeepGEMM 1d2d).

    Args:
        a: ``(float8_e4m3fn [m, k], float32 [m, ceil(k/128)])``, e.g. ``per_token_cast_to_fp8(x)``.
        b: ``(float8_e4m3fn [n, k], float32 [ceil(n/128), ceil(k/128)])``, e.g.
            ``per_block_cast_to_fp8(w)``. ``n`` and ``k`` need not be multiples of 128.
        c: optional float32 ``[m, n]`` added in float32 before the cast.
        out_dtype: ``jnp.bfloat16`` or ``jnp.float32``.
        implementation: ``"auto"`` | ``"cuda"`` | ``"cpu"`` | ``"reference"``.

    Returns:
        ``[m, n]`` in ``out_dtype``. ``k == 0`` gives ``c`` (or zeros).

    Raises:
        TypeError: operands not (float8, float32) pairs, or a bad ``out_dtype``/``c`` dtype.
        ValueError: inconsistent shapes, or the implementation cannot run here.
    """
    op = "fp8_gemm_nt"
    aq, sa = _lhs(op, a)
    bq, sb = _rhs(op, b)
    _check_k(op, aq, bq)
    dt = _check_out_dtype(op, out_dtype)
    _check_c(op, c, (aq.shape[0], bq.shape[0]), "[m, n]")
    impl = dispatch.choose(implementation, op=op, has=_HAS)
    if impl == "reference":
        return gemm_reference.fp8_gemm_nt((aq, sa), (bq, sb), c=c, out_dtype=dt)
    return _dense_ffi(aq, sa, bq, sb, c, dt, False)


def fp8_gemm_nt_1d1d(a: Fp8Pair, b: Fp8Pair, *, c: jax.Array | None = None,
                     implementation: dispatch.Implementation = "auto") -> jax.Array:
    """FP8 GEMM with 1x128 scales on both operands, float32 ``D = A · Bᵀ (+ c)``: the Wgrad GEMM.

    Args:
        a: ``(float8_e4m3fn [m, k], float32 [m, ceil(k/128)])``.
        b: ``(float8_e4m3fn [n, k], float32 [n, ceil(k/128)])`` (per-row 1x128 scales).
        c: optional float32 ``[m, n]`` accumulator (e.g. the running weight gradient).
        implementation: ``"auto"`` | ``"cuda"`` | ``"cpu"`` | ``"reference"``.

    Returns:
        float32 ``[m, n]``.
    """
    op = "fp8_gemm_nt_1d1d"
    aq, sa = _lhs(op, a)
    bq, sb = _rhs(op, b, per_row=True)
    _check_k(op, aq, bq)
    _check_c(op, c, (aq.shape[0], bq.shape[0]), "[m, n]")
    impl = dispatch.choose(implementation, op=op, has=_HAS)
    if impl == "reference":
        return gemm_reference.fp8_gemm_nt((aq, sa), (bq, sb), c=c, out_dtype=jnp.float32,
                                          b_per_row=True)
    return _dense_ffi(aq, sa, bq, sb, c, np.dtype(jnp.float32), True)


def _check_contiguous_indices(op: str, m_indices: np.ndarray, groups: int) -> None:
    bad = (m_indices < -1) | (m_indices >= groups)
    if bad.any():
        r = int(np.argmax(bad))
        raise ValueError(f"{op}: m_indices must be -1 (padding) or in [0, {groups}), got "
                         f"m_indices[{r}] = {int(m_indices[r])}")
    for start in range(0, m_indices.shape[0], GROUP):
        blk = m_indices[start:start + GROUP]
        gs = np.unique(blk[blk >= 0])
        if gs.size > 1:
            raise ValueError(
                f"{op}: m_indices breaks the {GROUP}-row alignment: rows {start}.."
                f"{start + blk.shape[0] - 1} mix groups {gs.tolist()} (each group must start at a "
                f"multiple of get_m_alignment_for_contiguous_layout() = {GROUP} rows; pad with -1)")


def m_grouped_fp8_gemm_nt_contiguous(a: Fp8Pair, b: Fp8Pair, m_indices: jax.Array, *,
                                     out_dtype: Any = jnp.bfloat16,
                                     implementation: dispatch.Implementation = "auto") -> jax.Array:
    """MoE grouped GEMM, contiguous layout: ``D[r] = A[r] · B[m_indices[r]]ᵀ``.

    Args:
        a: ``(float8_e4m3fn [m_sum, k], float32 [m_sum, ceil(k/128)])``: the rows of every group
            concatenated, each group starting at a multiple of
            :func:`get_m_alignment_for_contiguous_layout` (128) rows.
        b: ``(float8_e4m3fn [G, n, k], float32 [G, ceil(n/128), ceil(k/128)])``.
        m_indices: int32 ``[m_sum]``: each row's group; -1 marks a padding row (output zero).
        out_dtype: ``jnp.bfloat16`` or ``jnp.float32``.
        implementation: ``"auto"`` | ``"cuda"`` | ``"cpu"`` | ``"reference"``.

    Returns:
        ``[m_sum, n]`` in ``out_dtype``; padding rows are zero.

    Raises:
        ValueError: shapes; and, when ``m_indices`` is concrete (or at run time on the CPU twin),
            an index outside [-1, G) or an aligned 128-row block that mixes two groups. Under
            ``jit`` the reference treats indices outside [0, G) as padding.
    """
    op = "m_grouped_fp8_gemm_nt_contiguous"
    aq, sa = _lhs(op, a)
    bq, sb = _rhs(op, b, rank=3)
    _check_k(op, aq, bq)
    _check_int_vector(op, "m_indices", m_indices, aq.shape[0], "[m_sum]")
    dt = _check_out_dtype(op, out_dtype)
    concrete = _concrete(m_indices)
    if concrete is not None:
        _check_contiguous_indices(op, concrete, bq.shape[0])
    impl = dispatch.choose(implementation, op=op, has=_HAS)
    if impl == "reference":
        return gemm_reference.m_grouped_fp8_gemm_nt_contiguous((aq, sa), (bq, sb), m_indices,
                                                               out_dtype=dt)
    return _grouped_ffi("contiguous", _gemm_ffi.m_grouped_contiguous, aq, sa, bq, sb, m_indices, dt)


def m_grouped_fp8_gemm_nt_masked(a: Fp8Pair, b: Fp8Pair, masked_m: jax.Array, expected_m: int, *,
                                 out_dtype: Any = jnp.bfloat16,
                                 implementation: dispatch.Implementation = "auto") -> jax.Array:
    """MoE grouped GEMM, masked layout (DeepEP low-latency): ``D[g, r] = A[g, r] · B[g]ᵀ``.

    Args:
        a: ``(float8_e4m3fn [G, m_max, k], float32 [G, m_max, ceil(k/128)])``.
        b: ``(float8_e4m3fn [G, n, k], float32 [G, ceil(n/128), ceil(k/128)])``.
        masked_m: int32 ``[G]``: valid rows per group, in ``[0, m_max]``; rows at or beyond
            ``masked_m[g]`` output zero.
        expected_m: static hint of the typical ``masked_m`` (a positive int; the GPU kernels size
            their tiles with it; it never changes the result).
        out_dtype: ``jnp.bfloat16`` or ``jnp.float32``.
        implementation: ``"auto"`` | ``"cuda"`` | ``"cpu"`` | ``"reference"``.

    Returns:
        ``[G, m_max, n]`` in ``out_dtype``.

    Raises:
        ValueError: shapes, a non-positive ``expected_m``; ``masked_m`` outside ``[0, m_max]``
            when concrete (the CPU twin checks at run time; under ``jit`` the reference clamps).
    """
    op = "m_grouped_fp8_gemm_nt_masked"
    aq, sa = _lhs(op, a, rank=3)
    bq, sb = _rhs(op, b, rank=3)
    _check_k(op, aq, bq)
    g, m_max = aq.shape[:2]
    if bq.shape[0] != g:
        raise ValueError(f"{op}: a and b must have the same number of groups G, got a "
                         f"{tuple(aq.shape)} and b {tuple(bq.shape)}")
    _check_int_vector(op, "masked_m", masked_m, g, "[G]")
    if isinstance(expected_m, bool) or not isinstance(expected_m, (int, np.integer)) or expected_m <= 0:
        raise ValueError(f"{op}: expected_m must be a positive Python int (a static hint), got "
                         f"{expected_m!r}")
    dt = _check_out_dtype(op, out_dtype)
    concrete = _concrete(masked_m)
    if concrete is not None and ((concrete < 0) | (concrete > m_max)).any():
        i = int(np.argmax((concrete < 0) | (concrete > m_max)))
        raise ValueError(f"{op}: masked_m must be in [0, m_max={m_max}], got masked_m[{i}] = "
                         f"{int(concrete[i])}")
    impl = dispatch.choose(implementation, op=op, has=_HAS)
    if impl == "reference":
        return gemm_reference.m_grouped_fp8_gemm_nt_masked((aq, sa), (bq, sb), masked_m,
                                                           out_dtype=dt)
    return _grouped_ffi("masked", _gemm_ffi.m_grouped_masked, aq, sa, bq, sb, masked_m, dt)


def k_grouped_fp8_gemm_nt_contiguous(a: Fp8Pair, b: Fp8Pair,
                                     group_ks: jax.Array | Sequence[int], *,
                                     c: jax.Array | None = None,
                                     implementation: dispatch.Implementation = "auto") -> jax.Array:
    """MoE weight-gradient GEMM: groups concatenated along K, ``D[g] = A[:, K_g] · B[:, K_g]ᵀ (+ c[g])``.

    Args:
        a: ``(float8_e4m3fn [m, K], float32 [m, ceil(K/128)])`` (1x128 scales along K), e.g. the
            transposed output gradients of every expert concatenated along tokens.
        b: ``(float8_e4m3fn [n, K], float32 [n, ceil(K/128)])``, e.g. the transposed inputs.
        group_ks: int32 ``[G]`` (or a sequence of ints): the K extent of each group, each a
            multiple of 128, ``sum <= K``; group g owns ``K[Σ_{j<g}, Σ_{j<=g})``. Columns past the
            sum are capacity padding and belong to no group. May be traced (dynamic routing).
        c: optional float32 ``[G, m, n]`` accumulator.
        implementation: ``"auto"`` | ``"cuda"`` | ``"cpu"`` | ``"reference"``.

    Returns:
        float32 ``[G, m, n]``; a group of size 0 gives ``c[g]`` (or zeros).

    Raises:
        ValueError: shapes; group sizes that are negative, not multiples of 128, or sum past K,
            when concrete (the CPU twin checks at run time).
    """
    op = "k_grouped_fp8_gemm_nt_contiguous"
    aq, sa = _lhs(op, a)
    bq, sb = _rhs(op, b, per_row=True)
    _check_k(op, aq, bq)
    if not hasattr(group_ks, "dtype"):
        group_ks = jnp.asarray(np.asarray(group_ks, dtype=np.int64).astype(np.int32))
    checks.check_dtype("group_ks", group_ks, (jnp.int32,), op=op)
    checks.check_rank("group_ks", group_ks, op=op, exact=1, layout="[G]")
    g = group_ks.shape[0]
    _check_c(op, c, (g, aq.shape[0], bq.shape[0]), "[G, m, n]")
    concrete = _concrete(group_ks)
    if concrete is not None:
        bad = (concrete < 0) | (concrete % GROUP != 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{op}: group_ks must be non-negative multiples of {GROUP}, got "
                             f"group_ks[{i}] = {int(concrete[i])}")
        if int(concrete.sum()) > aq.shape[1]:
            raise ValueError(f"{op}: sum(group_ks) must be <= K={aq.shape[1]}, got "
                             f"{int(concrete.sum())}")
    impl = dispatch.choose(implementation, op=op, has=_HAS)
    if impl == "reference":
        return gemm_reference.k_grouped_fp8_gemm_nt_contiguous((aq, sa), (bq, sb), group_ks, c=c)
    cc = () if c is None else (c,)

    def local(aq, sa, bq, sb, gk, *cc):
        return _gemm_ffi.k_grouped_contiguous((aq, sa), (bq, sb), gk, cc[0] if cc else None)

    return partition.partitioned(partition.gemm_layout("k_grouped", c is not None), local,
                                 key="k_grouped")(aq, sa, bq, sb, group_ks, *cc)
