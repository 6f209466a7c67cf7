"""pi0.5 in plain torch, with openpi's PyTorch module names (PI0Pytorch, pi05=True).

SigLIP -> projector -> Gemma-2B prefix (images + text), cached once; then Euler steps of the
Gemma-300M action expert on the action tokens, sharing each layer's attention with the cached
prefix K/V. The expert's norms are adaRMS, conditioned on the flow-matching time; its residuals
are gated. Flow matching in openpi's convention: x_1 = noise, x_0 = actions, dt = -1/steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from quantvla.models.checkpoint import Layout
from quantvla.models.layers import (
    AdaRMSNorm,
    RMSNorm,
    attend,
    gelu_tanh,
    object_state_tokens,
    observe_output,
    rope,
    sinusoidal,
    weight_dtype,
)
from quantvla.models.observation import ModelInputs, initial_noise
from quantvla.models.protocol import AttentionSite, Role
from quantvla.models.siglip import SiglipConfig, SiglipVisionModel


@dataclass(frozen=True)
class GemmaConfig:
    width: int
    depth: int
    mlp: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int = 0  # 0: no embedding (the action expert)


@dataclass(frozen=True)
class PI05Config:
    vision: SiglipConfig = field(default_factory=SiglipConfig)
    llm: GemmaConfig = GemmaConfig(2048, 18, 16384, 8, 1, 256, 257152)
    expert: GemmaConfig = GemmaConfig(1024, 18, 4096, 8, 1, 256)
    action_dim: int = 32
    action_horizon: int = 10  # pi05_libero
    num_steps: int = 10
    max_token_len: int = 200
    num_images: int = 3
    rope_theta: float = 10000.0
    # object-state tokens (the small trained policies' stand-in for the camera): 0 = none
    num_objects: int = 0
    object_dim: int = 0
    # openpi's Pi0Config.discrete_state_input: the proprioceptive state is written into the prompt as
    # 256-bin numbers (pi0.5's default; openpi's pi05_libero turns it off, LeRobot's pi05 keeps it)
    discrete_state_input: bool = False

    def __post_init__(self):
        a, b = self.llm, self.expert
        if (a.depth, a.heads, a.kv_heads, a.head_dim) != (b.depth, b.heads, b.kv_heads, b.head_dim):
            raise ValueError("pi0.5's two experts share one attention per layer: depth, heads, KV heads and "
                             "head_dim must be equal")


FULL = PI05Config()
TINY = PI05Config(
    vision=SiglipConfig(width=64, depth=2, mlp=128, heads=2, patch=14, image=56),
    llm=GemmaConfig(64, 2, 128, 2, 1, 32, 512),
    expert=GemmaConfig(32, 2, 64, 2, 1, 32),
    max_token_len=16, num_images=2,
)
# The small trained LIBERO policies: no camera; three object-state tokens stand in for it.
TINY_STATE = PI05Config(
    vision=SiglipConfig(width=64, depth=2, mlp=128, heads=2, patch=14, image=56),
    llm=GemmaConfig(128, 2, 256, 2, 1, 32, 64),
    expert=GemmaConfig(128, 2, 256, 2, 1, 32),
    max_token_len=16, num_images=0, num_objects=3, object_dim=12,
)
# The small trained policies that see: agentview + wrist at 64 px through SigLIP, the state in the
# prompt as pi0.5 does it (the vocabulary holds the 256 bin numbers). 16 px patches (16 image tokens a
# camera, 32 against at most 32 of language): measured better than 8 px patches (128 tokens) on
# LIBERO after the same training, and 3.3x faster to train (docs/policies.md, run E).
TINY_VISION = PI05Config(
    vision=SiglipConfig(width=96, depth=3, mlp=192, heads=3, patch=16, image=64),
    llm=GemmaConfig(128, 2, 256, 2, 1, 32, 320),
    expert=GemmaConfig(128, 2, 256, 2, 1, 32),
    max_token_len=32, num_images=2, discrete_state_input=True,
)


# Checkpoint layouts (quantvla.models.checkpoint): openpi's own keys, no prefix, the tied embedding
# stored as paligemma.lm_head.weight and gemma_expert.lm_head.weight (random, unused) tolerated;
# LeRobot's, the same under "model.".
_EMBED = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
_ALIASES = {"paligemma_with_expert.paligemma.lm_head.weight": _EMBED}
_IGNORED = ("paligemma_with_expert.gemma_expert.lm_head.",)
LAYOUTS = {"openpi": Layout("openpi", "", _ALIASES, _IGNORED),
           "lerobot": Layout("lerobot", "model.", _ALIASES, _IGNORED)}


class GemmaAttention(nn.Module):
    def __init__(self, width: int, c: GemmaConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.heads, c.kv_heads, c.head_dim
        self.q_proj = nn.Linear(width, c.heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(width, c.kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(width, c.kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.heads * c.head_dim, width, bias=False)

    def qkv(self, h, positions, theta):
        b, t, _ = h.shape
        q = self.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        return rope(q, positions, theta), rope(k, positions, theta), v


class GemmaMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class GemmaLayer(nn.Module):
    def __init__(self, c: GemmaConfig, adaptive: bool):
        super().__init__()
        norm = (lambda: AdaRMSNorm(c.width, c.width)) if adaptive else (lambda: RMSNorm(c.width))
        self.input_layernorm = norm()
        self.self_attn = GemmaAttention(c.width, c)
        self.post_attention_layernorm = norm()
        self.mlp = GemmaMLP(c.width, c.mlp)


class GemmaModel(nn.Module):
    def __init__(self, c: GemmaConfig, adaptive: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab, c.width) if c.vocab else None
        self.layers = nn.ModuleList(GemmaLayer(c, adaptive) for _ in range(c.depth))
        self.norm = AdaRMSNorm(c.width, c.width) if adaptive else RMSNorm(c.width)


class MultiModalProjector(nn.Module):
    def __init__(self, c: PI05Config):
        super().__init__()
        self.linear = nn.Linear(c.vision.width, c.llm.width)


class PaliGemmaInner(nn.Module):
    def __init__(self, c: PI05Config):
        super().__init__()
        self.vision_tower = SiglipVisionModel(c.vision)
        self.multi_modal_projector = MultiModalProjector(c)
        self.language_model = GemmaModel(c.llm, adaptive=False)


class PaliGemma(nn.Module):
    """The tied lm_head is not built: it never reaches the actions (its checkpoint key is the
    embedding, see checkpoint.py)."""

    def __init__(self, c: PI05Config):
        super().__init__()
        self.model = PaliGemmaInner(c)


class GemmaExpert(nn.Module):
    """gemma_expert: its lm_head exists in openpi's module but is random and unused; not built."""

    def __init__(self, c: PI05Config):
        super().__init__()
        self.model = GemmaModel(c.expert, adaptive=True)


class PaliGemmaWithExpert(nn.Module):
    def __init__(self, c: PI05Config):
        super().__init__()
        self.paligemma = PaliGemma(c)
        self.gemma_expert = GemmaExpert(c)


class PI05(nn.Module):
    family = "pi05"

    def __init__(self, config: PI05Config = TINY):
        super().__init__()
        self.config = c = config
        self.paligemma_with_expert = PaliGemmaWithExpert(c)
        self.action_in_proj = nn.Linear(c.action_dim, c.expert.width)
        self.action_out_proj = nn.Linear(c.expert.width, c.action_dim)
        self.time_mlp_in = nn.Linear(c.expert.width, c.expert.width)
        self.time_mlp_out = nn.Linear(c.expert.width, c.expert.width)
        # not in openpi: projects object-state tokens into the prefix, where image tokens would be
        self.object_state_proj = nn.Linear(c.object_dim, c.llm.width) if c.object_dim else None
        experts = self.paligemma_with_expert.gemma_expert.model.layers
        prefix = "paligemma_with_expert.gemma_expert.model.layers"
        self._sites = [AttentionSite(f"{prefix}.{i}.self_attn", c.expert.heads, c.expert.head_dim,
                                     layer.self_attn.q_proj, layer.self_attn.o_proj)
                       for i, layer in enumerate(experts)]

    # ------------------------------------------------------------------- quantizer protocol
    def linear_roles(self) -> dict[str, Role]:
        roles: dict[str, Role] = {}
        for name, module in self.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            if ".language_model.layers." in name:
                role = "llm"
            elif ".gemma_expert.model.layers." in name and (".mlp." in name or ".self_attn." in name):
                role = "dit_mlp" if ".mlp." in name else "dit_attn"
            elif ".vision_tower." in name or ".multi_modal_projector." in name or name == "object_state_proj":
                role = "vision"
            else:
                role = "other"  # action_in/out_proj, time_mlp_*, adaRMS dense
            roles[name] = role
        return roles

    def attention_sites(self) -> list[AttentionSite]:
        return self._sites

    # ---------------------------------------------------------------------------- forward
    @property
    def _lm(self) -> GemmaModel:
        return self.paligemma_with_expert.paligemma.model.language_model

    @property
    def _expert(self) -> GemmaModel:
        return self.paligemma_with_expert.gemma_expert.model

    def _dtype(self) -> torch.dtype:
        return self.action_in_proj.weight.dtype

    def embed_prefix(self, inputs: ModelInputs) -> tuple[torch.Tensor, torch.Tensor]:
        pg = self.paligemma_with_expert.paligemma.model
        dt = self._dtype()
        parts, masks = [], []
        for i in range(inputs.images.shape[1]):
            img = inputs.images[:, i].to(pg.vision_tower.vision_model.embeddings.patch_embedding.weight.dtype)
            feats = pg.vision_tower(img)
            feats = pg.multi_modal_projector.linear(feats.to(weight_dtype(pg.multi_modal_projector.linear, dt))).to(dt)
            parts.append(feats)
            masks.append(inputs.image_mask[:, i: i + 1].expand(-1, feats.shape[1]))
        if self.object_state_proj is not None:
            tokens, mask = object_state_tokens(self.object_state_proj, inputs.objects, dt)
            parts.append(tokens)
            masks.append(mask)
        text = self._lm.embed_tokens(inputs.tokens).to(dt) * math.sqrt(self.config.llm.width)
        parts.append(text)
        masks.append(inputs.token_mask)
        return torch.cat(parts, 1), torch.cat(masks, 1)

    def prefix_cache(self, inputs: ModelInputs) -> tuple[list, torch.Tensor]:
        """Run the prefix once; per layer its rotated K and V. Only the last layer's K/V (not its
        q, o or MLP) can reach the actions, so that layer stops after K/V."""
        x, pad = self.embed_prefix(inputs)
        positions = pad.long().cumsum(1) - 1
        valid = (pad[:, None, :] & pad[:, :, None])[:, None]
        cache = []
        theta = self.config.rope_theta
        for i, layer in enumerate(self._lm.layers):
            h = layer.input_layernorm(x)
            q, k, v = layer.self_attn.qkv(h, positions, theta)
            cache.append((k, v))
            if i == len(self._lm.layers) - 1:
                break
            x = x + layer.self_attn.o_proj(attend(q, k, v, valid))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return cache, pad

    def time_condition(self, t: torch.Tensor) -> torch.Tensor:
        emb = sinusoidal(t, self.config.expert.width, 4e-3, 4.0).to(self._dtype())
        return F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(emb))))

    def denoise_step(self, cache, prefix_pad: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity at (x_t, t) for the action chunk, against the cached prefix."""
        b, horizon, _ = x_t.shape
        cond = self.time_condition(t)
        x = self.action_in_proj(x_t.to(self._dtype()))
        positions = prefix_pad.long().sum(1, keepdim=True) + torch.arange(horizon, device=x.device)[None]
        # action tokens see every valid prefix token and every action token; the prefix never sees them
        valid = torch.cat([prefix_pad[:, None, :].expand(b, horizon, -1),
                           torch.ones(b, horizon, horizon, dtype=torch.bool, device=x.device)], 2)[:, None]
        theta = self.config.rope_theta
        for layer, (pk, pv), site in zip(self._expert.layers, cache, self._sites, strict=True):
            h, gate = layer.input_layernorm(x, cond)
            q, k, v = layer.self_attn.qkv(h, positions, theta)
            out = attend(q, torch.cat([pk.to(k.dtype), k], 2), torch.cat([pv.to(v.dtype), v], 2), valid, site)
            z = observe_output(site, layer.self_attn.o_proj(out))
            x = x + z * gate
            h, gate = layer.post_attention_layernorm(x, cond)
            x = x + layer.mlp(h) * gate
        h, _ = self._expert.norm(x, cond)
        return self.action_out_proj(h).float()

    @torch.no_grad()
    def sample_actions(self, inputs: ModelInputs, noise: torch.Tensor | None = None, num_steps: int | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Flow-matching sampling: from noise at t = 1 to actions at t = 0 in num_steps Euler steps."""
        c = self.config
        steps = num_steps or c.num_steps
        b = inputs.batch
        if noise is None:
            noise = initial_noise(c, b, generator, inputs.tokens.device)
        cache, pad = self.prefix_cache(inputs)
        x = noise.float()
        dt = -1.0 / steps
        for i in range(steps):
            t = torch.full((b,), 1.0 + i * dt, device=x.device)
            x = x + dt * self.denoise_step(cache, pad, x, t)
        return x

    def example_inputs(self, batch: int = 1, seed: int = 0) -> ModelInputs:
        from quantvla.models.observation import random_inputs
        c = self.config
        return random_inputs(c.num_images, c.vision.image, c.llm.vocab, c.max_token_len, batch, seed=seed,
                             objects=(c.num_objects, c.object_dim))

    def with_horizon(self, horizon: int) -> PI05Config:
        return replace(self.config, action_horizon=horizon)
