"""``python -m dsjax.bench NAME [--quick] [--json FILE]``."""

from __future__ import annotations

import argparse
import datetime
import platform
import sys

import jax

from dsjax.bench import UNAVAILABLE, available, format_table, run, write_json


def main(argv: list[str] | None = None) -> int:
    names = list(available())
    p = argparse.ArgumentParser(prog="python -m dsjax.bench", description=__doc__)
    p.add_argument("name", help=f"bench to run: all, {', '.join(names)}")
    p.add_argument("--quick", action="store_true", help="small shapes (CPU-sized)")
    p.add_argument("--json", metavar="FILE", help="also write the records as JSON")
    args = p.parse_args(argv)
    if args.name != "all" and args.name not in names:
        p.error(f"unknown bench {args.name!r}; choose one of: all, {', '.join(names)}")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "host": platform.node(),
        "quick": args.quick,
    }
    print(f"# dsjax bench {args.name} | {meta['date']} | jax {meta['jax']} | {meta['backend']} "
          f"({meta['device']}) | quick={args.quick}", flush=True)
    for mod, why in UNAVAILABLE.items():
        print(f"# bench module {mod} unavailable here: {why}", flush=True)
    records = run(args.name, quick=args.quick)
    print(format_table(records))
    if args.json:
        write_json(records, args.json, meta)
        print(f"# wrote {len(records)} records to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
