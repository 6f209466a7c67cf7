"""Which quantizer a run tests. A quantizer is any callable

    quantize(model, calibration: quantvla.CalibrationBuffer, bits: str) -> quantized model

that leaves `model` untouched. Named by --quantvla-quantizer as: "quantvla" (the reference, with
the run's bit-width), one of quantvla.PRESETS, "pkg.module:callable", or a name registered in the
`pytest_quantvla.quantizers` entry-point group."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points

import pytest

from quantvla import PRESETS, QuantizationReport, preset, quantize

GROUP = "pytest_quantvla.quantizers"
Quantizer = Callable[..., object]


def _reference(name: str | None) -> Quantizer:
    def run(model, calibration, bits, report: QuantizationReport | None = None):
        return quantize(model, calibration, preset(name or f"quantvla-{bits}"), report)

    run.quantvla_preset = name  # type: ignore[attr-defined]
    return run


def resolve(spec: str) -> Quantizer:
    if spec == "quantvla":
        return _reference(None)
    if spec in PRESETS:
        return _reference(spec)
    registered = {ep.name: ep for ep in entry_points(group=GROUP)}
    if spec in registered:
        return registered[spec].load()
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
    choices = ["quantvla", *PRESETS, *registered, "pkg.module:callable"]
    raise pytest.UsageError(f"--quantvla-quantizer={spec!r} is not valid; choose one of: {', '.join(choices)}")


def preset_for(spec: str, bits: str):
    """The QuantConfig behind a reference quantizer spec, or None for third-party quantizers."""
    if spec == "quantvla":
        return preset(f"quantvla-{bits}")
    return PRESETS.get(spec)
