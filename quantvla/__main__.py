"""Command line: python -m quantvla <command> ...

  bench kernels   QuantLinear (W8A8, W8A8 prepacked, W4A8, W4A4) against fp32/bf16 F.linear, ratios in one run
  bench models    FP vs quantized action-chunk latency, calibration time, component memory
  bench libero    naive vs render-on-query LIBERO episodes, side by side
  libero          paired FP / quantized LIBERO episodes, success table and gate verdict
  merge-reports   combine the JSON reports of sharded runs, decide the gates once
  expert          the scripted privileged-state expert's success on the official init states
  demos           expert demonstrations from randomized resets (optionally with camera frames)
  train-tiny      behaviour-clone a small state-based policy (flow matching) into a policy folder
  quantize        quantize a model (a trained policy, or a checkpoint) and write the artifact, with its memory
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from quantvla.errors import QuantVLAError
from quantvla.io import write_json_atomic

# model sizes: the shipped trained policies (quantvla.families.TRAINED; not imported here, it pulls in
# torch) and the random-weight configs
_SIZES = ["trained", "trained-state", "tiny", "full"]


def _bench_kernels(args) -> int:
    import torch

    from quantvla.bench import kernels
    from quantvla.quant.kernels import cpu_gemm, cpu_kernel_ok, onednn_unavailable_reason, set_cpu_gemm

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_gemm != "auto":
        set_cpu_gemm(args.cpu_gemm)
    ms = tuple(args.m) if args.m else kernels.DEFAULT_M
    onednn = onednn_unavailable_reason() or "ok"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu GEMM {cpu_gemm()} "
          f"({'chosen by hand' if args.cpu_gemm != 'auto' else 'from the instruction set'}), exact: {cpu_kernel_ok()}, "
          f"prepacked oneDNN path: {onednn}")
    rows = kernels.run(ms=ms, min_rounds=args.rounds, with_transform=not args.no_transform, device=args.device)
    print(kernels.as_table(rows))
    if args.json:
        write_json_atomic(Path(args.json), {"command": _command(), "torch": torch.__version__,
                                            "threads": torch.get_num_threads(), "rows": kernels.as_dicts(rows)})
        print(f"wrote {args.json}" + _png_note(kernels.plot(rows, Path(args.json).with_suffix(".png")), args.json))
    return 0


def _command() -> str:
    return "python -m quantvla " + " ".join(sys.argv[1:])


def _png_note(written: bool, json_path: str) -> str:
    png = Path(json_path).with_suffix(".png")
    return f" and {png}" if written else " (no PNG: matplotlib is not installed; pip install matplotlib)"


def _bench_models(args) -> int:
    import torch
    from tabulate import tabulate

    from quantvla.bench import models

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_gemm != "auto":
        from quantvla.quant.kernels import set_cpu_gemm
        set_cpu_gemm(args.cpu_gemm)
    from quantvla.presets import preset

    preset(args.quantizer)  # an unknown name is a clear error before anything is built
    families = args.model  # None: every registered family
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size} models, FP {args.dtype} on "
          f"{args.device}, {args.quantizer}, {args.rounds} interleaved rounds")
    rows = models.run(families, args.size, args.quantizer, args.rounds, args.seed, args.entries, args.device, dtype,
                      layers_per_pass=args.layers_per_pass)
    print(tabulate(models.as_dicts(rows), headers="keys"))
    if args.json:
        write_json_atomic(Path(args.json), {"command": _command(), "torch": torch.__version__,
                                            "threads": torch.get_num_threads(), "rows": models.as_dicts(rows)})
        print(f"wrote {args.json}" + _png_note(models.plot(rows, Path(args.json).with_suffix(".png")), args.json))
    return 0


def _bench_libero(args) -> int:
    from quantvla.bench import libero

    row = libero.run(suite=args.suite, steps=args.steps, rounds=args.rounds)
    if args.json:
        write_json_atomic(Path(args.json), row)
    return 0


def _libero(args) -> int:
    from quantvla.eval import paired
    from quantvla.quant import fused

    fused.set_forward(args.forward)

    suites = [paired.SUITE_NAMES.get(x.strip(), x.strip()) for x in args.suites.split(",") if x.strip()]
    quantizers = [x.strip() for x in args.quantizer.split(",") if x.strip()]
    out = Path(args.json)
    if out.is_dir() or not out.parent.is_dir():
        raise QuantVLAError(f"--json {out}: {'is a directory' if out.is_dir() else 'its folder does not exist'}; "
                            "pass a file path in an existing folder")
    stop = []

    def on_interrupt(signum, frame):  # finish the pair under way (never break the simulator mid-step)
        stop.append(True)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        print("interrupt: stopping after the current pair (Ctrl-C again to stop now)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        report = paired.run(args.model, args.size, args.checkpoint, quantizers, suites, args.episodes, args.seed,
                            args.margin, out, max_steps=args.max_steps, should_stop=lambda: bool(stop),
                            blank_images=args.blank_images, fp_from=Path(args.fp_from) if args.fp_from else None)
    except KeyboardInterrupt:
        report = {"partial": True}
    finally:
        signal.signal(signal.SIGINT, previous)
    if report["partial"]:
        where = (f"partial report in {out} (it says \"partial\": true)" if out.is_file() else
                 "before the first pair, nothing written")
        print(f"interrupted: {where}; nothing was decided", file=sys.stderr)
        return 130
    print(f"wrote {args.json}")
    verdicts = [v["verdict"] for gates in report["gates"].values() for v in gates.values()]
    if "fail" in verdicts:
        return 1
    if "inconclusive" in verdicts and not args.allow_inconclusive:
        print("error: a LIBERO gate is inconclusive (see the table); run more episodes, or pass "
              "--allow-inconclusive to accept it", file=sys.stderr)
        return 1
    return 0


def _user_value(parser: str):
    """An argparse type from one of quantvla.eval.gate's parsers (their message, exit 2), imported
    only when the option is given (scipy is slow to import)."""
    def convert(text: str):
        from quantvla.eval import gate
        try:
            return getattr(gate, parser)(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return convert


_FAMILY_HELP = "a registered model family (quantvla.families)"


def _family(name: str) -> str:
    """An argparse type: a registered family name (an unknown one: the registered ones listed, exit 2)."""
    from quantvla import families

    if name not in families.names():
        raise argparse.ArgumentTypeError(f"unknown model {name!r}; choose one of: {', '.join(families.names())}")
    return name


def _positive(text: str) -> int:
    """An argparse type: a positive integer (anything else: one clear line, exit 2)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _non_negative_int(text: str) -> int:
    """An argparse type: 0 or a positive integer (anything else: one clear line, exit 2)."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {text!r}")
    return int(text)


def _merge(args) -> int:
    from quantvla.eval import merge

    try:
        return merge.main(args.out, args.reports, allow_inconclusive=args.allow_inconclusive)
    except (ValueError, OSError, KeyError) as err:
        print(f"error: cannot merge: {err}", file=sys.stderr)
        return 2


def _tasks(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: --tasks takes comma-separated task indices such as 0,1,2 (got {text!r})") from None


def _expert(args) -> int:
    from tabulate import tabulate

    from quantvla.eval.gate import wilson
    from quantvla.eval.libero import TaskEnv
    from quantvla.eval.protocols import load_protocol
    from quantvla.trained.demos import ExpertPolicy

    protocol = load_protocol(args.protocol)
    rows, report = [], {"suite": args.suite, "protocol": protocol.name, "tasks": {}}
    for task in _tasks(args.tasks):
        env = TaskEnv(args.suite, task, protocol)
        try:
            results = [env.run_episode(k, ExpertPolicy(env), seed=protocol.seed) for k in range(args.inits)]
        finally:
            env.close()
        wins = sum(r.success for r in results)
        rate = wilson(wins, len(results))
        lo, hi = rate.low, rate.high
        steps = [r.steps for r in results if r.success]
        report["tasks"][str(task)] = {"instruction": env.instruction, "successes": wins, "episodes": len(results),
                                      "wilson95": [lo, hi], "failures": [r.failure for r in results if r.failure]}
        rows.append([task, env.instruction, f"{wins}/{len(results)}", f"[{lo:.2f}, {hi:.2f}]",
                     f"{sum(steps) / max(1, len(steps)):.0f}",
                     f"{sum(r.wall_s for r in results) / len(results):.1f}"])
        print(f"  task {task}: {wins}/{len(results)}", flush=True)
    print(tabulate(rows, headers=["task", "instruction", "success", "Wilson 95%", "mean steps", "s/episode"]))
    if args.json:
        write_json_atomic(Path(args.json), report)
    return 0


def _demos(args) -> int:
    from quantvla.trained.demos import generate

    demos = generate(args.suite, _tasks(args.tasks), args.per_task, args.max_steps, args.workers,
                     args.noisy_share, args.noise, args.render, args.every)
    demos.save(args.out)
    frames = "" if demos.images is None else f", {len(demos.images)} camera frames of {args.render} px"
    print(f"wrote {args.out}: {len(demos.tasks)} demos, {len(demos.actions)} steps{frames}")
    return 0


def _train_tiny(args) -> int:
    import torch

    from quantvla.policy.bundle import save_bundle
    from quantvla.trained.demos import Demos
    from quantvla.trained.train import TrainConfig, train, train_vision

    if args.threads:
        torch.set_num_threads(args.threads)
    demos = Demos.load(args.demos)
    cfg = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, aux_weight=args.aux_weight,
                      shift=args.shift)
    sees = demos.images is not None  # rendered demos train a policy that sees
    model, adapter, calibration, record = (train_vision if sees else train)(args.model, demos, cfg)
    inputs = ("agentview and wrist cameras (rendered at {} px), the instruction{}; no object state".format(
        demos.meta["render"], " and the proprioceptive state" + (" (in the prompt)" if adapter.discrete_state else "")
        if getattr(model.config, "state_dim", 0) or adapter.discrete_state else "")
        if sees else "object-state tokens (robot, goal object, container) and the instruction: a state-based "
                     "stand-in for the camera; this policy never sees an image")
    meta = {"config_name": "tiny-vision" if sees else "tiny-state", "suite": demos.meta["suite"],
            "tasks": sorted(set(demos.tasks)), "inputs": inputs, "render": demos.meta.get("render") or None,
            "training": record, "demos": {k: v for k, v in demos.meta.items() if k != "per_task_summary"},
            "command": f"python -m quantvla train-tiny --model {args.model} --demos {args.demos} --out {args.out} "
                       f"--steps {args.steps} --batch {args.batch} --lr {args.lr} --seed {args.seed}"
                       + (f" --aux-weight {args.aux_weight} --shift {args.shift}" if sees else "")}
    save_bundle(args.out, model, meta, adapter.tokenizer, adapter.stats, calibration)
    print(f"wrote {args.out}")
    return 0


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
    k.add_argument("--cpu-gemm", default="auto", choices=["auto", "int_mm", "u8_weight", "fp32"],
                   help="the cpu backend's exact GEMM (default: chosen from the instruction set)")
    k.add_argument("--json", help="also write the rows to this JSON file, and a PNG beside it")
    k.set_defaults(func=_bench_kernels)
    mb = bench_sub.add_parser("models", help="FP vs quantized: action-chunk latency, calibration time, memory")
    mb.add_argument("--model", action="append", type=_family, help="repeatable (default: every family)")
    mb.add_argument("--size", default="trained", choices=_SIZES,
                    help="trained: the shipped policies (default); trained-state: the state-based ones; tiny, full: "
                         "random weights")
    mb.add_argument("--quantizer", default="quantvla-w4a8", help="a preset (default quantvla-w4a8)")
    mb.add_argument("--rounds", type=int, default=15, help="interleaved FP/quantized rounds (default 15)")
    mb.add_argument("--entries", type=int, default=16, help="synthetic calibration entries for tiny/full (default 16)")
    mb.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="the FP model's dtype")
    mb.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    mb.add_argument("--cpu-gemm", default="auto", choices=["auto", "int_mm", "u8_weight", "fp32"],
                    help="the cpu backend's exact GEMM (default: chosen from the instruction set)")
    mb.add_argument("--seed", type=int, default=0)
    mb.add_argument("--layers-per-pass", type=_positive, metavar="N",
                    help="quantize() records and replaces N linears per teacher pass (default: all in one)")
    mb.add_argument("--threads", type=int)
    mb.add_argument("--json", help="also write the rows to this JSON file, and a PNG beside it")
    mb.set_defaults(func=_bench_models)
    lb = bench_sub.add_parser("libero", help="naive vs render-on-query LIBERO episode time (needs the libero extra)")
    lb.add_argument("--suite", default="libero_spatial")
    lb.add_argument("--steps", type=int, default=100)
    lb.add_argument("--rounds", type=int, default=2)
    lb.add_argument("--json")
    lb.set_defaults(func=_bench_libero)
    lib = sub.add_parser("libero", help="paired FP / quantized LIBERO evaluation with the gate verdict")
    lib.add_argument("--model", required=True, type=_family, help=_FAMILY_HELP)
    lib.add_argument("--size", default="tiny", choices=["tiny", "full"])
    lib.add_argument("--checkpoint", help="FP checkpoint (safetensors file or folder), or a trained policy folder "
                                          "(golden/policies/...): then its own tasks and calibration")
    lib.add_argument("--quantizer", default="quantvla-w4a8",
                     help="a preset, or several comma-separated (each paired with the same FP episodes)")
    lib.add_argument("--suites", default="spatial", help="comma-separated: spatial, object, goal, 10")
    lib.add_argument("--episodes", type=_user_value("parse_pairs"), default=20, help="pairs per suite")
    lib.add_argument("--seed", type=int, default=0)
    lib.add_argument("--margin", type=_user_value("parse_margin"), default=0.10,
                     help="non-inferiority margin in success rate, in [0, 1)")
    lib.add_argument("--max-steps", type=int, help="cap episode length (smoke runs)")
    lib.add_argument("--blank-images", action="store_true",
                     help="ablation: every camera image reads as black (does a policy that sees use its eyes?)")
    lib.add_argument("--forward", choices=["eager", "fused"], default="eager",
                     help="QuantLinear's CPU forward: eager (the reference) or fused (one C++ call per layer, "
                          "bit-identical, compiled on first use; quantvla/quant/fused.py)")
    lib.add_argument("--fp-from", metavar="REPORT",
                     help="reuse the FP episodes of an earlier report of the same run (same model, checkpoint, "
                          "seed, options): only the quantized arms run, and the first FP episode is rerun as a check")
    lib.add_argument("--json", default="libero-report.json")
    lib.add_argument("--allow-inconclusive", action="store_true",
                     help="exit 0 when a gate is inconclusive (underpowered, simulator errors); a failing one still "
                          "exits 1")
    lib.set_defaults(func=_libero)
    mr = sub.add_parser("merge-reports", help="merge sharded JSON reports and decide each suite's gate once")
    mr.add_argument("out")
    mr.add_argument("reports", nargs="+")
    mr.add_argument("--allow-inconclusive", action="store_true",
                    help="exit 0 when a gate is inconclusive (underpowered, simulator errors); a failing one still "
                          "exits 1")
    mr.set_defaults(func=_merge)
    ex = sub.add_parser("expert", help="the scripted expert's success on the official init states")
    ex.add_argument("--suite", default="libero_object")
    ex.add_argument("--tasks", default="0,1,2,3,4")
    ex.add_argument("--inits", type=int, default=50, help="official init states per task (default 50)")
    ex.add_argument("--protocol", default="openpi")
    ex.add_argument("--json")
    ex.set_defaults(func=_expert)
    de = sub.add_parser("demos", help="expert demos from randomized resets (--render: with camera frames)")
    de.add_argument("--suite", default="libero_object")
    de.add_argument("--tasks", default="0,1,2,3,4")
    de.add_argument("--per-task", type=int, default=50)
    de.add_argument("--max-steps", type=int, default=280)
    de.add_argument("--workers", type=int, default=2)
    de.add_argument("--noisy-share", type=float, default=0.6, help="share of demos executed with action noise")
    de.add_argument("--noise", type=float, default=0.3, help="std of the executed arm-action noise")
    de.add_argument("--render", type=int, default=0, help="render agentview + wrist at this many pixels (0: none)")
    de.add_argument("--every", type=int, default=1, help="with --render: keep the frames of every N-th step")
    de.add_argument("--out", required=True)
    de.set_defaults(func=_demos)
    tt = sub.add_parser("train-tiny", help="behaviour-clone a small policy (one that sees, from rendered demos)")
    tt.add_argument("--model", required=True, type=_family, help=_FAMILY_HELP)
    tt.add_argument("--demos", required=True)
    tt.add_argument("--out", required=True)
    tt.add_argument("--steps", type=int, default=4000)
    tt.add_argument("--batch", type=int, default=256)
    tt.add_argument("--lr", type=float, default=3e-4)
    tt.add_argument("--seed", type=int, default=0)
    tt.add_argument("--aux-weight", type=float, default=0.5,
                    help="policies that see: weight of the training-only object-pose loss on the vision tower")
    tt.add_argument("--shift", type=_non_negative_int, default=4,
                    help="policies that see: random-shift augmentation of the images in pixels (0: none)")
    tt.add_argument("--threads", type=int)
    tt.set_defaults(func=_train_tiny)
    qz = sub.add_parser("quantize", help="quantize a model and write the artifact, printing its memory")
    qz.add_argument("--model", required=True, type=_family, help=_FAMILY_HELP)
    qz.add_argument("--size", default="trained", choices=_SIZES,
                    help="trained: a policy folder (default: the shipped one; trained-state: the shipped "
                         "state-based one); tiny, full: a model checkpoint")
    qz.add_argument("--checkpoint", help="a trained-policy folder, or (with --size tiny|full) a safetensors "
                                         "checkpoint in any supported layout")
    qz.add_argument("--quantizer", default="quantvla-w4a8", help="a preset (default quantvla-w4a8)")
    qz.add_argument("--out", required=True, help="artifact folder (model.safetensors + quantvla.json)")
    qz.add_argument("--entries", type=int, default=16, help="synthetic calibration entries for tiny/full")
    qz.add_argument("--seed", type=int, default=0)
    qz.add_argument("--layers-per-pass", type=_positive, metavar="N",
                    help="record and replace N linears per teacher pass (default: all in one): less memory, "
                         "more passes, the same result")
    qz.set_defaults(func=_quantize)
    args = parser.parse_args(argv)
    try:
        if getattr(args, "device", "cpu") != "cpu":
            _check_device(args.device)
        return args.func(args)
    except QuantVLAError as err:  # bad input: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


def _quantize(args) -> int:
    """A deployer's command: the FP model (a shipped or given trained policy with its recorded
    calibration, or a tiny/full model from a checkpoint with a synthetic buffer), quantized by a
    preset, written as an artifact (quantvla.artifact), with the memory of what was quantized."""
    import time

    import torch
    from tabulate import tabulate

    from quantvla import families, preset, quantize
    from quantvla.artifact import save_quantized
    from quantvla.memory import GIB, component_memory
    from quantvla.policy.bundle import is_bundle, shipped_policy

    if ":" in args.quantizer:
        raise QuantVLAError(f"--quantizer {args.quantizer}: artifacts hold the reference quantizer's layers; a "
                            "third-party quantizer saves with its own library (torchao, quanto: torch.save of the "
                            "state_dict); validate it with pytest --quantvla-quantizer=" + args.quantizer)
    config = preset(args.quantizer)  # an unknown name is one clear error before anything is built
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise QuantVLAError(f"--out {out} is a file; pass a folder (created if missing)")
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    if families.is_trained(args.size):
        path = Path(args.checkpoint) if args.checkpoint else shipped_policy(args.model, args.size)
        if not is_bundle(path):
            raise QuantVLAError(f"--checkpoint {path} is not a trained-policy folder (no policy.json); for a model "
                                "checkpoint pass --size tiny or --size full, the size it was saved at")
    loaded = families.load_fp(args.model, args.size, args.checkpoint, entries=args.entries, seed=args.seed)
    fp, calibration = loaded.model, loaded.calibration
    print(f"{args.model} ({args.size}), {len(calibration)} calibration entries, {args.quantizer}")
    quantized = quantize(fp, calibration, config, layers_per_pass=args.layers_per_pass)
    took = time.perf_counter() - started
    save_quantized(quantized, out, config, fp, calibration)
    mem = component_memory(fp, quantized)
    size = lambda n: f"{n / GIB:.3f} GiB" if n >= GIB else f"{n / 2**20:.3f} MiB"  # noqa: E731
    print(tabulate([["LLM + DiT linears", mem.components, mem.quantized, size(mem.fp16_bytes),
                     size(mem.storage_bytes), size(mem.resident_bytes), f"{mem.saving:.1%}"]],
                   headers=["components", "linears", "quantized", "FP16", "stored", "resident", "saved"]))
    print(f"quantized in {took:.1f} s; wrote {out} (load with quantvla.artifact.load_quantized)")
    return 0


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QuantVLAError(f"--device {device}: no CUDA device is available to this torch "
                            f"({torch.__version__}); run on a GPU machine or use --device cpu")
    if not device.startswith("cuda"):
        raise QuantVLAError(f"--device {device!r}: choose cpu or cuda")


if __name__ == "__main__":
    sys.exit(main())
