"""Bench of the FP8 quantizers: per_token_cast_to_fp8 and per_block_cast_to_fp8.

Bytes counted: the input read once, FP8 output and f32 scales written once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax.bench._harness import Record, implementations, record, time_fn
from dsjax.deep_gemm import per_block_cast_to_fp8, per_token_cast_to_fp8


def _impls() -> list[str]:
    return implementations()


def _shapes(quick: bool) -> list[tuple[int, int]]:
    if jax.default_backend() == "gpu" and not quick:
        return [(4096, 7168), (16384, 7168), (4096, 2048), (128, 7168)]
    return [(4096, 7168), (512, 2048)] if not quick else [(4096, 7168), (256, 1536)]


def _bench(name: str, fn, per_block: bool, quick: bool) -> list[Record]:
    out = []
    key = jax.random.PRNGKey(0)
    for m, k in _shapes(quick):
        x = jax.random.normal(key, (m, k), jnp.float32).astype(jnp.bfloat16)
        groups = (-(-m // 128)) * (-(-k // 128)) if per_block else m * (-(-k // 128))
        nbytes = x.size * 2 + x.size * 1 + groups * 4
        for impl in _impls():
            f = jax.jit(lambda x, impl=impl: fn(x, implementation=impl))
            t = time_fn(f, x, warmup=2, repeats=7 if quick else 11)
            out.append(record(name, f"[{m}, {k}] bf16", impl, t, nbytes=nbytes))
    return out


def run_per_token(quick: bool) -> list[Record]:
    return _bench("per_token_cast_to_fp8", per_token_cast_to_fp8, False, quick)


def run_per_block(quick: bool) -> list[Record]:
    return _bench("per_block_cast_to_fp8", per_block_cast_to_fp8, True, quick)


BENCHES = {"per_token_cast_to_fp8": run_per_token, "per_block_cast_to_fp8": run_per_block}
