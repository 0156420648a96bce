"""``dsjax train``: a DeepSeek-V3-style model trained on a (pp, dp, ep) mesh: DualPipe pipeline
parallelism, expert parallelism through DeepEP, data parallelism.

One step (DeepSeek-V3 technical report, arXiv:2412.19437, §2.1-2.2 and §3.2):

* a batch of token windows from :class:`dsjax.io.TokenDataset` (FFRecord shards read through the
  batched reader, served by a grain ``MapDataset`` indexed by step, so a resumed run reads exactly
  the batches the uninterrupted one would);
* with ``pp > 1`` (the default mesh is pp=2 x ep=4), the MoE layers are pipeline stages run by a
  DualPipe schedule over the ``pp`` axis (:mod:`dsjax.train.pipeline`), the embedding and dense
  layers before them and the head and MTP loss after them; with ``pp = 1`` the whole model runs
  data-parallel;
* forward with MLA, DeepSeekMoE whose routed experts run through DeepEP dispatch/combine over the
  ``ep`` axis (:mod:`dsjax.nn.ep`), and the depth-1 MTP loss;
* with ``fp8`` (the default; ``--no-fp8`` turns it off), DeepSeek-V3's FP8 mixed precision
  (§3.3): the linears of MLA, the dense MLP, the shared experts and the routed experts (FP8
  grouped GEMMs on each EP rank) run Fprop, Dgrad and Wgrad in FP8 with fine-grained scales,
  data-parallel over the mesh; embedding, head, router and norms stay in float32, as do the
  master weights and the optimizer state;
* AdamW (optax, warmup then constant learning rate, global-norm clipping);
* the auxiliary-loss-free bias update of every MoE layer from the step's observed expert load;
* EPLB (DeepSeek-V3 report §3.4): every MoE layer stores its routed experts in ``E +
  redundant_experts`` physical slots (default: one extra slot per EP rank), each device routes
  its tokens to the replicas of their logical expert (:func:`dsjax.eplb.replica_route` inside the
  EP body), and the replicas' gradients are tied so they stay identical, by one psum over ``ep``
  of only the replicated slots' rows (:func:`dsjax.nn.moe.tie_expert_replica_grads`; the whole
  expert gradients never cross the EP ranks). The logical load goes into a sliding-window
  :class:`dsjax.eplb.ExpertLoadTracker`; every ``rebalance_every`` steps
  :func:`dsjax.train.rebalance.rebalance_model` re-solves the placement with
  :func:`dsjax.eplb.rebalance_experts`, moves the expert weights and their AdamW moments to their
  new slots (collective permutes over ``ep``) and reports the EP-rank imbalance before and after.
  With ``redundant_experts=0`` the placement is only reported.

Checkpoints (orbax) hold the model, optimizer and tracker state; the step function, data order and
shardings do not depend on where a run started, so ``--resume`` reproduces the uninterrupted
losses bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

from dsjax.train import UsageError, checkpoint

PRESETS = ("tiny",)


@dataclasses.dataclass
class TrainConfig:
    """Options of a training run (the CLI flags of ``dsjax train``)."""

    data: str = "data/tokens"
    out: str = "runs/tiny"
    preset: str = "tiny"
    steps: int = 150
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    warmup: int = 10
    weight_decay: float = 0.01
    clip: float = 1.0
    mesh: dict[str, int] = dataclasses.field(default_factory=lambda: {"pp": 2, "dp": 1, "ep": 4})
    schedule: str = "dualpipe"
    microbatches: int = 4
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 50
    rebalance_every: int = 25
    redundant_experts: int | None = None  # EPLB's extra expert slots; None: one per EP rank
    resume: bool = False
    implementation: str = "auto"
    fp8: bool = True
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


def model_config(preset: str, vocab_size: int, seq_len: int, **overrides: Any):
    """The model configuration of a preset, sized to the dataset's vocabulary (``overrides``:
    any other :class:`~dsjax.nn.config.DeepSeekV3Config` fields, e.g. ``n_layers``)."""
    from dsjax.nn.config import DeepSeekV3Config  # pylint: disable=import-outside-toplevel
    if preset != "tiny":
        raise UsageError(f"--preset: expected one of {PRESETS}, got {preset!r}")
    return DeepSeekV3Config.tiny(**{"vocab_size": vocab_size, "max_seq_len": max(256, seq_len),
                                    "original_seq_len": max(256, seq_len), **overrides})


def _check(cfg: TrainConfig) -> None:
    for name in ("steps", "batch_size", "seq_len", "warmup", "log_every", "ckpt_every", "rebalance_every",
                 "microbatches"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            raise UsageError(f"--{name.replace('_', '-')}: expected a positive integer, got {v!r}")
    if not isinstance(cfg.clip, (int, float)) or not cfg.clip > 0:
        raise UsageError(f"clip: expected a positive number (global-norm gradient clipping), got {cfg.clip!r}")
    red = cfg.redundant_experts
    if red is not None and (not isinstance(red, int) or isinstance(red, bool) or red < 0):
        raise UsageError(f"--redundant-experts: expected an integer >= 0, got {red!r}")
    shards = cfg.mesh["dp"] * cfg.mesh["ep"]
    if cfg.batch_size % shards:
        raise UsageError(f"--batch-size {cfg.batch_size} must be a multiple of the {shards} devices "
                         f"of the mesh (dp={cfg.mesh['dp']} x ep={cfg.mesh['ep']})")
    if cfg.mesh.get("pp", 1) > 1 and cfg.batch_size % (shards * cfg.microbatches):
        raise UsageError(f"--batch-size {cfg.batch_size} must be a multiple of --microbatches "
                         f"{cfg.microbatches} x the {shards} devices of dp x ep (pp={cfg.mesh['pp']})")


# Options that change the steps already taken; a resumed run must keep them.
_RESUME_FIXED = ("preset", "batch_size", "seq_len", "lr", "warmup", "weight_decay", "clip", "mesh", "seed",
                 "fp8", "model_overrides", "schedule", "microbatches", "redundant_experts")


# What a run saved before an option existed ran with.
_BEFORE_OPTION = {"fp8": False, "schedule": "dualpipe", "microbatches": 4, "redundant_experts": 0}


def _check_resume(cfg: TrainConfig, conf_path: str, mcfg=None) -> None:
    """Refuses to resume with options that would make the continuation differ from the run, or
    into a model that differs from the checkpoint's (e.g. a preset changed by a dsjax upgrade)."""
    try:
        with open(conf_path) as f:
            saved = json.load(f)
        old = saved["train"]
    except (OSError, ValueError, KeyError):
        raise UsageError(f"--resume: {conf_path} is missing or unreadable") from None
    now = dataclasses.asdict(cfg)
    old = {**_BEFORE_OPTION, **old}
    diff = [f"{k}={old.get(k)!r} (now {now[k]!r})" for k in _RESUME_FIXED if old.get(k) != now[k]]
    if diff:
        raise UsageError("--resume: the run was started with " + ", ".join(diff) + "; resume with the same options")
    if mcfg is not None and "model" in saved:
        model_now = json.loads(json.dumps(dataclasses.asdict(mcfg)))
        changed = [f"{k}={saved['model'].get(k)!r} (now {v!r})" for k, v in model_now.items()
                   if saved["model"].get(k) != v]
        if changed:
            raise UsageError("--resume: the checkpoint's model differs from this run's: " + ", ".join(changed))


def _optimizer(cfg: TrainConfig):
    return _optimizer_for(cfg.lr, cfg.warmup, cfg.weight_decay)


@functools.cache
def _optimizer_for(lr: float, warmup: int, weight_decay: float):
    """AdamW (cached: the transformation is part of the optimizer's static structure, so runs in
    one process with the same settings share the step's compilation). Gradient clipping is done
    by the step itself (:func:`clip_grads`), which counts each logical expert once."""
    import optax  # pylint: disable=import-outside-toplevel
    # Warmup then constant: the schedule does not depend on the total step count, so a run can be
    # extended with --resume --steps N without changing the steps already taken.
    sched = optax.join_schedules([optax.linear_schedule(lr / warmup, lr, warmup),
                                  optax.constant_schedule(lr)], [warmup])
    return optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=weight_decay)


def clip_grads(model, grads, max_norm: float, *, mesh=None):
    """Ties the replica gradients of redundant experts, then clips by the global norm that
    counts every logical expert once (:func:`dsjax.nn.moe.expert_global_norm`; optax's
    ``clip_by_global_norm`` rule). A model with redundant experts thus takes exactly the steps of
    the same model without them. ``mesh``: the layers' expert meshes for the replica tie (a mesh or
    a per-layer mapping, :func:`dsjax.nn.moe.tie_expert_replica_grads`; the pipeline gives its
    own); without it the mesh of the layers' EP function is used, if any."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from dsjax.nn.moe import expert_global_norm, tie_expert_replica_grads  # pylint: disable=import-outside-toplevel

    grads = tie_expert_replica_grads(model, grads, mesh=mesh)
    norm = expert_global_norm(model, grads)
    return jax.tree.map(lambda g: jnp.where(norm < max_norm, g, g / norm.astype(g.dtype) * max_norm), grads)


def _place(tree, mesh, model):
    """Puts a model or optimizer state on the mesh: the routed experts' weights (and their AdamW
    moments) ``[E, ...]`` of ``model``'s MoE layers split over ``ep`` (rank r holds experts
    ``[r·E/R, (r+1)·E/R)``, the layout :mod:`dsjax.nn.ep` computes with), everything else
    replicated."""
    import jax  # pylint: disable=import-outside-toplevel
    from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
    from dsjax.nn.moe import moe_layers, routed_weight_owner  # pylint: disable=import-outside-toplevel

    experts, replicated = NamedSharding(mesh, P("ep")), NamedSharding(mesh, P())
    layers = moe_layers(model)

    def put(path, x):
        routed = routed_weight_owner(path, layers) is not None
        return jax.device_put(x, experts if routed else replicated)

    return jax.tree_util.tree_map_with_path(put, tree)


def train(cfg: TrainConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs (or resumes) a training run; returns its history.

    Args:
        cfg: the run's options. ``cfg.out`` receives ``config.json``, ``checkpoints/``,
            ``metrics.json`` and the PNG plots.
        log: where progress lines go.

    Returns:
        ``{"step": [...], "loss": [...], "lm": [...], "mtp": [...], "imbalance": [...],
        "tokens_per_s": float, "rebalances": [...]}`` for every step of the run so far
        (restored steps included after ``--resume``).

    Raises:
        UsageError: missing/empty dataset, bad sizes, no checkpoint to resume, or an output
            directory that already holds checkpoints without ``resume``.
    """
    _check(cfg)
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel

    from dsjax import eplb  # pylint: disable=import-outside-toplevel
    from dsjax.io import TokenDataset  # pylint: disable=import-outside-toplevel
    from dsjax.nn.ep import use_expert_parallelism  # pylint: disable=import-outside-toplevel
    from dsjax.nn.layers import shard_fp8_linears  # pylint: disable=import-outside-toplevel
    from dsjax.nn.moe import moe_layers  # pylint: disable=import-outside-toplevel
    from dsjax.nn.model import DeepSeekV3  # pylint: disable=import-outside-toplevel
    from dsjax.train.mesh import make_mesh  # pylint: disable=import-outside-toplevel
    from dsjax.train.rebalance import placement, rebalance_model  # pylint: disable=import-outside-toplevel

    if not os.path.exists(os.path.join(cfg.data, "meta.json")):
        raise UsageError(f"--data: no token dataset in {cfg.data} (run: dsjax prepare --out {cfg.data})")
    procs = jax.process_count()
    if cfg.batch_size % procs:
        raise UsageError(f"--batch-size {cfg.batch_size} must be a multiple of the {procs} processes")
    try:
        # Each process reads its own windows (multi-host); one process reads them all.
        tokens = TokenDataset(cfg.data, seq_len=cfg.seq_len, seed=cfg.seed,
                              process_index=jax.process_index(), process_count=procs)
    except ValueError as e:  # too few tokens for one window
        raise UsageError(f"--data {cfg.data}: {e}") from None
    local_batch = cfg.batch_size // procs
    if len(tokens) < local_batch:
        raise UsageError(f"--data {cfg.data}: {len(tokens)} windows of {cfg.seq_len + 1} tokens, fewer "
                         f"than one batch of {local_batch}")
    existing = checkpoint.list_checkpoints(cfg.out)
    if existing and not cfg.resume:
        raise UsageError(f"--out {cfg.out} already holds checkpoints (step {existing[-1][0]}); "
                         "pass --resume to continue it or choose another --out")
    if cfg.resume and not existing:
        raise UsageError(f"--resume: no checkpoint in {checkpoint.checkpoint_dir(cfg.out)}")

    mesh = make_mesh(cfg.mesh)
    red = cfg.mesh["ep"] if cfg.redundant_experts is None else cfg.redundant_experts
    mcfg = model_config(cfg.preset, int(tokens.meta["vocab_size"]), cfg.seq_len,
                        **{"use_fp8": cfg.fp8, "n_redundant_experts": red, **cfg.model_overrides})
    if mcfg.n_routed_experts % cfg.mesh["ep"] or mcfg.n_physical_experts % cfg.mesh["ep"]:
        raise UsageError(f"--mesh: ep={cfg.mesh['ep']} must divide the {mcfg.n_routed_experts} routed "
                         f"experts of the {cfg.preset} preset and their {mcfg.n_physical_experts} "
                         f"slots (--redundant-experts {mcfg.n_redundant_experts})")
    conf_path = os.path.join(cfg.out, "config.json")
    if cfg.resume:
        _check_resume(cfg, conf_path, mcfg)
    os.makedirs(cfg.out, exist_ok=True)
    with open(conf_path, "w") as f:
        json.dump({"model": dataclasses.asdict(mcfg), "train": dataclasses.asdict(cfg)}, f, indent=1)

    model = DeepSeekV3(mcfg, rngs=nnx.Rngs(cfg.seed))
    pipe = None
    if cfg.mesh.get("pp", 1) > 1:
        try:
            pipe = _pipeline(mesh, mcfg, cfg.schedule, cfg.microbatches, cfg.implementation)
        except ValueError as e:  # schedule constraints, layers that do not split into stages
            raise UsageError(f"--mesh pp={cfg.mesh['pp']} --schedule {cfg.schedule} --microbatches "
                             f"{cfg.microbatches}: {e}") from None
        pipe.prepare(model)
        n_moe = len(moe_layers(model))
    else:
        n_moe = use_expert_parallelism(model, mesh, ep_axis="ep", implementation=cfg.implementation)
        # FP8 linears are custom calls that jit would otherwise run on the whole batch on every device.
        shard_fp8_linears(model, mesh, ("dp", "ep"))
    opt = nnx.Optimizer(model, _optimizer(cfg), wrt=nnx.Param)
    # Every array gets the same explicit placement on fresh and resumed runs (restoring takes
    # these arrays as its target): the compiled step, hence every rounding, is then identical.
    nnx.update(model, _place(nnx.state(model), mesh, model))
    nnx.update(opt, _place(nnx.state(opt), mesh, model))
    ep_size, n_experts = cfg.mesh["ep"], mcfg.n_routed_experts
    tracker = _place(eplb.ExpertLoadTracker.create(n_moe, n_experts, window=cfg.rebalance_every), mesh, model)
    history: dict[str, Any] = {"step": [], "loss": [], "lm": [], "mtp": [], "imbalance": [], "rebalances": []}
    start = 0
    if cfg.resume:
        path = existing[-1][1]
        info = checkpoint.read_run_info(path)
        for name, obj in (("model", model), ("opt", opt)):
            state = nnx.state(obj)
            nnx.replace_by_pure_dict(state, checkpoint.restore(path, name, nnx.to_pure_dict(state)))
            nnx.update(obj, state)
        tracker = eplb.ExpertLoadTracker(**checkpoint.restore(path, "extra", _tracker_tree(tracker)))
        history, start = info["history"], int(info["step"])
        log(f"resumed from {path} (step {start})")

    data = tokens.dataset(local_batch, num_epochs=None)
    batch_sharding = NamedSharding(mesh, P(("dp", "ep")))

    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    gemms = "FP8" if mcfg.use_fp8 else mcfg.dtype
    pp = cfg.mesh.get("pp", 1)
    sched = (f", {cfg.schedule} schedule with {cfg.microbatches} micro-batches over {pipe.schedule.num_stages} "
             f"stages of {pipe.per_stage} MoE layers" if pipe else "")
    log(f"training {cfg.preset} DeepSeek-V3 ({n_params / 1e6:.2f}M params, {n_moe} MoE layers x {n_experts} "
        f"experts, {gemms} GEMMs) on mesh pp={pp} x dp={cfg.mesh['dp']} x ep={ep_size} "
        f"({jax.devices()[0].platform}){sched}, batch {cfg.batch_size} x {cfg.seq_len} tokens, "
        f"steps {start + 1}..{cfg.steps}")
    tok_per_step = cfg.batch_size * cfg.seq_len
    n_timed, t_timed = 0, 0.0
    # The placement the EP ranks compute with (None: one slot per expert, rank r holds [r·E/ep, ...)).
    phy2log = placement(model) if mcfg.n_redundant_experts else None
    for step in range(start + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        batch = jax.make_array_from_process_local_data(batch_sharding, np.asarray(data[step - 1]))
        parts, loads = (_pipeline_step(pipe, cfg.clip) if pipe else _train_step(cfg.clip))(model, opt, batch)
        loss = float(parts.total)  # waits for the step
        if step > start + 1:  # a process's first step includes compilation
            n_timed, t_timed = n_timed + 1, t_timed + (time.perf_counter() - t0)
        tracker = tracker.add_counts(loads).advance()
        stats = eplb.balance_stats(loads, phy2log, ep_size)
        history["step"].append(step)
        history["loss"].append(loss)
        history["lm"].append(float(parts.lm))
        history["mtp"].append(float(parts.mtp))
        history["imbalance"].append(float(jnp.mean(stats.imbalance)))
        if not np.isfinite(loss):
            raise FloatingPointError(f"train: loss became {loss} at step {step}")
        if step % cfg.rebalance_every == 0:
            if phy2log is None:
                history["rebalances"].append(_rebalance(tracker, mcfg, ep_size, step, log))
            else:
                history["rebalances"].append(rebalance_model(
                    model, opt, tracker.load(), ep_size=ep_size, step=step, window=tracker.window, log=log))
                phy2log = placement(model)
        if step % cfg.log_every == 0 or step == cfg.steps or step == start + 1:
            speed = f"{tok_per_step * n_timed / t_timed:8.0f} tok/s" if n_timed else "(+ compile)   "
            log(f"step {step:5d}/{cfg.steps}  loss {loss:.4f} (lm {history['lm'][-1]:.4f}, mtp "
                f"{history['mtp'][-1]:.4f})  {speed}  EP imbalance {history['imbalance'][-1]:.3f}")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            history["tokens_per_s"] = tok_per_step * n_timed / t_timed if n_timed else None
            checkpoint.save(cfg.out, step, {
                "model": nnx.to_pure_dict(nnx.state(model)), "opt": nnx.to_pure_dict(nnx.state(opt)),
                "extra": _tracker_tree(tracker)}, {"step": step, "history": history})
    history["tokens_per_s"] = tok_per_step * n_timed / t_timed if n_timed else None
    with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
        json.dump(history, f)
    from dsjax.train import plots  # pylint: disable=import-outside-toplevel
    for p in plots.write_all(history, cfg.out):
        log(f"wrote {p}")
    if pipe is not None:
        log(f"wrote {plots.write_schedule(pipe.schedule, cfg.out)}")
    return history


@functools.cache
def _train_step(clip: float):
    """The jitted step, built once per process: later runs in the same process (tests, notebooks)
    with the same model structure reuse its compilation."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from dsjax.nn.model import lm_loss, update_expert_biases  # pylint: disable=import-outside-toplevel
    from dsjax.nn.moe import moe_layers  # pylint: disable=import-outside-toplevel

    @nnx.jit
    def train_step(model, opt, batch):
        """One AdamW step on batch int32 [B, S + 1]; then the aux-loss-free bias update.
        Returns the loss parts and the expert load int32 [MoE layers, E] of this step."""
        def loss_fn(m):
            parts = lm_loss(m, batch)
            return parts.total, parts
        (_, parts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        # Replicas of a logical expert get its whole gradient, so they stay identical.
        opt.update(model, clip_grads(model, grads, clip))
        loads = jnp.stack([moe.load[...] for _, moe in moe_layers(model)])
        update_expert_biases(model)
        return parts, loads

    return train_step


@functools.cache
def _pipeline(mesh, mcfg, schedule: str, microbatches: int, implementation: str):
    """The run's :class:`~dsjax.train.pipeline.Pipeline` (cached: runs in one process with the same
    settings share its executor and hence the step's compilation)."""
    from dsjax.train.pipeline import Pipeline  # pylint: disable=import-outside-toplevel
    return Pipeline(mesh, mcfg, schedule=schedule, num_microbatches=microbatches, implementation=implementation)


@functools.cache
def _pipeline_step(pipe, clip: float):
    """The jitted pipeline-parallel step (same contract as :func:`_train_step`)."""
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from dsjax.nn.model import update_expert_biases  # pylint: disable=import-outside-toplevel

    @nnx.jit
    def train_step(model, opt, batch):
        parts, grads, stats = pipe.loss_and_grads(model, batch)
        opt.update(model, clip_grads(model, grads, clip, mesh=pipe.expert_meshes(model)))
        pipe.set_loads(model, stats.loads)
        update_expert_biases(model)
        return parts, stats.loads

    return train_step


def _tracker_tree(tracker) -> dict[str, Any]:
    """The tracker's arrays as a plain dict (what orbax stores)."""
    return {"counts": tracker.counts, "cursor": tracker.cursor, "steps": tracker.steps}


def _rebalance(tracker, mcfg, ep_size: int, step: int, log: Callable[[str], None]) -> dict[str, Any]:
    """EPLB over the tracker's window: imbalance of the EP ranks before and after placement."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    from dsjax import eplb  # pylint: disable=import-outside-toplevel
    from dsjax.eplb.online import rank_loads  # pylint: disable=import-outside-toplevel

    load = tracker.load()
    e = load.shape[1]
    res = eplb.rebalance_experts(load, e + ep_size, mcfg.n_expert_groups, 1, ep_size)
    before = eplb.balance_stats(load, None, ep_size)
    after = eplb.balance_stats(load, res.phy2log, ep_size)
    # Per-EP-rank load of every MoE layer, before (expert e on rank e // (E/ep)) and after.
    rec = {"step": step, "imbalance_before": float(np.mean(before.imbalance)),
           "imbalance_after": float(np.mean(after.imbalance)), "replicas": int(res.phy2log.shape[1]),
           "rank_load_before": np.asarray(rank_loads(load, None, ep_size)).tolist(),
           "rank_load_after": np.asarray(rank_loads(load, res.phy2log, ep_size)).tolist(),
           "first_step": max(1, step - tracker.window + 1),
           "layers": [f"layer {mcfg.n_dense_layers + i}" for i in range(mcfg.n_layers - mcfg.n_dense_layers)]
           + (["MTP block"] if mcfg.mtp_depth else [])}
    log(f"eplb  step {step}: EP-rank imbalance over the last {tracker.window} steps "
        f"{rec['imbalance_before']:.3f} -> {rec['imbalance_after']:.3f} with {rec['replicas']} replicas "
        f"on {ep_size} ranks (placement reported, not applied)")
    return rec
