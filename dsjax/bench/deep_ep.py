"""Bench of DeepEP dispatch + combine on an 8-rank expert-parallel mesh (8 host CPU devices).

Rows per mode: dsjax with the reference and the FFI local kernels, and two baselines written
with the same XLA collectives: ``naive_per_expert`` (one copy per (token, expert) pair, what a
plain all_to_all MoE sends) and ``all_gather`` (every rank gets every token, results are
reduce-scattered back). Byte columns are per rank and step, counted from what the implementation
actually routed (the handle's send slots), not from a formula:

* ``payload_MB``: rows that hold a token and leave the rank, times the row size (dispatch only);
* ``wire_MB``: the static all_to_all buffers that leave the rank (``transport="all_to_all"``, the
  default: with a static capacity, padding travels too), rows plus their top-k ids and weights;
* ``ragged_wire_MB``: what ``transport="ragged"`` (``ragged_all_to_all``, GPU/TPU only) puts on
  the wire for the same step: exactly the rows that hold a token, with their ids and weights, plus
  the int32 per-destination counts exchanged first (counted from the handle, as payload_MB);
  ``node_wire_MB`` / ``node_ragged_wire_MB``: the same two for the node hop of the two-hop path;
* ``node_copies_per_pair`` (two-hop mode): rows crossing the node axis per distinct
  (token, destination node) pair; 1.0 means one copy per destination node;
* ``bytes_vs_bf16`` (FP8 rows): row bytes (codes + 1x128 scales) relative to bf16 rows of the same
  tokens; ``with_meta_vs_bf16`` counts the top-k ids and weights that travel with each row too.

GB/s = 2 · payload (dispatch and combine) / step time. On CPU devices the collectives are memcpys
between threads, so times are informational; the byte counts are the point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.bench._harness import Record, implementations, record, time_fn

RANKS, NODES = 8, 2
_CHILD_ENV = "DSJAX_DEEP_EP_BENCH_CHILD"


def _impls() -> list[str]:
    return implementations()


def _routing(t: int, k: int, e: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    scores = rng.random((RANKS * t, e))
    idx = np.argsort(-scores, axis=1)[:, :k].astype(np.int32)  # random top-k, distinct experts
    w = rng.random((RANKS * t, k)).astype(np.float32)
    return idx, w


def _mesh(hier: bool):
    from jax.sharding import Mesh
    devs = np.array(jax.devices()[:RANKS])
    return Mesh(devs.reshape(NODES, RANKS // NODES), ("node", "gpu")) if hier else Mesh(devs, ("ep",))


def _put(mesh, *arrays):
    from jax.sharding import NamedSharding, PartitionSpec as P
    spec = P(tuple(mesh.axis_names))
    return [jax.device_put(a, NamedSharding(mesh, spec)) for a in arrays]


def _sm(mesh, fn, n_in):
    from jax.sharding import PartitionSpec as P
    spec = P(tuple(mesh.axis_names))
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * n_in, out_specs=spec))


def _dsjax_step(mesh, e, impl, fp8, hier, cap=None):
    from dsjax import deep_ep
    kw = dict(axis_name="gpu", node_axis_name="node") if hier else dict(axis_name="ep")

    def step(x, idx, w):
        t = idx.shape[0]
        if fp8 is None:  # dispatch + combine
            recv, _, _, _, h = deep_ep.dispatch(x, idx, w, num_experts=e, num_worst_tokens=RANKS * t,
                                                send_capacity=cap, implementation=impl, **kw)
            return deep_ep.combine(recv, h, implementation=impl)
        if fp8:  # dispatch only, FP8 codes + scales on the wire
            from dsjax.deep_gemm import per_token_cast_to_fp8
            x = per_token_cast_to_fp8(x, implementation=impl)
        recv, _, _, _, _ = deep_ep.dispatch(x, idx, w, num_experts=e, num_worst_tokens=RANKS * t,
                                            implementation=impl, **kw)
        return jax.tree.map(lambda a: a[:t], recv)

    def slots(x, idx, w):
        _, _, _, _, h = deep_ep.dispatch(x, idx, w, num_experts=e, num_worst_tokens=RANKS * idx.shape[0],
                                         send_capacity=cap, implementation=impl, **kw)
        return h.send_src[0][None], h.num_dropped[None]

    return _sm(mesh, step, 3), _sm(mesh, slots, 3)


def _baseline_step(mesh, e, kind):
    """Same-collective baselines: one copy per (token, expert) pair, or all-gather EP."""
    from dsjax.deep_ep import _plan, reference
    axis = tuple(mesh.axis_names)
    local = e // RANKS

    def naive(x, idx, w):
        t, k = idx.shape
        pairs = idx.reshape(t * k, 1)
        red, src, _, _, _ = reference.route(pairs, w.reshape(t * k, 1), experts_per_dest=local,
                                            num_dests=RANKS, capacity=t * k, local_ids=True)
        rows = jnp.repeat(x, k, axis=0)
        recv = _plan.exchange(reference.gather_rows(rows, src), axis)
        back = _plan.exchange(recv, axis)
        out = reference.gather_reduce(back, red, None, x.dtype)
        return out.reshape(t, k, -1).sum(axis=1).astype(x.dtype)

    def all_gather(x, idx, w):
        xs = jax.lax.all_gather(x, axis, tiled=True)
        ids = jax.lax.all_gather(idx, axis, tiled=True)
        rank = jax.lax.axis_index(axis)
        mine = ((ids >= rank * local) & (ids < (rank + 1) * local)).any(axis=1)
        y = jnp.where(mine[:, None], xs, 0).astype(x.dtype)
        return jax.lax.psum_scatter(y, axis, tiled=True)

    return _sm(mesh, naive if kind == "naive_per_expert" else all_gather, 3)


def _measured_payload(slots_fn, x, idx, w, t, hier) -> tuple[int, float]:
    """(rows leaving their rank or node, per rank on average) from the handle's first-hop slots."""
    src, dropped = (np.asarray(a) for a in slots_fn(x, idx, w))
    if dropped.any():
        raise RuntimeError(f"deep_ep bench: {int(dropped[0])} token copies were dropped; raise the capacity")
    dests = NODES if hier else RANKS
    cap = src.shape[1] // dests
    total = 0
    for r in range(RANKS):
        own = r // (RANKS // NODES) if hier else r
        for d in range(dests):
            if d != own:
                total += int((src[r, d * cap:(d + 1) * cap] >= 0).sum())
    return total, total / RANKS


def _ragged_wire(rows_per_rank: float, row_bytes: int, dests: int) -> float:
    """MB a ragged exchange sends per rank: the exact rows (with their metadata) + int32 counts."""
    return (rows_per_rank * row_bytes + 4 * (dests - 1)) / 1e6


def _run_all(quick: bool) -> list[Record]:
    t, h, k, e = (64, 1024, 8, 64) if quick else (256, 2048, 8, 64)
    idx, w = _routing(t, k, e)
    x = jax.random.normal(jax.random.PRNGKey(0), (RANKS * t, h), jnp.float32).astype(jnp.bfloat16)
    out: list[Record] = []
    reps = dict(warmup=1, repeats=5 if quick else 9)
    row_bf16 = 2 * h
    row_fp8 = h + 4 * (-(-h // 128))
    local = e // RANKS
    owner = idx // local
    src_rank = np.repeat(np.arange(RANKS), t)
    pair_rows = int(((owner != src_rank[:, None])).sum())  # naive: (token, expert) pairs leaving
    # ---------------- flat: dsjax (reference / FFI) and the two baselines
    mesh = _mesh(False)
    xs, ids, ws = _put(mesh, x, idx, w)
    shape = f"R={RANKS} T={t} H={h} top{k}/{e} bf16"
    for impl in _impls():
        step, slots = _dsjax_step(mesh, e, impl, None, False)
        rows, per_rank = _measured_payload(slots, xs, ids, ws, t, False)
        sec = time_fn(step, xs, ids, ws, **reps)
        pay = per_rank * row_bf16
        out.append(record("deep_ep_dispatch_combine", shape, impl, sec, nbytes=2 * pay,
                          payload_MB=pay / 1e6, wire_MB=(RANKS - 1) * t * (row_bf16 + 8 * k) / 1e6,
                          ragged_wire_MB=_ragged_wire(per_rank, row_bf16 + 8 * k, RANKS)))
    # A send capacity near the expected load (+5 sigma here) shrinks the static buffers; the bench
    # refuses to report a configuration that dropped anything.
    impl = _impls()[-1]
    p = 1 - (1 - 1 / RANKS) ** k
    cap = min(t, int(np.ceil(t * p + 5 * np.sqrt(t * p * (1 - p)))))
    step, slots = _dsjax_step(mesh, e, impl, None, False, cap)
    _, per_rank = _measured_payload(slots, xs, ids, ws, t, False)
    sec = time_fn(step, xs, ids, ws, **reps)
    out.append(record("deep_ep_dispatch_combine", shape, f"{impl} send_capacity={cap}", sec,
                      nbytes=2 * per_rank * row_bf16, payload_MB=per_rank * row_bf16 / 1e6,
                      wire_MB=(RANKS - 1) * cap * (row_bf16 + 8 * k) / 1e6,
                      ragged_wire_MB=_ragged_wire(per_rank, row_bf16 + 8 * k, RANKS)))
    for kind in ("naive_per_expert", "all_gather"):
        sec = time_fn(_baseline_step(mesh, e, kind), xs, ids, ws, **reps)
        if kind == "naive_per_expert":
            pay, wire = pair_rows / RANKS * row_bf16, (RANKS - 1) * t * k * row_bf16
        else:
            pay = wire = (RANKS - 1) * t * row_bf16
        out.append(record("deep_ep_dispatch_combine", shape, kind, sec, nbytes=2 * pay,
                          payload_MB=pay / 1e6, wire_MB=wire / 1e6))
    # ---------------- FP8 vs bf16 dispatch (payload rows are the same tokens; row sizes differ)
    impl = _impls()[-1]
    for fp8 in (False, True):
        step, slots = _dsjax_step(mesh, e, impl, fp8, False)
        _, per_rank = _measured_payload(slots, xs, ids, ws, t, False)
        row = row_fp8 if fp8 else row_bf16
        sec = time_fn(step, xs, ids, ws, **reps)
        meta = 8 * k  # top-k ids (int32) and weights (f32) travel with every row
        out.append(record("deep_ep_fp8_dispatch", f"R={RANKS} T={t} H={h} top{k}/{e}",
                          f"{impl}_{'fp8' if fp8 else 'bf16'}", sec, nbytes=per_rank * row,
                          payload_MB=per_rank * row / 1e6, bytes_vs_bf16=row / row_bf16,
                          with_meta_vs_bf16=(row + meta) / (row_bf16 + meta)))
    # ---------------- two-hop on a 2x4 mesh: copies crossing the node axis
    gpus = RANKS // NODES
    node_of_expert = idx // (local * gpus)
    src_node = src_rank // gpus
    token_node_pairs = sum(len(set(row[row != n])) for row, n in zip(node_of_expert, src_node))
    naive_node = int((node_of_expert != src_node[:, None]).sum())
    hmesh = _mesh(True)
    hx, hi, hw = _put(hmesh, x, idx, w)
    hshape = f"{NODES}x{gpus} T={t} H={h} top{k}/{e} bf16"
    for impl in _impls():
        step, slots = _dsjax_step(hmesh, e, impl, None, True)
        crossing, per_rank = _measured_payload(slots, hx, hi, hw, t, True)
        sec = time_fn(step, hx, hi, hw, **reps)
        out.append(record("deep_ep_hierarchical", hshape, impl, sec, nbytes=2 * per_rank * row_bf16,
                          node_MB=per_rank * row_bf16 / 1e6,
                          node_copies_per_pair=crossing / max(token_node_pairs, 1),
                          node_wire_MB=(NODES - 1) * t * (row_bf16 + 8 * k) / 1e6,
                          node_ragged_wire_MB=_ragged_wire(per_rank, row_bf16 + 8 * k, NODES),
                          naive_node_copies_per_pair=naive_node / max(token_node_pairs, 1)))
    return out


def _local_kernels(quick: bool) -> list[Record]:
    """The local work of one dispatch + combine without the wire, on the default device.

    route -> pack rows into 8 per-destination send buffers -> sum the copies back per token. This
    is what the FFI kernels replace (on a GPU: the CUDA twins), timed against the reference.
    """
    from dsjax.deep_ep import _plan
    gpu = jax.default_backend() == "gpu"
    t, h, k, e = (4096, 7168, 8, 256) if gpu and not quick else ((512, 2048, 8, 64) if not quick else (256, 1024, 8, 64))
    idx, w = _routing(t // RANKS, k, e)  # RANKS * (t / RANKS) = t tokens on this one device
    x = jax.random.normal(jax.random.PRNGKey(1), (t, h), jnp.float32).astype(jnp.bfloat16)
    owner = idx // (e // RANKS)
    copies = sum(len(set(r[r >= 0])) for r in owner)
    nbytes = copies * 2 * h * 4  # pack: read + write a row per copy; combine: read a copy, write once per token
    out = []
    for impl in _impls():
        kern = _plan.kernels(impl)

        def step(x, idx, w, kern=kern):
            red, src, _, _, _ = kern.route(idx, w, experts_per_dest=e // RANKS, num_dests=RANKS, capacity=t,
                                           local_ids=True)
            return kern.gather_reduce(kern.gather_rows(x, src), red, None, x.dtype)

        sec = time_fn(jax.jit(step), x, idx, w, warmup=2, repeats=7 if quick else 11)
        out.append(record("deep_ep_local_kernels", f"T={t} H={h} top{k}/{e} R={RANKS} bf16", impl, sec,
                          nbytes=nbytes))
    return out


def _child(quick: bool) -> None:
    recs = _run_all(quick)
    print("@@RECORDS@@" + json.dumps([r.to_json() for r in recs]))


def run(quick: bool) -> list[Record]:
    """Runs on 8 devices: in a child process with 8 host CPU devices when this one has fewer."""
    local = _local_kernels(quick)
    if len(jax.devices()) >= RANKS or os.environ.get(_CHILD_ENV):
        return local + _run_all(quick)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={RANKS}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env[_CHILD_ENV] = "1"
    code = f"from dsjax.bench import deep_ep; deep_ep._child({bool(quick)})"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("@@RECORDS@@")), None)
    if res.returncode != 0 or line is None:
        raise RuntimeError(f"deep_ep bench child failed (rc={res.returncode}):\n{res.stderr[-4000:]}")
    out = []
    base = {"bench", "shape", "implementation", "median_s", "gbps", "tflops", "vs_reference"}
    for d in json.loads(line[len("@@RECORDS@@"):]):
        out.append(Record(d["bench"], d["shape"], d["implementation"], d["median_s"], d["gbps"], d["tflops"],
                          None, {k: v for k, v in d.items() if k not in base}))
    return local + out


BENCHES = {"deep_ep": run}
