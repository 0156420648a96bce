"""The ``dsjax`` console script: the project's main job.

``dsjax demo`` reports which implementations can run here and benchmarks the FP8 quantizers
(reference vs CPU/CUDA FFI, same run). ``dsjax bench NAME`` runs any bench.
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
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
