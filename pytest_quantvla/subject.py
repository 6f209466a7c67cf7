"""The model under test, built once per process: the FP model (seeded, or loaded from
--quantvla-checkpoint), a calibration buffer, a held-out buffer, and the quantized model made by
the run's quantizer. Every xdist worker builds the same one from the same seed."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from pytest_quantvla import quantizers
from pytest_quantvla.options import RunConfig
from quantvla import CalibrationBuffer, QuantizationReport
from quantvla.models import build
from quantvla.models.checkpoint import load_checkpoint

CALIBRATION_ENTRIES = 8
HELD_OUT_ENTRIES = 8


@dataclass
class Subject:
    run: RunConfig
    fp: nn.Module
    calibration: CalibrationBuffer
    held_out: CalibrationBuffer
    quantized: nn.Module
    report: QuantizationReport | None  # the reference quantizer's calibration report

    def quantized_layers(self) -> list[str]:
        """Names of the FP model's linears that the quantizer replaced."""
        q = dict(self.quantized.named_modules())
        return [n for n in self.fp.linear_roles() if type(q.get(n)) is not nn.Linear]


@functools.lru_cache(maxsize=2)
def subject(run: RunConfig) -> Subject:
    torch.manual_seed(run.seed)
    fp = build(run.model, run.config)
    if run.checkpoint is not None:
        load_checkpoint(fp, run.checkpoint)
    fp = fp.to(run.device).eval()
    calibration = CalibrationBuffer.synthetic(fp, CALIBRATION_ENTRIES, seed=run.seed).to(run.device)
    held_out = CalibrationBuffer.synthetic(fp, HELD_OUT_ENTRIES, seed=run.seed + 1).to(run.device)
    quantize = quantizers.resolve(run.quantizer)
    report = None
    if getattr(quantize, "quantvla_preset", False) is not False:  # the reference: keep its report
        report = QuantizationReport(run.quantizer)
        quantized = quantize(fp, calibration, run.bits, report)
    else:
        quantized = quantize(fp, calibration, run.bits)
    return Subject(run, fp, calibration, held_out, quantized.eval(), report)
