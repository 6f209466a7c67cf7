"""Behaviour cloning of the small trained policies with each family's flow-matching objective.

    python -m quantvla train-tiny --model <family> --demos demos.safetensors --out <policy folder>

Demos with camera frames (`demos --render`) train a policy that sees: the family's "tiny-vision"
config, both cameras through its own vision tower (train_vision); camera-free demos train the
state-based stand-in ("tiny-state", object-state tokens; train).

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
from quantvla.eval.libero import CAMERAS
from quantvla.models import build
from quantvla.models.observation import ModelInputs
from quantvla.models.siglip import SiglipVisionModel
from quantvla.policy.adapters import STATE_BINS, LiberoAdapter, NormStats, WordTokenizer, state_prompt_words
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
    aux_weight: float = 0.5  # policies that see: weight of the training-only object-pose regression
    shift: int = 4  # policies that see: random-shift augmentation in pixels, 0 for none

    def __post_init__(self) -> None:
        if self.shift < 0:
            raise QuantVLAError(f"the random shift is a number of pixels >= 0 (0 turns it off), got {self.shift}")


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


def _start(family: str, config_name: str, demos: Demos, cfg: TrainConfig):
    """Seeded, the untrained model, the training and held-out episodes, and each step's episode."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    train_eps, held_eps = split(demos)
    return build(family, config_name).train(), train_eps, held_eps, demos.episode.numpy()


def _cosine_lr(cfg: TrainConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))


def train(family: str, demos: Demos, cfg: TrainConfig = TrainConfig(), log=print):
    """-> (model, adapter, calibration buffer, training record)."""
    if len(demos.actions) == 0:
        raise QuantVLAError("the demos file holds no steps")
    model, train_eps, held_eps, episode = _start(family, "tiny-state", demos, cfg)
    c = model.config
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
        lr = _cosine_lr(cfg, step)
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


# ----------------------------------------------------------------------------- policies that see
def vision_adapter(family: str, config, demos: Demos, steps: np.ndarray) -> LiberoAdapter:
    """The evaluation adapter (LiberoAdapter: cameras, instruction, the family's state) with
    statistics from the training steps; it turns the demos' raw frames into model images."""
    actions = model_actions(family, demos.actions.numpy()[steps])
    stats = {"actions": _stats(actions, STD_FLOOR), "state": _stats(demos.state.numpy()[steps], STD_FLOOR)}
    extra = state_prompt_words() if getattr(config, "discrete_state_input", False) else []
    return LiberoAdapter.for_config(family, config, WordTokenizer.fit(list(demos.instructions) + extra), stats)


def ordinal_number_embeddings(embedding: torch.nn.Embedding, tokenizer: WordTokenizer) -> None:
    """Start the 256 state-bin tokens as a smooth code of their value (sines and cosines of the bin
    at geometric frequencies), at the table's own scale: neighbouring bins start alike, so what the
    model learns about one bin carries to the next. A learned table starts random, and a tiny model
    trained from scratch would otherwise have to discover the order of 256 unrelated tokens."""
    w = embedding.weight
    half = w.shape[1] // 2
    freqs = torch.logspace(math.log10(0.5), math.log10(64.0), half)  # cycles over the bins' range
    angle = 2 * math.pi * (torch.arange(STATE_BINS)[:, None] / STATE_BINS) * freqs[None]
    code = torch.cat([angle.sin(), angle.cos()], 1)
    ids = [tokenizer.ids[str(b)] for b in range(STATE_BINS)]
    with torch.no_grad():
        w[ids, : 2 * half] = code * (w.std() / code.std())


def model_images(adapter: LiberoAdapter, frames: torch.Tensor) -> torch.Tensor:
    """[F, 2, R, R, 3] uint8 raw frames -> [F, 2, 3, S, S] through the adapter evaluation uses."""
    return torch.stack([adapter.images(dict(zip(CAMERAS, f.numpy(), strict=True))) for f in frames])


def _shift(images: torch.Tensor, gen: torch.Generator, shift: int) -> torch.Tensor:
    """Each image moved by up to `shift` pixels (replicate padding, then a random crop; DrQ,
    Kostrikov et al. 2020)."""
    if shift == 0:
        return images
    b, n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images.flatten(0, 1), (shift,) * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * shift + 1, (2, b * n), generator=gen)
    out = torch.stack([padded[i, :, y:y + h, x:x + w] for i, (x, y) in enumerate(zip(dx.tolist(), dy.tolist(),
                                                                                      strict=True))])
    return out.view(b, n, c, h, w)


def train_vision(family: str, demos: Demos, cfg: TrainConfig = TrainConfig(), log=print):
    """A policy whose observation is the two cameras + instruction (+ the family's proprioceptive
    state), no object tokens. Samples are the demos' frames (every `every`-th step); during training
    only, a linear head on the vision tower's patch tokens regresses the simulator's object
    tokens (TrainConfig.aux_weight): it is not part of the model and never runs at evaluation.
    -> (model, adapter, calibration buffer, training record)."""
    if demos.images is None or demos.state is None:
        raise QuantVLAError("these demos have no camera frames; make them with `python -m quantvla demos --render R`")
    model, train_eps, held_eps, episode = _start(family, "tiny-vision", demos, cfg)
    c = model.config
    frame_step = demos.frame_step.numpy()
    frame_ep = episode[frame_step]
    train_frames = np.flatnonzero(np.isin(frame_ep, train_eps))
    adapter = vision_adapter(family, c, demos, np.flatnonzero(np.isin(episode, train_eps)))
    t0 = time.perf_counter()
    images = model_images(adapter, demos.images)
    log(f"  {len(images)} frames -> model images {tuple(images.shape[1:])} in {time.perf_counter() - t0:.0f} s")
    targets = torch.from_numpy(adapter.stats["actions"].normalize(model_actions(family, demos.actions.numpy()),
                                                                  adapter.action_norm).astype(np.float32))
    index = torch.from_numpy(chunk_index(episode, c.action_horizon))
    raw_state = demos.state.numpy().astype(np.float64)
    # each frame's prompt: the instruction, and where the protocol writes it there, the state
    ids, masks = (torch.stack(t) for t in zip(*[adapter.tokenizer.encode(
        adapter.prompt(demos.instructions[episode[at]], raw_state[at]), c.max_token_len) for at in frame_step],
        strict=True))
    if adapter.discrete_state:  # a prompt cut at max_token_len would lose the state's last numbers
        longest = max(len(adapter.tokenizer.split(adapter.prompt(t, raw_state[0]))) + 1 for t in demos.instructions)
        if longest > c.max_token_len:
            raise QuantVLAError(f"a prompt with the state takes {longest} tokens and this config reads "
                                f"{c.max_token_len}; use shorter instructions or a config with a longer max_token_len")
        ordinal_number_embeddings(model.paligemma_with_expert.paligemma.model.language_model.embed_tokens,
                                  adapter.tokenizer)
    states = None
    if adapter.state_dim:
        s = adapter.stats["state"].normalize(raw_state, adapter.state_norm)
        states = torch.zeros(len(s), adapter.state_dim)
        states[:, :s.shape[1]] = torch.from_numpy(s.astype(np.float32))
    obj_flat = demos.objects.flatten(1).double()
    obj_mean, obj_std = obj_flat.mean(0), obj_flat.std(0).clamp_min(STD_FLOOR)
    aux_target = ((obj_flat - obj_mean) / obj_std).float()

    tower = next(m for m in model.modules() if isinstance(m, SiglipVisionModel))
    features: list[torch.Tensor] = []
    # every patch token, not their mean: object positions are where a feature is, which a mean loses
    hook = tower.register_forward_hook(lambda _m, _i, out: features.append(out.flatten(1)))
    aux_head = torch.nn.Linear(c.vision.width * c.vision.tokens * c.num_images, aux_target.shape[1])
    params = list(model.parameters()) + list(aux_head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses, aux_losses = [], []
    t0 = time.perf_counter()
    try:
        for step in range(cfg.steps):
            lr = _cosine_lr(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            pick = torch.from_numpy(train_frames)[torch.randint(len(train_frames), (cfg.batch,), generator=gen)]
            at = torch.from_numpy(frame_step)[pick]  # the step each frame was observed at
            inputs = ModelInputs(_shift(images[pick], gen, cfg.shift),
                                 torch.ones(cfg.batch, c.num_images, dtype=torch.bool),
                                 ids[pick], masks[pick], None if states is None else states[at])
            features.clear()
            loss = _loss(model, inputs, targets[index[at]], gen)
            aux = torch.nn.functional.mse_loss(aux_head(torch.cat(features[:c.num_images], 1)), aux_target[at])
            opt.zero_grad(set_to_none=True)
            (loss + cfg.aux_weight * aux).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            aux_losses.append(aux.item())
            if step % 250 == 0 or step == cfg.steps - 1:
                log(f"  step {step:5d}  loss {np.mean(losses[-100:]):.4f}  aux {np.mean(aux_losses[-100:]):.4f}  "
                    f"lr {lr:.2e}  {time.perf_counter() - t0:.0f} s")
    finally:
        hook.remove()
    model.eval()

    held_frames = np.flatnonzero(np.isin(frame_ep, held_eps))
    pick = held_frames[np.linspace(0, len(held_frames) - 1, CALIBRATION_ENTRIES).round().astype(int)]
    entries = []
    for i in pick:  # clones: each entry owns its tensors (a buffer is saved tensor by tensor)
        at = frame_step[i]
        entries.append(ModelInputs(images[i][None].clone(), torch.ones(1, c.num_images, dtype=torch.bool),
                                   ids[i][None].clone(), masks[i][None].clone(),
                                   None if states is None else states[at][None].clone()))
    calibration = CalibrationBuffer.from_inputs(entries, c.action_horizon, c.action_dim, seed=cfg.seed)
    record = {"steps": cfg.steps, "batch": cfg.batch, "lr": cfg.lr, "seed": cfg.seed,
              "train_demos": len(train_eps), "held_out_demos": len(held_eps), "train_frames": len(train_frames),
              "augmentation": f"random shift +-{cfg.shift} px" if cfg.shift else "none",
              "state": "in the prompt, 256 bins" if adapter.discrete_state else
              ("proprioceptive input" if adapter.state_dim else "none"),
              "aux_loss": f"object tokens from the vision tower's patch tokens, weight {cfg.aux_weight}, training only",
              "initial_loss": float(np.mean(losses[:10])),
              "final_loss": float(np.mean(losses[-100:])), "final_aux_loss": float(np.mean(aux_losses[-100:])),
              "wall_s": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads()}
    return model, adapter, calibration, record
