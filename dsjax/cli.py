"""The ``dsjax`` console script: the project's main job.

``dsjax prepare`` writes byte-level token shards (default: the Python standard library's sources),
``dsjax train --preset tiny`` trains a DeepSeek-V3-style model with expert parallelism on 8
simulated CPU devices (or the devices JAX has), ``dsjax generate --prompt ...`` generates from the
checkpoint through the paged MLA cache. ``dsjax demo`` reports which implementations can run here
and benchmarks the FP8 quantizers; ``dsjax bench NAME`` runs any bench.

Bad input (missing dataset or checkpoint, bad mesh shape, empty input) is reported as one line on
stderr with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys


def _demo(args: argparse.Namespace) -> int:
    import jax

    import dsjax
    from dsjax.bench import format_table, run

    print(f"dsjax {dsjax.__version__} on jax {jax.__version__}, backend {jax.default_backend()} "
          f"({len(jax.devices())} devices)")
    print("implementations usable here:")
    print(json.dumps(dsjax.backends(), indent=2))
    for name in ("per_token_cast_to_fp8", "per_block_cast_to_fp8"):
        print(f"\n== {name} (median of timed runs, ratio = reference time / this time)")
        print(format_table(run(name, quick=args.quick)))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from dsjax.bench.__main__ import main as bench_main

    rest = [args.name] + (["--quick"] if args.quick else []) + (["--json", args.json] if args.json else [])
    return bench_main(rest)


def _prepare(args: argparse.Namespace) -> int:
    from dsjax.train.data import prepare

    max_bytes = None if args.max_mb <= 0 else int(args.max_mb * (1 << 20))
    meta = prepare(args.out, input_dir=args.input, max_bytes=max_bytes)
    print(f"wrote {meta['num_tokens']:,} byte tokens from {meta['num_documents']:,} documents of "
          f"{meta['source']} to {args.out} ({len(meta['shards'])} shards)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from dsjax.train.loop import TrainConfig
    from dsjax.train.mesh import ensure_host_devices, parse_mesh

    mesh = parse_mesh(args.mesh)
    if args.platform_cpu_devices:
        # Before JAX creates its CPU backend; an XLA_FLAGS device count of the user's wins.
        ensure_host_devices(max(8, mesh["pp"] * mesh["dp"] * mesh["ep"]))
    if args.coordinator:
        import jax

        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from dsjax.train.loop import train

    cfg = TrainConfig(data=args.data, out=args.out, preset=args.preset, steps=args.steps,
                      batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, mesh=mesh,
                      seed=args.seed, log_every=args.log_every, ckpt_every=args.ckpt_every,
                      rebalance_every=args.rebalance_every, resume=args.resume,
                      implementation=args.implementation, fp8=args.fp8, schedule=args.schedule,
                      microbatches=args.microbatches, redundant_experts=args.redundant_experts)
    hist = train(cfg)
    first, last = hist["loss"][0], hist["loss"][-1]
    print(f"done: loss {first:.3f} (step {hist['step'][0]}) -> {last:.3f} (step {hist['step'][-1]}); "
          f"checkpoints and plots in {args.out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from dsjax.train.generate import generate

    outs = generate(args.ckpt, args.prompt, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, seed=args.seed, implementation=args.implementation)
    for prompt, text in zip(args.prompt, outs):
        print(f"=== {prompt!r}")
        print(prompt + text)
    return 0


def _add_main_job(sub) -> None:
    impls = ("auto", "cuda", "cpu", "reference")
    pr = sub.add_parser("prepare", help="write byte-level token shards (default: the Python stdlib sources)")
    pr.add_argument("--out", default="data/tokens", help="dataset directory (default data/tokens)")
    pr.add_argument("--input", help="directory of your text files (default: the standard library's .py files)")
    pr.add_argument("--max-mb", type=float, default=16.0, help="stop after this many MiB of text (<= 0: all)")
    pr.set_defaults(fn=_prepare)
    t = sub.add_parser("train", help="train a DeepSeek-V3-style model with expert parallelism")
    t.add_argument("--preset", default="tiny", help="model preset (tiny)")
    t.add_argument("--data", default="data/tokens", help="token dataset from dsjax prepare")
    t.add_argument("--out", default="runs/tiny", help="run directory: config, checkpoints, plots")
    t.add_argument("--steps", type=int, default=150, help="train until this step (default 150)")
    t.add_argument("--batch-size", type=int, default=16,
                   help="sequences per step, a multiple of dp*ep (x --microbatches when pp > 1)")
    t.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    t.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate")
    t.add_argument("--mesh", default="pp=2,ep=4",
                   help="mesh shape: pipeline x data-parallel x expert-parallel, e.g. pp=2,ep=4 or dp=2,ep=4")
    t.add_argument("--schedule", default="dualpipe", choices=("dualpipe", "dualpipev", "zb1p", "1f1b", "gpipe"),
                   help="pipeline schedule when pp > 1 (default dualpipe)")
    t.add_argument("--microbatches", type=int, default=4, help="micro-batches per step when pp > 1")
    t.add_argument("--redundant-experts", type=int, default=None,
                   help="EPLB: extra expert slots per MoE layer (default: one per EP rank; 0: no replicas, "
                        "placement only reported)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--ckpt-every", type=int, default=50)
    t.add_argument("--rebalance-every", type=int, default=25, help="EPLB rebalancing period (steps)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--implementation", default="auto", choices=impls, help="DeepEP kernels")
    t.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=True,
                   help="DeepSeek-V3 FP8 recipe: linears and experts as FP8 GEMMs (default on; "
                        "--no-fp8 for float32 GEMMs; a resumed run must keep its setting)")
    t.add_argument("--no-simulated-devices", dest="platform_cpu_devices", action="store_false",
                   help="do not ask XLA:CPU for 8 simulated devices (use the devices JAX finds)")
    t.add_argument("--coordinator", help="multi-host: coordinator address for jax.distributed.initialize")
    t.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    t.add_argument("--process-id", type=int, help="multi-host: this process's id")
    t.set_defaults(fn=_train)
    g = sub.add_parser("generate", help="generate text from a training run's checkpoint")
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    g.add_argument("--ckpt", default="runs/tiny", help="run directory of dsjax train (default runs/tiny)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--implementation", default="auto", choices=impls, help="FlashMLA decode kernels")
    g.set_defaults(fn=_generate)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsjax", description="dsjax: DeepSeek infrastructure for JAX")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="report backends and benchmark the FP8 quantizers")
    d.add_argument("--quick", action="store_true", help="smaller shapes")
    d.set_defaults(fn=_demo)
    b = sub.add_parser("bench", help="run a bench: same as python -m dsjax.bench")
    b.add_argument("name")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--json")
    b.set_defaults(fn=_bench)
    _add_main_job(sub)
    args = p.parse_args(argv)
    from dsjax.train import UsageError

    try:
        return args.fn(args)
    except UsageError as e:
        print(f"dsjax {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
