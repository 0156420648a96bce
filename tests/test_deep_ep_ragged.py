"""DeepEP dispatch / combine with ``transport="ragged"`` (``jax.lax.ragged_all_to_all``).

XLA:CPU does not implement ragged_all_to_all, so on CPU the primitive's call site
(``dsjax.deep_ep._plan.ragged_all_to_all``) is replaced by :func:`emulated_ragged_all_to_all`, a
pure-JAX emulation of the semantics documented for ``jax.lax.ragged_all_to_all`` (input_offsets
and send_sizes index the sender's operand; output_offsets are offsets in the *receiver's* output;
recv_sizes are the sizes the receiver expects), built from all_gather / all_to_all. It poisons
(NaN / int min) every received slice whose recv_size disagrees with the sender's send_size or
that would read or write out of range, so a wrong size or offset shows up as a mismatch. The
emulator itself is checked against the example in the JAX docstring.

With the emulator, every output (dispatch's arrays, the handle's counts, both combine forms, and
the gradients) must equal the all_to_all transport's bit for bit: both transports move the same
rows into the same static receive buffers. On CPU without the emulator, transport="ragged" raises
a ValueError naming ``transport`` before any collective is traced. The ``gpu`` test runs the real
primitive against the all_to_all transport.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsjax import deep_ep
from dsjax.deep_ep import _plan

R, T, H, K, E = 8, 8, 128, 4, 16
L = E // R
CALLS: list[tuple] = []


def _poison(dtype):
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.array(jnp.iinfo(dtype).min, dtype)
    return jnp.array(jnp.nan, dtype)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name, axis_index_groups=None):
    """``jax.lax.ragged_all_to_all`` from its documented semantics, one slice per peer."""
    assert axis_index_groups is None
    d = jax.lax.axis_size(axis_name)
    assert input_offsets.shape == send_sizes.shape == output_offsets.shape == recv_sizes.shape == (d,)
    CALLS.append((operand.shape, operand.dtype))
    a2a = functools.partial(jax.lax.all_to_all, axis_name=axis_name, split_axis=0, concat_axis=0, tiled=True)
    ops = jax.lax.all_gather(operand, axis_name)  # [D, M, ...]: every sender's operand
    in_off, sent, out_off = a2a(input_offsets), a2a(send_sizes), a2a(output_offsets)  # [s]: sender s's value for me
    m, n_out = operand.shape[0], output.shape[0]
    rows = jnp.arange(n_out)
    bshape = (n_out,) + (1,) * (output.ndim - 1)
    result = output
    for s in range(d):
        size = jnp.maximum(sent[s], recv_sizes[s])
        sel = (rows >= out_off[s]) & (rows < out_off[s] + size)
        src = in_off[s] + rows - out_off[s]
        bad = ((sent[s] != recv_sizes[s]) | (in_off[s] < 0) | (in_off[s] + sent[s] > m) | (out_off[s] < 0)
               | (out_off[s] + size > n_out))
        vals = jnp.where(bad, _poison(output.dtype), ops[s][jnp.clip(src, 0, max(m - 1, 0))])
        result = jnp.where(sel.reshape(bshape), vals, result)
    return result


@pytest.fixture
def emulated(monkeypatch):
    """Runs the ragged transport on CPU: the emulator at the call site, the backend check off."""
    monkeypatch.setattr(_plan, "ragged_all_to_all", emulated_ragged_all_to_all)
    monkeypatch.setattr(_plan, "check_ragged_backend", lambda op: None)
    CALLS.clear()
    return CALLS


def test_emulator_matches_the_documented_example(emulated):
    mesh = Mesh(np.array(jax.devices()[:2]), ("a",))
    args = dict(operand=[[1, 2, 2], [3, 4, 0]], output=[[0] * 4] * 2, input_offsets=[[0, 1], [0, 1]],
                send_sizes=[[1, 2], [1, 1]], output_offsets=[[0, 0], [1, 2]], recv_sizes=[[1, 1], [2, 1]])
    arrays = [jnp.asarray(np.array(v, np.int32).reshape(-1)) for v in args.values()]

    def local(*a):
        return emulated_ragged_all_to_all(*a, axis_name="a")

    got = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("a"),) * 6, out_specs=P("a")))(*arrays)
    np.testing.assert_array_equal(np.asarray(got).reshape(2, 4), [[1, 3, 0, 0], [2, 2, 4, 0]])


def _data():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((R * T, H)).astype(np.float32)
    idx = np.array([rng.choice(E, K, replace=False) for _ in range(R * T)], np.int32)
    idx[rng.random(idx.shape) < 0.25] = -1
    idx[::T] = -1                  # tokens with no expert
    idx[1::T, :2] = idx[1::T, :1]  # an expert listed twice
    idx[2] = [0, 1, -1, -1]        # all on rank 0 (remote for every source but rank 0)
    w = rng.random((R * T, K)).astype(np.float32)
    return x, idx, w


X, IDX, W = _data()
PROBE = np.random.default_rng(8).standard_normal((R * T, H)).astype(np.float32)


def _program(mesh, impl: str, hier: bool, **kw):
    """dispatch + both combine forms with each transport, and their gradients, in one program.

    Returns ``(outs, grads)``: ``outs[i]`` a dict of the arrays of transport i (all_to_all, ragged),
    ``grads[i]`` the gradients (x, topk_weights) of ``<PROBE, out3 + plain>`` of transport i.
    """
    axes = tuple(mesh.axis_names)
    ax = dict(axis_name="gpu", node_axis_name="node") if hier else dict(axis_name=axes)
    local_experts = E // mesh.size

    def local(x, idx, w):
        rank = jax.lax.axis_index(axes)
        outs = []
        for transport in ("all_to_all", "ragged"):
            rx, ridx, rw, cnt, h = deep_ep.dispatch(x, idx, w, num_experts=E, num_worst_tokens=X.shape[0],
                                                    transport=transport, implementation=impl, **ax, **kw)
            # per-slot expert outputs; slots without a local expert hold NaN (never read)
            slots = jnp.stack([jnp.where((ridx[:, k] >= 0)[:, None],
                                         jnp.tanh(rx * (1.0 + ridx[:, k:k + 1] + rank * local_experts)), jnp.nan)
                               for k in range(K)], axis=1)
            out3 = deep_ep.combine(slots, h, topk_weights=rw, implementation=impl)
            plain, cw = deep_ep.combine(rx * 2.0, h, topk_weights=rw, implementation=impl)
            counts = (jnp.concatenate(h.send_counts + h.recv_counts) if transport == "ragged"
                      else jnp.zeros(0, jnp.int32))
            outs.append(dict(rx=rx, ridx=ridx, rw=rw, cnt=cnt, out3=out3, plain=plain, cw=cw,
                             dropped=h.num_dropped[None], counts=counts))
        return outs

    spec = P(axes)
    sm = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)

    @jax.jit
    def fn(x, idx, w):
        outs, pull = jax.vjp(lambda x, w: sm(x, idx, w), x, w)
        grads = []
        for which in range(2):
            ct = jax.tree.map(lambda o: (np.zeros(o.shape, jax.dtypes.float0) if o.dtype == jnp.int32
                                         else jnp.zeros_like(o)), outs)
            ct[which]["out3"] = ct[which]["plain"] = jnp.asarray(PROBE)
            grads.append(pull(ct))
        return outs, grads

    devs = [jax.device_put(a, NamedSharding(mesh, spec)) for a in (X, IDX, W)]
    return jax.tree.map(np.asarray, fn(*devs))


def _check_equal(outs, grads):
    """The ragged transport's arrays and gradients are the all_to_all transport's, bit for bit."""
    a2a, rag = outs
    for name in a2a:
        if name != "counts":
            np.testing.assert_array_equal(rag[name], a2a[name], err_msg=name)
    for ga, gr in zip(*grads):
        np.testing.assert_array_equal(gr, ga)
    assert np.isfinite(rag["out3"]).all() and all(np.isfinite(g).all() for g in grads[1])
    assert np.abs(grads[1][1]).sum() > 0  # the weights do get a gradient


def test_ragged_equals_all_to_all_flat(emulated):
    # The transport lives in dsjax.deep_ep._plan, shared by every implementation of the local
    # kernels, so one implementation (the CPU FFI) covers it.
    impl = "cpu"
    mesh = Mesh(np.array(jax.devices()[:R]), ("ep",))
    outs, grads = _program(mesh, impl, False, send_capacity=2)  # < T: some copies are dropped
    _check_equal(outs, grads)
    assert outs[0]["dropped"][0] > 0
    send, recv = outs[1]["counts"].reshape(R, 2, R).transpose(1, 0, 2)
    np.testing.assert_array_equal(recv, send.T)  # what s sends d is what d receives from s
    for s in range(R):
        toks = IDX[s * T:(s + 1) * T]
        want = [min(2, int(((toks >= 0) & (toks // L == d)).any(1).sum())) for d in range(R)]
        np.testing.assert_array_equal(send[s], want)
    assert len(emulated) >= 2  # the ragged path really went through the primitive's call site


def test_ragged_equals_all_to_all_two_hop(emulated):
    mesh = Mesh(np.array(jax.devices()[:R]).reshape(2, 4), ("node", "gpu"))
    outs, grads = _program(mesh, "cpu", True, send_capacity=4, forward_capacity=5)
    _check_equal(outs, grads)
    assert outs[0]["dropped"][0] > 0
    counts = outs[1]["counts"].reshape(R, -1)  # per rank: send node hop [2], send gpu hop [4], recv ...
    node_send = counts[:, :2]
    for s in range(R):
        toks = IDX[s * T:(s + 1) * T]
        want = [min(4, int(((toks >= 0) & (toks // (L * 4) == nd)).any(1).sum())) for nd in range(2)]
        np.testing.assert_array_equal(node_send[s], want)
    assert {shape[0] for shape, _ in emulated} >= {2 * 4, 4 * 5}  # both hops used the ragged exchange


def test_ragged_on_cpu_raises_before_any_collective(monkeypatch):
    mesh = Mesh(np.array(jax.devices()[:R]), ("ep",))

    def boom(*a, **k):
        raise AssertionError("a collective was traced before the transport check")

    monkeypatch.setattr(_plan, "exchange", boom)
    monkeypatch.setattr(jax.lax, "all_to_all", boom)

    def local(x, idx, w):
        return deep_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep", num_worst_tokens=R * T,
                                transport="ragged", implementation="cpu")[0]

    f = jax.shard_map(local, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep"))
    with pytest.raises(ValueError, match=r"transport='ragged'.*'cpu'.*UNIMPLEMENTED"):
        jax.jit(f).lower(X, IDX, W)
    bad = functools.partial(deep_ep.dispatch, num_experts=E, axis_name="ep", num_worst_tokens=R * T,
                            transport="ragged_all_to_all", implementation="cpu")
    with pytest.raises(ValueError, match=r"transport must be one of .*'ragged_all_to_all'"):
        jax.jit(jax.shard_map(lambda *a: bad(*a)[0], mesh=mesh, in_specs=(P("ep"),) * 3,
                              out_specs=P("ep"))).lower(X, IDX, W)


@pytest.mark.gpu
def test_ragged_primitive_on_gpu_equals_all_to_all():
    """The real ragged_all_to_all (every visible GPU is one EP rank) against the all_to_all transport:
    bf16/f32 rows, both combine forms and the gradients; FP8 rows; the two-hop path on >= 8 GPUs."""
    devs = jax.devices("gpu")
    n = max(d for d in (1, 2, 4, 8) if d <= len(devs))
    with jax.default_device(devs[0]):
        outs, grads = _program(Mesh(np.array(devs[:n]), ("ep",)), "cuda", False, send_capacity=2)
        _check_equal(outs, grads)
        mesh = Mesh(np.array(devs[:n]), ("ep",))

        def fp8(q, s, idx, w):
            kw = dict(num_experts=E, axis_name="ep", num_worst_tokens=X.shape[0], implementation="cuda")
            return [deep_ep.dispatch((q, s), idx, w, transport=t, **kw)[0] for t in ("all_to_all", "ragged")]
        from dsjax.deep_gemm import per_token_cast_to_fp8
        q, s = per_token_cast_to_fp8(jnp.asarray(X, jnp.bfloat16), implementation="reference")
        (aq, as_), (rq, rs) = jax.tree.map(np.asarray, jax.jit(jax.shard_map(
            fp8, mesh=mesh, in_specs=(P("ep"),) * 4, out_specs=P("ep")))(q, s, IDX, W))
        np.testing.assert_array_equal(rq.view(np.uint8), aq.view(np.uint8))
        np.testing.assert_array_equal(rs, as_)
        if len(devs) >= 8:
            hmesh = Mesh(np.array(devs[:8]).reshape(2, 4), ("node", "gpu"))
            _check_equal(*_program(hmesh, "cuda", True, send_capacity=4, forward_capacity=5))


@pytest.mark.parametrize("hier", [False, True], ids=["flat8", "hier2x4"])
def test_real_primitive_accepts_the_arguments(monkeypatch, hier):
    """Lowers (does not run: XLA:CPU has no ragged_all_to_all thunk) dispatch + both combines and
    their gradients with the real primitive, so its shape / dtype rules check our offsets and sizes."""
    monkeypatch.setattr(_plan, "check_ragged_backend", lambda op: None)
    devs = np.array(jax.devices()[:R])
    mesh = Mesh(devs.reshape(2, 4), ("node", "gpu")) if hier else Mesh(devs, ("ep",))
    axes = tuple(mesh.axis_names)
    ax = dict(axis_name="gpu", node_axis_name="node") if hier else dict(axis_name=axes)

    def local(x, idx, w):
        rx, ridx, rw, _, h = deep_ep.dispatch(x.astype(jnp.bfloat16), idx, w, num_experts=E, num_worst_tokens=R * T,
                                              transport="ragged", implementation="cpu", **ax)
        slots = jnp.broadcast_to(rx[:, None], (R * T, K, H))
        return (deep_ep.combine(slots, h, topk_weights=rw, implementation="cpu").astype(jnp.float32)
                + deep_ep.combine(rx, h, implementation="cpu"))

    f = jax.shard_map(local, mesh=mesh, in_specs=(P(axes),) * 3, out_specs=P(axes))
    hlo = jax.jit(jax.grad(lambda x, w: f(x, IDX, w).sum(), argnums=(0, 1))).lower(X, W).as_text()
    # dispatch: ids, weights, rows per hop; combine: rows per hop (x2 forms); backward: as many again
    assert hlo.count("ragged_all_to_all") >= (2 if hier else 1) * 4
