"""Two signed 4-bit values per byte, in a layout chosen so unpacking is two vector ops.

Layout ("split halves"): for a [N, K] int4 matrix with H = ceil(K/2),
    byte[n, j] = (q[n, j] & 0xF) | (q[n, j + H] << 4)       for j < H
so the low nibbles hold columns [0, H) and the high nibbles columns [H, K) (a zero nibble pads
odd K). Unpacking yields two contiguous [N, H] int8 halves with one arithmetic shift each
(hi = p >> 4, lo = (p << 4) >> 4), which feed the int8 GEMM directly without interleaving.
(The common "even k in the low nibble" layout needs an interleave that costs more than the
GEMM on CPU; see docs/quantizer.md, "Integer GEMM".)
"""

from __future__ import annotations

import torch

from quantvla.errors import QuantInputError


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] int8 values in [-8, 7] -> [N, ceil(K/2)] uint8."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise QuantInputError(f"pack_int4 expects a 2-D int8 tensor, got {q.dtype} of shape {tuple(q.shape)}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise QuantInputError("pack_int4: values must lie in [-8, 7]")
    n, k = q.shape
    half = (k + 1) // 2
    lo = q[:, :half]
    hi = torch.zeros(n, half, dtype=torch.int8, device=q.device)
    hi[:, : k - half] = q[:, half:]
    packed = (lo & 0xF) | (hi << 4)
    return packed.view(torch.uint8).contiguous()


def unpack_int4_halves(packed: torch.Tensor, out_lo: torch.Tensor | None = None,
                       out_hi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two [N, H] int8 halves (columns [0, H) and [H, 2H)), optionally into given buffers."""
    p = packed.view(torch.int8)
    if out_lo is None:
        lo = (p << 4) >> 4
    else:
        lo = torch.bitwise_left_shift(p, 4, out=out_lo).bitwise_right_shift_(4)
    hi = p >> 4 if out_hi is None else torch.bitwise_right_shift(p, 4, out=out_hi)
    return lo, hi


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """[N, ceil(K/2)] uint8 -> [N, K] int8."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != (k + 1) // 2:
        raise QuantInputError(
            f"unpack_int4 expects uint8 [N, {(k + 1) // 2}] for K={k}, got {packed.dtype} {tuple(packed.shape)}"
        )
    lo, hi = unpack_int4_halves(packed)
    return torch.cat([lo, hi], dim=1)[:, :k]
