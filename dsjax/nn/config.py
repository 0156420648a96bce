"""DeepSeek-V3 model configuration, with a CPU-sized ``tiny`` preset and the published 671B one.

Field names and the 671B values follow DeepSeek-V3's inference code (``inference/configs/config_671B.json``
and ``ModelArgs`` in ``inference/model.py`` of deepseek-ai/DeepSeek-V3) and the technical report
(arXiv:2412.19437): MLA with q/kv LoRA and decoupled RoPE, DeepSeekMoE with 1 shared + 256 routed
experts (8 active, 8 groups, 4 groups per token), sigmoid routing with routed scaling 2.5, YaRN
RoPE extension (factor 40), multi-token prediction of depth 1.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class DeepSeekV3Config:
    """Hyper-parameters of a DeepSeek-V3-style model.

    Attributes follow DeepSeek-V3's ``ModelArgs``; additions: ``bias_update_speed`` (γ of the
    auxiliary-loss-free balancing), ``seq_aux_alpha`` (weight of the sequence-wise balance loss,
    0 disables it), ``mtp_depth`` / ``mtp_loss_weight`` (multi-token prediction), ``dtype`` of the
    activations, ``use_fp8`` (linears and experts as FP8 GEMMs) and ``n_redundant_experts``
    (EPLB: the routed experts are stored in ``n_routed_experts + n_redundant_experts`` physical
    slots, hot experts replicated; 0 keeps one slot per expert, no placement state).
    """

    vocab_size: int = 129280
    dim: int = 7168
    inter_dim: int = 18432
    moe_inter_dim: int = 2048
    n_layers: int = 61
    n_dense_layers: int = 3
    n_heads: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 8
    n_expert_groups: int = 8
    n_limited_groups: int = 4
    score_func: str = "sigmoid"
    route_scale: float = 2.5
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    max_seq_len: int = 4096 * 4
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    norm_eps: float = 1e-6
    bias_update_speed: float = 0.001
    seq_aux_alpha: float = 0.0001
    mtp_depth: int = 1
    mtp_loss_weight: float = 0.3
    dtype: str = "bfloat16"
    use_fp8: bool = True
    n_redundant_experts: int = 0

    def __post_init__(self) -> None:
        errors = []
        if self.n_routed_experts % max(self.n_expert_groups, 1):
            errors.append(f"n_routed_experts ({self.n_routed_experts}) must be a multiple of "
                          f"n_expert_groups ({self.n_expert_groups})")
        if not 1 <= self.n_limited_groups <= self.n_expert_groups:
            errors.append(f"n_limited_groups must be in [1, n_expert_groups={self.n_expert_groups}], "
                          f"got {self.n_limited_groups}")
        per_group = self.n_routed_experts // max(self.n_expert_groups, 1)
        if self.n_activated_experts > self.n_limited_groups * per_group:
            errors.append(f"n_activated_experts ({self.n_activated_experts}) exceeds the experts in "
                          f"n_limited_groups groups ({self.n_limited_groups * per_group})")
        if self.qk_rope_head_dim % 2:
            errors.append(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.score_func not in ("sigmoid", "softmax"):
            errors.append(f"score_func must be 'sigmoid' or 'softmax', got {self.score_func!r}")
        if self.dtype not in ("float32", "bfloat16"):
            errors.append(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            errors.append(f"n_dense_layers must be in [0, n_layers={self.n_layers}], got {self.n_dense_layers}")
        if not isinstance(self.n_redundant_experts, int) or self.n_redundant_experts < 0:
            errors.append(f"n_redundant_experts must be an int >= 0, got {self.n_redundant_experts!r}")
        if errors:
            raise ValueError("DeepSeekV3Config: " + "; ".join(errors))

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_physical_experts(self) -> int:
        """Physical routed-expert slots: ``n_routed_experts + n_redundant_experts``."""
        return self.n_routed_experts + self.n_redundant_experts

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim**-0.5, times mscale² when the context is extended beyond the original
        length (YaRN), as in DeepSeek-V3's ``MLA.__init__``."""
        scale = self.qk_head_dim ** -0.5
        if self.max_seq_len > self.original_seq_len:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale *= m * m
        return scale

    @classmethod
    def deepseek_v3_671b(cls, **overrides) -> "DeepSeekV3Config":
        """The published DeepSeek-V3 configuration (671B parameters, 37B active)."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def tiny(cls, **overrides) -> "DeepSeekV3Config":
        """A CPU-sized model with every feature of the full one (MLA with both LoRAs and RoPE,
        dense then MoE layers, grouped sigmoid routing, shared expert, MTP)."""
        base = cls(
            vocab_size=256, dim=128, inter_dim=256, moe_inter_dim=64, n_layers=3, n_dense_layers=1,
            n_heads=4, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
            n_expert_groups=4, n_limited_groups=2, q_lora_rank=64,
            # FlashMLA's cache row is 512 latent + 64 RoPE channels; the tiny model keeps that width
            # so that it decodes through the same kernels as the full one.
            kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32, max_seq_len=256,
            original_seq_len=256, dtype="float32", use_fp8=False, seq_aux_alpha=0.0001,
        )
        return dataclasses.replace(base, **overrides)
