"""QuantLinear end to end against fp32 and bf16 F.linear, measured side by side.

For every shape, all candidates run in interleaved rounds (fp32, bf16, W8A8, W4A8, ... then again)
and each keeps its median, so a burst of load from another process hits all of them alike.
Ratios are fp32 time / candidate time: > 1 means the candidate is faster. Every row also gives
the bytes the candidate keeps resident (weights, scales, caches: QuantLinear.footprint()), so the
one speed-for-memory trade on the list, "W8A8 prepacked" (the opt-in oneDNN backend, CPU only),
shows its price next to its speed. On CPUs whose cpu backend runs the u8_weight GEMM (x86 without
VNNI), "W8A8 fp32-GEMM" and "W4A8 fp32-GEMM" run the same layers on the fp32 GEMM it replaced.
"W4A8+DuQuant bf16 in/out" is a bf16 model's call (bf16 activations in and out, no widening or
narrowing pass), beside "... bf16 via fp32", the same layer with the activations widened first and
the output narrowed after (the route before issue 20's deliverable 2): the same bits, two passes more.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantvla.quant import kernels
from quantvla.quant.config import ActQuantConfig, DuQuantConfig, LinearQuantConfig, WeightQuantConfig
from quantvla.quant.linear import QuantLinear

DEFAULT_M = (1, 64, 512)
DEFAULT_KN = ((2048, 2048), (2048, 16384), (16384, 2048))


@dataclass
class KernelRow:
    m: int
    k: int
    n: int
    name: str
    ms: float
    vs_fp32: float
    vs_bf16: float
    resident_bytes: int


def _config(wbits: int, abits: int, transform: bool, backend: str = "auto") -> LinearQuantConfig:
    # One clip ratio: the MSE search changes the values, not the speed, and is slow on big weights.
    return LinearQuantConfig(WeightQuantConfig(bits=wbits, clip_ratios=(1.0,)), ActQuantConfig(bits=abits),
                             DuQuantConfig() if transform else None, backend=backend)


def _time_interleaved(fns: dict, min_rounds: int, min_seconds: float) -> dict[str, float]:
    for fn in fns.values():  # warm-up (oneDNN JIT, allocator)
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or time.perf_counter() - start < min_seconds:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}


def _sync(device: str):
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


@torch.no_grad()
def run(ms=DEFAULT_M, kns=DEFAULT_KN, with_transform: bool = True, min_rounds: int = 7,
        min_seconds: float = 0.5, seed: int = 0, device: str = "cpu", log=print) -> list[KernelRow]:
    rows: list[KernelRow] = []
    gen = torch.Generator().manual_seed(seed)
    sync = _sync(device)
    for k, n in kns:
        lin = nn.Linear(k, n, bias=False)
        lin.weight.copy_(torch.randn(n, k, generator=gen) * k**-0.5)
        w32 = lin.weight.to(device)
        w16 = w32.to(torch.bfloat16)
        calib = torch.randn(64, k, generator=gen)
        layers = {"W8A8": QuantLinear.from_linear(lin, _config(8, 8, False)),
                  "W8A8 prepacked": QuantLinear.from_linear(lin, _config(8, 8, False, "onednn")),
                  "W4A8": QuantLinear.from_linear(lin, _config(4, 8, False)),
                  "W4A4": QuantLinear.from_linear(lin, _config(4, 4, False))}
        if with_transform:
            layers["W4A8+DuQuant"] = QuantLinear.from_linear(lin, _config(4, 8, True), calib=calib)
        if device != "cpu":
            del layers["W8A8 prepacked"]
        layers = {name: layer.to(device) for name, layer in layers.items()}
        for m in ms:
            x = torch.randn(m, k, generator=gen).to(device)
            x16 = x.to(torch.bfloat16)

            def timed(fn):
                return lambda: (fn(), sync())

            fns = {"fp32 F.linear": timed(lambda x=x, w=w32: F.linear(x, w)),
                   "bf16 F.linear": timed(lambda x=x16, w=w16: F.linear(x, w))}
            fns.update({name: timed(lambda layer=layer, x=x: layer(x)) for name, layer in layers.items()})
            if "W4A8+DuQuant" in layers:  # a bf16 model's call: in its dtype, against widening it first
                duq = layers["W4A8+DuQuant"]
                fns["W4A8+DuQuant bf16 in/out"] = timed(lambda layer=duq, x=x16: layer(x))
                fns["W4A8+DuQuant bf16 via fp32"] = timed(
                    lambda layer=duq, x=x16: layer(x.to(torch.float32)).to(torch.bfloat16))
            if device == "cpu" and kernels.cpu_gemm() == "u8_weight":
                for name in ("W8A8", "W4A8"):
                    fns[f"{name} fp32-GEMM"] = timed(lambda layer=layers[name], x=x: _on_fp32_gemm(layer, x))
            med = _time_interleaved(fns, min_rounds, min_seconds)
            resident = {"fp32 F.linear": w32.numel() * 4, "bf16 F.linear": w16.numel() * 2}
            resident.update({name: layer.footprint()["resident"] for name, layer in layers.items()})
            resident.update({name: resident[name.split()[0]] for name in fns
                             if name.endswith("fp32-GEMM") or " bf16 " in name})
            for name, t in med.items():
                row = KernelRow(m, k, n, name, round(t, 4), round(med["fp32 F.linear"] / t, 2),
                                round(med["bf16 F.linear"] / t, 2), resident[name])
                rows.append(row)
            log(f"  M={m:<4} K={k:<6} N={n:<6} " + "  ".join(f"{r.name} {r.ms:.3f}ms ({r.vs_fp32}x)"
                                                             for r in rows[-len(med):]))
    return rows


def _on_fp32_gemm(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    with kernels.cpu_gemm_override("fp32"):
        return layer(x)


def as_table(rows: list[KernelRow]) -> str:
    from tabulate import tabulate
    return tabulate([asdict(r) for r in rows], headers="keys", floatfmt=".3f")


def as_dicts(rows: list[KernelRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def plot(rows: list[KernelRow], path) -> bool:
    """PNG: speed-up over fp32 F.linear of every candidate, one group of bars per shape."""
    from quantvla.bench.plot import grouped_bars

    shapes = list(dict.fromkeys((r.m, r.k, r.n) for r in rows))
    names = list(dict.fromkeys(r.name for r in rows if r.name != "fp32 F.linear"))
    ratio = {(r.m, r.k, r.n, r.name): r.vs_fp32 for r in rows}
    series = {name: [ratio.get((*s, name), 0.0) for s in shapes] for name in names}
    return grouped_bars(path, [f"M{m} K{k} N{n}" for m, k, n in shapes], [("speed-up over fp32 F.linear", series)],
                        title="QuantLinear end to end vs F.linear, measured side by side", reference=1.0)
