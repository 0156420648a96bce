"""Argument checks shared by the DeepEP ops; messages name the argument, the expected and the given."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax._src import checks

ACTIVATION_DTYPES = (jnp.bfloat16, jnp.float32)
GROUP = 128


def positive_int(op: str, name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{op}: {name} must be a Python int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    return int(value)


def axis_size(op: str, name: str, axis: Any) -> int:
    """Size of a mesh axis (or tuple of axes) bound by the enclosing ``jax.shard_map``."""
    if axis is None:
        raise ValueError(f"{op}: {name} must name a mesh axis of the enclosing jax.shard_map, got None")
    try:
        return int(jax.lax.axis_size(axis))
    except (NameError, KeyError, ValueError, TypeError) as e:
        raise ValueError(
            f"{op}: {name}={axis!r} is not a mesh axis bound here; call {op} inside "
            f"jax.shard_map over a mesh with that axis ({type(e).__name__}: {e})") from None


def check_topk(op: str, topk_idx: Any, topk_weights: Any | None, num_tokens: int | None) -> tuple[int, int]:
    """topk_idx int32 [T, K] (and topk_weights float32 [T, K]); returns (T, K)."""
    checks.check_dtype("topk_idx", topk_idx, (jnp.int32,), op=op)
    checks.check_rank("topk_idx", topk_idx, op=op, exact=2, layout="[num_tokens, num_topk]")
    t, k = topk_idx.shape
    if k < 1:
        raise ValueError(f"{op}: topk_idx must have at least one column [num_tokens, num_topk], got {tuple(topk_idx.shape)}")
    if num_tokens is not None and t != num_tokens:
        raise ValueError(f"{op}: topk_idx must have {num_tokens} rows (one per token of x), got shape {tuple(topk_idx.shape)}")
    if topk_weights is not None:
        checks.check_dtype("topk_weights", topk_weights, (jnp.float32,), op=op)
        checks.check_shape("topk_weights", topk_weights, (t, k), op=op, layout="[num_tokens, num_topk] like topk_idx")
    return t, k


def check_experts(op: str, num_experts: Any, num_ranks: int) -> int:
    e = positive_int(op, "num_experts", num_experts)
    if e % num_ranks:
        raise ValueError(f"{op}: num_experts must be a multiple of the number of EP ranks ({num_ranks}), got {e}")
    return e


def split_x(op: str, x: Any) -> tuple[tuple[jax.Array, ...], int, int]:
    """x: bf16/f32 [T, H] or an FP8 tuple (x_fp8 [T, H] e4m3fn, scales [T, ceil(H/128)] f32).

    Returns (parts, T, H).
    """
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"{op}: an FP8 x must be a pair (x_fp8, scales), got a {type(x).__name__} of {len(x)}")
        q, s = x
        checks.check_dtype("x[0] (x_fp8)", q, (jnp.float8_e4m3fn,), op=op)
        checks.check_rank("x[0] (x_fp8)", q, op=op, exact=2, layout="[num_tokens, hidden]")
        t, h = q.shape
        checks.check_dtype("x[1] (scales)", s, (jnp.float32,), op=op)
        checks.check_shape("x[1] (scales)", s, (t, -(-h // GROUP)), op=op,
                           layout="[num_tokens, ceil(hidden/128)] (per_token_cast_to_fp8)")
        return (q, s), t, h
    checks.check_dtype("x", x, ACTIVATION_DTYPES, op=op)
    checks.check_rank("x", x, op=op, exact=2, layout="[num_tokens, hidden]")
    return (x,), x.shape[0], x.shape[1]
