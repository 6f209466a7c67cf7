"""GR00T N1.5 in plain torch, with Isaac-GR00T n1.5-release module names.

Eagle 2.5 backbone (SigLIP -> mlp1 connector -> Qwen3 truncated to its first 12 layers, final
norm) runs once; the action head normalizes the VL tokens (vlln), refines them with 4 self-
attention blocks, then runs the 16-block DiT (even blocks cross-attend to the VL tokens, odd
blocks self-attend, AdaLayerNorm from the timestep) for each flow-matching step. State, action
encoders and the decoder are per-embodiment weight banks (3-D parameters, not nn.Linear).
Flow matching in GR00T's convention: x_0 = noise, x_1 = actions, t = k/N, dt = +1/N,
timesteps discretized to 0..999.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from quantvla.errors import QuantInputError
from quantvla.models.checkpoint import Layout
from quantvla.models.dit import DiT, SelfAttentionTransformer
from quantvla.models.eagle import EagleBackbone
from quantvla.models.layers import (
    LayerNorm,
)
from quantvla.models.observation import ModelInputs, initial_noise
from quantvla.models.protocol import AttentionSite, Role
from quantvla.models.qwen3 import Qwen3Config
from quantvla.models.siglip import SiglipConfig


@dataclass(frozen=True)
class GR00TConfig:
    vision: SiglipConfig = field(default_factory=SiglipConfig)
    llm: Qwen3Config = field(default_factory=Qwen3Config)
    vl_blocks: int = 4
    vl_heads: int = 32
    vl_head_dim: int = 64
    vl_ff: int = 8192
    dit_blocks: int = 16
    dit_heads: int = 32
    dit_head_dim: int = 48
    dit_ff: int = 6144
    hidden_size: int = 1024  # DiT output width, decoder input
    action_dim: int = 32
    action_horizon: int = 16
    state_dim: int = 64
    num_embodiments: int = 32
    embodiment_id: int = 31  # "new_embodiment", what the LIBERO fine-tunes use
    num_future_tokens: int = 32
    max_seq_len: int = 1024
    num_steps: int = 4
    timestep_buckets: int = 1000
    max_token_len: int = 64
    num_images: int = 1
    # object-state tokens (the small trained policies' stand-in for the camera): 0 = none
    num_objects: int = 0
    object_dim: int = 0

    def __post_init__(self):
        # checked here, not at the first embedding lookup, where it would be an IndexError traceback
        if not 0 <= self.embodiment_id < self.num_embodiments:
            n = self.num_embodiments
            raise QuantInputError(f"GR00TConfig: embodiment_id={self.embodiment_id} is outside the {n} embodiments "
                                  f"of the action head (0..{n - 1}); "
                                  "pass the id your checkpoint was fine-tuned for (31, 'new_embodiment', for the "
                                  "LIBERO fine-tunes with 32 embodiments)")

    @property
    def dit_width(self) -> int:
        return self.dit_heads * self.dit_head_dim


FULL = GR00TConfig()
TINY = GR00TConfig(
    vision=SiglipConfig(width=64, depth=2, mlp=128, heads=2, patch=14, image=56),
    llm=Qwen3Config(width=64, depth=2, mlp=128, heads=4, kv_heads=2, head_dim=16, vocab=512),
    vl_blocks=2, vl_heads=2, vl_head_dim=32, vl_ff=256,
    dit_blocks=4, dit_heads=4, dit_head_dim=16, dit_ff=256, hidden_size=64,
    state_dim=16, max_token_len=16, max_seq_len=64,
)
# The small trained LIBERO policies: no camera; three object-state tokens stand in for it.
TINY_STATE = GR00TConfig(
    vision=SiglipConfig(width=64, depth=2, mlp=128, heads=2, patch=14, image=56),
    llm=Qwen3Config(width=128, depth=2, mlp=256, heads=4, kv_heads=2, head_dim=32, vocab=64),
    vl_blocks=2, vl_heads=2, vl_head_dim=32, vl_ff=256,
    dit_blocks=4, dit_heads=4, dit_head_dim=16, dit_ff=256, hidden_size=64,
    state_dim=16, max_token_len=16, max_seq_len=64, num_future_tokens=8, num_images=0, num_objects=3, object_dim=12,
)
# The small trained policies that see: agentview + wrist at 64 px through Eagle's SigLIP + mlp1 and the
# proprioceptive state, as GR00T's LIBERO fine-tunes read them. 16 px patches (16 image tokens a
# camera): 0/20 -> 5/5 on LIBERO against 8 px patches (64 a camera) after the same training, and 3.5x
# faster to train (docs/policies.md, run E).
TINY_VISION = GR00TConfig(
    vision=SiglipConfig(width=96, depth=3, mlp=192, heads=3, patch=16, image=64),
    llm=Qwen3Config(width=128, depth=2, mlp=256, heads=4, kv_heads=2, head_dim=32, vocab=64),
    vl_blocks=2, vl_heads=2, vl_head_dim=32, vl_ff=256,
    dit_blocks=4, dit_heads=4, dit_head_dim=16, dit_ff=256, hidden_size=64,
    state_dim=16, max_token_len=16, max_seq_len=64, num_future_tokens=8, num_images=2,
)


# Checkpoint layouts (quantvla.models.checkpoint): Isaac-GR00T's keys, no prefix (usually sharded
# with model.safetensors.index.json); LeRobot's, the same under "_groot_model."; and action-head-only
# files, loaded into model.action_head with the backbone untouched: the head's own keys ("head"),
# under "action_head." ("isaac-head") or "_groot_model.action_head." ("lerobot-head").
_EMBED = "backbone.eagle_model.language_model.model.embed_tokens.weight"
_ALIASES = {"backbone.eagle_model.language_model.lm_head.weight": _EMBED}
_IGNORED = ("backbone.eagle_model.vision_model.vision_model.head.",)
LAYOUTS = {"isaac": Layout("isaac", "", _ALIASES, _IGNORED),
           "lerobot": Layout("lerobot", "_groot_model.", _ALIASES, _IGNORED),
           "head": Layout("head", "", part="action_head"),
           "isaac-head": Layout("isaac-head", "action_head.", part="action_head"),
           "lerobot-head": Layout("lerobot-head", "_groot_model.action_head.", part="action_head")}


# ------------------------------------------------------------------------------ backbone
def _state_2d(state: torch.Tensor, batch: int, state_dim: int) -> torch.Tensor:
    """[B, state_dim], or LeRobot's [B, 1, state_dim] (one observation step), as [B, state_dim]."""
    given = tuple(state.shape)
    if state.dim() == 3 and state.shape[1] == 1:
        state = state[:, 0]
    if state.shape != (batch, state_dim):
        raise QuantInputError(f"GR00T state has shape {given}; expected [{batch}, {state_dim}] or "
                              f"LeRobot's [{batch}, 1, {state_dim}] (batch, one step, the config's state_dim, padded "
                              "with zeros as LeRobot pads to max_state_dim)")
    return state



# ------------------------------------------------------------------------------ action head
class CategorySpecificLinear(nn.Module):
    """A weight bank W[num_embodiments, in, out], b[num_embodiments, out]: not an nn.Linear."""

    def __init__(self, num: int, dim_in: int, dim_out: int):
        super().__init__()
        self.W = nn.Parameter(0.02 * torch.randn(num, dim_in, dim_out))
        self.b = nn.Parameter(torch.zeros(num, dim_out))

    def forward(self, x, emb_id):
        ids = emb_id.unique()
        if len(ids) == 1:  # one embodiment in the batch (always, in LIBERO): a plain matmul whose
            i = int(ids[0])  # backward is deterministic, unlike the gather's scatter-add on CPU
            return x @ self.W[i] + self.b[i]
        return torch.bmm(x, self.W[emb_id]) + self.b[emb_id][:, None]


class CategorySpecificMLP(nn.Module):
    def __init__(self, num, dim_in, hidden, dim_out):
        super().__init__()
        self.layer1 = CategorySpecificLinear(num, dim_in, hidden)
        self.layer2 = CategorySpecificLinear(num, hidden, dim_out)

    def forward(self, x, emb_id):
        return self.layer2(F.relu(self.layer1(x, emb_id)), emb_id)


def gr00t_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """GR00T's SinusoidalPositionalEncoding of the discretized timestep: [..] -> [.., dim]."""
    half = dim // 2
    exponent = -torch.arange(half, dtype=torch.float32, device=t.device) * (math.log(10000.0) / half)
    freqs = t.float()[..., None] * torch.exp(exponent)
    return torch.cat([freqs.sin(), freqs.cos()], dim=-1)


class MultiEmbodimentActionEncoder(nn.Module):
    def __init__(self, num, action_dim, width):
        super().__init__()
        self.W1 = CategorySpecificLinear(num, action_dim, width)
        self.W2 = CategorySpecificLinear(num, 2 * width, width)
        self.W3 = CategorySpecificLinear(num, width, width)
        self.width = width

    def forward(self, actions, t_disc, emb_id):
        a = self.W1(actions, emb_id)
        tau = gr00t_sinusoid(t_disc[:, None].expand(-1, actions.shape[1]), self.width).to(a.dtype)
        return self.W3(F.silu(self.W2(torch.cat([a, tau], -1), emb_id)), emb_id)


class FlowmatchingActionHead(nn.Module):
    def __init__(self, c: GR00TConfig):
        super().__init__()
        d = c.dit_width
        self.vlln = LayerNorm(c.llm.width, eps=1e-5)
        self.vl_self_attention = SelfAttentionTransformer(c)
        self.model = DiT(c)
        self.state_encoder = CategorySpecificMLP(c.num_embodiments, c.state_dim, c.hidden_size, d)
        self.action_encoder = MultiEmbodimentActionEncoder(c.num_embodiments, c.action_dim, d)
        self.action_decoder = CategorySpecificMLP(c.num_embodiments, c.hidden_size, c.hidden_size, c.action_dim)
        self.future_tokens = nn.Embedding(c.num_future_tokens, d)
        self.position_embedding = nn.Embedding(c.max_seq_len, d)


class GR00TN15(nn.Module):
    family = "gr00t-n15"

    def __init__(self, config: GR00TConfig = TINY):
        super().__init__()
        self.config = c = config
        self.backbone = EagleBackbone(c)
        self.action_head = FlowmatchingActionHead(c)
        blocks = self.action_head.model.transformer_blocks
        self._sites = [AttentionSite(f"action_head.model.transformer_blocks.{i}.attn1", c.dit_heads, c.dit_head_dim,
                                     b.attn1.to_q, b.attn1.to_out[0]) for i, b in enumerate(blocks)]

    # ------------------------------------------------------------------- quantizer protocol
    def linear_roles(self) -> dict[str, Role]:
        roles: dict[str, Role] = {}
        for name, module in self.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            if name.startswith("backbone.eagle_model.language_model.model.layers."):
                role = "llm"
            elif name.startswith("action_head.model.transformer_blocks."):
                role = "dit_mlp" if ".ff." in name else "dit_attn" if ".attn1." in name else "other"
            elif name.startswith(("backbone.eagle_model.vision_model.", "backbone.eagle_model.mlp1.",
                                  "backbone.eagle_model.object_state_proj")):
                role = "vision"
            else:
                role = "other"  # vl_self_attention, AdaLayerNorm linears, timestep encoder, proj_out
            roles[name] = role
        return roles

    def attention_sites(self) -> list[AttentionSite]:
        return self._sites

    # ---------------------------------------------------------------------------- forward
    def vl_embeddings(self, inputs: ModelInputs) -> torch.Tensor:
        feats, _ = self.backbone(inputs)  # padding is attended to, as in GR00T (no mask passed)
        return self._head_context(feats)

    def _head_context(self, features: torch.Tensor) -> torch.Tensor:
        head = self.action_head
        return head.vl_self_attention(head.vlln(features))

    def velocity(self, vl: torch.Tensor, state: torch.Tensor, x_t: torch.Tensor, t_disc: torch.Tensor) -> torch.Tensor:
        c, head = self.config, self.action_head
        b = x_t.shape[0]
        emb_id = torch.full((b,), c.embodiment_id, dtype=torch.long, device=x_t.device)
        dt = head.future_tokens.weight.dtype
        state_feats = head.state_encoder(state[:, None].to(dt), emb_id)
        act = head.action_encoder(x_t.to(dt), t_disc, emb_id)
        act = act + head.position_embedding.weight[: x_t.shape[1]][None].to(act.dtype)
        future = head.future_tokens.weight[None].expand(b, -1, -1)
        out = head.model(torch.cat([state_feats, future, act], 1), vl, t_disc, self._sites)
        return head.action_decoder(out, emb_id)[:, -x_t.shape[1]:].float()

    @torch.no_grad()
    def sample_actions(self, inputs: ModelInputs, noise: torch.Tensor | None = None, num_steps: int | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Flow matching from noise at t = 0 to actions at t = 1 in num_steps Euler steps."""
        b = inputs.batch
        if noise is None:
            noise = initial_noise(self.config, b, generator, inputs.tokens.device)
        return self._flow(self.vl_embeddings(inputs), inputs.state, noise, num_steps)

    @torch.no_grad()
    def sample_actions_from_features(self, features: torch.Tensor, state: torch.Tensor | None = None,
                                     noise: torch.Tensor | None = None, num_steps: int | None = None,
                                     generator: torch.Generator | None = None) -> torch.Tensor:
        """The action head alone, on backbone features computed elsewhere ([B, T, llm width]: the
        Eagle LLM's hidden states, LeRobot's `backbone_features`), for a head-only checkpoint."""
        c = self.config
        if features.dim() != 3 or features.shape[-1] != c.llm.width:
            raise QuantInputError(f"backbone features of shape {tuple(features.shape)}; the action head takes "
                                  f"[batch, tokens, {c.llm.width}] (the backbone LLM's hidden states)")
        if noise is None:
            noise = initial_noise(c, features.shape[0], generator, features.device)
        return self._flow(self._head_context(features), state, noise, num_steps)

    def _flow(self, vl: torch.Tensor, state: torch.Tensor | None, noise: torch.Tensor, num_steps: int | None):
        c = self.config
        steps = num_steps or c.num_steps
        b = noise.shape[0]
        state = _state_2d(state, b, c.state_dim) if state is not None else \
            torch.zeros(b, c.state_dim, device=noise.device)
        x = noise.float()
        for k in range(steps):
            t_disc = torch.full((b,), int(k / steps * c.timestep_buckets), dtype=torch.long, device=x.device)
            x = x + (1.0 / steps) * self.velocity(vl, state, x, t_disc)
        return x

    def example_inputs(self, batch: int = 1, seed: int = 0) -> ModelInputs:
        from quantvla.models.observation import random_inputs
        c = self.config
        return random_inputs(c.num_images, c.vision.image, c.llm.vocab, c.max_token_len, batch, c.state_dim, seed,
                             objects=(c.num_objects, c.object_dim))
