"""python -m quantvla libero: paired FP / quantized LIBERO evaluation from the command line.

Runs, per suite, `episodes` pairs (FP and quantized on the same task, init state and seed), prints
the success table with Wilson intervals and the gate verdict, and rewrites the JSON after every
episode (atomically), so an interrupted run leaves a valid partial report."""

from __future__ import annotations

from pathlib import Path

import torch

from quantvla.eval.stats import paired_gate
from quantvla.io import write_json_atomic
from quantvla.reference import paper_delta

SUITE_NAMES = {"spatial": "libero_spatial", "object": "libero_object", "goal": "libero_goal", "10": "libero_10",
               "long": "libero_10"}


def run(model_name: str, size: str, checkpoint: str | None, quantizer: str, suites: list[str], episodes: int,
        seed: int, margin: float, out: Path, max_steps: int | None = None, log=print) -> dict:
    from quantvla import CalibrationBuffer, preset, quantize
    from quantvla.eval.libero import TaskEnv
    from quantvla.eval.policy import ModelPolicy
    from quantvla.eval.protocols import protocol_for
    from quantvla.models import build
    from quantvla.models.checkpoint import load_checkpoint

    torch.manual_seed(seed)
    fp = build(model_name, size)
    if checkpoint:
        load_checkpoint(fp, checkpoint)
    q = quantize(fp, CalibrationBuffer.synthetic(fp, 8, seed=seed), preset(quantizer))
    protocol = protocol_for(model_name)
    report = {"model": model_name, "config": size, "checkpoint": checkpoint, "quantizer": quantizer, "seed": seed,
              "protocol": protocol.name, "episodes": [], "suites": {}}
    for suite in suites:
        envs: dict[int, TaskEnv] = {}
        try:
            for k in range(episodes):
                task, init_index = k % 10, k // 10
                env = envs.get(task) or envs.setdefault(task, TaskEnv(suite, task, protocol))
                row = {"suite": suite, "task": task, "init": init_index}
                for label, model in (("fp", fp), ("quantized", q)):
                    r = env.run_episode(init_index, ModelPolicy.for_model(model, [env.instruction], seed=seed),
                                        seed=protocol.seed, max_steps=max_steps)
                    row[label] = r.to_dict()
                report["episodes"].append(row)
                write_json_atomic(out, report)
                log(f"  {suite} task {task} init {init_index}: FP {'ok' if row['fp']['success'] else '--'}, "
                    f"quantized {'ok' if row['quantized']['success'] else '--'}")
        finally:
            for env in envs.values():
                env.close()
        rows = [e for e in report["episodes"] if e["suite"] == suite]

        def outcome(r):
            return None if (r["failure"] or "").startswith("error") else r["success"]

        verdict = paired_gate([outcome(e["fp"]) for e in rows], [outcome(e["quantized"]) for e in rows],
                              paper_delta(model_name, quantizer, suite), margin)
        report["suites"][suite] = verdict.to_dict()
        write_json_atomic(out, report)
    _print_table(report, log)
    return report


def _print_table(report: dict, log) -> None:
    from tabulate import tabulate
    rows = []
    for suite, v in report["suites"].items():
        f, q = v["fp"], v["quantized"]  # the verdict already carries both Wilson intervals
        rows.append([suite, v["pairs"], f"{f['successes']}/{v['pairs']} [{f['low']:.2f}, {f['high']:.2f}]",
                     f"{q['successes']}/{v['pairs']} [{q['low']:.2f}, {q['high']:.2f}]", f"{v['delta0']:+.3f}",
                     v["verdict"], v["reason"]])
    log(tabulate(rows, headers=["suite", "pairs", "FP (Wilson 95%)", "quantized (Wilson 95%)", "delta0", "verdict",
                                "why"]))
