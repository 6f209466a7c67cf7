"""Eagle 2.5, GR00T N1.5's vision-language backbone: SigLIP, the mlp1 connector and Qwen3, run
once per observation (Isaac-GR00T's module names)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from quantvla.models.layers import (
    object_state_tokens,
)
from quantvla.models.observation import ModelInputs
from quantvla.models.qwen3 import Qwen3ForCausalLM
from quantvla.models.siglip import SiglipVisionModel

if TYPE_CHECKING:
    from quantvla.models.gr00t_n15 import GR00TConfig


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
        dt = em.language_model.model.embed_tokens.weight.dtype  # the LLM's; mlp1 is cast with it
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
