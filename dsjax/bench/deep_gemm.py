"""Bench of DeepGEMM's FP8 GEMMs: dense (1d2d), m-grouped contiguous and masked, k-grouped.

Shapes follow DeepGEMM's published tables (deepseek-ai/DeepGEMM README): dense M in {64, 128, 4096}
x (N, K) in {(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)};
contiguous 4x8192 and 8x4096 groups and masked 1x1024, 2x512, 4x256 with (N, K) in
{(4096, 7168), (7168, 2048)} -- on a GPU. ``--quick`` (and any CPU run) uses a CPU-sized subset of
the same (N, K) pairs. Every shape times each available implementation, the reference
(dequantize + XLA f32 dot) and XLA's bf16 dot of the same problem, in one process.

TFLOP/s = 2·m·n·k / t (useful rows only for the grouped GEMMs); GB/s = (m·k + k·n + 2·m·n) / t
(FP8 operands, bf16 output); ``vs_bf16`` = XLA bf16 dot time / this time.

On a GPU the dense, contiguous and masked shapes are also timed with the Hopper TMA + WGMMA kernel
(row ``cuda_wgmma``: the configuration the heuristic picks, selected through
``DSJAX_DEEP_GEMM_KERNEL=wgmma`` while it is traced) next to the default mma kernel (``cuda``) and
XLA's bf16 dot. The issue's target shape M=4096, N=7168, K=16384 is measured first, so that a
short GPU session gets it, with one more row per WGMMA configuration (``cuda_wgmma:<name>``,
forced through ``DSJAX_DEEP_GEMM_WGMMA_CONFIG``), all in the same process.
``DSJAX_BENCH_WGMMA_CONFIGS`` (comma-separated names) restricts those rows to the configurations
that passed their smoke run, and ``DSJAX_BENCH_SKIP_WGMMA=1`` leaves every WGMMA row out (both set
by ``scripts/gpu_check.sh``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import jax
import jax.numpy as jnp

from dsjax import deep_gemm as dg
from dsjax.bench._harness import Record, implementations, record, time_fn
from dsjax.deep_gemm import _gemm_ffi

BENCH = "deep_gemm"
_NK_DENSE = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
_NK_GROUPED = [(4096, 7168), (7168, 2048)]


def _cases(quick: bool) -> list[tuple[str, int, int, int, int]]:
    """(kind, groups, m per group, n, k)."""
    if jax.default_backend() == "gpu" and not quick:
        cases = [TARGET] + [("dense", 1, m, n, k) for m in (64, 128, 4096) for n, k in _NK_DENSE
                            if ("dense", 1, m, n, k) != TARGET]  # the target first
        cases += [("contiguous", g, m, n, k) for g, m in ((4, 8192), (8, 4096)) for n, k in _NK_GROUPED]
        cases += [("masked", g, m, n, k) for g, m in ((1, 1024), (2, 512), (4, 256)) for n, k in _NK_GROUPED]
        cases += [("k_grouped", 4, 4096, 4096, 8192)]
        return cases
    cases = [("dense", 1, 64, 2112, 7168), ("dense", 1, 128, 7168, 2048),
             ("dense", 1, 64, 4096, 7168), ("contiguous", 2, 128, 7168, 2048),
             ("masked", 2, 64, 4096, 7168), ("k_grouped", 4, 512, 512, 512)]
    if not quick:
        cases += [("dense", 1, 512, 7168, 2048), ("contiguous", 4, 256, 4096, 7168)]
    return cases


TARGET = ("dense", 1, 4096, 7168, 16384)  # the acceptance shape


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """Sets an environment variable (read when a GEMM is traced) for the duration of the block."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _kernel(name: str) -> contextlib.AbstractContextManager[None]:
    """Selects the CUDA GEMM kernel (``mma`` or ``wgmma``) for the duration of the block."""
    return _env(_gemm_ffi.KERNEL_ENV, name)


def _wgmma_configs() -> list[str]:
    """The WGMMA configurations to time one by one on the target shape."""
    raw = os.environ.get("DSJAX_BENCH_WGMMA_CONFIGS")
    if raw is None:
        return list(_gemm_ffi.WGMMA_CONFIGS)
    names = [c.strip() for c in raw.split(",") if c.strip()]
    unknown = [c for c in names if c not in _gemm_ffi.WGMMA_CONFIGS]
    if unknown:
        raise ValueError(f"DSJAX_BENCH_WGMMA_CONFIGS names unknown configurations {unknown}; "
                         f"choices: {', '.join(_gemm_ffi.WGMMA_CONFIGS)}")
    return names


def _bf16_dot(kind: str, x: jax.Array, w: jax.Array) -> jax.Array:
    if kind == "masked":
        return jnp.einsum("gmk,gnk->gmn", x, w, preferred_element_type=jnp.bfloat16)
    if kind == "contiguous":
        # The equivalent dense work: each group's rows against its own weight.
        g = w.shape[0]
        return jnp.einsum("gmk,gnk->gmn", x.reshape(g, -1, x.shape[-1]), w,
                          preferred_element_type=jnp.bfloat16)
    if kind == "k_grouped":
        g = w.shape[0]
        return jnp.einsum("mgk,ngk->gmn", x.reshape(x.shape[0], g, -1), w.reshape(w.shape[0], g, -1),
                          preferred_element_type=jnp.float32)
    return jnp.dot(x, w.T, preferred_element_type=jnp.bfloat16)


def _case(kind: str, g: int, m: int, n: int, k: int, quick: bool) -> list[Record]:
    key = jax.random.split(jax.random.PRNGKey(0), 2)
    reps = 5 if quick else 9
    if kind == "k_grouped":
        # D[g] (m x n) = A[:, K_g] . B[:, K_g]^T with K_g = k each: the MoE weight gradient.
        x = jax.random.normal(key[0], (m, g * k), jnp.float32).astype(jnp.bfloat16)
        w = jax.random.normal(key[1], (n, g * k), jnp.float32).astype(jnp.bfloat16)
        a, b = dg.per_token_cast_to_fp8(x), dg.per_token_cast_to_fp8(w)
        ks = jnp.full((g,), k, jnp.int32)
        fn = lambda impl: jax.jit(lambda a, b: dg.k_grouped_fp8_gemm_nt_contiguous(  # noqa: E731
            a, b, ks, implementation=impl))
        bf = (x, w.reshape(n, g * k))
        shape = f"k_grouped {g}x{k} m={m} n={n}"
        flops, nbytes = 2 * g * m * n * k, g * (m * k + n * k) + 4 * g * m * n
    elif kind == "masked":
        x = jax.random.normal(key[0], (g, m, k), jnp.float32).astype(jnp.bfloat16)
        w = jax.random.normal(key[1], (g, n, k), jnp.float32).astype(jnp.bfloat16)
        a, b = dg.per_token_cast_to_fp8(x), dg.per_block_cast_to_fp8(w)
        masked = jnp.full((g,), m, jnp.int32)
        fn = lambda impl: jax.jit(lambda a, b: dg.m_grouped_fp8_gemm_nt_masked(  # noqa: E731
            a, b, masked, expected_m=m, implementation=impl))
        bf = (x, w)
        shape = f"masked {g}x{m} n={n} k={k}"
        flops, nbytes = 2 * g * m * n * k, g * (m * k + n * k + 2 * m * n)
    else:
        rows = g * m
        x = jax.random.normal(key[0], (rows, k), jnp.float32).astype(jnp.bfloat16)
        wshape = (g, n, k) if kind == "contiguous" else (n, k)
        w = jax.random.normal(key[1], wshape, jnp.float32).astype(jnp.bfloat16)
        a, b = dg.per_token_cast_to_fp8(x), dg.per_block_cast_to_fp8(w)
        if kind == "contiguous":
            mi = jnp.repeat(jnp.arange(g, dtype=jnp.int32), m)
            fn = lambda impl: jax.jit(lambda a, b: dg.m_grouped_fp8_gemm_nt_contiguous(  # noqa: E731
                a, b, mi, implementation=impl))
            shape = f"contiguous {g}x{m} n={n} k={k}"
        else:
            fn = lambda impl: jax.jit(lambda a, b: dg.fp8_gemm_nt(a, b, implementation=impl))  # noqa: E731
            shape = f"dense m={m} n={n} k={k}"
        bf = (x, w)
        flops, nbytes = 2 * rows * n * k, rows * k + g * n * k + 2 * rows * n
    out: list[Record] = []
    f_bf = jax.jit(lambda x, w: _bf16_dot(kind, x, w))
    t_bf = time_fn(f_bf, *bf, warmup=2, repeats=reps)
    for impl in implementations():
        with _kernel("mma"):
            t = time_fn(fn(impl), a, b, warmup=2, repeats=reps)
        out.append(record(BENCH, shape, impl, t, nbytes=nbytes, flops=flops, vs_bf16=t_bf / t))
        if (impl == "cuda" and kind in ("dense", "contiguous", "masked")
                and not os.environ.get("DSJAX_BENCH_SKIP_WGMMA")):
            allowed = _wgmma_configs()
            # The heuristic's pick (row cuda_wgmma), unless it failed its smoke run; on the
            # target shape also every configuration. Traced (and so lowered to the WGMMA target
            # and configuration) inside the blocks.
            auto = _gemm_ffi.choose_wgmma_config(kind, m if kind == "masked" else g * m, n,
                                                 g if kind == "masked" else 1)
            runs = [("cuda_wgmma", "auto", auto)] if auto in allowed else []
            if (kind, g, m, n, k) == TARGET:
                runs += [(f"cuda_wgmma:{c}", c, c) for c in allowed]
            for name, env, cfg in runs:
                with _kernel("wgmma"), _env(_gemm_ffi.WGMMA_CONFIG_ENV, env):
                    t = time_fn(fn(impl), a, b, warmup=2, repeats=reps)
                out.append(record(BENCH, shape, name, t, nbytes=nbytes, flops=flops,
                                  vs_bf16=t_bf / t, config=cfg))
    out.append(record(BENCH, shape, "xla_bf16_dot", t_bf, nbytes=2 * nbytes, flops=flops,
                      vs_bf16=1.0))
    return out


def run(quick: bool) -> list[Record]:
    records: list[Record] = []
    for case in _cases(quick):
        records.extend(_case(*case, quick=quick))
    return records


BENCHES = {BENCH: run}
