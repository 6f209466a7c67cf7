"""LIBERO success-rate gates (marker `libero`). Each item runs one pair: the FP model and the
quantized model on the same suite, task, init state and seed, with the family's own protocol
(quantvla.families). xdist spreads the pairs; the controller turns each pair's result into a
quantvla.eval.gate.PairRecord and decides each suite once with quantvla.eval.gate.gates, against
the paper's quantized-minus-FP delta minus --quantvla-margin."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from pytest_quantvla.collect import Check
from pytest_quantvla.options import RunConfig
from pytest_quantvla.results import CheckResult
from pytest_quantvla.subject import subject
from quantvla.eval.gate import PairRecord
from quantvla.eval.protocols import Protocol, protocol_for

if TYPE_CHECKING:
    from quantvla.eval.libero import TaskEnv

TASKS_PER_SUITE = 10
_envs: dict[tuple[str, int], TaskEnv] = {}


def _env(suite: str, task: int, protocol: Protocol) -> TaskEnv:
    from quantvla.eval.libero import TaskEnv
    key = (suite, task)
    if key not in _envs:  # reused across this worker's episodes of the task
        _envs[key] = TaskEnv(suite, task, protocol)
    return _envs[key]


def close_envs() -> None:
    for env in _envs.values():
        env.close()
    _envs.clear()


@dataclass(kw_only=True)
class PairResult(CheckResult):
    """One pair's outcomes as the gate counts them; extra: each arm's failure, steps, wall time and
    recording. Not a row of the summary table: the gate lines report the pairs."""

    kind = "libero_pair"
    suite: str
    task: int
    init: int
    fp_success: bool | None
    q_success: bool | None
    fp_policy_error: bool
    q_policy_error: bool

    def record(self) -> PairRecord:
        return PairRecord(self.suite, self.task, self.init, self.fp_success, self.q_success, self.fp_policy_error,
                          self.q_policy_error)


def pair_record(entry: dict[str, Any]) -> PairRecord:
    """A reported pair item as the gate's record: a pair whose item did not pass (a crashed worker,
    an exception outside the episodes) is unfinished, unknown on both sides."""
    result = CheckResult.from_dict(entry) if entry.get("outcome") == "passed" else None
    if isinstance(result, PairResult):
        return result.record()
    return PairRecord.unfinished(entry["suite"], entry["task"], entry["init"])


def pair(run: RunConfig, suite: str, task: int, init_index: int) -> PairResult:
    from quantvla.policy.model_policy import ModelPolicy

    s = subject(run)
    protocol = s.bundle.protocol() if s.bundle is not None else protocol_for(run.family)
    env = _env(suite, task, protocol)
    out: dict[str, Any] = {}
    results = {}
    for label, model in (("fp", s.fp), ("q", s.quantized)):
        policy = ModelPolicy.for_task(model, env, seed=run.seed, bundle=s.bundle)
        r = env.run_episode(init_index, policy, seed=protocol.seed)
        if run.record is not None and not r.success:  # replay the failure with the camera on
            name = f"{suite}-task{task}-init{init_index:02d}-{'fp' if label == 'fp' else 'quantized'}.gif"
            env.record(init_index, ModelPolicy.for_task(model, env, seed=run.seed, bundle=s.bundle), protocol.seed,
                       run.record / name)
            out[f"{label}_recording"] = str(run.record / name)
        results[label] = (r.success, r.failure)
        out[f"{label}_failure"], out[f"{label}_steps"], out[f"{label}_wall_s"] = r.failure, r.steps, round(r.wall_s, 2)
    record = PairRecord.from_episodes(suite, task, init_index, results["fp"], results["q"])
    return PairResult(suite=suite, task=task, init=init_index, fp_success=record.fp, q_success=record.quantized,
                      fp_policy_error=record.fp_policy_error, q_policy_error=record.q_policy_error, extra=out)


def check_suites(run: RunConfig) -> None:
    """A trained policy runs only its own suite: a usage error before anything is built (reads the
    policy's metadata only)."""
    import json

    from pytest_quantvla.subject import policy_path
    from quantvla.policy.bundle import is_bundle
    if not run.trained or run.suites is None or not is_bundle(policy_path(run)):
        return  # not a policy folder: building the subject says so
    trained = json.loads((policy_path(run) / "policy.json").read_text()).get("suite")
    if run.suites != (trained,):
        raise pytest.UsageError(f"the trained {run.model} policy ({policy_path(run)}) knows only {trained}; pass "
                                f"--quantvla-suites={trained} (or leave it out), or --quantvla-config=tiny to run "
                                f"{','.join(run.suites)} with random weights")


def suites_and_tasks(run: RunConfig) -> dict[str, list[int]]:
    """Per suite, the tasks that episodes cycle through: a trained policy's own suite and tasks
    (asking for another suite is an error, check_suites), else all ten tasks of each asked-for suite."""
    check_suites(run)  # the controller checked already; a worker or a direct call checks here too
    bundle = subject(run).bundle
    if bundle is None:
        return {suite: list(range(TASKS_PER_SUITE)) for suite in run.suites or ("libero_spatial",)}
    return {bundle.meta["suite"]: list(bundle.meta["tasks"])}


def checks(run: RunConfig) -> Iterator[Check]:
    for suite, tasks in suites_and_tasks(run).items():
        for k in range(run.episodes):
            task, init_index = tasks[k % len(tasks)], k // len(tasks)
            yield Check(f"{run.prefix}/libero[{suite}/task{task}/init{init_index:02d}]",
                        functools.partial(pair, run, suite, task, init_index), (pytest.mark.libero, pytest.mark.slow),
                        kind=PairResult.kind, identity={"suite": suite, "task": task, "init": init_index})
