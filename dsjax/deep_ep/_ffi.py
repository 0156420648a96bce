"""FFI wrappers of the DeepEP local kernels (CPU twin and CUDA), same signatures as ``reference``.

XLA picks the CPU or CUDA handler of a target from the platform the computation runs on; both are
registered under the same names by :mod:`dsjax._src.ffi`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax._src import ffi

I32 = jnp.int32
F32 = jnp.float32


def _sds(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), dtype)


# Results of a call inside shard_map vary over the operands' mesh axes (dsjax._src.ffi.call).
_call = ffi.call


def dispatch_layout(topk_idx: jax.Array, *, num_experts: int, num_ranks: int,
                    ranks_per_node: int | None):
    t = topk_idx.shape[0]
    rpn = num_ranks if ranks_per_node is None else ranks_per_node
    out = (_sds((num_ranks,), I32), _sds((num_ranks // rpn,), I32), _sds((num_experts,), I32),
           _sds((t, num_ranks), jnp.bool_))
    per_rank, per_node, per_expert, in_rank = _call(
        "dsjax_deep_ep_get_dispatch_layout", out, topk_idx, num_experts=int(num_experts),
        num_ranks=int(num_ranks), ranks_per_node=int(rpn))
    return per_rank, (None if ranks_per_node is None else per_node), per_expert, in_rank


def route(topk_idx: jax.Array, topk_weights: jax.Array, *, experts_per_dest: int, num_dests: int,
          capacity: int, local_ids: bool):
    t, k = topk_idx.shape
    slots = num_dests * capacity
    out = (_sds((t, num_dests), I32), _sds((slots,), I32), _sds((slots, k), I32), _sds((slots, k), F32),
           _sds((), I32))
    return tuple(_call("dsjax_deep_ep_route", out, topk_idx, topk_weights.astype(F32),
                          experts_per_dest=int(experts_per_dest), num_dests=int(num_dests),
                          capacity=int(capacity), local_ids=bool(local_ids)))


def gather_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    return _call("dsjax_deep_ep_gather_rows", _sds((idx.shape[0], *x.shape[1:]), x.dtype), x, idx)


def gather_reduce(x: jax.Array, idx: jax.Array, weights: jax.Array | None, out_dtype) -> jax.Array:
    w = (idx >= 0).astype(F32) if weights is None else weights.astype(F32)
    return _call("dsjax_deep_ep_gather_reduce", _sds((idx.shape[0], x.shape[1]), out_dtype), x, idx, w)


def ll_layout(recv_idx: jax.Array, *, num_local_experts: int):
    m, k = recv_idx.shape
    out = (_sds((num_local_experts * m,), I32), _sds((num_local_experts,), I32), _sds((m, k), I32))
    return tuple(_call("dsjax_deep_ep_ll_layout", out, recv_idx,
                          num_local_experts=int(num_local_experts)))
