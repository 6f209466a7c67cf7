"""Integer kernels on this machine: every backend bit-identical to the int64 oracle, with the
operands that break broken kernels (saturating all-max products, K = 1, odd shapes, odd sums
beyond fp32's 2^24)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from pytest_quantvla.collect import Check, CheckFailed
from pytest_quantvla.options import RunConfig
from pytest_quantvla.results import CheckResult
from quantvla.quant import kernels
from quantvla.quant.packing import pack_int4


def _probe_operands(seed: int, wbits: int) -> Iterator[tuple[str, tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (wbits - 1)), (1 << (wbits - 1)) - 1
    # 8x2048x2048 is large enough for the u8_weight GEMM AVX2-only CPUs use on big layers
    shapes = [(1, 1, 5), (3, 7, 2), (17, 129, 33), (64, 2048, 96), (5, 16384, 8), (8, 2048, 2048)]
    for m, k, n in shapes:
        yield f"random {m}x{k}x{n}", (torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8),
                                      torch.randint(lo, hi + 1, (n, k), generator=gen, dtype=torch.int8))
        yield f"all-min {m}x{k}x{n}", (torch.full((m, k), -128, dtype=torch.int8),
                                       torch.full((n, k), lo, dtype=torch.int8))
    # odd sums above 2^24 (W8): an fp32 detour rounds them, so a kernel that returns float(acc)
    # without its int32 fallback fails here
    w = torch.full((96, 2048), hi, dtype=torch.int8)
    w[:, 0] = hi - 1
    yield "odd-large 64x2048x96", (torch.full((64, 2048), 127, dtype=torch.int8), w)
    # odd sums whose unsigned partial sums pass 2^24 at the longest K the u8_weight GEMM takes: a
    # kernel that leaves fp32 before it subtracts the weight's zero point rounds them
    x = torch.full((8, 16382), 127, dtype=torch.int8)
    x[:, 0] = 126
    yield "odd-large 8x16382x256", (x, torch.full((256, 16382), hi, dtype=torch.int8))


@dataclass(kw_only=True)
class KernelResult(CheckResult):
    kind = "kernel_exact"
    source = "quantvla.quant.kernels"
    probes: int
    gemm: str | None  # the exact GEMM the cpu backend chose on this CPU (kernels.cpu_gemm)

    def measured(self) -> str:
        return f"{self.probes} probes" + (f" ({self.gemm} GEMM)" if self.gemm else "")

    def reference(self) -> str:
        return "int64 oracle, bit for bit"


def _exact(backend: str, wbits: int, seed: int, device: str) -> KernelResult:
    if backend == "onednn" and not kernels.onednn_ok():
        pytest.skip(f"the opt-in onednn backend is unavailable here: {kernels.onednn_unavailable_reason()}")
    checked = 0
    for what, (qx, qw) in _probe_operands(seed, wbits):
        want = qx.long() @ qw.long().t()
        stored = pack_int4(qw) if wbits <= 4 else qw
        got = kernels.int_linear(qx.to(device), stored.to(device), qx.shape[1], wbits, backend).cpu()
        if got.dtype != torch.int32 or not torch.equal(got.long(), want):
            bad = int((got.long() != want).sum())
            raise CheckFailed(f"backend {backend!r} W{wbits}: {bad} of {want.numel()} int32 outputs differ from "
                              f"the int64 oracle on the {what} probe")
        checked += 1
    return KernelResult(probes=checked, gemm=kernels.cpu_gemm() if backend == "cpu" else None)


def checks(run: RunConfig) -> Iterator[Check]:
    backend = "cuda" if run.device.startswith("cuda") else "cpu"
    device = run.device
    wbits = int(run.bits[1])
    prefix = f"quantvla/{run.model}/{run.bits}"
    for bits in sorted({wbits, 8}):
        yield Check(f"{prefix}/kernel_exact[{backend}-w{bits}]",
                    functools.partial(_exact, backend, bits, run.seed, device), kind=KernelResult.kind)
    if backend == "cpu":  # the prepacked W8 path: 64x2048x96 runs oneDNN, all-min and odd-large its int32 redo
        yield Check(f"{prefix}/kernel_exact[onednn-w8]", lambda: _exact("onednn", 8, run.seed, device),
                    kind=KernelResult.kind)
