"""The main job from the command line: ``dsjax prepare`` / ``train`` / ``generate``.

* bad input (missing checkpoint, bad mesh shapes, empty or missing datasets) gives one line on
  stderr and exit status 2, no traceback (in-process: an exception would fail the test);
* batched generation of prompts of different lengths through the paged MLA cache equals greedy
  decoding with the full-sequence forward;
* one end-to-end run of the console script in subprocesses: prepare, train 3 steps, generate.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsjax import cli
from dsjax.nn.config import DeepSeekV3Config
from dsjax.nn.model import DeepSeekV3
from dsjax.train import data
from dsjax.train.generate import generate_tokens

SRC = pathlib.Path(data.__file__).parent


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tok") / "d")
    data.prepare(out, input_dir=str(SRC), max_bytes=32 << 10)
    return out


def test_bad_input_is_one_line_error(tmp_path, capsys, tokens):
    cases = [
        (["generate", "--prompt", "x", "--ckpt", str(tmp_path / "nope")], "dsjax generate: error: --ckpt: no training run in"),
        (["train", "--mesh", "dp=2,ep=x"], "--mesh: size of 'ep' must be a positive integer, got 'x'"),
        (["train", "--mesh", "tp=2,ep=4"], "--mesh: unknown axis 'tp'"),
        (["train", "--mesh", "dp=2"], "an 'ep' axis is required"),
        (["train", "--mesh", "dp=2,ep=3", "--batch-size", "6", "--data", tokens, "--out", str(tmp_path / "r")],
         "--mesh: ep=3 must divide the 8 routed experts"),
        (["train", "--batch-size", "12", "--data", tokens],
         "--batch-size 12 must be a multiple of --microbatches 4 x the 4 devices of dp x ep (pp=2)"),
        (["train", "--mesh", "dp=2,ep=4", "--batch-size", "12", "--data", tokens],
         "--batch-size 12 must be a multiple of the 8 devices"),
        (["train", "--mesh", "pp=2,ep=4", "--microbatches", "2", "--data", tokens, "--out", str(tmp_path / "r2")],
         "num_microbatches must be even and >= 2*pp = 4, got 2"),
        (["train", "--data", str(tmp_path / "missing")], "--data: no token dataset in"),
        (["prepare", "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "does not exist"),
        (["prepare", "--out", tokens], "already holds a token dataset"),
        (["generate", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens: expected a positive integer, got 0"),
        (["generate", "--prompt", "x", "--temperature", "-1"], "--temperature: expected >= 0, got -1.0"),
    ]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    cases.append((["prepare", "--input", str(tmp_path / "empty"), "--out", str(tmp_path / "o")], "are all empty"))
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "a.txt").write_text("tiny")
    assert cli.main(["prepare", "--input", str(tmp_path / "small"), "--out", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    cases.append((["train", "--data", str(tmp_path / "s")], "tokens give 0 windows of seq_len=64"))
    for argv, msg in cases:
        assert cli.main(argv) == 2, argv
        assert msg in _err_line(capsys), argv


def test_prepare_default_corpus_is_the_stdlib_in_sorted_order(tmp_path):
    from dsjax.io import BYTE_EOS_ID, TokenDataset

    metas = [data.prepare(str(tmp_path / n), max_bytes=200_000, record_tokens=1024) for n in ("a", "b")]
    assert metas[0]["shards"] == metas[1]["shards"] and metas[0]["num_tokens"] >= 200_000
    files = data.list_documents(data.default_corpus_dir(), suffixes=(".py",))
    first = [f for f in files if os.path.getsize(f) > 0 and pathlib.Path(f).read_bytes().strip()][0]
    want = np.frombuffer(pathlib.Path(first).read_bytes()[:500], np.uint8).astype(np.int32)
    ds = TokenDataset(str(tmp_path / "a"), seq_len=len(want), seed=0, process_index=0, process_count=1)
    stream = ds.reader.read_concat(np.arange(len(ds.reader.lengths)))[0].view(np.uint16)
    np.testing.assert_array_equal(stream[:len(want)], want)
    assert BYTE_EOS_ID in stream and stream.max() == BYTE_EOS_ID  # documents end with EOS


def test_batched_ragged_generation_equals_full_forward_greedy():
    cfg = DeepSeekV3Config.tiny(n_layers=2, vocab_size=257)
    model = DeepSeekV3(cfg, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (3, 9, 5)]
    new = 6
    gen = generate_tokens(model, prompts, max_new_tokens=new, page_block_size=4, implementation="reference")
    assert [len(g) for g in gen] == [new] * 3
    width = max(len(p) for p in prompts) + new
    seqs = np.zeros((3, width), np.int32)
    for i, (p, g) in enumerate(zip(prompts, gen)):
        seqs[i, :len(p) + new] = p + g
    # Causal model: right padding does not change the logits of earlier positions.
    logits = np.asarray(nnx.jit(lambda m, t: m(t).logits)(model, jnp.asarray(seqs)))
    checked = 0
    for i, p in enumerate(prompts):
        for j in range(new):
            row = logits[i, len(p) - 1 + j]
            top2 = np.sort(row)[-2:]
            # Decode and full forward agree to ~2e-4 (test_nn_model); nearer ties may flip.
            if top2[1] - top2[0] > 1e-3:
                assert gen[i][j] == int(row.argmax()), (i, j)
                checked += 1
    assert checked >= 15


def test_end_to_end_console_script(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in sorted(SRC.glob("*.py")):
        (corpus / f.name).write_bytes(f.read_bytes())
    env = dict(os.environ)

    def run(*argv: str) -> str:
        p = subprocess.run([sys.executable, "-m", "dsjax.cli", *argv], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout

    out = run("prepare", "--input", str(corpus), "--out", "tok")
    assert "byte tokens from" in out and (tmp_path / "tok" / "meta.json").exists()
    out = run("train", "--data", "tok", "--out", "run", "--steps", "3", "--batch-size", "16", "--seq-len", "32",
              "--log-every", "1", "--rebalance-every", "100")
    assert "step     3/3" in out and "done: loss" in out, out
    assert "dualpipe schedule with 4 micro-batches" in out, out
    for png in ("loss.png", "pipeline_schedule.png"):
        assert (tmp_path / "run" / png).stat().st_size > 0, png
    assert (tmp_path / "run" / "checkpoints" / "step_00000003" / "run.json").exists()
    out = run("generate", "--ckpt", "run", "--prompt", "def ", "--prompt", "import os\n", "--max-new-tokens", "8")
    assert out.count("=== ") == 2 and "=== 'def '" in out and "=== 'import os\\n'" in out, out
