"""Command line: python -m quantvla <command> ...

  bench kernels   QuantLinear (W8A8, W4A8, W4A4) against fp32/bf16 F.linear, ratios in one run
  bench models    action-chunk latency of pi05 and gr00t-n15 (tiny by default)
  bench libero    naive vs render-on-query LIBERO episodes, side by side
  libero          paired FP / quantized LIBERO episodes, success table and gate verdict
  merge-reports   combine the JSON reports of sharded runs, decide the gates once
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quantvla.io import write_json_atomic


def _bench_kernels(args) -> int:
    import torch

    from quantvla.bench import kernels
    from quantvla.quant.kernels import cpu_kernel_ok

    if args.threads:
        torch.set_num_threads(args.threads)
    ms = tuple(args.m) if args.m else kernels.DEFAULT_M
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, int8 CPU kernel exact: {cpu_kernel_ok()}")
    rows = kernels.run(ms=ms, min_rounds=args.rounds, with_transform=not args.no_transform, device=args.device)
    print(kernels.as_table(rows))
    if args.json:
        write_json_atomic(Path(args.json), {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                            "rows": kernels.as_dicts(rows)})
        print(f"wrote {args.json}")
    return 0


def _bench_models(args) -> int:
    import torch
    from tabulate import tabulate

    from quantvla.bench import models

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = models.run(size=args.size, rounds=args.rounds)
    print(tabulate(rows, headers="keys"))
    if args.json:
        write_json_atomic(Path(args.json), {"torch": torch.__version__, "rows": rows})
    return 0


def _bench_libero(args) -> int:
    from quantvla.bench import libero

    row = libero.run(suite=args.suite, steps=args.steps, rounds=args.rounds)
    if args.json:
        write_json_atomic(Path(args.json), row)
    return 0


def _libero(args) -> int:
    from quantvla.errors import QuantVLAError
    from quantvla.eval import cli

    try:
        suites = [cli.SUITE_NAMES.get(x.strip(), x.strip()) for x in args.suites.split(",") if x.strip()]
        cli.run(args.model, args.size, args.checkpoint, args.quantizer, suites, args.episodes, args.seed,
                args.margin, Path(args.json), max_steps=args.max_steps)
    except QuantVLAError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.json}")
    return 0


def _merge(args) -> int:
    from quantvla.eval import merge

    try:
        return merge.main(args.out, args.reports)
    except (ValueError, OSError, KeyError) as err:
        print(f"error: cannot merge: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantvla", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks, ratios measured side by side in one run")
    bench_sub = bench.add_subparsers(dest="what", required=True)
    k = bench_sub.add_parser("kernels", help="QuantLinear vs F.linear")
    k.add_argument("--m", type=int, nargs="+", help="token counts (default 1 64 512)")
    k.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per shape (default 7)")
    k.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    k.add_argument("--no-transform", action="store_true", help="skip the W4A8+DuQuant row")
    k.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    k.add_argument("--json", help="also write the rows to this JSON file")
    k.set_defaults(func=_bench_kernels)
    mb = bench_sub.add_parser("models", help="action-chunk latency of the model zoo")
    mb.add_argument("--size", default="tiny", choices=["tiny", "full"])
    mb.add_argument("--rounds", type=int, default=15)
    mb.add_argument("--threads", type=int)
    mb.add_argument("--json")
    mb.set_defaults(func=_bench_models)
    lb = bench_sub.add_parser("libero", help="naive vs render-on-query LIBERO episode time (needs the libero extra)")
    lb.add_argument("--suite", default="libero_spatial")
    lb.add_argument("--steps", type=int, default=100)
    lb.add_argument("--rounds", type=int, default=2)
    lb.add_argument("--json")
    lb.set_defaults(func=_bench_libero)
    lib = sub.add_parser("libero", help="paired FP / quantized LIBERO evaluation with the gate verdict")
    lib.add_argument("--model", required=True, choices=["pi05", "gr00t-n15"])
    lib.add_argument("--size", default="tiny", choices=["tiny", "full"])
    lib.add_argument("--checkpoint", help="FP checkpoint (safetensors file or folder)")
    lib.add_argument("--quantizer", default="quantvla-w4a8", help="a preset (default quantvla-w4a8)")
    lib.add_argument("--suites", default="spatial", help="comma-separated: spatial, object, goal, 10")
    lib.add_argument("--episodes", type=int, default=20, help="pairs per suite")
    lib.add_argument("--seed", type=int, default=0)
    lib.add_argument("--margin", type=float, default=0.10)
    lib.add_argument("--max-steps", type=int, help="cap episode length (smoke runs)")
    lib.add_argument("--json", default="libero-report.json")
    lib.set_defaults(func=_libero)
    mr = sub.add_parser("merge-reports", help="merge sharded JSON reports and decide each suite's gate once")
    mr.add_argument("out")
    mr.add_argument("reports", nargs="+")
    mr.set_defaults(func=_merge)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
