"""Expert demonstrations for the small trained policies.

    python -m quantvla demos --suite libero_object --tasks 0,1,2,3,4 --per-task 40 --out demos.safetensors
    python -m quantvla demos ... --render 128 --every 2 --out demos-rgb.safetensors   # with camera frames

Each demo starts from a randomized reset (`env.seed(s); env.reset()`, never `set_init_state`), so
no demo starts from one of the 50 official evaluation init states. Camera-free envs: physics only
(~0.015 s a step). Like the evaluation runner, 10 settle no-ops come first and are not recorded;
failed demos are discarded and counted. Most demos execute the expert's arm actions with noise
while recording the clean ones (see expert_episode). Stored as one safetensors file: per step the object-state
tokens and the expert's action, per step its episode; metadata with the instructions and seeds.

With --render R, the two cameras LIBERO policies read (agentview, wrist) are rendered at R x R and
kept every `every`-th step (uint8, exactly as the simulator returns them: upside down, unresized),
with the 8-D proprioceptive state at every step. A camera render costs far more than a physics step
on CPU, so only the kept steps render (the runner's render-on-query switch: physics is unchanged).
Frames are stored raw so that training feeds them through the very adapter that evaluation uses
(flip, crop, resize, normalisation: quantvla.policy.adapters), for any family.
"""

from __future__ import annotations

import dataclasses
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
from quantvla.eval.libero import CAMERAS, NOOP, TaskEnv, import_libero
from quantvla.eval.protocols import protocol_for
from quantvla.io import atomic_write
from quantvla.policy.adapters import libero_state
from quantvla.policy.state import goal_objects, object_tokens

DEMO_SEED_BASE = 1_000_000  # reset seeds of demos: far from anything the evaluation derives
WAIT_STEPS = 10
NOISY_SHARE, NOISE = 0.6, 0.3  # share of demos whose executed arm actions get noise, and its std
MIN_RENDER, MAX_RENDER = 16, 512


@dataclass
class Demos:
    objects: torch.Tensor  # [steps, NUM_OBJECTS, OBJECT_DIM]
    actions: torch.Tensor  # [steps, 7]
    episode: torch.Tensor  # [steps] int64, index into tasks / instructions
    tasks: list[int]  # per episode
    instructions: list[str]  # per episode
    meta: dict
    state: torch.Tensor | None = None  # [steps, 8] proprioception (rendered demos)
    images: torch.Tensor | None = None  # [frames, 2, R, R, 3] uint8 agentview + wrist, as rendered
    frame_step: torch.Tensor | None = None  # [frames] int64: the step each frame was observed at

    def save(self, path) -> Path:
        tensors = {"objects": self.objects.contiguous(), "actions": self.actions.contiguous(),
                   "episode": self.episode.contiguous()}
        for name in ("state", "images", "frame_step"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name).contiguous()
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
                       json.loads(meta["instructions"]), json.loads(meta["meta"]), t.get("state"), t.get("images"),
                       t.get("frame_step"))
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


@dataclass
class Episode:
    success: bool
    steps: int
    tokens: list  # per step: object tokens
    actions: list  # per step: the expert's clean action
    states: list  # per step: 8-D proprioception
    frames: list  # (step, [2, R, R, 3] uint8) every `every`-th step, when a camera switch is given


def expert_episode(env, obs: dict, max_steps: int, record: bool, noise: float = 0.0,
                   rng: np.random.Generator | None = None, camera=None, every: int = 1) -> Episode:
    """Run the expert from `obs` (after the settle steps, whose last one rendered when `camera` is
    given). With `noise`, the executed arm action gets Gaussian noise of that std (the gripper none)
    while the expert's clean action is recorded: demos then cover the states a slightly wrong policy
    drifts into, and show the way back (DART, Laskey et al. 2017). `camera(on)` switches rendering
    for the next env.step; frames are kept at steps 0, every, 2 every, ..."""
    expert = PickPlaceExpert(env)
    _, obj, container = goal_objects(env)
    ep = Episode(False, max_steps, [], [], [], [])
    for step in range(max_steps):
        a = expert.act(obs)
        if record:
            ep.tokens.append(object_tokens(obs, (obj, container)))
            ep.actions.append(a)
            ep.states.append(libero_state(obs))
            if camera is not None and step % every == 0:
                ep.frames.append((step, np.stack([np.asarray(obs[k]) for k in CAMERAS])))
        executed = a
        if noise:
            executed = a.copy()
            executed[:6] = np.clip(a[:6] + rng.normal(0.0, noise, 6) * [1, 1, 1, 0.3, 0.3, 0.3], -1, 1)
        if camera is not None:
            camera((step + 1) % every == 0)
        obs, _, done, _ = env.step(executed)
        if bool(done):
            ep.success, ep.steps = True, step + 1
            return ep
    return ep


def _task_demos(suite: str, task_id: int, per_task: int, max_steps: int, max_attempts: int,
                noisy_share: float, noise: float, render: int = 0, every: int = 1) -> dict:
    camera, task_env = None, None
    if render:  # the runner's env, cameras at R x R, rendering only the steps whose frames are kept
        task_env = TaskEnv(suite, task_id, dataclasses.replace(protocol_for(None), render=render))
        env, instruction, camera = task_env.env, task_env.instruction, task_env.render_next_step
    else:
        env, instruction = camera_free_env(suite, task_id)
    tokens, actions, states, frames, frame_step = [], [], [], [], []
    lengths, seeds, failures, done_steps = [], [], 0, 0
    t0 = time.perf_counter()
    try:
        k = 0
        while len(lengths) < per_task and k < max_attempts:
            seed = DEMO_SEED_BASE + 1000 * task_id + k
            k += 1
            if task_env is not None:
                obs = task_env.reset_randomized(seed)
            else:
                env.seed(seed)
                np.random.seed(seed)
                obs = env.reset()
            for i in range(WAIT_STEPS):
                if camera is not None:
                    camera(i == WAIT_STEPS - 1)  # the last settle step's frame is the first one kept
                obs, _, _, _ = env.step(NOOP)
            noisy = len(lengths) < round(noisy_share * per_task)
            rng = np.random.default_rng(seed)
            ep = expert_episode(env, obs, max_steps, record=True, noise=noise if noisy else 0.0, rng=rng,
                                camera=camera, every=every)
            if not ep.success:
                failures += 1
                continue
            tokens += ep.tokens
            actions += ep.actions
            states += ep.states
            for step, frame in ep.frames:
                frame_step.append(done_steps + step)
                frames.append(frame)
            done_steps += ep.steps
            lengths.append(ep.steps)
            seeds.append(seed)
    finally:
        env.close()
    return {"task": task_id, "instruction": instruction, "tokens": np.stack(tokens), "actions": np.stack(actions),
            "states": np.stack(states), "frames": np.stack(frames) if frames else None,
            "frame_step": np.asarray(frame_step, dtype=np.int64), "lengths": lengths, "seeds": seeds,
            "failures": failures, "wall_s": time.perf_counter() - t0}


def generate(suite: str, tasks: list[int], per_task: int, max_steps: int = 280, workers: int = 2,
             noisy_share: float = NOISY_SHARE, noise: float = NOISE, render: int = 0, every: int = 1,
             log=print) -> Demos:
    if per_task < 1:
        raise QuantVLAError(f"--per-task must be at least 1 (got {per_task})")
    if not 0.0 <= noisy_share <= 1.0 or noise < 0:
        raise QuantVLAError(f"noisy_share must lie in [0, 1] and noise be >= 0 (got {noisy_share}, {noise})")
    if render < 0 or (render and not MIN_RENDER <= render <= MAX_RENDER) or every < 1:
        raise QuantVLAError(f"--render must be 0 (no cameras) or {MIN_RENDER}..{MAX_RENDER} pixels and --every at "
                            f"least 1 (got {render}, {every})")
    jobs = [(suite, t, per_task, max_steps, 3 * per_task, noisy_share, noise, render, every) for t in tasks]
    if workers <= 1 or len(jobs) == 1:
        # in this process: a fork of a process whose threads (torch, EGL) hold a lock inherits it held,
        # and the child waits forever (seen in a pytest-xdist worker that had run LIBERO before)
        results = [_task_demos(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            results = list(pool.map(_task_demos, *zip(*jobs, strict=True)))
    objects, actions, episode, ep_tasks, instructions = [], [], [], [], []
    states, frames, frame_step, offset = [], [], [], 0
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
        states.append(r["states"])
        if r["frames"] is not None:
            frames.append(r["frames"])
            frame_step.append(r["frame_step"] + offset)
        offset += len(r["actions"])
        summary[str(r["task"])] = {"demos": len(r["lengths"]), "failed_attempts": r["failures"],
                                   "mean_steps": float(np.mean(r["lengths"])), "seeds": r["seeds"],
                                   "frames": 0 if r["frames"] is None else len(r["frames"]),
                                   "wall_s": round(r["wall_s"], 1)}
        log(f"  {suite} task {r['task']}: {len(r['lengths'])} demos, {r['failures']} failed attempts, "
            f"mean {np.mean(r['lengths']):.0f} steps, {r['wall_s']:.0f} s")
    meta = {"suite": suite, "per_task": per_task, "max_steps": max_steps, "wait_steps": WAIT_STEPS,
            "noisy_share": noisy_share, "executed_action_noise": noise,
            "reset": "randomized (env.seed(s); env.reset()), never an official init state",
            "render": render, "every": every if render else None,
            "cameras": list(CAMERAS) if render else [], "per_task_summary": summary}
    images = torch.from_numpy(np.concatenate(frames)) if frames else None
    return Demos(torch.from_numpy(np.concatenate(objects)), torch.from_numpy(np.concatenate(actions)),
                 torch.from_numpy(np.concatenate(episode)).long(), ep_tasks, instructions, meta,
                 torch.from_numpy(np.concatenate(states)), images,
                 torch.from_numpy(np.concatenate(frame_step)) if frames else None)


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
