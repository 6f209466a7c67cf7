"""The analytic error bound of a QuantLinear, element by element.

For y = x W^T + b and its quantized form, write x_t = T(x) and W_t = fold(W) for the DuQuant
transform (identity when off). The layer computes x^_t W^_t^T with
  |x_t - x^_t| <= dx = Δx/2 + clip_x     (Δx: the row's or tensor's activation step)
  |W_t - W^_t| <= dw = Δw/2 + clip_w     (Δw: the output channel's weight step)
so, since x_t W_t^T - x^_t W^_t^T = (x_t - x^_t) W_t^T + x^_t (W_t - W^_t)^T and |x^_t| <= |x_t| + dx,
  |e[m, n]| <= sum_k dx[m,k] |W_t[n,k]| + sum_k (|x_t[m,k]| + dx[m,k]) dw[n,k]          (1)
then an output rotation Q ("restore") maps e to e Q, so |e| <= (1) @ |Q|.
Float rounding (the fp32 transform, the fp32 epilogue, the output dtype) adds a small slack
proportional to the magnitudes involved. The steps per bit-width b are
  weights                     Δw = r * max|W_t[n]| / (2^(b-1) - 1), r the chosen clip ratio
  activations, symmetric      Δx = max|x_t[m]| / (2^(b-1) - 1)
  activations, asymmetric     Δx = (max(x_t[m], 0) - min(x_t[m], 0)) / (2^b - 1)
and clip_x = 0 for per-token grids (nothing is clipped); docs/quantizer.md ("The error bound") has the derivation.
"""

from __future__ import annotations

import math

import torch

from quantvla.quant import grids
from quantvla.quant.duquant import apply_blocks
from quantvla.quant.linear import QuantLinear

UNIT_ROUNDOFF = 2.0**-24


def _abs_transform(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """Magnitude bound |x| pushed through |T|: bounds every partial sum the fp32 transform forms."""
    t = layer.transform
    x = x.abs().to(torch.float64)
    if t is None:
        return x
    if t.smooth is not None:
        x = x / t.smooth.to(torch.float64)
    for rot in (t.rot1, None, t.rot2):
        if rot is None and t.perm is not None:
            x = x.index_select(1, t.perm.long())
        elif rot is not None:
            full, rem = rot.matrices(torch.float64)
            x = apply_blocks(x, rot.layout, full.abs(), rem.abs())
    return x


@torch.no_grad()
def output_error_bound(layer: QuantLinear, weight: torch.Tensor, x: torch.Tensor,
                       bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference output, elementwise bound) for `layer` quantized from `weight` (and `bias`).

    The reference is x W^T + b in float64, computed from x rounded to float32 (what the layer sees).
    |layer(x) - reference| <= bound holds elementwise for every finite input."""
    k = layer.in_features
    x2 = x.reshape(-1, k).to(torch.float32)
    x_t, qa = layer.quantize_input(x2)
    dx = grids.activation_error_allowance(x_t, qa, layer.config.act.bits)
    w64 = weight.detach().to(torch.float64)
    w_t = layer.transform.fold_weight(w64) if layer.transform is not None else w64
    if layer.transform is not None and layer.transform.out_rot is not None:
        # fold_weight includes the output rotation; the bound is formed before it
        w_t = layer.transform.out_rot.apply(w_t.t().contiguous()).t()
    if layer.config.weight.rounding == "gptq":
        # error-feedback rounding keeps no half-step promise per element: use the stored error itself
        w_hat = layer.int_weight().to(torch.float64) * layer.w_scale.to(torch.float64)[:, None]
        dw = (w_t - w_hat).abs() + grids.ROUNDING * w_t.abs()
    else:
        dw = grids.weight_error_allowance(w_t, layer.w_scale, layer.config.weight.bits)
    wt_abs = w_t.abs()
    e = dx @ wt_abs.t() + (x_t.to(torch.float64).abs() + dx) @ dw.t()
    # rounding slack: fp32 transform (sums of up to a block of terms, rebuilt rotations), fp32 epilogue
    t_cfg = layer.config.transform
    block = t_cfg.block_size if layer.transform is not None and t_cfg is not None else 1
    steps = t_cfg.rotation_steps if layer.transform is not None and t_cfg is not None else 0
    rel = UNIT_ROUNDOFF * (8 * block * (steps + 2) + 32)
    mag = _abs_transform(layer, x2) @ (wt_abs + dw).t()
    e = e + rel * mag
    if layer.transform is not None and layer.transform.out_rot is not None:
        full, rem = layer.transform.out_rot.matrices(torch.float64)
        e = apply_blocks(e, layer.transform.out_rot.layout, full.abs(), rem.abs())
        e = e + rel * apply_blocks(mag, layer.transform.out_rot.layout, full.abs(), rem.abs())
    ref = x2.to(torch.float64) @ w64.t()
    if bias is not None:
        ref = ref + bias.detach().to(torch.float64)
        e = e + UNIT_ROUNDOFF * bias.detach().to(torch.float64).abs()
    if x.dtype in (torch.float16, torch.bfloat16):  # the output is rounded to the input dtype
        e = e + torch.finfo(x.dtype).eps * (ref.abs() + e)
    lead = x.shape[:-1]
    return ref.reshape(*lead, -1), e.reshape(*lead, -1)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (0 when both are 0)."""
    num = (out.to(torch.float64) - ref).norm()
    den = ref.norm()
    return float(num / den) if den > 0 else float(num)


def sqnr_db(relative: float) -> float | None:
    """Signal-to-quantization-noise ratio of an output with this relative error (relative_error):
    20 log10(||ref|| / ||out - ref||) dB, torchao's unit for layer outputs (its tests ask about
    20 dB for int8, 15-20 dB for int4 weights). None for an exact output (infinite SQNR)."""
    return None if relative <= 0 else -20.0 * math.log10(relative)
