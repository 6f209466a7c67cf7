"""Memory of the quantized components (LLM + DiT linears; counting rule in quantvla.memory):
measured on the model under test, and projected for the full-size architecture on the meta device
against the paper (reference/paper.json): pi0.5 4.27 -> 1.28 GB (70.0% saved), GR00T N1.5
2.02 -> 0.91 GB (55.0% saved) for quantvla-w4a8."""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pytest_quantvla.collect import Check, CheckFailed
from pytest_quantvla.options import RunConfig
from pytest_quantvla.quantizers import preset_for, reference_config
from pytest_quantvla.results import CheckResult
from pytest_quantvla.subject import subject
from quantvla import families
from quantvla.memory import COMPONENT_ROLES, GIB, component_memory, projected_memory
from quantvla.reference import paper

# Per-channel allowance of a quantized layer: room for 8 four-byte vectors per input and output
# channel (scales, zero-point sums, smoothing, permutation, bias...), beyond its packed integers.
PER_CHANNEL_BYTES = 32


@dataclass(kw_only=True)
class MemoryResult(CheckResult):
    """extra: the rest of quantvla.memory.MemoryReport (resident bytes, component counts, GiB)."""

    kind = "memory"
    source = "bit-width + 32 B/channel"
    fp16_bytes: int
    storage_bytes: int
    saving: float
    budget_bytes: int

    def measured(self) -> str:
        return f"{self.fp16_bytes} -> {self.storage_bytes} B ({self.saving:.1%} saved)"

    def reference(self) -> str:
        return f"<= {self.budget_bytes} B"


@dataclass(kw_only=True)
class FullSizeMemoryResult(CheckResult):
    kind = "memory_full_size"
    source = "paper Table 2 (reference/paper.json)"
    fp16_gib: float
    storage_gib: float
    saving: float
    paper_fp16: float
    paper_quantized: float
    paper_saving: float

    def measured(self) -> str:
        return f"{self.fp16_gib:.2f} -> {self.storage_gib:.3f} GiB ({self.saving:.1%} saved)"

    def reference(self) -> str:
        return f"<= {self.paper_quantized} GB, >= {self.paper_saving:.1%} saved"


def budget(fp: nn.Module, quantized_names: Collection[str], wbits: int) -> int:
    """What the components may store: kept linears in FP16, quantized ones at wbits per weight plus
    the per-channel allowance. A fake-quantized layer (float weights, replaced or changed in place)
    or W4 values kept in int8 containers (torchao's unpacked intx int4) exceed it."""
    mods = dict(fp.named_modules())
    roles: dict[str, str] = fp.linear_roles()  # type: ignore[operator]  # every family's model has them
    total = 0
    for n, r in roles.items():
        if r not in COMPONENT_ROLES:
            continue
        lin = mods[n]
        if n in quantized_names:
            total += lin.weight.numel() * wbits // 8 + PER_CHANNEL_BYTES * (lin.in_features + lin.out_features)
        else:
            total += lin.weight.numel() * 2
    return total


def measured(run: RunConfig) -> MemoryResult:
    s = subject(run)
    rep = component_memory(s.fp, s.quantized)
    if rep.quantized == 0:
        raise CheckFailed("the quantizer changed none of the LLM/DiT linears: each is still an nn.Linear with the FP "
                          "model's weight, bit for bit (did it return the model unchanged, or quantize a copy it "
                          "did not return?)")
    limit = budget(s.fp, set(s.quantized_layers()), int(run.bits[1]))
    if rep.storage_bytes > limit:
        raise CheckFailed(f"quantized components store {rep.storage_bytes} bytes (FP16: {rep.fp16_bytes}); "
                          f"{run.bits} allows {limit} ({int(run.bits[1])}-bit weights plus {PER_CHANNEL_BYTES} "
                          "bytes per channel): weights are not stored at the claimed bit-width")
    if rep.resident_bytes > rep.storage_bytes * 1.01:
        raise CheckFailed(f"layers keep {rep.resident_bytes - rep.storage_bytes} bytes alive beyond what they "
                          "store (caches): resident memory would not match the claim")
    return MemoryResult.from_values({**rep.to_dict(), "budget_bytes": limit})


def full_size(run: RunConfig, ref: dict[str, Any], preset_name: str) -> FullSizeMemoryResult:
    with torch.device("meta"):
        model = families.build(run.family, "full")
    rep = projected_memory(model, reference_config(run.quantizer, run.bits))
    want_q, want_saving = ref[preset_name], ref[f"{preset_name}_saving"]
    got_q = rep.storage_bytes / GIB
    if got_q > want_q or rep.saving < want_saving:
        raise CheckFailed(f"full-size {run.model}: {rep.fp16_bytes / GIB:.2f} -> {got_q:.3f} GiB "
                          f"({rep.saving:.1%} saved); the paper: {ref['fp16']} -> {want_q} ({want_saving:.1%} saved)")
    return FullSizeMemoryResult.from_values({**rep.to_dict(), "paper_fp16": ref["fp16"], "paper_quantized": want_q,
                                             "paper_saving": want_saving})


def checks(run: RunConfig) -> Iterator[Check]:
    yield Check(f"{run.prefix}/memory[{run.size}]", functools.partial(measured, run), kind=MemoryResult.kind)
    cfg = preset_for(run.quantizer, run.bits)
    ref = paper()["memory_gb"].get(run.model, {})
    if cfg is not None and f"{cfg.name}_saving" in ref:  # the paper gives a figure for this family and setting
        yield Check(f"{run.prefix}/memory[full-vs-paper]", functools.partial(full_size, run, ref, cfg.name),
                    kind=FullSizeMemoryResult.kind)
