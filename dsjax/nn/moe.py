"""DeepSeekMoE layer: shared experts plus group-limited top-k routed experts.

The routed experts are computed by ``routed_experts_dense`` here (every expert on every token,
masked by the gating weights: exact, simple, fine for CPU-sized models). The expert-parallel path
(DeepEP dispatch/combine under shard_map) and FP8 grouped GEMMs plug in at ``routed_fn``.
The load-balancing bias and the observed expert load are NNX variables that are not parameters:
the optimizer never sees them, and ``apply_bias_update`` changes the bias between steps.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.nn import router
from dsjax.nn.config import DeepSeekV3Config
from dsjax.nn.layers import MLP


class ExpertBias(nnx.Variable):
    """Selection bias of the auxiliary-loss-free balancing (not trained by gradients)."""


class ExpertLoad(nnx.Variable):
    """Tokens routed to each expert in the last forward pass (int32 [E])."""


class AuxLoss(nnx.Variable):
    """Sequence-wise balance loss of the last forward pass (scalar)."""


def routed_experts_dense(x: jax.Array, weights: jax.Array, indices: jax.Array, w1: jax.Array,
                         w3: jax.Array, w2: jax.Array) -> jax.Array:
    """Σ_k weight_k · expert_{idx_k}(x) for x [T, D], experts w1/w3 [E, D, I], w2 [E, I, D]."""
    e = w1.shape[0]
    combine = jnp.zeros((x.shape[0], e), jnp.float32).at[
        jnp.arange(x.shape[0])[:, None], indices].add(weights)
    h = jax.nn.silu(jnp.einsum("td,edi->tei", x, w1)) * jnp.einsum("td,edi->tei", x, w3)
    y = jnp.einsum("tei,eid->ted", h, w2)
    return jnp.einsum("ted,te->td", y.astype(jnp.float32), combine).astype(x.dtype)


class DeepSeekMoE(nnx.Module):
    """Shared experts + routed experts with DeepSeek-V3 routing.

    Args:
        cfg: model configuration (experts, groups, routing scale, balance settings).
        rngs: parameter initialization.
        routed_fn: computes the routed experts from (x [T, D], weights [T, K], indices [T, K],
            w1, w3, w2); defaults to :func:`routed_experts_dense`.
    """

    def __init__(self, cfg: DeepSeekV3Config, *, rngs: nnx.Rngs,
                 routed_fn: Callable[..., jax.Array] | None = None):
        e, d, i = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        init = nnx.initializers.lecun_normal()
        self.gate = nnx.Param(init(rngs.params(), (d, e), jnp.float32))
        self.w1 = nnx.Param(init(rngs.params(), (e, d, i), jnp.float32))
        self.w3 = nnx.Param(init(rngs.params(), (e, d, i), jnp.float32))
        self.w2 = nnx.Param(init(rngs.params(), (e, i, d), jnp.float32))
        self.bias = ExpertBias(jnp.zeros((e,), jnp.float32))
        self.load = ExpertLoad(jnp.zeros((e,), jnp.int32))
        self.aux_loss = AuxLoss(jnp.zeros((), jnp.float32))
        self.shared = MLP(d, cfg.n_shared_experts * i, rngs=rngs) if cfg.n_shared_experts else None
        self.cfg = cfg
        self.routed_fn = routed_fn or routed_experts_dense

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, S, D] -> [B, S, D]; records the expert load and the balance loss."""
        cfg = self.cfg
        b, s, d = x.shape
        flat = x.reshape(b * s, d)
        r = router.route(flat @ self.gate[...].astype(x.dtype), self.bias[...],
                         topk=cfg.n_activated_experts, n_groups=cfg.n_expert_groups,
                         topk_groups=cfg.n_limited_groups, route_scale=cfg.route_scale,
                         score_func=cfg.score_func)
        self.load[...] = jax.lax.stop_gradient(router.expert_counts(r.indices, cfg.n_routed_experts))
        if cfg.seq_aux_alpha > 0:
            self.aux_loss[...] = router.sequence_balance_loss(
                r.scores.reshape(b, s, -1), r.indices.reshape(b, s, -1), alpha=cfg.seq_aux_alpha)
        y = self.routed_fn(flat, r.weights, r.indices, self.w1[...].astype(x.dtype),
                           self.w3[...].astype(x.dtype), self.w2[...].astype(x.dtype))
        y = y.reshape(b, s, d)
        if self.shared is not None:
            y = y + self.shared(x)
        return y

    def apply_bias_update(self) -> None:
        """Moves the selection bias towards balance from the load of the last forward pass."""
        self.bias[...] = router.update_bias(self.bias[...], self.load[...], self.cfg.bias_update_speed)
