"""Integer GEMM backends behind one function.

    int_linear(qx, qweight, k, weight_bits, backend) -> int32 [M, N]  (= qx @ W^T, exactly)

qx is int8 [M, K]; qweight is int8 [N, K] (weights of 5..8 bits) or packed int4 uint8
[N, ceil(K/2)] (2..4 bits, see packing.py). Backends:

- "reference": int64 matmul, the oracle. Slow, obviously exact.
- "cpu": torch._int_mm (oneDNN s8s8s32, AMX/VNNI where present). Packed int4 weights are
  unpacked one tile of rows at a time into a small per-thread scratch buffer, so no int8 copy
  of the weight stays alive between calls. A one-time self-test with saturating operands
  guards against CPUs whose u8*s8 path saturates in int16 (falls back to "reference").
- "cuda": torch._int_mm (cuBLASLt IMMA), padding M <= 16 and K, N to multiples of 8 with zeros,
  which keeps the result exact.
- "auto": "cuda" for CUDA tensors, else "cpu".

All backends return bit-identical int32 results; tests check that against the oracle.
"""

from __future__ import annotations

import threading
import warnings

import torch
import torch.nn.functional as F

from quantvla.errors import KernelUnavailable
from quantvla.quant.packing import unpack_int4, unpack_int4_halves

BACKENDS = ("reference", "cpu", "cuda")

# Bytes of int8 weight a CPU W4 tile may unpack at once (per thread, shared by all layers).
CPU_SCRATCH_BYTES = 4 << 20

_state = threading.local()
_cpu_ok: bool | None = None


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "cuda" if device.type == "cuda" else "cpu"
    if backend not in BACKENDS:
        raise KernelUnavailable(f"unknown integer backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    if backend == "cuda" and device.type != "cuda":
        raise KernelUnavailable("backend 'cuda' needs CUDA tensors; move the layer with .to('cuda') or use 'cpu'")
    if backend == "cpu" and device.type != "cpu":
        raise KernelUnavailable(f"backend 'cpu' needs CPU tensors, got {device}; use 'auto' or 'cuda'")
    return backend


def int_linear(qx: torch.Tensor, qweight: torch.Tensor, k: int, weight_bits: int,
               backend: str = "auto") -> torch.Tensor:
    backend = resolve_backend(backend, qx.device)
    packed = weight_bits <= 4
    if backend == "reference":
        w = unpack_int4(qweight, k) if packed else qweight
        return _reference(qx, w)
    if backend == "cuda":
        w = unpack_int4(qweight, k) if packed else qweight
        return _cuda_int_mm(qx, w)
    if not cpu_kernel_ok():
        w = unpack_int4(qweight, k) if packed else qweight
        return _reference(qx, w)
    if not packed:
        return _cpu_int_mm(qx, qweight)
    return cpu_int4_mm(qx, qweight)


def _cpu_int_mm(qx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """torch._int_mm on the transposed view of the [N, K] weight (the fast form on CPU).

    torch 2.13's CPU _int_mm returns garbage for K == 1 with N > 1; a zero column keeps it exact."""
    if qx.shape[1] == 1:
        qx, w = F.pad(qx, (0, 1)), F.pad(w, (0, 1))
    return torch._int_mm(qx, w.t())


def _reference(qx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    acc = qx.to(torch.int64) @ w.to(torch.int64).t()
    return acc.to(torch.int32)


def cpu_int4_mm(qx: torch.Tensor, packed: torch.Tensor, tile_bytes: int | None = None) -> torch.Tensor:
    """qx [M, K] int8 times packed int4 [N, ceil(K/2)]^T, unpacking about tile_bytes of int8 weight
    at a time into the per-thread scratch.

    Wide weights (K/2 <= N) are cut into tiles of output rows; deep ones (K/2 > N, e.g. a 16384->2048
    down projection) into tiles of input columns whose int32 partial products are summed, which
    keeps each GEMM large enough for oneDNN (measured: 1.7x faster at 64x16384x2048)."""
    m, n, half = qx.shape[0], packed.shape[0], packed.shape[1]
    budget = tile_bytes or CPU_SCRATCH_BYTES
    x_lo = qx[:, :half]
    x_hi = qx[:, half:]
    if x_hi.shape[1] < half:  # odd K: the last high nibble is padding (0); give it a zero activation
        x_hi = F.pad(x_hi, (0, half - x_hi.shape[1]))
    if half > n:
        cols = max(1, min(half, budget // (2 * n)))
        scratch = _scratch(2 * n * cols)
        out = torch.zeros(m, n, dtype=torch.int32)
        for start in range(0, half, cols):
            stop = min(half, start + cols)
            c = stop - start
            lo, hi = unpack_int4_halves(packed[:, start:stop], scratch[: n * c].view(n, c),
                                        scratch[n * c: 2 * n * c].view(n, c))
            out.add_(_cpu_int_mm(x_lo[:, start:stop].contiguous(), lo))
            out.add_(_cpu_int_mm(x_hi[:, start:stop].contiguous(), hi))
        return out
    x_lo, x_hi = x_lo.contiguous(), x_hi.contiguous()
    rows = max(1, min(n, budget // (2 * half)))
    scratch = _scratch(2 * rows * half)
    out = torch.empty(m, n, dtype=torch.int32)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        r = stop - start
        lo, hi = unpack_int4_halves(packed[start:stop], scratch[: r * half].view(r, half),
                                    scratch[r * half: 2 * r * half].view(r, half))
        torch.add(_cpu_int_mm(x_lo, lo), _cpu_int_mm(x_hi, hi), out=out[:, start:stop])
    return out


def _scratch(nbytes: int) -> torch.Tensor:
    buf = getattr(_state, "scratch", None)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(nbytes, dtype=torch.int8)
        _state.scratch = buf
    return buf


def scratch_nbytes() -> int:
    """Bytes of the calling thread's W4 unpack scratch (shared by all layers; 0 before first use)."""
    buf = getattr(_state, "scratch", None)
    return 0 if buf is None else buf.numel()


def _cuda_int_mm(qx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if not hasattr(torch, "_int_mm"):
        raise KernelUnavailable("this torch build has no torch._int_mm; use backend='reference'")
    m, k = qx.shape
    n = w.shape[0]
    # cuBLASLt int8 rules: M > 16, K and N multiples of 8. Zero padding keeps the sums exact.
    pad_m = max(0, 17 - m)
    pad_k = (-k) % 8
    pad_n = (-n) % 8
    if pad_m or pad_k:
        qx = F.pad(qx, (0, pad_k, 0, pad_m))
    if pad_k or pad_n:
        w = F.pad(w, (0, pad_k, 0, pad_n))
    out = torch._int_mm(qx.contiguous(), w.contiguous().t())
    return out[:m, :n]


def cpu_kernel_ok() -> bool:
    """One-time self-test of torch._int_mm on this CPU: random, large-sum and all-max operands."""
    global _cpu_ok
    if _cpu_ok is None:
        _cpu_ok = _self_test()
        if not _cpu_ok:
            warnings.warn(
                "torch._int_mm gave inexact int8 results on this CPU (likely int16 saturation on a CPU "
                "without VNNI); using the exact int64 reference GEMM instead, which is much slower",
                RuntimeWarning, stacklevel=3,
            )
    return _cpu_ok


def _self_test() -> bool:
    if not hasattr(torch, "_int_mm"):
        return False
    gen = torch.Generator().manual_seed(0)
    probes = [
        (torch.randint(-128, 128, (32, 2048), generator=gen, dtype=torch.int8),
         torch.randint(-128, 128, (64, 2048), generator=gen, dtype=torch.int8)),
        (torch.full((32, 2048), 127, dtype=torch.int8), torch.full((64, 2048), 127, dtype=torch.int8)),
        (torch.full((32, 2048), -128, dtype=torch.int8), torch.full((64, 2048), -128, dtype=torch.int8)),
        (torch.full((1, 3), -128, dtype=torch.int8), torch.full((5, 3), 127, dtype=torch.int8)),
        (torch.full((3, 1), -7, dtype=torch.int8), torch.full((2, 1), 5, dtype=torch.int8)),
    ]
    try:
        return all(torch.equal(_cpu_int_mm(a, b), _reference(a, b)) for a, b in probes)
    except RuntimeError:
        return False
