"""Behaviour cloning of the small state-based policies with each family's flow-matching objective.

    python -m quantvla train-tiny --model <family> --demos demos.safetensors --out <policy folder>

(docs/policies.md has the commands that made the shipped policies.) The family's record says
which convention its flow matching uses (quantvla.families.Family.flow):
noise_at_one (openpi, pi0.5): x_t = t noise + (1 - t) actions, target velocity noise - actions, t ~ Beta(1.5, 1)
       scaled into [0.001, 1]; the prefix (object tokens + instruction) runs with gradients.
data_at_one (GR00T N1.5): x_t = (1 - t) noise + t actions, target actions - noise, t = 0.999 (1 - Beta(1.5, 1)),
       discretized to 1000 buckets; the robot token is also its proprioceptive state.
Targets are action chunks of the model's horizon from each demo step, padded with the episode's
last action. Seeded end to end: the same demos and seed give the same weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from quantvla import families
from quantvla.calibration.buffer import CalibrationBuffer
from quantvla.errors import QuantVLAError
from quantvla.models import build
from quantvla.models.observation import ModelInputs
from quantvla.policy.adapters import NormStats, WordTokenizer
from quantvla.policy.state import ROBOT_DIM, StateAdapter, model_actions
from quantvla.trained.demos import Demos

HELD_OUT_PER_TASK = 2  # demos kept out of training: the calibration buffer is drawn from them
CALIBRATION_ENTRIES = 32
STD_FLOOR = 0.01  # features that barely vary in the demos must not be blown up at run time
RANGE_FLOOR = 0.05


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 4000
    batch: int = 256
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup: int = 200
    seed: int = 0


def _stats(x: np.ndarray, floor: float) -> NormStats:
    x = x.astype(np.float64)
    q01, q99 = np.quantile(x, 0.01, axis=0), np.quantile(x, 0.99, axis=0)
    mid = (q01 + q99) / 2
    half = np.maximum((q99 - q01) / 2, RANGE_FLOOR / 2)
    lo, hi = x.min(0), x.max(0)
    mmid, mhalf = (lo + hi) / 2, np.maximum((hi - lo) / 2, RANGE_FLOOR / 2)
    return NormStats(x.mean(0), np.maximum(x.std(0), floor), mid - half, mid + half, mmid - mhalf, mmid + mhalf)


def split(demos: Demos) -> tuple[np.ndarray, np.ndarray]:
    """Episode indices for training and held out (the last HELD_OUT_PER_TASK demos of each task)."""
    tasks = np.asarray(demos.tasks)
    held = np.concatenate([np.flatnonzero(tasks == t)[-HELD_OUT_PER_TASK:] for t in sorted(set(demos.tasks))])
    train = np.setdiff1d(np.arange(len(tasks)), held)
    return train, held


def chunk_index(episode: np.ndarray, horizon: int) -> np.ndarray:
    """[steps, horizon] indices of each step's action chunk, clamped to its episode's last step."""
    last = np.zeros_like(episode)
    for e in np.unique(episode):
        idx = np.flatnonzero(episode == e)
        last[idx] = idx[-1]
    steps = np.arange(len(episode))[:, None] + np.arange(horizon)[None]
    return np.minimum(steps, last[:, None])


def make_adapter(family: str, config, demos: Demos, steps: np.ndarray) -> StateAdapter:
    tokens = demos.objects.numpy()[steps]
    actions = model_actions(family, demos.actions.numpy()[steps])
    stats = {"objects": _stats(tokens.reshape(len(tokens), -1), STD_FLOOR),
             "state": _stats(tokens[:, 0, :ROBOT_DIM], STD_FLOOR),
             "actions": _stats(actions, STD_FLOOR)}
    return StateAdapter(family, config, WordTokenizer.fit(demos.instructions), stats)


def _loss(model, inputs, chunk: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    c = model.config
    b = chunk.shape[0]
    target = torch.zeros(b, c.action_horizon, c.action_dim)
    target[:, :, :chunk.shape[2]] = chunk
    noise = torch.randn(target.shape, generator=gen)
    beta = torch.distributions.Beta(1.5, 1.0).sample((b,))  # uses the global RNG, seeded by train()
    if families.of(model).flow == "noise_at_one":  # openpi: x_t = t noise + (1 - t) actions
        t = beta * 0.999 + 0.001
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * target
        cache, pad = model.prefix_cache(inputs)
        v = model.denoise_step(cache, pad, x_t, t)
        goal = noise - target
    else:
        t = 0.999 * (1 - beta)
        x_t = (1 - t[:, None, None]) * noise + t[:, None, None] * target
        t_disc = (t * c.timestep_buckets).long()
        v = model.velocity(model.vl_embeddings(inputs), inputs.state, x_t, t_disc)
        goal = target - noise
    return torch.nn.functional.mse_loss(v[:, :, :7], goal[:, :, :7])  # padded action dims carry nothing


def train(family: str, demos: Demos, cfg: TrainConfig = TrainConfig(), log=print):
    """-> (model, adapter, calibration buffer, training record)."""
    if len(demos.actions) == 0:
        raise QuantVLAError("the demos file holds no steps")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build(family, "tiny-state").train()
    c = model.config
    train_eps, held_eps = split(demos)
    episode = demos.episode.numpy()
    train_steps = np.flatnonzero(np.isin(episode, train_eps))
    adapter = make_adapter(family, c, demos, train_steps)
    index = chunk_index(episode, c.action_horizon)
    all_tokens = demos.objects.numpy()
    targets = adapter.target(demos.actions.numpy())
    instructions = demos.instructions
    objects_n, state_n = adapter.normalize(all_tokens)
    ids_by_episode, mask_by_episode = adapter.encode(instructions)
    target_t = torch.from_numpy(targets)
    index_t = torch.from_numpy(index)
    episode_t = torch.from_numpy(episode)

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        pick = torch.from_numpy(train_steps)[torch.randint(len(train_steps), (cfg.batch,), generator=gen)]
        ep = episode_t[pick]
        inputs = ModelInputs(torch.zeros(cfg.batch, 0, 3, 1, 1), torch.zeros(cfg.batch, 0, dtype=torch.bool),
                             ids_by_episode[ep], mask_by_episode[ep],
                             None if state_n is None else state_n[pick], objects_n[pick])
        loss = _loss(model, inputs, target_t[index_t[pick]], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 500 == 0 or step == cfg.steps - 1:
            log(f"  step {step:5d}  loss {np.mean(losses[-100:]):.4f}  lr {lr:.2e}  {time.perf_counter() - t0:.0f} s")
    model.eval()

    # calibration: observations from the held-out demos, evenly spread over their steps
    held_steps = np.flatnonzero(np.isin(episode, held_eps))
    pick = held_steps[np.linspace(0, len(held_steps) - 1, CALIBRATION_ENTRIES).round().astype(int)]
    entries = [adapter.batch(all_tokens[i][None], [instructions[episode[i]]]) for i in pick]
    calibration = CalibrationBuffer.from_inputs(entries, c.action_horizon, c.action_dim, seed=cfg.seed)
    record = {"steps": cfg.steps, "batch": cfg.batch, "lr": cfg.lr, "seed": cfg.seed,
              "train_demos": len(train_eps), "held_out_demos": len(held_eps), "train_samples": len(train_steps),
              "initial_loss": float(np.mean(losses[:10])), "final_loss": float(np.mean(losses[-100:])),
              "wall_s": round(time.perf_counter() - t0, 1),
              "threads": torch.get_num_threads()}
    return model, adapter, calibration, record
