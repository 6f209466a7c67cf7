"""Building blocks shared by the model families: norms, rotary embeddings, attention with
calibration observers, sinusoidal embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from quantvla.errors import QuantVLAError
from quantvla.models.protocol import AttentionSite

NEG_INF = -2.3819763e38  # what openpi/HF use as the masked logit


class RMSNorm(nn.Module):
    """RMSNorm. Gemma style scales by (1 + weight); Qwen3 style by weight."""

    def __init__(self, dim: int, eps: float = 1e-6, one_plus: bool = True):
        super().__init__()
        self.eps, self.one_plus = eps, one_plus
        self.weight = nn.Parameter(torch.zeros(dim) if one_plus else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight.float()
        return (h * (1.0 + w if self.one_plus else w)).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computed in float32 whatever the input dtype (norms stay fp32 under the
    bf16 dtype policy); same parameter names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class AdaRMSNorm(nn.Module):
    """pi0.5's adaptive RMSNorm: dense(cond) -> scale, shift, gate; no weight of its own."""

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        # openpi zero-initializes this layer for training; a random model must not, or every gate
        # is 0 and the expert's attention and MLP never reach the actions
        self.dense = nn.Linear(cond_dim, 3 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        scale, shift, gate = self.dense(cond.to(self.dense.weight.dtype)).float()[:, None, :].chunk(3, dim=-1)
        return (h * (1.0 + scale) + shift).to(x.dtype), gate.to(x.dtype)


# Parameters kept in float32 by the dtype policy (openpi's rule: norms and patch/position embeddings).
FP32_NAME_PARTS = ("norm", "patch_embedding", "position_embedding", "vlln")


def apply_dtype_policy(model: nn.Module, dtype: torch.dtype = torch.bfloat16,
                       fp32_name_parts: tuple[str, ...] = FP32_NAME_PARTS) -> nn.Module:
    """Cast parameters to `dtype`, except those whose name contains one of fp32_name_parts
    (openpi's bf16 mode keeps norms, including adaRMS denses, and the embeddings in float32)."""
    for name, p in model.named_parameters():
        want = torch.float32 if any(part in name for part in fp32_name_parts) else dtype
        p.data = p.data.to(want)
    return model


def weight_dtype(layer: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype a layer's float weight is kept in, or `default` where it has none (a quantized layer
    keeps integers and takes any float input: the models feed it what they would otherwise cast to)."""
    weight = getattr(layer, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else default


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding, HF "rotate_half" convention. x [B, H, T, D], positions [B, T]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = positions.float()[:, None, :, None] * inv  # [B, 1, T, D/2]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
           site: AttentionSite | None = None) -> torch.Tensor:
    """Softmax attention. q [B, H, Q, D]; k, v [B, Hkv, K, D] (KV heads shared by groups of
    query heads); valid [B or 1, 1, Q, K] bool or None. Returns [B, Q, H*D].

    Calls the site's logit observers with the pre-softmax logits (float32) and the valid mask."""
    b, h, nq, d = q.shape
    if site is not None and site.runtime_alpha is not None:
        q = q * site.runtime_alpha.to(q.dtype)[None, :, None, None]
    groups = h // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(d)
    if site is not None and site.logit_observers:
        mask = valid if valid is not None else torch.ones(1, 1, nq, k.shape[2], dtype=torch.bool, device=q.device)
        for observe in site.logit_observers:
            observe(logits, mask)
    if valid is not None:
        logits = logits.masked_fill(~valid, NEG_INF)
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)  # [B, H, Q, D]
    return out.transpose(1, 2).reshape(b, nq, h * d)


def observe_output(site: AttentionSite | None, z: torch.Tensor) -> torch.Tensor:
    """Apply the site's run-time beta (if any), show the result to its observers, return it."""
    if site is not None:
        if site.runtime_beta is not None:
            z = z * site.runtime_beta
        for observe in site.output_observers:
            observe(z)
    return z


def sinusoidal(t: torch.Tensor, dim: int, min_period: float, max_period: float) -> torch.Tensor:
    """openpi's create_sinusoidal_pos_embedding: sin/cos of t over geometric periods."""
    frac = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** frac
    ang = t.double()[:, None] * (2 * math.pi / period)[None, :]
    return torch.cat([ang.sin(), ang.cos()], dim=-1).float()


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True,
                       downscale_freq_shift: float = 1.0, max_period: float = 10000.0) -> torch.Tensor:
    """diffusers' get_timestep_embedding (used by GR00T's Timesteps(256, True, 1))."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    exponent = exponent / (half - downscale_freq_shift)
    emb = t.float()[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return emb


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def object_state_tokens(proj: nn.Linear, objects: torch.Tensor | None, dtype: torch.dtype):
    """Object-state tokens (the small trained policies' stand-in for the camera) projected into the
    prefix, and their all-valid mask."""
    if objects is None:
        raise QuantVLAError("this model reads object-state tokens: ModelInputs.objects [B, n_objects, object_dim] "
                            "is missing (build inputs with quantvla.policy.state.StateAdapter)")
    tokens = proj(objects.to(proj.weight.dtype)).to(dtype)
    return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
