"""Integer GEMM backends behind one function.

    int_linear(qx, qweight, k, weight_bits, backend) -> int32 [M, N]  (= qx @ W^T, exactly)

qx is int8 [M, K]; qweight is int8 [N, K] (weights of 5..8 bits) or packed int4 uint8
[N, ceil(K/2)] (2..4 bits, see packing.py). Backends:

- "reference": int64 matmul, the oracle. Slow, obviously exact.
- "cpu": one of three exact GEMMs, chosen once per process from the CPU's instruction set
  (cpu_gemm()): torch._int_mm (oneDNN s8s8s32) where the CPU has VNNI or AMX; on x86 without
  them, where _int_mm runs a slow generic kernel (0.01-0.1x fp32 on an AVX2-only EPYC), oneDNN's
  u8 x s8 kernel with the *weight* as the unsigned operand ("u8_weight", _u8_weight_mm): the
  activations become the small prepacked operand (packing them costs little), the weight is
  offset to unsigned per call, and the operands are kept small enough that the kernel's int16
  pair sums cannot saturate. Small layers (where packing costs more than it saves) and
  K > 16384 take the third GEMM, also the fallback where oneDNN's quantized linear is missing:
  an fp32 GEMM of the integer values cut into K-chunks short enough that every partial sum stays below
  2^24, so that fp32 holds it exactly whatever the summation order (W4: K <= 16384 per chunk, W8:
  K <= 1024). Packed int4 weights are unpacked one tile of rows at a time into a small per-thread
  scratch buffer, so no int8 (or fp32) copy of the weight stays alive between calls. A one-time
  self-test with saturating operands guards against a GEMM that is inexact on this CPU (falls
  back to "reference").
- "onednn": W8 weights prepacked once into oneDNN's blocked layout (brgemm VNNI/AMX), which
  saves the weight reorder that _int_mm pays on every call (1.7x at 64x2048x2048 on the 2-core
  CI machine). The prepacked copy is a cache: it costs about N*K more resident bytes, so it is
  opt-in and counted by QuantLinear.footprint(). Packed int4 weights keep the "cpu" tile path
  (an int8 copy would triple their resident bytes). oneDNN returns float(acc); while
  |acc| < 2^24 that is the integer itself, so it is converted back exactly, and otherwise the
  call is redone with _int_mm. Below ONEDNN_MIN_M rows _int_mm is faster and is used.
- "cuda": torch._int_mm (cuBLASLt IMMA), padding M <= 16 and K, N to multiples of 8 with zeros,
  which keeps the result exact.
- "auto": "cuda" for CUDA tensors, else "cpu".

All backends return bit-identical int32 results; tests check that against the oracle.
"""

from __future__ import annotations

import contextlib
import platform
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from quantvla.errors import KernelUnavailable
from quantvla.quant.packing import pack_int4, unpack_int4, unpack_int4_halves

BACKENDS = ("reference", "cpu", "onednn", "cuda")

# Bytes of int8 weight a CPU W4 tile may unpack at once (per thread, shared by all layers).
CPU_SCRATCH_BYTES = 4 << 20

_state = threading.local()
_cpu_ok: bool | None = None
_cpu_gemm: str | None = None  # "int_mm" or "fp32", fixed at first use (cpu_gemm())
_onednn_why_not: str | None = None  # "" once the oneDNN path passed its self-test
_onednn_warned = False

# Fewer activation rows than this: torch._int_mm beats the prepacked call (measured 37 vs 59 us at
# 1x2048x2048), so the onednn backend hands small batches to it.
ONEDNN_MIN_M = 16
FP32_EXACT = 2**24


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "cuda" if device.type == "cuda" else "cpu"
    if backend not in BACKENDS:
        raise KernelUnavailable(f"unknown integer backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    if backend == "cuda" and device.type != "cuda":
        raise KernelUnavailable("backend 'cuda' needs CUDA tensors; move the layer with .to('cuda') or use 'cpu'")
    if backend in ("cpu", "onednn") and device.type != "cpu":
        raise KernelUnavailable(f"backend {backend!r} needs CPU tensors, got {device}; use 'auto' or 'cuda'")
    if backend == "onednn" and not onednn_ok():
        global _onednn_warned
        if not _onednn_warned:
            _onednn_warned = True
            warnings.warn(f"integer backend 'onednn' is unavailable ({_onednn_why_not}); using 'cpu' "
                          f"({cpu_gemm()} GEMM), which gives the same integers", RuntimeWarning, stacklevel=3)
        return "cpu"
    return backend


def int_linear(qx: torch.Tensor, qweight: torch.Tensor, k: int, weight_bits: int,
               backend: str = "auto", prepacked: PrepackedWeight | None = None) -> torch.Tensor:
    """`prepacked` (onednn backend, W8 only) is the layer's cached onednn_prepack(qweight); without it
    the weight is prepacked for this call alone (exact, but slower than _int_mm)."""
    backend = resolve_backend(backend, qx.device)
    packed = weight_bits <= 4
    if backend == "onednn" and not packed:  # resolve_backend kept "onednn": its self-test passed
        if prepacked is None:
            prepacked = onednn_prepack(qweight)
        elif prepacked.source != weight_identity(qweight):
            raise KernelUnavailable("the prepacked weight was built from another (or since edited) qweight; "
                                    "prepack it again with onednn_prepack(qweight)")
        return _onednn_int_mm(qx, qweight, prepacked)
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


CPU_GEMMS = ("int_mm", "u8_weight", "fp32")

# Every oneDNN result of the u8_weight GEMM is an integer of magnitude <= 8 * 128 * K (see
# _u8_weight_mm); fp32 holds it exactly up to 2^24, hence K <= 16384. Longer K: the fp32 GEMM.
U8_WEIGHT_MAX_K = FP32_EXACT // (8 * 128)


def cpu_gemm() -> str:
    """How the "cpu" backend multiplies int8 matrices on this machine, decided once per process from
    the instruction set (never from timing, so every xdist worker and a serial run choose alike):

    - "int_mm": torch._int_mm, oneDNN's s8s8s32 kernel. Fast where the CPU has VNNI or AMX
      (AVX-512 VNNI, AVX-VNNI, AMX-INT8), and kept off x86 (e.g. aarch64, whose int8 dot-product
      instructions oneDNN uses); the self-test still decides whether it is exact.
    - "u8_weight": on x86 without VNNI (AVX2-only hosts). There oneDNN's s8 kernel is its slow
      generic one and its fast u8 kernel sums pairs of products in saturating int16; with the
      weight (offset to 0..15, or 0..255 against 4-bit activation halves) as the unsigned operand
      no pair sum can saturate (see _u8_weight_mm). 2.5x fp32 at W4A8, 1.3x at W8A8 (64x2048x2048).
    - "fp32": where oneDNN's quantized linear is missing or failed the self-test, and for the small
      or very deep layers u8_weight leaves to it: an fp32 GEMM of the integer values, exact while
      every partial sum stays below 2^24 (see _fp32_int_mm), at fp32 speed."""
    global _cpu_gemm
    if _cpu_gemm is None:
        if not _x86_without_vnni():
            _cpu_gemm = "int_mm"
        else:
            _cpu_gemm = "u8_weight" if _has_onednn_qlinear() else "fp32"
    return _cpu_gemm


@contextlib.contextmanager
def cpu_gemm_override(gemm: str) -> Iterator[None]:
    """Run the cpu backend on another of its GEMMs for a while (benchmarks putting two side by side
    in one run); unlike set_cpu_gemm it keeps the self-test's verdict for the detected one."""
    global _cpu_gemm
    if gemm not in CPU_GEMMS:
        raise KernelUnavailable(f"unknown cpu GEMM {gemm!r}; choose one of {CPU_GEMMS}")
    saved = cpu_gemm()
    _cpu_gemm = gemm
    try:
        yield
    finally:
        _cpu_gemm = saved


def _has_onednn_qlinear() -> bool:
    return (hasattr(torch.ops.onednn, "qlinear_pointwise") and hasattr(torch.ops.onednn, "qlinear_prepack")
            and torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]


def set_cpu_gemm(gemm: str | None) -> None:
    """Choose the "cpu" backend's GEMM by hand (benchmarks comparing the two on one machine, or a CPU
    whose features torch misreports); None: back to cpu_gemm()'s choice from the instruction set.
    Both are exact where the self-test passes, which reruns for the new choice."""
    global _cpu_gemm, _cpu_ok
    if gemm is not None and gemm not in CPU_GEMMS:
        raise KernelUnavailable(f"unknown cpu GEMM {gemm!r}; choose one of {CPU_GEMMS} (or None: detect)")
    _cpu_gemm, _cpu_ok = gemm, None


def _x86_without_vnni() -> bool:
    """From torch's own CPU feature detection (torch.cpu.get_capabilities where this torch has it;
    older builds: the private probes, which see AVX-512 VNNI and AMX only)."""
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is not None:
        c = caps()
        x86 = c.get("architecture", platform.machine()).lower() in ("x86_64", "amd64", "x86", "i686")
        return x86 and not any(c.get(f, False) for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    x86 = platform.machine().lower() in ("x86_64", "amd64", "x86", "i686")
    return x86 and not any(getattr(torch.cpu, probe, lambda: False)()
                           for probe in ("_is_vnni_supported", "_is_amx_tile_supported"))


def _cpu_int_mm(qx: torch.Tensor, w: torch.Tensor, w_max: int = 128) -> torch.Tensor:
    """int8 [M, K] x int8 [N, K]^T -> int32 [M, N], exactly, through the GEMM cpu_gemm() chose.
    `w_max` bounds |w| (8 for int4 values): it sets how long the fp32 GEMM's K-chunks may be."""
    gemm = cpu_gemm()
    if gemm == "int_mm":
        return _int_mm(qx, w)
    m, k = qx.shape
    if gemm == "u8_weight" and k <= U8_WEIGHT_MAX_K and _u8_weight_worth(m, w.shape[0], k, False):
        return _u8_weight_mm(qx, w)
    return _fp32_int_mm(qx.to(torch.float32), w, w_max)


def _int_mm(qx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """torch._int_mm on the transposed view of the [N, K] weight (the fast form on CPU).

    torch 2.13's CPU _int_mm returns garbage for K == 1 with N > 1; a zero column keeps it exact."""
    if qx.shape[1] == 1:
        qx, w = F.pad(qx, (0, 1)), F.pad(w, (0, 1))
    return torch._int_mm(qx, w.t())


def _u8_weight_worth(m: int, n: int, k: int, int4: bool) -> bool:
    """Whether the u8_weight GEMM beats the fp32 one for this shape (both are exact: speed only, from
    the shape alone, so every process decides alike). Measured on a 2-core AVX2-only EPYC
    (docs/quantizer.md, "Integer GEMM"): each call pays about 0.4 ms to pack the activations and
    set oneDNN up, so small weights stay on fp32; W4 wins from 1024 x 1024 (M >= 8) or 2048 x 2048
    (M = 1) at 1.3-4.6x; W8 needs two activation halves, i.e. twice the int8 work, and wins from
    2048 x 2048 at 8 <= M <= 128 (1.2-2.7x) or K > 2048 (1.5-2x), and ties fp32 at larger M."""
    if int4:
        return n * k >= 1 << 20 and (m >= 8 or n * k >= 1 << 22)
    return n * k >= 1 << 22 and m >= 8 and (m <= 128 or k > 2048)


def _u8_weight_mm(qx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] x int8 [N, K]^T -> int32 [M, N], exactly, on oneDNN's u8 x s8 kernel without VNNI.

    That kernel multiplies unsigned by signed bytes and adds each pair of products in saturating
    int16 (AVX2 vpmaddubsw), so an exact call needs 2 * max|a| * max|b| <= 32767. With the weight
    offset to unsigned, u = w + 128 in 0..255, the activations must be cut into 4-bit halves,
    x = 16 * hi + lo with hi = x >> 4 in -8..7 and lo = x & 15 in 0..15: every pair sum is at most
    2 * 255 * 15. oneDNN takes u's zero point 128 in int32 and returns w . hi and w . lo in fp32,
    exact while below 2^24: always for w . hi (128 * 8 * K), for w . lo while K <= 8738. Longer K
    shifts lo to lo - 8 in -8..7 and adds 8 * sum_k w from a row of ones. One GEMM computes every
    half (B = 2M (+ 1) rows, the operand oneDNN packs: small); the weight is offset a tile at a time."""
    m, k = qx.shape
    shifted = 128 * 15 * k >= FP32_EXACT  # oneDNN pads B's rows to its block: no ones row unless needed
    b = torch.empty(2 * m + int(shifted), k, dtype=torch.int8)
    torch.bitwise_right_shift(qx, 4, out=b[:m])
    low = torch.bitwise_and(qx, 15, out=b[m:2 * m])
    if shifted:
        low.sub_(8)
        b[2 * m].fill_(1)
    y = _u8_weight_gemm(b, w.shape[0], lambda start, stop, out: torch.bitwise_xor(
        w[start:stop].view(torch.uint8), 128, out=out), k, zero_point=128)
    yi = y.t().to(torch.int32, memory_format=torch.contiguous_format)  # [B, N], one pass
    acc = yi[:m].mul_(16).add_(yi[m:2 * m])  # contiguous [M, N] rows
    return acc.add_(yi[2 * m], alpha=8) if shifted else acc


def _u8_weight_int4_mm(qx: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """qx int8 [M, K] x packed int4 [N, K/2]^T (even K) -> int32 [M, N], exactly: the weight offset
    to u = w + 8 in 0..15 (each packed byte XOR 0x88 offsets both nibbles), the activations whole;
    pair sums reach 2 * 15 * 128, results 8 * 128 * K (see _u8_weight_mm)."""
    n, half = packed.shape

    def offset_tile(start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        r = stop - start
        tmp = _scratch(r * half, "u8_tmp")[: r * half].view(torch.uint8).view(r, half)
        both = torch.bitwise_xor(packed[start:stop], 0x88, out=tmp)
        halves = out.view(r, 2, half)  # the split-halves layout: low nibbles are columns [0, H)
        torch.bitwise_and(both, 15, out=halves[:, 0])
        torch.bitwise_right_shift(both, 4, out=halves[:, 1])
        return out

    y = _u8_weight_gemm(qx, n, offset_tile, 2 * half, zero_point=8)
    return y.t().to(torch.int32, memory_format=torch.contiguous_format)


def _u8_weight_gemm(b: torch.Tensor, n: int, offset_tile: Callable[[int, int, torch.Tensor], torch.Tensor],
                    k: int, zero_point: int) -> torch.Tensor:
    """fp32 [N, B] = (u - zero_point) @ b^T, u [N, K] uint8 written a tile of rows at a time by
    offset_tile(start, stop, out) into the per-thread scratch."""
    rows_b = b.shape[0]
    handle = torch.ops.onednn.qlinear_prepack(b, None)
    ones, zeros = torch.ones(rows_b), torch.zeros(rows_b, dtype=torch.int64)
    rows = max(1, min(n, CPU_SCRATCH_BYTES // k))
    scratch = _scratch(rows * k).view(torch.uint8)
    tiles = []
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        u = offset_tile(start, stop, scratch[: (stop - start) * k].view(stop - start, k))
        tiles.append(torch.ops.onednn.qlinear_pointwise(u, 1.0, zero_point, handle, ones, zeros, None, 1.0, 0,
                                                        torch.float32, "none", [], ""))
    return tiles[0] if len(tiles) == 1 else torch.cat(tiles)


def fp32_chunk(w_max: int, x_max: int = 128) -> int:
    """The longest K for which x_max * w_max * K <= 2^24: every partial sum of such a dot product is
    an integer fp32 represents exactly, so the fp32 GEMM's result is exact in any summation order."""
    return FP32_EXACT // (x_max * w_max)


def _fp32_int_mm(xf: torch.Tensor, w: torch.Tensor, w_max: int = 128) -> torch.Tensor:
    """xf: int8 values as fp32 [M, K]; w: int8 [N, K] with |w| <= w_max. int32 [M, N], exact.

    The weight is converted to fp32 a block of rows at a time (at most CPU_SCRATCH_BYTES of int8,
    a temporary, never cached); each K-chunk of fp32_chunk(w_max) columns is one exact GEMM."""
    m, k = xf.shape
    n = w.shape[0]
    chunk = fp32_chunk(w_max)
    if k <= chunk and n * k <= CPU_SCRATCH_BYTES:  # one exact GEMM (the common case: few ops)
        return F.linear(xf, w.to(torch.float32)).to(torch.int32)
    out = torch.zeros(m, n, dtype=torch.int32)
    rows = max(1, min(n, CPU_SCRATCH_BYTES // max(1, k)))
    for start in range(0, n, rows):
        w_rows = w[start:start + rows].to(torch.float32)
        block = out[:, start:start + rows]
        for c in range(0, k, chunk):
            block.add_(F.linear(xf[:, c:c + chunk], w_rows[:, c:c + chunk]).to(torch.int32))
    return out


class PrepackedWeight:
    """An int8 [N, K] weight in oneDNN's opaque blocked layout (torch._mkldnn tensor), plus the
    constant scale/zero-point vectors the call wants. A cache rebuilt from the plain weight, never
    saved; `source` is (data_ptr, version) of the weight it was built from, to detect changes."""

    def __init__(self, w: torch.Tensor):
        n, k = w.shape
        self.source = weight_identity(w)
        if k == 1:  # same K == 1 guard as _cpu_int_mm
            w = F.pad(w, (0, 1))
        self.n, self.k = n, w.shape[1]
        self.handle = torch.ops.onednn.qlinear_prepack(w.contiguous(), None)
        self.ones = torch.ones(n)
        self.zeros = torch.zeros(n, dtype=torch.int64)
        # |acc| <= 128 * max_n sum_k |w[n, k]|: when that is below 2^24 every output is exact by
        # construction and the call skips its check (true for real K=2048 weights, not for K=16384)
        l1 = w.to(torch.int64).abs().sum(dim=1)  # widen first: int8 abs(-128) wraps to -128
        self.always_exact = 128 * int(l1.max()) < FP32_EXACT

    @property
    def nbytes(self) -> int:
        """Resident bytes. The tensor is opaque (no storage to measure); oneDNN's weight blocks pad N
        and K to multiples of 64 and add an int32 compensation per column (the RSS growth measured
        for a 4096x4096 weight was 16.09 MiB against this formula's 16.02 MiB), plus the two vectors."""
        n64, k64 = -(-self.n // 64) * 64, -(-self.k // 64) * 64
        return n64 * k64 + 4 * n64 + self.ones.numel() * 4 + self.zeros.numel() * 8


def weight_identity(w: torch.Tensor) -> tuple[int, int]:
    """(data_ptr, version counter): changes when w is replaced or edited in place. Tensors made under
    torch.inference_mode() keep no version counter, so for them only replacement is seen."""
    return w.data_ptr(), (-1 if w.is_inference() else w._version)


def onednn_prepack(w: torch.Tensor) -> PrepackedWeight:
    return PrepackedWeight(w)


def _onednn_int_mm(qx: torch.Tensor, w: torch.Tensor, pk: PrepackedWeight) -> torch.Tensor:
    if qx.shape[0] < ONEDNN_MIN_M:
        return _cpu_int_mm(qx, w)
    # oneDNN's s8-activation kernel on CPUs without AMX is its slow reference (3 s for 64x2048x2048);
    # the u8 one with zero point 128 is brgemm wherever VNNI is. As uint8, x + 128 is x's bit pattern
    # with the top bit flipped.
    xu = torch.bitwise_xor((F.pad(qx, (0, 1)) if qx.shape[1] == 1 else qx).view(torch.uint8), 128)
    y: torch.Tensor = torch.ops.onednn.qlinear_pointwise(xu, 1.0, 128, pk.handle, pk.ones, pk.zeros, None, 1.0, 0,
                                           torch.float32, "none", [], "")
    if pk.always_exact:
        return y.to(torch.int32)  # below 2^24 float(acc) is acc itself
    lo, hi = torch.aminmax(y)
    if bool(hi < FP32_EXACT) and bool(lo > -FP32_EXACT):
        return y.to(torch.int32)
    return _cpu_int_mm(qx, w)  # rare: a sum fp32 cannot hold exactly; redo it in int32


def _reference(qx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    acc = qx.to(torch.int64) @ w.to(torch.int64).t()
    return acc.to(torch.int32)


def cpu_int4_mm(qx: torch.Tensor, packed: torch.Tensor, tile_bytes: int | None = None) -> torch.Tensor:
    """qx [M, K] int8 times packed int4 [N, ceil(K/2)]^T, unpacking about tile_bytes of int8 weight
    at a time into the per-thread scratch.

    Wide weights (K/2 <= N) are cut into tiles of output rows. On the "int_mm" GEMM deep ones (K/2 > N,
    e.g. a 16384->2048 down projection) are cut into tiles of input columns whose int32 partial
    products are summed, which keeps each GEMM large enough for oneDNN (measured: 1.7x faster at
    64x16384x2048); the "fp32" GEMM takes row tiles for every shape."""
    m, n, half = qx.shape[0], packed.shape[0], packed.shape[1]
    budget = tile_bytes or CPU_SCRATCH_BYTES
    gemm = cpu_gemm()
    k = qx.shape[1]
    if gemm == "u8_weight" and k == 2 * half and k <= U8_WEIGHT_MAX_K and _u8_weight_worth(m, n, k, True):
        return _u8_weight_int4_mm(qx, packed)
    fp32 = gemm != "int_mm"
    if k == 2 * half and n * k <= budget and (not fp32 or k <= fp32_chunk(8)):
        # The whole weight fits one tile (every small layer): unpack the two halves of each row
        # side by side into the scratch, which is then the [N, K] weight, and run a single GEMM on
        # the unsplit activations.
        halves = _scratch(n * k)[: n * k].view(n, 2, half)
        lo_out, hi_out = halves[:, 0], halves[:, 1]
        lo, hi = unpack_int4_halves(packed, lo_out, hi_out)
        # the halves it returns are the weight (in the buffers given, the usual case, no join is needed)
        w = halves.view(n, k) if lo is lo_out and hi is hi_out else torch.cat([lo, hi], dim=1)
        if fp32:
            return F.linear(qx.to(torch.float32), w.to(torch.float32)).to(torch.int32)
        return _int_mm(qx, w)
    if fp32:  # convert the activations once, not once per tile
        qx = qx.to(torch.float32)
    x_lo = qx[:, :half]
    x_hi = qx[:, half:]
    if x_hi.shape[1] < half:  # odd K: the last high nibble is padding (0); give it a zero activation
        x_hi = F.pad(x_hi, (0, half - x_hi.shape[1]))
    if half > n and not fp32:
        cols = max(1, min(half, budget // (2 * n)))
        scratch = _scratch(2 * n * cols)
        out = torch.zeros(m, n, dtype=torch.int32)
        for start in range(0, half, cols):
            stop = min(half, start + cols)
            c = stop - start
            lo, hi = unpack_int4_halves(packed[:, start:stop], scratch[: n * c].view(n, c),
                                        scratch[n * c: 2 * n * c].view(n, c))
            out.add_(_int_mm(x_lo[:, start:stop].contiguous(), lo))
            out.add_(_int_mm(x_hi[:, start:stop].contiguous(), hi))
        return out
    x_lo, x_hi = x_lo.contiguous(), x_hi.contiguous()
    tile_gemm = _fp32_int4_tile if fp32 else lambda xl, xh, lo, hi: _int_mm(xl, lo) + _int_mm(xh, hi)
    rows = max(1, min(n, budget // (2 * half)))
    scratch = _scratch(2 * rows * half)
    out = torch.empty(m, n, dtype=torch.int32)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        r = stop - start
        lo, hi = unpack_int4_halves(packed[start:stop], scratch[: r * half].view(r, half),
                                    scratch[r * half: 2 * r * half].view(r, half))
        out[:, start:stop] = tile_gemm(x_lo, x_hi, lo, hi)
    return out


def _fp32_int4_tile(x_lo: torch.Tensor, x_hi: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """x_lo lo^T + x_hi hi^T for int4 weight halves and fp32-held int8 activations, exactly. While
    both halves together fit one fp32 chunk (K <= 16384) it is one addmm, whose every partial sum
    stays below 2^24; beyond, each half is chunked and the halves are added in int32."""
    if 2 * lo.shape[1] <= fp32_chunk(8):
        return torch.addmm(F.linear(x_lo, lo.to(torch.float32)), x_hi, hi.to(torch.float32).t())
    return _fp32_int_mm(x_lo, lo, 8) + _fp32_int_mm(x_hi, hi, 8)


def _scratch(nbytes: int, name: str = "scratch") -> torch.Tensor:
    buf = getattr(_state, name, None)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(nbytes, dtype=torch.int8)
        setattr(_state, name, buf)
    return buf


def scratch_nbytes() -> int:
    """Bytes of the calling thread's weight scratch buffers (the W4 unpack tile, the u8_weight
    GEMM's offset tile and its nibble temporary; shared by all layers; 0 before first use)."""
    return sum(0 if (buf := getattr(_state, name, None)) is None else buf.numel() for name in ("scratch", "u8_tmp"))


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
    """One-time self-test of the cpu backend's GEMM on this CPU: random, large-sum and all-max
    operands. A u8_weight GEMM that fails it hands over to the fp32 GEMM (tested in turn); a GEMM
    that still fails leaves the int64 reference."""
    global _cpu_ok, _cpu_gemm
    if _cpu_ok is None:
        _cpu_ok = _self_test()
        if not _cpu_ok and cpu_gemm() == "u8_weight":
            _cpu_gemm = "fp32"
            _cpu_ok = _self_test()
            warnings.warn("oneDNN's u8 x s8 GEMM gave inexact results on this CPU; the cpu backend uses its "
                          f"fp32 GEMM instead{'' if _cpu_ok else ', which failed too'}", RuntimeWarning, stacklevel=3)
        if not _cpu_ok:
            warnings.warn(
                f"the cpu backend's {cpu_gemm()} GEMM gave inexact int8 results on this CPU; using the "
                "exact int64 reference GEMM instead, which is much slower",
                RuntimeWarning, stacklevel=3,
            )
    return _cpu_ok


def _self_test_probes() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Operands that break broken int8 GEMMs: random, all-max, all-min and mixed-sign saturating
    sums past 2^24 at K = 2048, a tiny K = 3 and the K = 1 case torch 2.13 gets wrong."""
    gen = torch.Generator().manual_seed(0)

    def full(v: int, *shape: int) -> torch.Tensor:
        return torch.full(shape, v, dtype=torch.int8)

    return [
        (torch.randint(-128, 128, (32, 2048), generator=gen, dtype=torch.int8),
         torch.randint(-128, 128, (64, 2048), generator=gen, dtype=torch.int8)),
        (full(127, 32, 2048), full(127, 64, 2048)),
        (full(-128, 32, 2048), full(-128, 64, 2048)),
        (full(-128, 32, 2048), full(127, 64, 2048)),
        (full(-128, 1, 3), full(127, 5, 3)),
        (full(-7, 3, 1), full(5, 2, 1)),
    ]


def _u8_weight_edge_probes() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The u8_weight GEMM's own edges, W4 values: K = 16384 with all-min operands (results reach
    2^24 exactly), and K = 16383 with odd results whose unsigned sums (15 * 127 * K) are past 2^24,
    so a kernel that converted to fp32 before taking the zero point in int32 rounds them."""
    lo = torch.full((3, 16384), -128, dtype=torch.int8), torch.full((4, 16384), -8, dtype=torch.int8)
    odd = torch.full((3, 16382), 127, dtype=torch.int8), torch.full((4, 16382), 7, dtype=torch.int8)
    odd[0][:, 0] = 126  # 7 * (127 * 16381 + 126): odd
    neg = -odd[0], odd[1].clone()
    return [lo, odd, neg]


def _self_test() -> bool:
    """The GEMM primitive on this CPU, not the code around it (an unpacking bug must fail the checks,
    not be hidden by the fallback). On the fp32 route also int4-range weights at K = 16384, where
    its chunk for int4 sums to exactly 2^24, the edge of its exactness bound; on u8_weight the
    probes run its GEMM whatever their size, packed int4 included, and its own edges."""
    gemm = cpu_gemm()
    if gemm == "int_mm" and not hasattr(torch, "_int_mm"):
        return False
    try:
        if gemm == "u8_weight":
            ok = all(torch.equal(_u8_weight_mm(a, b), _reference(a, b)) for a, b in _self_test_probes())
            int4 = [(a, b.clamp(-8, 7)) for a, b in _self_test_probes() if a.shape[1] % 2 == 0]
            return ok and all(torch.equal(_u8_weight_int4_mm(a, pack_int4(b)), _reference(a, b))
                              for a, b in int4 + _u8_weight_edge_probes())
        if not all(torch.equal(_cpu_int_mm(a, b), _reference(a, b)) for a, b in _self_test_probes()):
            return False
        if gemm == "fp32":
            a, b = torch.full((3, 16384), -128, dtype=torch.int8), torch.full((4, 16384), -8, dtype=torch.int8)
            return torch.equal(_fp32_int_mm(a.to(torch.float32), b, 8), _reference(a, b))
        return True
    except RuntimeError:
        return False


def onednn_ok() -> bool:
    """One-time self-test of the prepacked oneDNN path: exact on random and saturating operands
    against the int64 oracle. onednn_unavailable_reason() says why not.

    Only exactness decides, so the answer is the same in every process on a machine (xdist workers
    agree with a serial run). Speed only warns: where oneDNN's brgemm cannot run it silently uses its
    reference kernel (measured 3000x slower), which is exact but defeats the point."""
    global _onednn_why_not
    if _onednn_why_not is None:
        _onednn_why_not = _onednn_self_test()
        if _onednn_why_not == "":
            _warn_if_reference_kernel()
    return _onednn_why_not == ""


def onednn_unavailable_reason() -> str:
    onednn_ok()
    return _onednn_why_not or ""


def _onednn_self_test() -> str:
    if not hasattr(torch.ops.onednn, "qlinear_pointwise") or not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return "this torch build has no oneDNN quantized linear"
    if not cpu_kernel_ok():
        return "the cpu backend's GEMM failed its own self-test"
    try:  # the 32-row probes run oneDNN itself (and its int32 redo); the tiny ones run _int_mm
        for a, b in _self_test_probes():
            if not torch.equal(_onednn_int_mm(a, b, onednn_prepack(b)), _reference(a, b)):
                return ("oneDNN gave inexact int8 results on this CPU" + (
                    " (without VNNI its u8 x s8 kernel saturates int16 pair sums)" if cpu_gemm() != "int_mm" else ""))
    except RuntimeError as err:
        return f"oneDNN failed: {str(err).splitlines()[0]}"
    return ""


def _warn_if_reference_kernel() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (64, 1024), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (1024, 1024), generator=gen, dtype=torch.int8)
    pk = onednn_prepack(b)
    fast, slow = _best_of(lambda: _onednn_int_mm(a, b, pk)), _best_of(lambda: _cpu_int_mm(a, b))
    # the reference kernel takes ~0.75 s here, brgemm ~0.1 ms: both bars are far from either
    if fast > 50 * slow and fast > 0.05:
        warnings.warn(f"oneDNN runs its slow reference int8 kernel on this CPU ({fast * 1e3:.0f} ms against "
                      f"{slow * 1e3:.2f} ms for torch._int_mm); results stay exact, but use backend 'cpu'",
                      RuntimeWarning, stacklevel=4)


def _best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()  # JIT
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
