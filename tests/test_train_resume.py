"""dsjax.train: a run resumed from its orbax checkpoint reproduces the uninterrupted run exactly
(6 steps vs 3 + resume to 6: identical losses, bit for bit; FP8 by default, float32 too), and
the run's files are complete.

Runs in-process on the 8 host devices of the test session (mesh dp=2 x ep=4), with a 2-layer
tiny model to keep compilation short; all three runs share one compiled step.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

from dsjax.nn.moe import moe_layers
from dsjax.train import UsageError, checkpoint, data, loop
from test_train_rebalance import assert_step_collectives

SRC = pathlib.Path(data.__file__).parent  # dsjax/train: a few kB of text, always present


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tokens"))
    meta = data.prepare(out, input_dir=str(SRC), max_bytes=64 << 10)
    assert meta["num_tokens"] > 20_000 and meta["vocab_size"] == 257
    return out


def _cfg(tokens: str, out: str, steps: int, resume: bool = False) -> loop.TrainConfig:
    # the default mesh pp=2 x ep=4 with DualPipe: 4 micro-batches of 4 rows, 1 MoE layer per stage
    return loop.TrainConfig(data=tokens, out=out, steps=steps, batch_size=16, seq_len=32, log_every=1,
                            ckpt_every=100, rebalance_every=2, resume=resume, implementation="cpu",
                            model_overrides={"n_layers": 3})


def test_resume_gives_identical_losses(tokens, tmp_path, monkeypatch):
    logs: list[str] = []
    steps = []  # (the loop's jitted pipeline step, its first call's arguments)
    make_step = loop._pipeline_step

    def capture(pipe, clip):
        step = make_step(pipe, clip)

        def run(*args):
            if not steps:
                steps.append((step, args))
            return step(*args)
        return run

    monkeypatch.setattr(loop, "_pipeline_step", capture)
    full = loop.train(_cfg(tokens, str(tmp_path / "a"), 6), log=logs.append)
    # The run's model (updated in place): replicas stayed bit-identical through 6 steps and 3
    # rebalances, their gradients tied by the sharded form inside the compiled step.
    step, (model, opt, batch) = steps[0]
    for _, moe in moe_layers(model):
        phy = np.asarray(moe.phy2log[...])
        for w in (moe.w1, moe.w3, moe.w2):
            arr = np.asarray(w[...])
            for e in range(moe.cfg.n_routed_experts):
                assert (arr[phy == e] == arr[phy == e][0]).all(), e
    # Compiled already (cached): all 3 MoE layers (the stages' 2 and the MTP block's, whose routed
    # weights the executor takes as loss parameters split over ep) tie by a [K, ...] psum per
    # weight, and no whole [P, ...] expert array is gathered into the executor or its gradient
    # all-reduced out of it (the MTP block's were, 3 of each, while the loss parameters were
    # replicated).
    cfg = moe_layers(model)[0][1].cfg
    assert_step_collectives(step.lower(model, opt, batch).compile().as_text(),
                            slots=cfg.n_physical_experts, experts=cfg.n_routed_experts, dim=cfg.dim,
                            inter=cfg.moe_inter_dim, layers=3)
    part = loop.train(_cfg(tokens, str(tmp_path / "b"), 3), log=logs.append)
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path / "b"))] == [3]
    changed = _cfg(tokens, str(tmp_path / "b"), 6, resume=True)
    changed.batch_size = 32
    with pytest.raises(UsageError, match=r"--resume: the run was started with batch_size=16 \(now 32\)"):
        loop.train(changed)
    resumed = loop.train(_cfg(tokens, str(tmp_path / "b"), 6, resume=True), log=logs.append)
    assert part["loss"] == full["loss"][:3]
    for key in ("step", "loss", "lm", "mtp", "imbalance"):
        assert resumed[key] == full[key], key  # exact: same program, same data, same state
    assert any(line.startswith("resumed from") for line in logs)
    assert len(full["rebalances"]) == 3 and all(r["replicas"] == 8 + 4 for r in full["rebalances"])
    # The EPLB placement never makes the EP ranks less balanced than the identity placement.
    assert all(r["imbalance_after"] <= r["imbalance_before"] + 1e-6 for r in full["rebalances"])
    assert np.isfinite(full["loss"]).all() and full["loss"][-1] < full["loss"][0]
    run = tmp_path / "a"
    for name in ("config.json", "metrics.json", "loss.png", "expert_load.png"):
        assert (run / name).stat().st_size > 0, name
    with open(run / "metrics.json") as f:
        assert json.load(f)["loss"] == full["loss"]
    # A checkpoint of another model (e.g. a preset changed since) is refused in one line.
    with open(run / "config.json") as f:
        saved = json.load(f)
    saved["model"]["n_layers"] = 4
    with open(run / "config.json", "w") as f:
        json.dump(saved, f)
    with pytest.raises(UsageError, match=r"--resume: the checkpoint's model differs from this run's: n_layers=4 \(now 3\)"):
        loop.train(_cfg(tokens, str(run), 7, resume=True))


def test_resume_and_overwrite_are_refused(tokens, tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(UsageError, match="--resume: no checkpoint in"):
        loop.train(_cfg(tokens, out, 2, resume=True))
    os.makedirs(os.path.join(out, "checkpoints", "step_00000002"))
    with open(os.path.join(out, "checkpoints", "step_00000002", "run.json"), "w") as f:
        f.write("{}")
    with pytest.raises(UsageError, match=r"already holds checkpoints \(step 2\); pass --resume"):
        loop.train(_cfg(tokens, out, 2))


def test_precision_is_part_of_the_run(tokens, tmp_path):
    """``fp8`` (``dsjax train --fp8/--no-fp8``, on by default, so the test above resumes an FP8
    run) reaches the model through config.json, a resume must keep it, a float32 run resumes
    bit for bit too, and a run saved before the option existed counts as float32."""
    def cfg(out, steps, resume=False, fp8=False):
        c = _cfg(tokens, str(tmp_path / out), steps, resume)
        c.fp8, c.rebalance_every = fp8, 100
        return c

    assert loop.TrainConfig().fp8 is True
    full = loop.train(cfg("a", 4), log=lambda _: None)
    loop.train(cfg("b", 2), log=lambda _: None)
    conf_path = tmp_path / "b" / "config.json"
    with open(conf_path) as f:
        conf = json.load(f)
    assert conf["train"]["fp8"] is False and conf["model"]["use_fp8"] is False
    with pytest.raises(UsageError, match=r"--resume: the run was started with fp8=False \(now True\)"):
        loop.train(cfg("b", 4, resume=True, fp8=True))
    del conf["train"]["fp8"]  # as written before the option existed
    with open(conf_path, "w") as f:
        json.dump(conf, f)
    resumed = loop.train(cfg("b", 4, resume=True), log=lambda _: None)
    assert resumed["loss"] == full["loss"] and np.isfinite(full["loss"]).all()
