"""A model-zoo model as a LIBERO policy: observation -> model inputs -> action chunk -> 7-D actions."""

from __future__ import annotations

import numpy as np
import torch

from quantvla.eval.libero import CAMERAS
from quantvla.policy.adapters import LiberoAdapter, NormStats, WordTokenizer


def identity_stats(dim: int) -> NormStats:
    """Statistics that leave values unchanged (for models without a checkpoint's norm stats)."""
    return NormStats(np.zeros(dim), np.ones(dim), -np.ones(dim), np.ones(dim), -np.ones(dim), np.ones(dim))


class ModelPolicy:
    """needs_images / reset / infer, as the runner expects. Noise is seeded per query from the
    episode seed and the query index, so FP and quantized models of a pair draw the same noise.
    `blank_images`: an ablation, every camera image reads as black (nothing is rendered)."""

    needs_images = True

    def __init__(self, model, adapter: LiberoAdapter, seed: int = 0, num_steps: int | None = None,
                 blank_images: bool = False):
        self.model, self.adapter, self.seed, self.num_steps = model, adapter, seed, num_steps
        self.blank_images = blank_images
        self.needs_images = not blank_images
        self.queries = 0

    @classmethod
    def for_model(cls, model, instructions: list[str], seed: int = 0, num_steps: int | None = None) -> ModelPolicy:
        c = model.config
        stats = {"actions": identity_stats(7), "state": identity_stats(8)}
        tokenizer = WordTokenizer.fit(instructions)
        adapter = LiberoAdapter.for_config(model.family, c, tokenizer, stats)
        return cls(model, adapter, seed, num_steps)

    @classmethod
    def for_task(cls, model, task_env, seed: int = 0, bundle=None, num_steps: int | None = None,
                 blank_images: bool = False) -> ModelPolicy:
        """The policy for one LIBERO task: a trained state-based bundle reads the task's goal
        objects and needs no images; a bundle that sees and any other model read the cameras."""
        if bundle is None:
            return cls.for_model(model, [task_env.instruction], seed=seed, num_steps=num_steps)
        if bundle.sees:
            return cls(model, bundle.adapter(), seed, num_steps, blank_images)
        from quantvla.policy.state import goal_objects
        _, obj, container = goal_objects(task_env.env)
        policy = cls(model, bundle.adapter((obj, container)), seed, num_steps)
        policy.needs_images = False
        return policy

    def reset(self) -> None:
        self.queries = 0

    @torch.no_grad()
    def infer(self, obs: dict, instruction: str) -> np.ndarray:
        c = self.model.config
        if self.blank_images:
            obs = {**obs, **{k: np.zeros_like(obs[k]) for k in CAMERAS if k in obs}}
        inputs = self.adapter.inputs(obs, instruction, c.num_images)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.queries)
        self.queries += 1
        noise = torch.randn(1, c.action_horizon, c.action_dim, generator=gen)
        chunk = self.model.sample_actions(inputs, noise, num_steps=self.num_steps)
        return self.adapter.actions(chunk)
