"""DeepSeek-V3 routing: sigmoid scores, group-limited top-k, routed scaling, and the two balancing
mechanisms of the technical report (arXiv:2412.19437 §2.1.2):

* auxiliary-loss-free balancing: a per-expert bias added to the scores for *selection only*,
  updated outside the gradient by ``b_i += γ·sign(mean_load − load_i)`` after each step;
* the complementary sequence-wise balance loss ``α·Σ_i f_i·P_i`` (eqs. 17–20).

Selection follows ``Gate.forward`` of DeepSeek-V3's inference code: with a bias, a group's score is
the sum of its two best (biased) expert scores; the top ``topk_groups`` groups stay eligible; the
gating weights are the *unbiased* scores of the chosen experts, normalized (sigmoid) and scaled.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    weights: jax.Array  # [T, K] float32 gating weights (normalized, times route_scale)
    indices: jax.Array  # [T, K] int32 expert ids
    scores: jax.Array   # [T, E] float32 unbiased affinity scores (for the balance loss)


def route(logits: jax.Array, bias: jax.Array | None, *, topk: int, n_groups: int, topk_groups: int,
          route_scale: float, score_func: str = "sigmoid") -> Routing:
    """Group-limited top-k routing of DeepSeek-V3.

    Args:
        logits: [T, E] router logits (any float dtype; computed in float32).
        bias: [E] float32 load-balancing bias (selection only) or None.
        topk: experts per token (K).
        n_groups: expert groups (E must be a multiple); 1 disables group limiting.
        topk_groups: groups a token may route to.
        route_scale: multiplier of the gating weights (2.5 for DeepSeek-V3).
        score_func: 'sigmoid' (V3) or 'softmax' (V2).
    """
    t, e = logits.shape
    lf = logits.astype(jnp.float32)
    scores = jax.nn.sigmoid(lf) if score_func == "sigmoid" else jax.nn.softmax(lf, axis=-1)
    sel = scores if bias is None else scores + bias.astype(jnp.float32)
    if n_groups > 1:
        g = sel.reshape(t, n_groups, e // n_groups)
        if bias is not None and e // n_groups >= 2:
            group_score = jax.lax.top_k(g, 2)[0].sum(-1)
        else:
            group_score = g.max(-1)
        _, gidx = jax.lax.top_k(group_score, topk_groups)
        keep = jax.nn.one_hot(gidx, n_groups, dtype=jnp.bool_).any(axis=1)  # [T, n_groups]
        sel = jnp.where(keep[:, :, None], g, -jnp.inf).reshape(t, e)
    _, idx = jax.lax.top_k(sel, topk)
    w = jnp.take_along_axis(scores, idx, axis=-1)
    if score_func == "sigmoid":
        w = w / w.sum(-1, keepdims=True)
    return Routing(w * route_scale, idx.astype(jnp.int32), scores)


def expert_counts(indices: jax.Array, num_experts: int) -> jax.Array:
    """Tokens routed to each expert: int32 [E] from indices [..., K] (entries < 0 ignored)."""
    flat = indices.reshape(-1)
    return jnp.zeros((num_experts,), jnp.int32).at[jnp.where(flat < 0, num_experts, flat)].add(1, mode="drop")


def sequence_balance_loss(scores: jax.Array, indices: jax.Array, *, alpha: float) -> jax.Array:
    """Sequence-wise balance loss α·Σ_i f_i·P_i, averaged over sequences.

    Args:
        scores: [B, S, E] unbiased affinities; indices: [B, S, K] chosen experts.
    Returns:
        float32 scalar. f_i = E/(K·S)·(tokens of the sequence routed to i);
        P_i = mean over the sequence of s_i / Σ_j s_j.
    """
    b, s, e = scores.shape
    k = indices.shape[-1]
    counts = jax.vmap(lambda idx: expert_counts(idx, e))(indices).astype(jnp.float32)  # [B, E]
    f = counts * (e / (k * s))
    p = (scores / scores.sum(-1, keepdims=True)).mean(axis=1)  # [B, E]
    return alpha * jnp.mean(jnp.sum(f * p, axis=-1))


def update_bias(bias: jax.Array, load: jax.Array, speed: float) -> jax.Array:
    """Auxiliary-loss-free update: raise the bias of under-loaded experts, lower over-loaded ones."""
    load = load.astype(jnp.float32)
    return bias + speed * jnp.sign(load.mean() - load)
