"""GR00T N1.5's flow-matching transformer: the VL self-attention blocks and the DiT (even blocks
cross-attend to the VL tokens, odd blocks self-attend; AdaLayerNorm from the timestep), with
diffusers' module names as Isaac-GR00T uses them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import nn

from quantvla.models.layers import (
    LayerNorm,
    attend,
    gelu_tanh,
    observe_output,
    timestep_embedding,
)
from quantvla.models.protocol import AttentionSite

if TYPE_CHECKING:
    from quantvla.models.gr00t_n15 import GR00TConfig


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
