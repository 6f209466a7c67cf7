"""The fused CPU forward: one C++ call per QuantLinear call, bit-identical to the eager forward.

On the trained policies' small layers (64-256 wide) the eager forward's 40-65 torch operators cost
about 250 us a call against 17 us for fp32 F.linear, so the quantized models ran a chunk at 0.45x of
FP speed. csrc/fused_linear.cpp runs the same arithmetic (transform, activation grid, GEMM,
epilogue) in plain loops, calling ATen only where the bits are ATen's (the reflections' block sums
and the integer GEMM), in the eager path's order of float operations.

    from quantvla.quant import fused
    fused.set_forward("fused")          # process-wide; "eager" (the default) is the reference
    with fused.forward_override("fused"): ...

The extension is compiled on first use with torch's C++ extension builder (a C++ compiler and
ninja are needed; about 30 s once, cached by torch per machine). It is used only after a
self-test on probe layers (every supported variant: int4 and int8 weights, symmetric and
asymmetric, per-token and per-tensor grids, smoothing, reflections, permutation, bias) gives the
eager path's bits; where the build or the self-test fails, it warns once with the reason and the
eager forward runs. Layers it does not cover run eagerly too: dense (svd) rotations, an output-side
rotation, non-CPU tensors, the oneDNN backend, and the shapes where the cpu GEMM would take its
u8_weight kernel or a chunked fp32 GEMM (large layers, where dispatch costs nothing by comparison).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, cast

import torch

from quantvla.errors import KernelUnavailable, QuantInputError
from quantvla.quant import grids, kernels

if TYPE_CHECKING:
    from quantvla.quant.duquant import BlockRotation
    from quantvla.quant.linear import QuantLinear

FORWARDS = ("eager", "fused")
SOURCE = Path(__file__).with_name("csrc") / "fused_linear.cpp"

_forward = "eager"
_module: ModuleType | None = None
_why_not: str | None = None  # "" once built and self-tested
_warned = False
_calls = 0  # QuantLinear calls the fused forward ran in this process (fused_calls())
_EMPTY = torch.empty(0, dtype=torch.int8)  # the scratch argument of int8 weights (they need no unpacking)


def set_forward(mode: str) -> None:
    """"eager" (the reference, the default) or "fused" for every QuantLinear in this process."""
    global _forward
    if mode not in FORWARDS:
        raise KernelUnavailable(f"unknown forward {mode!r}; choose one of {FORWARDS}")
    _forward = mode


@contextlib.contextmanager
def forward_override(mode: str) -> Iterator[None]:
    saved = _forward
    set_forward(mode)
    try:
        yield
    finally:
        set_forward(saved)


def available() -> bool:
    """Builds (once) and self-tests the extension; False with unavailable_reason() if either fails."""
    global _module, _why_not
    if _why_not is None:
        try:
            _module = build()
            _why_not = ""
            _why_not = _self_test()
        except Exception as e:  # no compiler, no ninja, headers missing: the eager forward runs
            last = (str(e).strip().splitlines() or [""])[-1]
            _why_not = (f"the C++ extension did not build ({type(e).__name__}: {last}); it needs a C++ compiler "
                        "and ninja")
        if _why_not:
            _module = None
    return not _why_not


def build(name: str = "quantvla_fused_linear", extra_cflags: tuple[str, ...] = ()) -> ModuleType:
    """Compile (or load torch's cached build of) the extension. The tests build variants for one
    instruction set each (extra_cflags=("-DQV_NO_CLONES", "-mavx2")) under other names."""
    from torch.utils.cpp_extension import load

    return cast(ModuleType, load(name=name, sources=[str(SOURCE)], verbose=False,
                                 extra_cflags=["-O3", "-ffp-contract=off", "-fno-fast-math", *extra_cflags]))


def unavailable_reason() -> str:
    available()
    return _why_not or ""


def build_error() -> str:
    """Why the extension did not build here ('' if it did): a machine without a C++ toolchain, where
    the eager forward is the only one. A self-test failure is not a build error (tests fail on it)."""
    reason = unavailable_reason()
    return "" if reason.startswith("self-test:") else reason


def _fallback_warning() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"fused QuantLinear forward unavailable ({_why_not}); running the eager forward, "
                      "which gives the same bits", RuntimeWarning, stacklevel=4)


def _rotation_args(rot: BlockRotation | None, dtype: torch.dtype,
                   device: torch.device) -> tuple[list[int], list[float], list[torch.Tensor]] | None:
    """The rotation's cached reflection plan, flattened for the C++ call; None: not supported."""
    if rot is None:
        return [], [], []
    if rot.kind != "householder":
        return None
    meta: list[int] = []
    us: list[float] = []
    tensors: list[torch.Tensor] = []
    for start, blocks, size, u, steps in rot._reflection_plan(dtype, device):
        meta += [start, blocks, size, len(steps)]
        us.append(u)
        for jj, weight in steps:
            tensors += [jj, weight]
    return meta, us, tensors


def _gemm_mode(layer: QuantLinear, m: int) -> bool | None:
    """False: torch._int_mm; True: one exact fp32 GEMM; None: a GEMM this path does not cover."""
    n, k = layer.out_features, layer.in_features
    packed = layer.config.weight.bits <= 4
    if k < 2 or (packed and k % 2) or n * k > kernels.CPU_SCRATCH_BYTES:
        return None
    gemm = kernels.cpu_gemm()
    if gemm == "int_mm":
        return False
    if gemm == "u8_weight" and k <= kernels.U8_WEIGHT_MAX_K and kernels._u8_weight_worth(m, n, k, packed):
        return None
    return True if k <= kernels.fp32_chunk(8 if packed else 128) else None


def run(layer: QuantLinear, x2: torch.Tensor, backend: str) -> torch.Tensor | None:
    """y [M, N] float32 for x2 [M, K] float32, or None where the eager forward must run."""
    if _forward != "fused" or not x2.is_cpu or backend not in ("auto", "cpu"):
        return None
    if _why_not != "" and not available():
        _fallback_warning()
        return None
    if not kernels.cpu_kernel_ok():
        return None
    fp32_gemm = _gemm_mode(layer, x2.shape[0])
    if fp32_gemm is None:
        return None
    native = _native_layer(layer)
    if native is None:
        return None
    scratch = kernels._scratch(layer.out_features * layer.in_features) if layer.config.weight.bits <= 4 else _EMPTY
    y, ok = native.forward(x2 if x2.is_contiguous() else x2.contiguous(), fp32_gemm, scratch)
    if not ok:
        raise QuantInputError(f"layer {layer.name_for_errors}: input contains NaN or Inf")
    global _calls
    _calls += 1
    return cast(torch.Tensor, y)


def fused_calls() -> int:
    """How many QuantLinear calls the fused forward has run in this process (the rest ran eagerly)."""
    return _calls


def _state_key(buffer_dicts: list[dict[str, torch.Tensor | None]]) -> tuple[tuple[int, int], ...]:
    """Identity and version of every buffer of the layer and its transform: a buffer replaced (load,
    .to()) or edited in place (a rotation's index) makes _native_layer rebuild the C++ arguments."""
    return tuple((id(t), t._version) for d in buffer_dicts for t in d.values() if t is not None)


def _native_layer(layer: QuantLinear) -> Any:
    """The layer's C++ argument object (csrc Layer), built once and cached on the layer: it references
    the layer's own buffers and the rotations' cached plans, so no tensor is copied (smoothing or
    permutation vectors stored in another dtype than the call's would be, and the key covers them).
    None: a layer the fused forward does not cover."""
    cached = layer.__dict__.get("_fused_args")
    if cached is not None and cached[1] == _state_key(cached[0]):
        return cached[2]
    mods = [layer] if layer.transform is None else [layer, *layer.transform.modules()]
    dicts = [m._buffers for m in mods]
    args = _build_args(layer)
    assert _module is not None
    native = None if args is None else _module.Layer(*args)
    layer.__dict__["_fused_args"] = (dicts, _state_key(dicts), native)
    return native


def _build_args(layer: QuantLinear) -> tuple[Any, ...] | None:
    t = layer.transform
    smooth = perm = None
    empty: tuple[list[int], list[float], list[torch.Tensor]] = ([], [], [])
    rot1 = rot2 = empty
    dtype, device = torch.float32, layer.qweight.device
    if t is not None:
        if t.out_rot is not None:
            return None
        r1, r2 = _rotation_args(t.rot1, dtype, device), _rotation_args(t.rot2, dtype, device)
        if r1 is None or r2 is None:
            return None
        rot1, rot2 = r1, r2
        smooth = None if t.smooth is None else t.smooth.to(torch.float32).contiguous()
        perm = None if t.perm is None else t.perm.to(torch.int32).contiguous()
    act = layer.config.act
    return (smooth, *rot1, perm, *rot2, act.bits, act.symmetric, act.granularity == "per_token",
            layer.act_scale, layer.act_zero, grids.MIN_SCALE, layer.qweight, layer.config.weight.bits <= 4,
            layer.w_sum, layer.w_scale, layer.bias)


# ---------------------------------------------------------------------------------- self-test
def _probe_layers() -> list[tuple[Any, torch.Tensor]]:
    """(layer, input) pairs covering every variant run() accepts, with outliers so the transforms act."""
    from quantvla.quant.config import ActQuantConfig, DuQuantConfig, LinearQuantConfig, WeightQuantConfig
    from quantvla.quant.linear import QuantLinear

    g = torch.Generator().manual_seed(1234)
    probes = []
    # (weight bits, act bits, greedy DuQuant, granularity, symmetric, bias, smoothing, permutation)
    variants: list[tuple[int, int, bool, Literal["per_token", "per_tensor"], bool, bool, float, bool]] = [
        (4, 8, True, "per_token", False, False, 0.15, True), (4, 8, True, "per_token", False, True, 0.0, True),
        (4, 8, True, "per_token", False, True, 0.15, False), (8, 8, True, "per_token", True, True, 0.15, True),
        (4, 4, False, "per_token", True, False, 0.0, False), (8, 8, False, "per_tensor", True, True, 0.0, False),
        (4, 8, True, "per_tensor", False, False, 0.15, True),
    ]
    for i, (wb, ab, greedy, gran, sym, bias, smooth, permute) in enumerate(variants):
        k, n, m = (256, 96, 7) if i % 2 else (130, 64, 12)
        x = torch.randn(4 * m, k, generator=g) * torch.logspace(-2, 1.5, k)[torch.randperm(k, generator=g)]
        x[:, torch.randperm(k, generator=g)[:3]] *= 40
        lin = torch.nn.Linear(k, n, bias=bias)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
            if lin.bias is not None:
                lin.bias.copy_(torch.randn(n, generator=g))
        transform = DuQuantConfig(rotation="greedy", smooth_strength=smooth, permute=permute) if greedy else None
        cfg = LinearQuantConfig(WeightQuantConfig(bits=wb), ActQuantConfig(bits=ab, granularity=gran, symmetric=sym),
                                transform)
        probes.append((QuantLinear.from_linear(lin, cfg, calib=x[m:]), x[:m].contiguous()))
    return probes


def _self_test() -> str:
    """'' where the fused forward gives the eager forward's bits on every probe, else the reason."""
    for layer, x in _probe_layers():
        with torch.no_grad():
            eager = layer(x)
            with forward_override("fused"):
                fused = run(layer, x, "auto")
        if fused is None:
            continue  # a GEMM this CPU's cpu backend takes elsewhere: nothing to compare
        if not torch.equal(fused.view(torch.int32), eager.view(torch.int32)):
            diff = (fused - eager).abs().max().item()
            what = layer.extra_repr().split(", bytes")[0]
            return f"self-test: {what} differs from the eager forward (max {diff:.3g}); please report it"
    return ""
