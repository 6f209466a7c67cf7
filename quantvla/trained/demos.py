"""Expert demonstrations for the small trained policies, generated without rendering.

    python -m quantvla demos --suite libero_object --tasks 0,1,2,3,4 --per-task 40 --out demos.safetensors

Each demo starts from a randomized reset (`env.seed(s); env.reset()`, never `set_init_state`), so
no demo starts from one of the 50 official evaluation init states. Camera-free envs: physics only
(~0.015 s a step). Like the evaluation runner, 10 settle no-ops come first and are not recorded;
failed demos are discarded and counted. Most demos execute the expert's arm actions with noise
while recording the clean ones (see expert_episode). Stored as one safetensors file: per step the object-state
tokens and the expert's action, per step its episode; metadata with the instructions and seeds.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from quantvla.errors import QuantVLAError
from quantvla.eval.expert import PickPlaceExpert
from quantvla.eval.libero import NOOP, import_libero
from quantvla.io import atomic_write
from quantvla.policy.state import goal_objects, object_tokens

DEMO_SEED_BASE = 1_000_000  # reset seeds of demos: far from anything the evaluation derives
WAIT_STEPS = 10
NOISY_SHARE, NOISE = 0.6, 0.3  # share of demos whose executed arm actions get noise, and its std


@dataclass
class Demos:
    objects: torch.Tensor  # [steps, NUM_OBJECTS, OBJECT_DIM]
    actions: torch.Tensor  # [steps, 7]
    episode: torch.Tensor  # [steps] int64, index into tasks / instructions
    tasks: list[int]  # per episode
    instructions: list[str]  # per episode
    meta: dict

    def save(self, path) -> Path:
        tensors = {"objects": self.objects.contiguous(), "actions": self.actions.contiguous(),
                   "episode": self.episode.contiguous()}
        meta = {"tasks": json.dumps(self.tasks), "instructions": json.dumps(self.instructions),
                "meta": json.dumps(self.meta)}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path) -> Demos:
        from safetensors import safe_open
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            t = load_file(str(path))
            return cls(t["objects"], t["actions"], t["episode"], json.loads(meta["tasks"]),
                       json.loads(meta["instructions"]), json.loads(meta["meta"]))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for a corrupt file
            raise QuantVLAError(f"{path} is not a demos file written by `python -m quantvla demos` ({err})") from None


def camera_free_env(suite: str, task_id: int):
    """A LIBERO env with no renderer and no camera observables (physics only)."""
    benchmark, get_libero_path, _ = import_libero()
    from libero.libero.envs.env_wrapper import ControlEnv
    s = benchmark.get_benchmark_dict()[suite]()
    task = s.get_task(task_id)
    bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
    env = ControlEnv(bddl_file_name=bddl, use_camera_obs=False, has_offscreen_renderer=False, has_renderer=False)
    return env, task.language


def expert_episode(env, obs: dict, max_steps: int, record: bool, noise: float = 0.0,
                   rng: np.random.Generator | None = None):
    """Run the expert from `obs` (after the settle steps); -> (success, steps, tokens, actions).
    With `noise`, the executed arm action gets Gaussian noise of that std (the gripper none) while
    the expert's clean action is recorded: demos then cover the states a slightly wrong policy
    drifts into, and show the way back (DART, Laskey et al. 2017)."""
    expert = PickPlaceExpert(env)
    _, obj, container = goal_objects(env)
    tokens, actions = [], []
    for step in range(max_steps):
        a = expert.act(obs)
        if record:
            tokens.append(object_tokens(obs, (obj, container)))
            actions.append(a)
        executed = a
        if noise:
            executed = a.copy()
            executed[:6] = np.clip(a[:6] + rng.normal(0.0, noise, 6) * [1, 1, 1, 0.3, 0.3, 0.3], -1, 1)
        obs, _, done, _ = env.step(executed)
        if bool(done):
            return True, step + 1, tokens, actions
    return False, max_steps, tokens, actions


def _task_demos(suite: str, task_id: int, per_task: int, max_steps: int, max_attempts: int,
                noisy_share: float, noise: float) -> dict:
    env, instruction = camera_free_env(suite, task_id)
    tokens, actions, lengths, seeds, failures = [], [], [], [], 0
    t0 = time.perf_counter()
    try:
        k = 0
        while len(lengths) < per_task and k < max_attempts:
            seed = DEMO_SEED_BASE + 1000 * task_id + k
            k += 1
            env.seed(seed)
            np.random.seed(seed)
            obs = env.reset()
            for _ in range(WAIT_STEPS):
                obs, _, _, _ = env.step(NOOP)
            noisy = len(lengths) < round(noisy_share * per_task)
            rng = np.random.default_rng(seed)
            ok, steps, tok, act = expert_episode(env, obs, max_steps, record=True, noise=noise if noisy else 0.0,
                                                 rng=rng)
            if not ok:
                failures += 1
                continue
            tokens += tok
            actions += act
            lengths.append(steps)
            seeds.append(seed)
    finally:
        env.close()
    return {"task": task_id, "instruction": instruction, "tokens": np.stack(tokens), "actions": np.stack(actions),
            "lengths": lengths, "seeds": seeds, "failures": failures, "wall_s": time.perf_counter() - t0}


def generate(suite: str, tasks: list[int], per_task: int, max_steps: int = 280, workers: int = 2,
             noisy_share: float = NOISY_SHARE, noise: float = NOISE, log=print) -> Demos:
    if per_task < 1:
        raise QuantVLAError(f"--per-task must be at least 1 (got {per_task})")
    if not 0.0 <= noisy_share <= 1.0 or noise < 0:
        raise QuantVLAError(f"noisy_share must lie in [0, 1] and noise be >= 0 (got {noisy_share}, {noise})")
    jobs = [(suite, t, per_task, max_steps, 3 * per_task, noisy_share, noise) for t in tasks]
    with ProcessPoolExecutor(max_workers=max(1, min(workers, len(jobs)))) as pool:
        results = list(pool.map(_task_demos, *zip(*jobs, strict=True)))
    objects, actions, episode, ep_tasks, instructions = [], [], [], [], []
    summary = {}
    for r in results:
        if len(r["lengths"]) < per_task:
            tried = len(r["lengths"]) + r["failures"]
            raise QuantVLAError(f"the expert succeeded in only {len(r['lengths'])} of {tried} "
                                f"attempts on {suite} task {r['task']}; it cannot make {per_task} demos there")
        for length in r["lengths"]:
            episode.append(np.full(length, len(ep_tasks)))
            ep_tasks.append(r["task"])
            instructions.append(r["instruction"])
        objects.append(r["tokens"])
        actions.append(r["actions"])
        summary[str(r["task"])] = {"demos": len(r["lengths"]), "failed_attempts": r["failures"],
                                   "mean_steps": float(np.mean(r["lengths"])), "seeds": r["seeds"],
                                   "wall_s": round(r["wall_s"], 1)}
        log(f"  {suite} task {r['task']}: {len(r['lengths'])} demos, {r['failures']} failed attempts, "
            f"mean {np.mean(r['lengths']):.0f} steps, {r['wall_s']:.0f} s")
    meta = {"suite": suite, "per_task": per_task, "max_steps": max_steps, "wait_steps": WAIT_STEPS,
            "noisy_share": noisy_share, "executed_action_noise": noise,
            "reset": "randomized (env.seed(s); env.reset()), never an official init state", "per_task_summary": summary}
    return Demos(torch.from_numpy(np.concatenate(objects)), torch.from_numpy(np.concatenate(actions)),
                 torch.from_numpy(np.concatenate(episode)).long(), ep_tasks, instructions, meta)


class ExpertPolicy:
    """The scripted expert behind the runner's policy interface (one action per query), so its
    success is measured on the official init states exactly as a model's is."""

    needs_images = False

    def __init__(self, task_env):
        self.task_env = task_env
        self.expert = None

    def reset(self) -> None:
        self.expert = PickPlaceExpert(self.task_env.env)

    def infer(self, obs: dict, instruction: str) -> np.ndarray:
        return self.expert.act(obs)[None]
