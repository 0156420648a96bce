"""DeepSeek-V3 in Flax NNX: blocks (MLA + dense MLP or DeepSeekMoE), the model with its
multi-token-prediction head (depth 1, arXiv:2412.19437 §2.2), and the training loss.

The MTP module of depth 1 combines the main model's final hidden state at position t with the
embedding of token t+1 (``proj([RMSNorm(h); RMSNorm(emb)])``), runs one transformer block and
predicts token t+2 with the shared output head; its loss is weighted by ``mtp_loss_weight``.

``cfg.use_fp8`` applies DeepSeek-V3's FP8 mixed-precision recipe (§3.3): every linear of the
blocks (MLA projections, dense MLP, shared and routed experts, the MTP projection) runs its
Fprop/Dgrad/Wgrad GEMMs in FP8, while the embedding, the output head, the MoE router gate, the
norms and the attention core stay in high precision, and the master weights stay float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsjax.flash_mla import PagedMLACache
from dsjax.nn.config import DeepSeekV3Config
from dsjax.nn.layers import MLP, RMSNorm, linear_factory
from dsjax.nn.mla import MLA
from dsjax.nn.moe import AuxLoss, DeepSeekMoE


class DeepSeekV3Block(nnx.Module):
    """Pre-norm block: x + MLA(norm(x)), then + FFN(norm(x)); FFN is a dense SwiGLU MLP for the
    first ``n_dense_layers`` layers and DeepSeekMoE after."""

    def __init__(self, layer_id: int, cfg: DeepSeekV3Config, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = MLA(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = (MLP(cfg.dim, cfg.inter_dim, rngs=rngs, linear=linear_factory(cfg, rngs))
                    if layer_id < cfg.n_dense_layers
                    else DeepSeekMoE(cfg, rngs=rngs))

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), positions)
        return x + self.ffn(self.ffn_norm(x))

    def decode(self, x: jax.Array, positions: jax.Array, cache: PagedMLACache, *,
               implementation: str = "auto") -> tuple[jax.Array, PagedMLACache]:
        a, cache = self.attn.decode(self.attn_norm(x), positions, cache, implementation=implementation)
        x = x + a
        return x + self.ffn(self.ffn_norm(x)), cache


class MTPHead(nnx.Module):
    """Multi-token prediction module of depth 1 (its own block; embedding and head are shared)."""

    def __init__(self, cfg: DeepSeekV3Config, *, rngs: nnx.Rngs):
        self.hnorm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.enorm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.proj = linear_factory(cfg, rngs)(2 * cfg.dim, cfg.dim)
        self.block = DeepSeekV3Block(cfg.n_layers, cfg, rngs=rngs)
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)

    def __call__(self, h: jax.Array, next_emb: jax.Array, positions: jax.Array) -> jax.Array:
        x = self.proj(jnp.concatenate([self.hnorm(h), self.enorm(next_emb)], axis=-1))
        return self.norm(self.block(x, positions))


class Outputs(NamedTuple):
    logits: jax.Array              # [B, S, V] next-token logits
    mtp_logits: jax.Array | None   # [B, S-1, V] logits of token t+2 (depth-1 MTP)
    hidden: jax.Array              # [B, S, D] final hidden states (after the last norm)


class DeepSeekV3(nnx.Module):
    """A DeepSeek-V3-style decoder. ``DeepSeekV3(DeepSeekV3Config.tiny(), rngs=nnx.Rngs(0))``."""

    def __init__(self, cfg: DeepSeekV3Config, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(cfg.vocab_size, cfg.dim, rngs=rngs)
        self.layers = nnx.List([DeepSeekV3Block(i, cfg, rngs=rngs) for i in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nnx.Linear(cfg.dim, cfg.vocab_size, use_bias=False, rngs=rngs)
        self.mtp = MTPHead(cfg, rngs=rngs) if cfg.mtp_depth > 0 else None
        self.cfg = cfg

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> Outputs:
        """tokens int32 [B, S] -> Outputs. positions default to 0..S-1."""
        b, s = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        dtype = jnp.dtype(self.cfg.dtype)
        x = self.embed(tokens).astype(dtype)
        for layer in self.layers:
            x = layer(x, positions)
        h = self.norm(x)
        logits = self.head(h).astype(jnp.float32)
        mtp_logits = None
        if self.mtp is not None and s > 1:
            nxt = self.embed(tokens[:, 1:]).astype(dtype)
            hm = self.mtp(h[:, :-1], nxt, positions[:, :-1])
            mtp_logits = self.head(hm).astype(jnp.float32)
        return Outputs(logits, mtp_logits, h)


    def init_caches(self, batch: int, max_len: int, *, page_block_size: int = 64,
                    dtype=jnp.float32, fp8: bool = False) -> list[PagedMLACache]:
        """One empty paged latent cache per layer, room for ``max_len`` tokens per sequence."""
        blocks = -(-max_len // page_block_size)
        width = self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim
        if width != 576:
            raise ValueError(f"DeepSeekV3.init_caches: FlashMLA caches are 576 wide (kv_lora_rank 512 + "
                             f"qk_rope_head_dim 64), this config has {width}")
        return [PagedMLACache.create(batch * blocks, page_block_size, batch, blocks, dtype=dtype, fp8=fp8)
                for _ in self.layers]

    def decode(self, tokens: jax.Array, positions: jax.Array, caches: list[PagedMLACache], *,
               implementation: str = "auto") -> tuple[jax.Array, list[PagedMLACache]]:
        """Logits [B, T, V] of T new tokens per sequence, attending over and extending ``caches``.

        Prefill is the same call with T = prompt length; plain decoding uses T = 1. ``positions``
        [B, T] must continue each sequence (the cached length before the new tokens).
        """
        x = self.embed(tokens).astype(jnp.dtype(self.cfg.dtype))
        new = []
        for layer, cache in zip(self.layers, caches):
            x, cache = layer.decode(x, positions, cache, implementation=implementation)
            new.append(cache)
        return self.head(self.norm(x)).astype(jnp.float32), new


class LossParts(NamedTuple):
    total: jax.Array
    lm: jax.Array
    mtp: jax.Array
    balance: jax.Array


def lm_loss(model: DeepSeekV3, tokens: jax.Array) -> LossParts:
    """Next-token cross-entropy on tokens [B, S+1], plus the MTP loss (token t+2) weighted by
    ``mtp_loss_weight`` and the sequence-wise balance losses of the MoE layers."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    out = model(inputs)
    lm = optax.softmax_cross_entropy_with_integer_labels(out.logits, targets).mean()
    mtp = jnp.zeros((), jnp.float32)
    if out.mtp_logits is not None:
        mtp = optax.softmax_cross_entropy_with_integer_labels(out.mtp_logits, tokens[:, 2:]).mean()
    balance = sum((v[...] for _, v in nnx.iter_graph(model) if isinstance(v, AuxLoss)),
                  jnp.zeros((), jnp.float32))
    total = lm + model.cfg.mtp_loss_weight * mtp + balance
    return LossParts(total, lm, mtp, balance)


def update_expert_biases(model: DeepSeekV3) -> None:
    """Auxiliary-loss-free balancing step for every MoE layer (call after the optimizer step)."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, DeepSeekMoE):
            node.apply_bias_update()
