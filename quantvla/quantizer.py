"""What a quantizer is, for everything that runs one (the pytest plugin, `python -m quantvla
quantize`, the benchmarks):

    quantize(model, calibration: CalibrationBuffer, bits: str) -> quantized model

a callable that leaves `model` untouched and returns the model to test. It may carry metadata:

* `bits`: the setting it really quantizes at ("w8a8", "w4a16", ...). A run takes it as its own
  bit-width; asking for another one is an error naming both, so no run id claims what did not run.
* `name`: a readable name for reports.
* a keyword parameter `report`: it is then passed a QuantizationReport to fill (the reference does).
"""

from __future__ import annotations

import inspect
from typing import Protocol, runtime_checkable

from torch import nn

# W<weight bits>A<activation bits>; A16: weights only, activations stay in floating point
BITS = ("w4a8", "w4a4", "w8a8", "w8a16", "w4a16")


@runtime_checkable
class Quantizer(Protocol):
    def __call__(self, model: nn.Module, calibration, bits: str, /) -> nn.Module: ...


def declared_bits(quantizer) -> str | None:
    """The bit-width a quantizer says it quantizes at, or None when it takes the run's."""
    bits = getattr(quantizer, "bits", None)
    if bits is None:
        return None
    if bits not in BITS:
        raise ValueError(f"the quantizer declares bits={bits!r}; a bit-width is one of {', '.join(BITS)}")
    return bits


def accepts_report(quantizer) -> bool:
    """Whether the quantizer takes a `report` keyword (a QuantizationReport it fills)."""
    try:
        return "report" in inspect.signature(quantizer).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False
