"""DualPipe bench: simulated bubbles from measured op times, and the executor's step time.

``python -m dsjax.bench dualpipe [--quick]``:

* ``dualpipe_ops``: per-op times (F, B, W, BI, F&B) of one pipeline stage (a 2-layer MLP chunk)
  measured on this machine with jit.
* ``dualpipe_sim``: each schedule simulated at (pp=8, n=20) and (pp=16, n=64) with those times;
  ``median_us`` is the simulated step time, ``bubble_ratio`` the idle fraction of the pipeline.
  DualPipeV cuts the model into 2·pp chunks, so it is simulated with half the chunk times.
* ``dualpipe_exec``: step time of :class:`dsjax.dualpipe.DualPipe` on 8 host CPU devices per schedule
  (informational: the 8 "devices" share this machine's cores, so the pipeline cannot overlap work
  the way separate accelerators do), against ``reference`` = the same training step run
  sequentially (one jitted ``value_and_grad`` on one device).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from dsjax.bench._harness import Record, record, time_fn


def _mlp_stage(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"] + x


def _loss(y, lbl):
    return jnp.mean((y - lbl) ** 2)


def _stage_params(key, d: int, scale: float = 0.05):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (d, 4 * d)) * scale, "w2": jax.random.normal(k2, (4 * d, d)) * scale}


def measure_op_times(rows: int, d: int) -> dict[str, float]:
    """Median seconds of F, B (full), BI, W and an F&B pair for one MLP stage of width ``d``."""
    p = _stage_params(jax.random.PRNGKey(0), d)
    x = jax.random.normal(jax.random.PRNGKey(1), (rows, d))
    dy = jnp.ones((rows, d))

    fwd = jax.jit(_mlp_stage)

    @jax.jit
    def full_b(p, x, dy):
        return jax.vjp(_mlp_stage, p, x)[1](dy)

    @jax.jit
    def input_b(p, x, dy):
        return jax.vjp(lambda x_: _mlp_stage(p, x_), x)[1](dy)

    @jax.jit
    def weight_b(p, x, dy):
        return jax.vjp(lambda p_: _mlp_stage(p_, x), p)[1](dy)

    @jax.jit
    def fb(p, x, x2, dy):
        return _mlp_stage(p, x), jax.vjp(_mlp_stage, p, x2)[1](dy)

    # The backward timings include recomputing the forward inside the VJP; subtract it so B, BI
    # and W are the backward-only costs the schedules' formulas assume.
    f = time_fn(fwd, p, x, repeats=15)
    t = {"F": f, "B": time_fn(full_b, p, x, dy, repeats=15) - f,
         "BI": time_fn(input_b, p, x, dy, repeats=15) - f, "W": time_fn(weight_b, p, x, dy, repeats=15) - f,
         "FB": time_fn(fb, p, x, x, dy, repeats=15) - f}
    t = {k: max(v, 1e-9) for k, v in t.items()}
    t["W"] = min(t["W"], t["B"])
    return t


def _sim_records(times: dict[str, float], shapes: list[tuple[int, int]]) -> list[Record]:
    from dsjax.dualpipe import SCHEDULES, simulate

    out = []
    F, B, W, FB, BI = times["F"], times["B"], times["W"], times["FB"], times["BI"]
    for pp, n in shapes:
        for name, gen in SCHEDULES.items():
            half = 0.5 if name == "dualpipev" else 1.0  # 2·pp chunks of half the size
            tl = simulate(gen(pp, n), F=F * half, B=B * half, W=W * half, FB=FB * half, BI=BI * half)
            out.append(record("dualpipe_sim", f"pp={pp},n={n}", name, tl.total, bubble_ratio=tl.bubble_ratio,
                              bubble_us=tl.max_bubble * 1e6, activations=max(tl.peak_activations),
                              stages_per_rank=max(tl.parameters)))
    return out


def _exec_worker(quick: bool) -> list[dict]:
    """Runs in a process with 8 host devices; returns records as dicts."""
    import numpy as np
    from jax.sharding import Mesh

    from dsjax.dualpipe import DualPipe, SCHEDULES

    pp = 8
    n = 16 if quick else 32
    rows, d = (32, 64) if quick else (128, 256)
    mesh = Mesh(np.array(jax.devices()[:pp]), ("pp",))
    x = jax.random.normal(jax.random.PRNGKey(1), (n, rows, d))
    lbl = jax.random.normal(jax.random.PRNGKey(2), (n, rows, d))
    recs = []
    shape = f"pp={pp},n={n},rows={rows},d={d}"
    for name, gen in SCHEDULES.items():
        sched = gen(pp, n)
        S = sched.num_stages
        params = [_stage_params(k, d) for k in jax.random.split(jax.random.PRNGKey(0), S)]
        if name == "1f1b":  # the sequential baseline, same (pp-stage) model as the linear schedules
            def total(params):
                def one(xm, lm):
                    y = xm
                    for p in params:
                        y = _mlp_stage(p, y)
                    return _loss(y, lm)
                return jax.vmap(one)(x, lbl).sum()
            ref = jax.jit(jax.value_and_grad(total))
            recs.append(record("dualpipe_exec", shape, "reference", time_fn(ref, params, repeats=5)).to_json())
        ex = DualPipe(_mlp_stage, _loss, schedule=sched, mesh=mesh)
        t = time_fn(lambda p: ex.step(p, x, lbl), params, repeats=5)
        # DualPipeV runs a 2·pp-stage model: its own shape row, no sequential baseline to compare
        recs.append(record("dualpipe_exec", shape + (f",stages={S}" if S != pp else ""), name, t,
                           ticks=ex.plan(True).ticks).to_json())
    return recs


def _exec_records(quick: bool) -> list[Record]:
    if len(jax.devices()) >= 8 and jax.default_backend() == "cpu":
        raw = _exec_worker(quick)
    else:  # the host-device count is fixed at JAX start-up: run in a child process
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
        env["JAX_PLATFORMS"] = "cpu"
        code = ("import json, sys; from dsjax.bench.dualpipe import _exec_worker; "
                f"print('@@' + json.dumps(_exec_worker({quick!r})))")
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"dualpipe executor bench failed:\n{proc.stderr[-3000:]}")
        raw = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("@@"))[2:])
    out = []
    for r in raw:
        extra = {k: v for k, v in r.items() if k not in ("bench", "shape", "implementation", "median_s",
                                                          "gbps", "tflops", "vs_reference")}
        out.append(record(r["bench"], r["shape"], r["implementation"], r["median_s"], **extra))
    return out


def run(quick: bool) -> list[Record]:
    rows, d = (128, 256) if quick else (512, 1024)
    times = measure_op_times(rows, d)
    recs = [record("dualpipe_ops", f"rows={rows},d={d}", k, v) for k, v in times.items()]
    recs += _sim_records(times, [(8, 20), (16, 64)])
    recs += _exec_records(quick)
    return recs


BENCHES = {"dualpipe": run}
