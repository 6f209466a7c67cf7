"""SigLIP vision tower (So400m/14 at full size), no pooling head; HF module names."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantvla.models.layers import LayerNorm, attend, gelu_tanh, weight_dtype


@dataclass(frozen=True)
class SiglipConfig:
    width: int = 1152
    depth: int = 27
    mlp: int = 4304
    heads: int = 16
    patch: int = 14
    image: int = 224

    @property
    def tokens(self) -> int:
        return (self.image // self.patch) ** 2


class SiglipAttention(nn.Module):
    def __init__(self, c: SiglipConfig):
        super().__init__()
        self.heads = c.heads
        self.q_proj, self.k_proj = nn.Linear(c.width, c.width), nn.Linear(c.width, c.width)
        self.v_proj, self.out_proj = nn.Linear(c.width, c.width), nn.Linear(c.width, c.width)

    def forward(self, x):
        b, t, w = x.shape
        split = lambda y: y.view(b, t, self.heads, w // self.heads).transpose(1, 2)  # noqa: E731
        return self.out_proj(attend(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), None))


class SiglipMLP(nn.Module):
    def __init__(self, c: SiglipConfig):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c.width, c.mlp), nn.Linear(c.mlp, c.width)

    def forward(self, x):
        return self.fc2(gelu_tanh(self.fc1(x)))


class SiglipLayer(nn.Module):
    def __init__(self, c: SiglipConfig):
        super().__init__()
        self.layer_norm1, self.self_attn = LayerNorm(c.width, eps=1e-6), SiglipAttention(c)
        self.layer_norm2, self.mlp = LayerNorm(c.width, eps=1e-6), SiglipMLP(c)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, c: SiglipConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, c.width, c.patch, stride=c.patch)
        self.position_embedding = nn.Embedding(c.tokens, c.width)

    def forward(self, images):
        x = self.patch_embedding(images).flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight[None].to(x.dtype)


class SiglipEncoder(nn.Module):
    def __init__(self, c: SiglipConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipLayer(c) for _ in range(c.depth))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVisionTransformer(nn.Module):
    """`.vision_model` of HF SiglipVisionModel: images [B, 3, H, W] in [-1, 1] -> tokens [B, T, width]."""

    def __init__(self, c: SiglipConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(c)
        self.encoder = SiglipEncoder(c)
        self.post_layernorm = LayerNorm(c.width, eps=1e-6)

    def forward(self, images):
        x = self.embeddings(images)  # fp32 under the dtype policy; the layers may be bf16
        return self.post_layernorm(self.encoder(x.to(weight_dtype(self.encoder.layers[0].mlp.fc1, x.dtype))))


class SiglipVisionModel(nn.Module):
    def __init__(self, c: SiglipConfig):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(c)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vision_model(images)
