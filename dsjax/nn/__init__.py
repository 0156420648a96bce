"""Flax NNX layers of DeepSeek-V3, built on dsjax's components.

* :class:`DeepSeekV3Config` (``tiny()`` and ``deepseek_v3_671b()`` presets), :class:`DeepSeekV3`,
  :class:`DeepSeekV3Block`, :class:`MTPHead`, :func:`lm_loss`, :func:`update_expert_biases`;
* :class:`MLA` (multi-head latent attention: training path, latent decode with FlashMLA);
* :class:`DeepSeekMoE` (group-limited sigmoid routing, auxiliary-loss-free bias, shared experts);
* :class:`Fp8Linear` / :class:`Fp8GroupedLinear` (DeepSeek-V3's FP8 training recipe).
"""

from dsjax.nn.config import DeepSeekV3Config
from dsjax.nn.fp8 import Fp8GroupedLinear, Fp8Linear
from dsjax.nn.layers import MLP, RMSNorm
from dsjax.nn.mla import MLA
from dsjax.nn.model import DeepSeekV3, DeepSeekV3Block, MTPHead, lm_loss, update_expert_biases
from dsjax.nn.moe import DeepSeekMoE, tie_expert_replica_grads

__all__ = [
    "DeepSeekMoE",
    "DeepSeekV3",
    "DeepSeekV3Block",
    "DeepSeekV3Config",
    "Fp8GroupedLinear",
    "Fp8Linear",
    "MLA",
    "MLP",
    "MTPHead",
    "RMSNorm",
    "lm_loss",
    "tie_expert_replica_grads",
    "update_expert_biases",
]
