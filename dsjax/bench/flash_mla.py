"""Bench of FlashMLA decoding (``flash_mla_with_kvcache``), counted like deepseek-ai/FlashMLA's
benchmark/bench_flash_mla.py:

    FLOPs = 2 * b * h_q * s_q * s_k * (576 + 512)
    bytes = 2 * b * (s_q * h_q * 576 + s_k * h_kv * 576 + s_q * h_q * 512)   (bf16 cache)

(for the FP8 cache the cache term is s_k * h_kv * 656 bytes instead of 2 * 576). Every sequence has
length s_k, h_kv = 1, causal when s_q > 1; the metadata is computed once outside the timed call,
as in FlashMLA's bench. GPU shapes (b = 128, s_k 4K..32K) run on a GPU backend; ``--quick`` and the
CPU run the CPU shapes (b = 8, s_k in {1024, 4096}).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.bench._harness import Record, implementations, record, time_fn
from dsjax.flash_mla import flash_mla_with_kvcache, get_mla_metadata, quantize_kvcache

PAGE = 64


def _shapes(quick: bool) -> list[tuple[int, int, int, int]]:
    """(b, h_q, s_q, s_k)."""
    if jax.default_backend() == "gpu" and not quick:
        return [(128, h, s, k) for h in (16, 128) for s in (1, 2) for k in (4096, 8192, 16384, 32768)]
    return [(8, h, s, k) for h in (16, 128) for s in (1, 2) for k in (1024, 4096)]


def _problem(b: int, h_q: int, s_q: int, s_k: int):
    key_q, key_k = jax.random.split(jax.random.PRNGKey(0))
    q = jax.random.normal(key_q, (b, s_q, h_q, 576), jnp.float32).astype(jnp.bfloat16)
    nblk = b * (s_k // PAGE)
    cache = jax.random.normal(key_k, (nblk, PAGE, 1, 576), jnp.float32).astype(jnp.bfloat16)
    # A shuffled block table, like a real paged cache.
    table = jnp.asarray(np.random.default_rng(0).permutation(nblk).reshape(b, -1), jnp.int32)
    lens = jnp.full((b,), s_k, jnp.int32)
    return q, cache, table, lens


def _run(quick: bool) -> list[Record]:
    out: list[Record] = []
    impls = implementations()
    with_fp8 = not quick
    for b, h_q, s_q, s_k in _shapes(quick):
        q, cache, table, lens = _problem(b, h_q, s_q, s_k)
        md, ns = get_mla_metadata(lens, s_q * h_q, 1)
        causal = s_q > 1
        flops = 2 * b * h_q * s_q * s_k * (576 + 512)
        io = 2 * b * (s_q * h_q * 576 + s_q * h_q * 512)
        shape = f"b={b} h_q={h_q} s_q={s_q} s_k={s_k}"
        variants = [(impl, False) for impl in impls]
        if with_fp8:
            variants += [(impl, True) for impl in impls if impl != "reference"]
        cache8 = quantize_kvcache(cache) if with_fp8 else None
        for impl, fp8 in variants:
            kc = cache8 if fp8 else cache
            fn = jax.jit(lambda q, kc, t, l, md, ns, impl=impl, fp8=fp8: flash_mla_with_kvcache(
                q, kc, t, l, 512, md, ns, causal=causal, is_fp8_kvcache=fp8, implementation=impl))
            t = time_fn(fn, q, kc, table, lens, md, ns, warmup=1, repeats=5)
            cache_bytes = b * s_k * (656 if fp8 else 2 * 576)
            out.append(record("flash_mla", shape, impl + ("_fp8" if fp8 else ""), t,
                              nbytes=io + cache_bytes, flops=flops,
                              parts=int(md.shape[0]), splits=int(ns[-1])))
    return out


BENCHES = {"flash_mla": _run}
