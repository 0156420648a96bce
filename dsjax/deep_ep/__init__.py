"""DeepEP for JAX: expert-parallel dispatch and combine for MoE layers, inside ``jax.shard_map``.

* :func:`get_dispatch_layout`: per-rank / node / expert token counts (local).
* :func:`dispatch` / :func:`combine`: normal mode (one copy per destination rank, bf16/f32 or FP8,
  static receive size ``num_worst_tokens``, optional two-hop path over a node axis, transport
  ``all_to_all`` (static buffers) or ``ragged`` (``ragged_all_to_all``, GPU/TPU)), differentiable
  (each is the other's backward). ``combine`` takes per-slot expert outputs ``[N, K, H]`` with the
  received top-k weights (weighted reduce inside, returns ``[T, H]``) or DeepEP's per-row ``[N, H]``.
* :func:`low_latency_dispatch` / :func:`low_latency_combine`: decoding mode producing DeepGEMM's
  masked layout ``[E/R, R·max_T, H]`` plus per-expert counts.
* :func:`reference_moe`: a dense single-device MoE, the oracle for EP layers.

Semantics follow deepseek-ai/DeepEP; see each function's docstring for the differences.
"""

from dsjax.deep_ep._plan import Handle
from dsjax.deep_ep.combine import combine
from dsjax.deep_ep.dispatch import dispatch
from dsjax.deep_ep.layout import Layout, get_dispatch_layout
from dsjax.deep_ep.low_latency import LowLatencyHandle, low_latency_combine, low_latency_dispatch
from dsjax.deep_ep.reference import reference_moe

__all__ = [
    "Handle",
    "Layout",
    "LowLatencyHandle",
    "combine",
    "dispatch",
    "get_dispatch_layout",
    "low_latency_combine",
    "low_latency_dispatch",
    "reference_moe",
]
