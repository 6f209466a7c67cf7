"""Which quantizer a run tests (the protocol: quantvla.quantizer.Quantizer). Named by
--quantvla-quantizer as: "quantvla" (the reference, at the run's bit-width), one of quantvla.PRESETS
(at the preset's own bit-width), "pkg.module:callable", or a name registered in the
`pytest_quantvla.quantizers` entry-point group. Resolved once per process; a quantizer's declared
`bits` becomes the run's (options._bits_of)."""

from __future__ import annotations

import functools
import importlib
from importlib.metadata import entry_points

import pytest
from torch import nn

from quantvla import PRESETS, CalibrationBuffer, QuantConfig, QuantizationReport, preset, quantize
from quantvla.errors import QuantVLAError
from quantvla.quantizer import Quantizer

GROUP = "pytest_quantvla.quantizers"
REFERENCE = "quantvla"


def _reference(name: str | None) -> Quantizer:
    def run(model: nn.Module, calibration: CalibrationBuffer, bits: str,
            report: QuantizationReport | None = None) -> nn.Module:
        return quantize(model, calibration, preset(name or f"quantvla-{bits}"), report)

    if name is not None:
        linear = PRESETS[name].linear
        run.bits = None if linear is None else f"w{linear.weight.bits}a{linear.act.bits}"  # type: ignore[attr-defined]
    run.name = name or REFERENCE  # type: ignore[attr-defined]
    return run


def is_reference(spec: str) -> bool:
    return spec == REFERENCE or spec in PRESETS


@functools.cache
def resolve(spec: str) -> Quantizer:
    if is_reference(spec):
        return _reference(None if spec == REFERENCE else spec)
    registered = {ep.name: ep for ep in entry_points(group=GROUP)}
    if spec in registered:
        loaded: Quantizer = registered[spec].load()
        return loaded
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as err:
            raise pytest.UsageError(f"--quantvla-quantizer={spec!r} cannot be imported: {err}") from None
        if not callable(obj):
            raise pytest.UsageError(f"--quantvla-quantizer={spec!r} is not callable")
        return obj
    choices = [REFERENCE, *PRESETS, *registered, "pkg.module:callable"]
    raise pytest.UsageError(f"--quantvla-quantizer={spec!r} is not valid; choose one of: {', '.join(choices)}")


def preset_for(spec: str, bits: str) -> QuantConfig | None:
    """The QuantConfig behind a reference quantizer spec, or None for third-party quantizers."""
    if spec == REFERENCE:
        return preset(f"quantvla-{bits}")
    return PRESETS.get(spec)


def reference_config(spec: str, bits: str) -> QuantConfig:
    """preset_for(spec, bits) for the checks collected only for the reference quantizer."""
    cfg = preset_for(spec, bits)
    if cfg is None:
        raise QuantVLAError(f"{spec!r} is not the reference quantizer or one of its presets; this check needs one")
    return cfg
