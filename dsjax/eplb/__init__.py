"""EPLB: DeepSeek's expert-parallel load balancer in pure JAX, plus the online pieces around it.

- :func:`rebalance_experts`: the placement solver (jit-compiled, vmapped over layers), same
  outputs as https://github.com/deepseek-ai/EPLB, optional local-search refinement.
- :func:`balance_stats`: max / mean GPU load and imbalance of a placement.
- :class:`ExpertLoadTracker` (+ :class:`ExpertLoad` NNX variable), :func:`replica_route`,
  :func:`relayout_expert_weights`, :func:`tie_replica_grads`, :func:`round_robin_placement`,
  :func:`rank_loads`: the pieces a training or serving loop needs around it.
"""

from dsjax.eplb.online import (BalanceStats, ExpertLoad, ExpertLoadTracker, balance_stats,
                               count_experts, rank_loads, relayout_expert_weights,
                               replica_route, round_robin_placement, tie_replica_grads)
from dsjax.eplb.solver import EplbResult, max_replicas_bound, rebalance_experts

__all__ = [
    "BalanceStats",
    "EplbResult",
    "ExpertLoad",
    "ExpertLoadTracker",
    "balance_stats",
    "count_experts",
    "max_replicas_bound",
    "rank_loads",
    "rebalance_experts",
    "relayout_expert_weights",
    "replica_route",
    "round_robin_placement",
    "tie_replica_grads",
]
