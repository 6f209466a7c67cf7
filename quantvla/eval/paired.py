"""python -m quantvla libero: paired FP / quantized LIBERO evaluation from the command line.

Runs, per suite, `episodes` pairs (FP and quantized on the same task, init state and seed), prints
the success table with Wilson intervals and the gate verdict, and rewrites the JSON after every
episode (atomically), so an interrupted run leaves a valid report that says "partial": true."""

from __future__ import annotations

from pathlib import Path

import torch

from quantvla import families
from quantvla.errors import QuantVLAError
from quantvla.eval.gate import PairRecord, gates
from quantvla.io import write_json_atomic

SUITE_NAMES = {"spatial": "libero_spatial", "object": "libero_object", "goal": "libero_goal", "10": "libero_10",
               "long": "libero_10"}


def run(model_name: str, size: str, checkpoint: str | None, quantizers: list[str], suites: list[str], episodes: int,
        seed: int, margin: float, out: Path, max_steps: int | None = None, log=print,
        should_stop=lambda: False, blank_images: bool = False, fp_from: Path | None = None) -> dict:
    """Each episode runs the FP model once and every quantized model on the same task, init state
    and seed; each quantizer's gate is decided per suite against the FP outcomes. `should_stop()`
    is asked after every pair: True ends the run there, with the report left "partial".
    `blank_images` (an ablation for policies that see): every arm's cameras read as black.
    `fp_from`: an earlier report of the same run whose FP episodes are reused instead of rerun
    (a new quantizer row at half the cost); its first FP episode is rerun and must match."""
    from quantvla import preset, quantize
    from quantvla.eval.libero import TaskEnv
    from quantvla.eval.protocols import protocol_for
    from quantvla.policy.bundle import is_bundle
    from quantvla.policy.model_policy import ModelPolicy

    torch.manual_seed(seed)
    # a small trained policy brings its own model, calibration and tasks
    size = "trained" if checkpoint and is_bundle(checkpoint) else size
    loaded = families.load_fp(model_name, size, checkpoint, entries=8, seed=seed)
    fp, calibration, bundle = loaded.model, loaded.calibration, loaded.bundle
    if blank_images and (bundle is None or not bundle.sees):
        what = f"the policy in {bundle.path} reads object-state tokens" if bundle else "this is not a trained policy"
        raise QuantVLAError(f"--blank-images: {what}; the ablation is for a trained policy that sees (config "
                            "tiny-vision, passed as --checkpoint <folder>)")
    protocol = bundle.protocol() if bundle is not None else protocol_for(model_name)
    report = {"model": model_name, "config": bundle.meta["config_name"] if bundle else size, "checkpoint": checkpoint,
              "quantizers": quantizers, "seed": seed, "protocol": protocol.name, "render": protocol.render,
              "blank_images": blank_images, "max_steps": max_steps, "margin": margin,
              "partial": True, "episodes": [], "gates": {name: {} for name in quantizers}}
    recorded = None
    if fp_from is not None:
        wanted = []  # (suite, task, init) of every pair this run asks for, in the loop's order below
        for suite in suites:
            tasks = task_list(bundle, suite)
            wanted += [(suite, tasks[k % len(tasks)], k // len(tasks)) for k in range(episodes)]
        recorded = recorded_fp(fp_from, report, wanted)
        report["fp_from"] = str(fp_from)
    models = {"fp": fp} | {name: quantize(fp, calibration, preset(name)) for name in quantizers}
    for suite in suites:
        tasks = task_list(bundle, suite)
        envs: dict[int, TaskEnv] = {}
        try:
            for k in range(episodes):
                task, init_index = tasks[k % len(tasks)], k // len(tasks)
                env = envs.get(task) or envs.setdefault(task, TaskEnv(suite, task, protocol))
                row = {"suite": suite, "task": task, "init": init_index, "quantized": {}}
                for label, model in models.items():
                    if label == "fp" and recorded is not None and report["episodes"]:
                        row["fp"] = recorded[(suite, task, init_index)]
                        continue
                    r = env.run_episode(init_index, ModelPolicy.for_task(model, env, seed=seed, bundle=bundle,
                                                                             blank_images=blank_images),
                                        seed=protocol.seed, max_steps=max_steps).to_dict()
                    if label == "fp" and recorded is not None:  # the first FP episode, rerun: is it the same run?
                        check_rerun(r, recorded[(suite, task, init_index)], fp_from)
                    if label == "fp":
                        row["fp"] = r
                    else:
                        row["quantized"][label] = r
                report["episodes"].append(row)
                write_json_atomic(out, report)
                marks = ", ".join(f"{label} {'ok' if r['success'] else '--'}" for label, r in
                                  [("FP", row["fp"]), *row["quantized"].items()])
                log(f"  {suite} task {task} init {init_index}: {marks}")
                if should_stop():
                    return report  # written after the last pair, "partial": true
        finally:
            for env in envs.values():
                env.close()
        rows = [e for e in report["episodes"] if e["suite"] == suite]
        for name in quantizers:
            arm = lambda r: (r["success"], r["failure"])  # noqa: E731
            pairs = [PairRecord.from_episodes(suite, e["task"], e["init"], arm(e["fp"]), arm(e["quantized"][name]))
                     for e in rows]
            report["gates"][name][suite] = gates(pairs, model_name, name, margin)[suite].to_dict()
        write_json_atomic(out, report)
    report["partial"] = False  # every suite ran to the end
    write_json_atomic(out, report)
    _print_table(report, log)
    return report


# what must agree for an earlier report's FP episodes to stand in for this run's
_SAME_RUN = ("model", "config", "checkpoint", "seed", "protocol", "render", "blank_images", "max_steps")


def _outcome(r: dict) -> tuple:
    return r["success"], r["steps"], r["queries"], r["failure"]


def recorded_fp(path: Path, report: dict, wanted: list[tuple[str, int, int]]) -> dict:
    """The FP episodes of the earlier report at `path`, by (suite, task, init), for each of `wanted`;
    one clear error when the report is unreadable, from another run, or lacks an episode."""
    import json
    try:
        earlier = json.loads(Path(path).read_text())
        episodes = {(e["suite"], e["task"], e["init"]): e["fp"] for e in earlier["episodes"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QuantVLAError(f"--fp-from {path}: not a report written by `python -m quantvla libero` ({e})") from None
    differ = [f"{k} {earlier.get(k)!r} here {report[k]!r}" for k in _SAME_RUN if earlier.get(k) != report[k]]
    if differ:
        raise QuantVLAError(f"--fp-from {path}: that report comes from another run ({'; '.join(differ)}); "
                            "reuse FP episodes only with the same model, checkpoint, seed and options")
    missing = [w for w in wanted if w not in episodes]
    if missing:
        raise QuantVLAError(f"--fp-from {path}: it has no FP episode for {len(missing)} of the {len(wanted)} pairs "
                            f"asked for (first: {missing[0]}); ask for at most the episodes it ran")
    return {w: episodes[w] for w in wanted}


def check_rerun(fresh: dict, recorded: dict, path: Path | None) -> None:
    """The first FP episode is rerun: a different outcome means the recorded FP arm is not this run's
    (another checkpoint under the same path, another simulator or torch build) and must not be reused."""
    if _outcome(fresh) != _outcome(recorded):
        raise QuantVLAError(f"--fp-from {path}: the first FP episode, rerun, gives (success, steps, queries, "
                            f"failure) {_outcome(fresh)} where the report recorded {_outcome(recorded)}; its FP arm "
                            "is not reproducible here, so run without --fp-from")


def task_list(bundle, suite: str) -> list[int]:
    """The tasks episodes cycle through: a trained policy's own tasks, else all ten of the suite."""
    if bundle is None:
        return list(range(10))
    if suite != bundle.meta["suite"]:
        raise QuantVLAError(f"the policy in {bundle.path} was trained on {bundle.meta['suite']}, not {suite}")
    return list(bundle.meta["tasks"])


def _print_table(report: dict, log) -> None:
    from tabulate import tabulate
    rows = []
    for name, by_suite in report["gates"].items():
        for suite, v in by_suite.items():
            f, q = v["fp"], v["quantized"]  # the verdict already carries both Wilson intervals
            rows.append([name, suite, v["pairs"], f"{f['successes']}/{v['pairs']} [{f['low']:.2f}, {f['high']:.2f}]",
                         f"{q['successes']}/{v['pairs']} [{q['low']:.2f}, {q['high']:.2f}]", f"{v['delta0']:+.3f}",
                         f"{v['detectable']:.3f}", v["verdict"], v["reason"]])
    log(tabulate(rows, headers=["quantizer", "suite", "pairs", "FP (Wilson 95%)", "quantized (Wilson 95%)", "delta0",
                                "detectable", "verdict", "why"]))
