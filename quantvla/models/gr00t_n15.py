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
from quantvla.models.layers import (
    LayerNorm,
    RMSNorm,
    attend,
    gelu_tanh,
    object_state_tokens,
    observe_output,
    rope,
    timestep_embedding,
)
from quantvla.models.observation import ModelInputs, initial_noise
from quantvla.models.protocol import AttentionSite, Role
from quantvla.models.siglip import SiglipConfig, SiglipVisionModel


@dataclass(frozen=True)
class Qwen3Config:
    width: int = 2048
    depth: int = 12  # Qwen3-1.7B has 28; GR00T N1.5 keeps the first 12
    mlp: int = 6144
    heads: int = 16
    kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 151680
    rope_theta: float = 1e6


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


class Qwen3Attention(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.heads, c.kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.width, c.heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.width, c.kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.width, c.kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.heads * c.head_dim, c.width, bias=False)
        self.q_norm = RMSNorm(c.head_dim, one_plus=False)
        self.k_norm = RMSNorm(c.head_dim, one_plus=False)

    def forward(self, x, positions, valid, theta):
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        return self.o_proj(attend(rope(q, positions, theta), rope(k, positions, theta), v, valid))


class Qwen3MLP(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.width, c.mlp, bias=False)
        self.up_proj = nn.Linear(c.width, c.mlp, bias=False)
        self.down_proj = nn.Linear(c.mlp, c.width, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3Layer(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(c.width, one_plus=False)
        self.self_attn = Qwen3Attention(c)
        self.post_attention_layernorm = RMSNorm(c.width, one_plus=False)
        self.mlp = Qwen3MLP(c)


class Qwen3Model(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab, c.width)
        self.layers = nn.ModuleList(Qwen3Layer(c) for _ in range(c.depth))
        self.norm = RMSNorm(c.width, one_plus=False)


class Qwen3ForCausalLM(nn.Module):
    """The tied lm_head is not built: Eagle computes its logits and discards them."""

    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.model = Qwen3Model(c)


class EagleModel(nn.Module):
    def __init__(self, c: GR00TConfig):
        super().__init__()
        self.vision_model = SiglipVisionModel(c.vision)
        self.mlp1 = nn.Sequential(nn.Linear(c.vision.width, c.llm.width))
        # not in Isaac-GR00T: projects object-state tokens into the VL sequence, where image tokens would be
        self.object_state_proj = nn.Linear(c.object_dim, c.llm.width) if c.object_dim else None
        self.language_model = Qwen3ForCausalLM(c.llm)


class EagleBackbone(nn.Module):
    def __init__(self, c: GR00TConfig):
        super().__init__()
        self.config = c
        self.eagle_model = EagleModel(c)

    def forward(self, inputs: ModelInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """-> VL features [B, T, 2048] (after the final norm) and their padding mask."""
        em, c = self.eagle_model, self.config
        dt = em.mlp1[0].weight.dtype
        parts, masks = [], []
        for i in range(inputs.images.shape[1]):
            img = inputs.images[:, i].to(em.vision_model.vision_model.embeddings.patch_embedding.weight.dtype)
            parts.append(em.mlp1(em.vision_model(img).to(dt)))
            masks.append(inputs.image_mask[:, i: i + 1].expand(-1, parts[-1].shape[1]))
        if em.object_state_proj is not None:
            tokens, mask = object_state_tokens(em.object_state_proj, inputs.objects, dt)
            parts.append(tokens)
            masks.append(mask)
        lm = em.language_model.model
        parts.append(lm.embed_tokens(inputs.tokens).to(dt))
        masks.append(inputs.token_mask)
        x, pad = torch.cat(parts, 1), torch.cat(masks, 1)
        t = x.shape[1]
        positions = pad.long().cumsum(1) - 1
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        valid = (causal[None] & pad[:, None, :])[:, None]
        for layer in lm.layers:
            x = x + layer.self_attn(layer.input_layernorm(x), positions, valid, c.llm.rope_theta)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return lm.norm(x), pad


# ------------------------------------------------------------------------------ action head
class Attention(nn.Module):
    """diffusers Attention: to_q, to_k, to_v, to_out.0 (to_out.1 is dropout)."""

    def __init__(self, dim: int, heads: int, head_dim: int, kv_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(kv_dim or dim, inner)
        self.to_v = nn.Linear(kv_dim or dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(self, x, context=None, site: AttentionSite | None = None):
        context = x if context is None else context
        b = x.shape[0]
        split = lambda y: y.view(b, -1, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        out = attend(split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context)), None, site)
        return observe_output(site, self.to_out[0](out))


class GELUProj(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return gelu_tanh(self.proj(x))


class FeedForward(nn.Module):
    """diffusers FeedForward: net.0 = GELU(proj), net.1 dropout, net.2 linear, net.3 dropout."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, hidden), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0)])

    def forward(self, x):
        for m in self.net:
            x = m(x)
        return x


class AdaLayerNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = LayerNorm(dim, eps=1e-5, elementwise_affine=False)

    def forward(self, x, temb):
        scale, shift = self.linear(F.silu(temb).to(self.linear.weight.dtype)).to(x.dtype).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class VLBlock(nn.Module):
    def __init__(self, c: GR00TConfig):
        super().__init__()
        d = c.llm.width
        self.norm1 = LayerNorm(d, eps=1e-5)
        self.attn1 = Attention(d, c.vl_heads, c.vl_head_dim)
        self.norm3 = LayerNorm(d, eps=1e-5)
        self.ff = FeedForward(d, c.vl_ff)

    def forward(self, x):
        x = x + self.attn1(self.norm1(x))
        return x + self.ff(self.norm3(x))


class SelfAttentionTransformer(nn.Module):
    def __init__(self, c: GR00TConfig):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(VLBlock(c) for _ in range(c.vl_blocks))

    def forward(self, x):
        for block in self.transformer_blocks:
            x = block(x)
        return x


class DiTBlock(nn.Module):
    def __init__(self, c: GR00TConfig, cross: bool):
        super().__init__()
        d = c.dit_width
        self.cross = cross
        self.norm1 = AdaLayerNorm(d)
        self.attn1 = Attention(d, c.dit_heads, c.dit_head_dim, kv_dim=c.llm.width if cross else None)
        self.norm3 = LayerNorm(d, eps=1e-5, elementwise_affine=False)
        self.ff = FeedForward(d, c.dit_ff)

    def forward(self, x, vl, temb, site):
        h = self.norm1(x, temb)
        x = x + self.attn1(h, vl if self.cross else None, site)
        return x + self.ff(self.norm3(x))


class TimestepEmbedding(nn.Module):
    def __init__(self, dim_in, dim):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(dim_in, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TimestepEncoder(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)

    def forward(self, t_disc):
        emb = timestep_embedding(t_disc, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
        return self.timestep_embedder(emb.to(self.timestep_embedder.linear_1.weight.dtype))


class DiT(nn.Module):
    def __init__(self, c: GR00TConfig):
        super().__init__()
        d = c.dit_width
        self.timestep_encoder = TimestepEncoder(d)
        # interleaved: even blocks cross-attend to the VL tokens, odd blocks self-attend
        self.transformer_blocks = nn.ModuleList(DiTBlock(c, cross=(i % 2 == 0)) for i in range(c.dit_blocks))
        self.norm_out = LayerNorm(d, eps=1e-6, elementwise_affine=False)
        self.proj_out_1 = nn.Linear(d, 2 * d)
        self.proj_out_2 = nn.Linear(d, c.hidden_size)

    def forward(self, x, vl, t_disc, sites):
        temb = self.timestep_encoder(t_disc)
        for block, site in zip(self.transformer_blocks, sites, strict=True):
            x = block(x, vl, temb, site)
        shift, scale = self.proj_out_1(F.silu(temb)).chunk(2, dim=-1)
        return self.proj_out_2(self.norm_out(x) * (1 + scale[:, None]) + shift[:, None])


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
