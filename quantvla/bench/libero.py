"""Episode time of the naive LIBERO loop (both cameras rendered every step) against the runner's
render-on-query loop, side by side on the same episode (same init state, seed and actions)."""

from __future__ import annotations

import numpy as np

from quantvla.eval.libero import TaskEnv
from quantvla.eval.protocols import load_protocol


class _ImagePolicy:
    """Reads both images and the state at each query (as a VLA does); replans every 5 steps."""

    needs_images = True

    def reset(self):
        pass

    def infer(self, obs, instruction):
        img = obs["agentview_image"].astype(float)
        base = np.tanh([img.mean() / 255 - 0.5, 0.0, obs["robot0_eef_pos"][2] - 1, 0, 0, 0, 1])
        return np.stack([base] * 10)


def run(suite: str = "libero_spatial", task_id: int = 0, steps: int = 100, protocol: str = "openpi",
        rounds: int = 2, log=print) -> dict:
    p = load_protocol(protocol)
    times = {"naive": [], "render_on_query": []}
    for _ in range(rounds):  # interleaved: naive, fast, naive, fast
        for mode, flag in (("naive", False), ("render_on_query", True)):
            env = TaskEnv(suite, task_id, p, render_on_query=flag)
            try:
                r = env.run_episode(0, _ImagePolicy(), seed=p.seed, max_steps=steps)
            finally:
                env.close()
            times[mode].append(r.wall_s)
            log(f"  {mode}: {r.steps} steps, {r.queries} queries, {r.wall_s:.1f} s")
    naive, fast = min(times["naive"]), min(times["render_on_query"])
    out = {"suite": suite, "task": task_id, "steps": steps, "replan": p.replan_steps, "naive_s": round(naive, 2),
           "render_on_query_s": round(fast, 2), "speedup": round(naive / fast, 2)}
    log(f"episode of {steps} steps (+{p.wait_steps} wait), replan {p.replan_steps}: naive {naive:.1f} s, "
        f"render on query {fast:.1f} s: {naive / fast:.2f}x faster")
    return out
