"""fused_exact (with --quantvla-forward=fused): the run's quantized model gives the same action
chunks, bit for bit, on the fused forward as on the eager one, so every other check, measured on the
fused forward, holds for the reference forward too."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from pytest_quantvla.collect import Check, CheckFailed
from pytest_quantvla.options import RunConfig
from pytest_quantvla.results import CheckResult
from quantvla.quant import fused

CHUNKS = 4  # held-out entries compared


@dataclass(kw_only=True)
class FusedResult(CheckResult):
    kind = "fused_exact"
    source = "quantvla.quant.fused"
    chunks: int
    fused_calls: int  # QuantLinear calls the fused forward ran (the rest ran eagerly: layers it does not cover)
    layer_calls: int

    def measured(self) -> str:
        return f"{self.chunks} chunks identical; {self.fused_calls} of {self.layer_calls} quantized-layer calls fused"

    def reference(self) -> str:
        return "eager forward, bit for bit"


def _fused_exact(run: RunConfig) -> FusedResult:
    from pytest_quantvla.subject import subject
    from quantvla.quant.linear import QuantLinear

    if run.device != "cpu":
        pytest.skip(f"the fused forward runs on the CPU; this run is on {run.device}, eager")
    if fused.build_error():
        pytest.skip(f"the fused forward could not be built here ({fused.build_error()}); this run used the eager one")
    if not fused.available():
        raise CheckFailed(f"the fused forward was refused ({fused.unavailable_reason()}); this run used the eager one")
    s = subject(run)
    model: Any = s.quantized  # a policy module: sample_actions(inputs, noise)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    n = min(CHUNKS, len(s.held_out))
    calls = [0]
    hooks = [m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for m in layers]
    try:
        before = fused.fused_calls()
        for i in range(n):
            x, noise = s.held_out.inputs[i], s.held_out.noise[i]
            with torch.no_grad():
                with fused.forward_override("eager"):
                    eager = model.sample_actions(x, noise)
                with fused.forward_override("fused"):
                    fast = model.sample_actions(x, noise)
            if not torch.equal(fast, eager):
                raise CheckFailed(f"held-out entry {i}: the fused forward's action chunk differs from the eager one "
                                  f"(max {float((fast - eager).abs().max()):.3g}); run with --quantvla-forward=eager")
        fused_calls = fused.fused_calls() - before
    finally:
        for h in hooks:
            h.remove()
    return FusedResult(chunks=n, fused_calls=fused_calls, layer_calls=calls[0] // 2)


def checks(run: RunConfig) -> Iterator[Check]:
    if run.forward == "fused":
        yield Check(f"{run.prefix}/fused_exact", lambda: _fused_exact(run), kind=FusedResult.kind)
