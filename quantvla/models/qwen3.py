"""Qwen3 (the language model inside GR00T N1.5's Eagle 2.5 backbone) in plain torch, with
Hugging Face's module names: grouped-query attention with per-head q/k RMSNorm, SwiGLU MLP."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from quantvla.models.layers import (
    RMSNorm,
    attend,
    rope,
)


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
