"""Training-step throughput of the tiny DeepSeek-V3 (the main job's ``dsjax train`` step).

Rows per shape: ``reference`` is the step with dense routed experts on one device (every expert
on every token, masked: the simplest exact MoE); ``ep-<impl>`` is the ``dsjax train`` step, with
the routed experts under ``shard_map`` through DeepEP dispatch/combine (``<impl>`` kernels) on a
(dp, ep) mesh over the devices JAX has; ``pp-dualpipe-<impl>`` is the default ``dsjax train`` step
on 8 or more devices: mesh pp=2 x ep=4, the MoE layers as two DualPipe stages with 4
micro-batches (:mod:`dsjax.train.pipeline`); ``ep-<impl>-eplb`` is the EP step with one redundant
expert slot per EP rank (EPLB: replica routing per device, replica gradients tied over ``ep``,
expert-counted clipping). On CPU set
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` for the 2x4 mesh of the default run (with
one device the EP rows run on a 1x1 mesh). Extra columns: tokens/s, the mesh and, on a GPU, model
FLOPs utilisation against the H200's dense bf16 peak (989 TFLOP/s): flops are 6·N_active per
token (N_active = parameters a token uses: shared + K of E routed experts, embeddings excluded,
attention scores excluded), so MFU is a lower bound. Informational: the tiny model is far too
small to fill a GPU.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsjax.bench._harness import Record, implementations, record, time_fn

H200_BF16_PEAK = 989e12


def _mesh() -> Mesh:
    n = len(jax.devices())
    dp, ep = (2, 4) if n >= 8 else (1, max(d for d in (4, 2, 1) if d <= n))
    return Mesh(np.array(jax.devices()[:dp * ep]).reshape(dp, ep), ("dp", "ep"))


def _active_params(model, cfg) -> int:
    params = nnx.state(model, nnx.Param)
    total = sum(x.size for x in jax.tree.leaves(params))
    n_moe = cfg.n_layers - cfg.n_dense_layers + (1 if cfg.mtp_depth else 0)
    # Redundant replicas (EPLB) hold copies: a token uses K of the P physical slots.
    idle = n_moe * (cfg.n_physical_experts - cfg.n_activated_experts) * 3 * cfg.dim * cfg.moe_inter_dim
    return int(total - idle - cfg.vocab_size * cfg.dim)


def _step_records(batch: int, seq: int) -> list[Record]:
    from dsjax.nn.config import DeepSeekV3Config
    from dsjax.nn.ep import use_expert_parallelism
    from dsjax.nn.model import DeepSeekV3
    from dsjax.train.loop import _optimizer_for, _pipeline, _pipeline_step, _place, _train_step

    base = DeepSeekV3Config.tiny(vocab_size=257)
    shape = f"tiny b{batch}x{seq}"
    tokens = np.random.default_rng(0).integers(0, 256, (batch, seq + 1)).astype(np.int32)
    mesh = _mesh()
    gpu = jax.default_backend() == "gpu"
    out = []
    variants = [("reference", None)] + [(f"ep-{i}", i) for i in implementations()]
    ep = mesh.shape["ep"]
    if ep > 1:  # EPLB: one redundant slot per EP rank (dsjax train's default), replicas tied
        variants.append((f"ep-{implementations()[-1]}-eplb", "eplb"))
    if len(jax.devices()) >= 8 and batch % 16 == 0:
        variants.append((f"pp-dualpipe-{implementations()[-1]}", "pp"))
    for name, impl in variants:
        cfg = dataclasses.replace(base, n_redundant_experts=ep) if impl == "eplb" else base
        model = DeepSeekV3(cfg, rngs=nnx.Rngs(0))
        step = _train_step(1.0)
        if impl == "pp":
            pmesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 1, 4), ("pp", "dp", "ep"))
            pipe = _pipeline(pmesh, cfg, "dualpipe", 4, implementations()[-1])
            pipe.prepare(model)
            step = _pipeline_step(pipe, 1.0)
            tok = jax.device_put(tokens, NamedSharding(pmesh, P(("dp", "ep"))))
            where = "pp=2 x ep=4, dualpipe, 4 micro-batches"
        elif impl is None:
            tok = jax.device_put(tokens, jax.devices()[0])
            where = "1 device"
        else:
            use_expert_parallelism(model, mesh,
                                   implementation=implementations()[-1] if impl == "eplb" else impl)
            tok = jax.device_put(tokens, NamedSharding(mesh, P(("dp", "ep"))))
            where = f"dp={mesh.shape['dp']} x ep={mesh.shape['ep']}"
            if impl == "eplb":
                where += f", {cfg.n_routed_experts} experts in {cfg.n_physical_experts} slots"
        opt = nnx.Optimizer(model, _optimizer_for(3e-3, 10, 0.01), wrt=nnx.Param)
        if impl is not None and impl != "pp":  # experts split over ep, as dsjax train places them
            nnx.update(model, _place(nnx.state(model), mesh, model))
            nnx.update(opt, _place(nnx.state(opt), mesh, model))
        t = time_fn(lambda: step(model, opt, tok)[0].total, warmup=2, repeats=5)
        flops = 6.0 * _active_params(model, cfg) * batch * seq
        extra = {"tokens_per_s": round(batch * seq / t), "mesh": where}
        if gpu:
            extra["mfu_pct"] = round(100 * flops / t / H200_BF16_PEAK, 4)
        out.append(record("train", shape, name, t, flops=flops, **extra))
    return out


def run(quick: bool) -> list[Record]:
    shapes = [(16, 64)] if quick else [(16, 64), (32, 128)]
    return [r for b, s in shapes for r in _step_records(b, s)]


BENCHES = {"train": run}
