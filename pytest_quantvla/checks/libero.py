"""LIBERO success-rate gates (marker `libero`). Each item runs one pair: the FP model and the
quantized model on the same suite, task, init state and seed, with the model's protocol (openpi
for pi05, GR00T's for gr00t-n15). xdist spreads the pairs; the controller collects the outcomes
and decides each suite once, with quantvla.eval.stats.paired_gate against the paper's
quantized-minus-FP delta minus --quantvla-margin."""

from __future__ import annotations

import functools

import pytest

from pytest_quantvla.subject import subject
from quantvla.eval.protocols import protocol_for

TASKS_PER_SUITE = 10
_envs: dict = {}


def _env(suite: str, task: int, protocol):
    from quantvla.eval.libero import TaskEnv
    key = (suite, task)
    if key not in _envs:  # reused across this worker's episodes of the task
        _envs[key] = TaskEnv(suite, task, protocol)
    return _envs[key]


def close_envs() -> None:
    for env in _envs.values():
        env.close()
    _envs.clear()


def pair(run, suite: str, task: int, init_index: int) -> dict:
    from quantvla.eval.libero import gate_outcome
    from quantvla.eval.policy import ModelPolicy

    s = subject(run)
    protocol = protocol_for(run.model)
    env = _env(suite, task, protocol)
    out = {"suite": suite, "task": task, "init": init_index}
    for label, model in (("fp", s.fp), ("q", s.quantized)):
        policy = ModelPolicy.for_task(model, env, seed=run.seed, bundle=s.bundle)
        r = env.run_episode(init_index, policy, seed=protocol.seed)
        if run.record is not None and not r.success:  # replay the failure with the camera on
            name = f"{suite}-task{task}-init{init_index:02d}-{'fp' if label == 'fp' else 'quantized'}.gif"
            env.record(init_index, ModelPolicy.for_task(model, env, seed=run.seed, bundle=s.bundle), protocol.seed,
                       run.record / name)
            out[f"{label}_recording"] = str(run.record / name)
        out[f"{label}_success"], out[f"{label}_policy_error"] = gate_outcome(r.success, r.failure)
        out[f"{label}_failure"], out[f"{label}_steps"], out[f"{label}_wall_s"] = r.failure, r.steps, round(r.wall_s, 2)
    return out


def check_suites(run) -> None:
    """A trained policy runs only its own suite: a usage error before anything is built (reads the
    policy's metadata only)."""
    import json

    from pytest_quantvla.subject import policy_path
    from quantvla.tiny.policy import is_bundle
    if run.config != "trained" or run.suites is None or not is_bundle(policy_path(run)):
        return  # not a policy folder: building the subject says so
    trained = json.loads((policy_path(run) / "policy.json").read_text()).get("suite")
    if run.suites != (trained,):
        raise pytest.UsageError(f"the trained {run.model} policy ({policy_path(run)}) knows only {trained}; pass "
                                f"--quantvla-suites={trained} (or leave it out), or --quantvla-config=tiny to run "
                                f"{','.join(run.suites)} with random weights")


def suites_and_tasks(run) -> dict[str, list[int]]:
    """Per suite, the tasks that episodes cycle through: a trained policy's own suite and tasks
    (asking for another suite is an error, check_suites), else all ten tasks of each asked-for suite."""
    check_suites(run)  # the controller checked already; a worker or a direct call checks here too
    bundle = subject(run).bundle
    if bundle is None:
        return {suite: list(range(TASKS_PER_SUITE)) for suite in run.suites or ("libero_spatial",)}
    return {bundle.meta["suite"]: list(bundle.meta["tasks"])}


def checks(run):
    for suite, tasks in suites_and_tasks(run).items():
        for k in range(run.episodes):
            task, init_index = tasks[k % len(tasks)], k // len(tasks)
            yield (f"{run.prefix}/libero[{suite}/task{task}/init{init_index:02d}]",
                   functools.partial(pair, run, suite, task, init_index), (pytest.mark.libero, pytest.mark.slow))
