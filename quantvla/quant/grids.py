"""Quantization grids: how floats become integers and back.

Weights: symmetric signed per-output-channel, q in [-2^(b-1), 2^(b-1)-1], scale chosen per row by
an MSE search over clipping ratios. Activations: per-token dynamic or per-tensor static, symmetric
or asymmetric (unsigned grid with a zero point, stored shifted by -2^(b-1) so it fits int8).

Guarantees (tested): an element inside the grid's range is reproduced within half a step;
an element outside it is clipped to the nearest end of the range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch

from quantvla.quant.config import ActQuantConfig, WeightQuantConfig

# Float rounding in x / scale and in the scale itself: a few units of fp32 roundoff of |x|.
ROUNDING = 4 * 2.0**-24

# A row whose absolute maximum is zero (or subnormal) gets this scale, so nothing divides by 0.
MIN_SCALE = torch.finfo(torch.float32).tiny


def signed_range(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


# ---------------------------------------------------------------------------------- weights
def quantize_weight(w: torch.Tensor, cfg: WeightQuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q int8 [N, K], scale float32 [N]). The input is not modified.

    For each row the scale is (ratio * max|w|) / qmax for the ratio among cfg.clip_ratios with
    the smallest squared error; ties keep the largest ratio (least clipping).
    """
    qmin, qmax = signed_range(cfg.bits)
    w64 = w.detach().to(torch.float64)
    amax = w64.abs().amax(dim=1)
    best_err = torch.full_like(amax, float("inf"))
    best_scale = torch.ones_like(amax, dtype=torch.float32)
    # one [N, K] float64 buffer reused for every ratio (in place, the same operations in the same
    # order as round(w / s).clamp().mul(s), then (deq - w)^2): a full-size layer's 21 ratios otherwise
    # allocate and first-touch ~100 fresh copies of the weight (about half the time, measured)
    deq = torch.empty_like(w64)
    for ratio in cfg.clip_ratios:
        scale = (amax * ratio / qmax).to(torch.float32).clamp_min(MIN_SCALE)
        s64 = scale.to(torch.float64)[:, None]
        torch.div(w64, s64, out=deq).round_().clamp_(qmin, qmax).mul_(s64)
        err = deq.sub_(w64).pow_(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    q = torch.round(w64 / best_scale.to(torch.float64)[:, None]).clamp_(qmin, qmax).to(torch.int8)
    return q, best_scale


def gptq_round(w: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, bits: int, damp: float = 0.1,
               block: int = 128) -> torch.Tensor:
    """Integer weights [N, K] int8 on the given per-row scales, rounded with error feedback.

    Minimises ||x W^T - x (q * scale)^T|| column by column (GPTQ): with H = x^T x + ridge and U the
    upper Cholesky factor of H^-1, column k is rounded to the grid and its error, divided by
    U[k, k], is subtracted along U[k, k+1:] from the columns still to be rounded. Columns whose
    calibration activations are all zero get no feedback (they are rounded to nearest). The
    integers stay inside [-2^(b-1), 2^(b-1)-1]; an element may end up more than half a step
    from its FP value, which is the point: the errors cancel on activations like x.
    """
    qmin, qmax = signed_range(bits)
    w = w.detach().to(torch.float64).clone()
    x = x.detach().reshape(-1, w.shape[1]).to(torch.float64)
    k = w.shape[1]
    h = x.t() @ x
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=torch.float64, device=h.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    s = scale.to(torch.float64)[:, None]
    q = torch.empty_like(w)
    for lo in range(0, k, block):  # lazy batch updates: one matmul per block for the columns after it
        hi = min(lo + block, k)
        err = torch.empty(w.shape[0], hi - lo, dtype=torch.float64, device=w.device)
        for j in range(lo, hi):
            col = torch.round(w[:, j:j + 1] / s).clamp_(qmin, qmax)
            q[:, j:j + 1] = col
            e = (w[:, j:j + 1] - col * s) / u[j, j]
            w[:, j + 1:hi] -= e * u[j:j + 1, j + 1:hi]
            err[:, j - lo:j - lo + 1] = e
        w[:, hi:] -= err @ u[lo:hi, hi:]
    return q.to(torch.int8)


def weight_error_allowance(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-element bound on |w - q*scale|: half a step, plus the clipped excess beyond the range
    (plus fp32 rounding of the scale)."""
    qmin, qmax = signed_range(bits)
    w64 = w.detach().to(torch.float64)
    s = scale.to(torch.float64)[:, None]
    excess = (w64 - qmax * s).clamp_min(0) + (qmin * s - w64).clamp_min(0)
    return s / 2 + excess + ROUNDING * w64.abs()


# ------------------------------------------------------------------------------ activations
@dataclass
class QuantizedActivation:
    """Integer activations and what it takes to read them back: x ~= scale * (q - zero)."""

    q: torch.Tensor  # int8 [M, K]
    scale: torch.Tensor  # float32 [M, 1] (per token) or [1, 1] (per tensor)
    zero: torch.Tensor | None  # int32, same shape as scale, in the shifted (int8) domain; None if symmetric

    def dequantize(self) -> torch.Tensor:
        q = self.q.to(torch.float32)
        if self.zero is not None:
            q = q - self.zero.to(torch.float32)
        return q * self.scale


def _asym_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and shifted zero point of an unsigned b-bit grid covering [min(lo,0), max(hi,0)]."""
    levels = (1 << bits) - 1
    lo = lo.clamp(max=0.0)
    hi = hi.clamp(min=0.0)
    scale = ((hi - lo) / levels).clamp_min(MIN_SCALE)
    zero = torch.round(-lo / scale).clamp_(0, levels) - (1 << (bits - 1))
    return scale.to(torch.float32), zero.to(torch.int32)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def quantize_activation(x: torch.Tensor, cfg: ActQuantConfig, static_scale: torch.Tensor | None = None,
                        static_zero: torch.Tensor | None = None) -> QuantizedActivation:
    """[M, K] float32 (or bfloat16 / float16) -> QuantizedActivation. Static (per-tensor) needs
    calibrated scale/zero.

    This runs on every QuantLinear call, so it is written as few passes as possible, in place on its
    own temporaries; the arithmetic (and so every bit) is that of _asym_params and the order below.
    A half-precision x gives the bits of x.float(): the row extremes are exact in any dtype and are
    widened before any arithmetic, and the division by the fp32 scale widens x in the same pass."""
    qmin, qmax = signed_range(cfg.bits)
    zero_f = None  # the zero point as float, for the add in the fixed order below
    if cfg.granularity == "per_token":
        if cfg.symmetric:
            scale = _fp32(x.abs().amax(dim=1, keepdim=True)).div_(qmax).clamp_min_(MIN_SCALE)
            zero = None
        else:
            # amax + amin: 16x faster than torch.aminmax(dim=1) on CPU in torch 2.13 (measured)
            levels = (1 << cfg.bits) - 1
            lo = _fp32(x.amin(dim=1, keepdim=True)).clamp_(max=0.0)
            hi = _fp32(x.amax(dim=1, keepdim=True)).clamp_(min=0.0)
            scale = hi.sub_(lo).div_(levels).clamp_min_(MIN_SCALE)
            zero_f = lo.neg_().div_(scale).round_().clamp_(0, levels).sub_(1 << (cfg.bits - 1))
            zero = zero_f.to(torch.int32)
    else:
        if static_scale is None:
            raise ValueError("per-tensor activation quantization needs a calibrated scale")
        scale = static_scale.reshape(1, 1).to(torch.float32)
        zero = None if cfg.symmetric else cast(torch.Tensor, static_zero).reshape(1, 1).to(torch.int32)
        zero_f = None if zero is None else zero.to(torch.float32)
    # One fixed order of operations: q = clamp(round(x / scale) + zero); every backend shares it.
    q = torch.div(x, scale).round_()
    if zero_f is not None:
        q.add_(zero_f)
    q = q.clamp_(qmin, qmax).to(torch.int8)
    return QuantizedActivation(q, scale, zero)


def calibrate_static(x: torch.Tensor, cfg: ActQuantConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-tensor scale (and zero) from calibration activations [T, K] at cfg.percentile.

    Uses kthvalue rather than torch.quantile, which refuses tensors of more than 2^24 elements.
    """
    _, qmax = signed_range(cfg.bits)
    flat = x.detach().reshape(-1).to(torch.float32)

    def pct(v: torch.Tensor, p: float) -> torch.Tensor:
        k = min(v.numel(), max(1, int(round(p / 100.0 * v.numel()))))
        return v.kthvalue(k).values

    if cfg.symmetric:
        scale = (pct(flat.abs(), cfg.percentile) / qmax).clamp_min(MIN_SCALE)
        return scale.reshape(1), None
    scale, zero = _asym_params(pct(flat, 100.0 - cfg.percentile), pct(flat, cfg.percentile), cfg.bits)
    return scale.reshape(1), zero.reshape(1)


def activation_error_allowance(x: torch.Tensor, qa: QuantizedActivation, bits: int) -> torch.Tensor:
    """Per-element bound on |x - dequant(q)|: half a step plus the clipped excess beyond the range
    (plus fp32 rounding of x / scale and of the zero point's position)."""
    qmin, qmax = signed_range(bits)
    s = qa.scale.to(torch.float64)
    z = qa.zero.to(torch.float64) if qa.zero is not None else torch.zeros_like(s)
    lo_r, hi_r = (qmin - z) * s, (qmax - z) * s
    x64 = x.to(torch.float64)
    excess = (x64 - hi_r).clamp_min(0) + (lo_r - x64).clamp_min(0)
    return s / 2 + excess + ROUNDING * x64.abs()
