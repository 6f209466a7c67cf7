"""The model under test, built once per process: the FP model, a calibration buffer, a held-out
buffer, and the quantized model made by the run's quantizer. Every xdist worker builds the same
one from the same seed.

--quantvla-config=trained (the default) or trained-state: a small LIBERO policy shipped in
golden/policies (or the policy folder given as --quantvla-checkpoint), calibrated and held out on its own recorded demo
observations. tiny / full: seeded random weights (or --quantvla-checkpoint) and synthetic inputs."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pytest_quantvla import quantizers
from pytest_quantvla.options import RunConfig
from quantvla import CalibrationBuffer, QuantizationReport, families
from quantvla import quantize as quantize_model
from quantvla.errors import QuantVLAError
from quantvla.memory import quantized_component_names
from quantvla.policy.bundle import Bundle, shipped_policy
from quantvla.quantizer import accepts_report

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
    bundle: Bundle | None = None  # the trained policy (config "trained" or "trained-state")

    def quantized_layers(self) -> list[str]:
        """Names of the FP model's linears that the quantizer changed (replaced, a tensor-subclass or
        parametrized weight, or other weight values): quantvla.memory.is_quantized."""
        return quantized_component_names(self.fp, self.quantized)


def policy_path(run: RunConfig) -> Path:
    """The trained policy of a run: --quantvla-checkpoint, else the one shipped for the model under the
    run's config name (trained, trained-state)."""
    return run.checkpoint if run.checkpoint is not None else shipped_policy(run.family, run.size)


# Where progress lines go: the plugin points it at the terminal in a serial run (an xdist worker's
# output is not shown). A long main job then says what it is doing, phase by phase.
progress: Callable[[str], None] = lambda line: None  # noqa: E731


@contextlib.contextmanager
def _phase(what: str) -> Iterator[None]:
    started = time.perf_counter()
    progress(f"quantvla: {what} ...")
    yield
    progress(f"quantvla: {what}: done in {time.perf_counter() - started:.1f} s")


@functools.lru_cache(maxsize=2)
def subject(run: RunConfig) -> Subject:
    torch.manual_seed(run.seed)
    with _phase(f"build {run.model} ({run.size}) and its calibration buffers"):
        fp, calibration, held_out, bundle = _build(run)
    with _phase(f"quantize with {run.quantizer} at {run.bits}"):
        quantized, report = _quantize(run, fp, calibration)
    return Subject(run, fp, calibration, held_out, quantized, report, bundle)


def _build(run: RunConfig) -> tuple[nn.Module, CalibrationBuffer, CalibrationBuffer, Bundle | None]:
    checkpoint = policy_path(run) if run.trained else run.checkpoint
    loaded = families.load_fp(run.family, run.size, checkpoint, entries=CALIBRATION_ENTRIES, seed=run.seed)
    fp = loaded.model.to(run.device).eval()
    if loaded.bundle is not None:  # alternate recorded entries (spread over tasks and phases): calibrate / hold out
        recorded = loaded.calibration
        calibration = CalibrationBuffer(recorded.inputs[::2], recorded.noise[::2]).to(run.device)
        held_out = CalibrationBuffer(recorded.inputs[1::2], recorded.noise[1::2]).to(run.device)
    else:
        calibration = loaded.calibration.to(run.device)
        held_out = CalibrationBuffer.synthetic(fp, HELD_OUT_ENTRIES, seed=run.seed + 1).to(run.device)
    return fp, calibration, held_out, loaded.bundle


def _quantize(run: RunConfig, fp: nn.Module, calibration: CalibrationBuffer) \
        -> tuple[nn.Module, QuantizationReport | None]:
    quantize = quantizers.resolve(run.quantizer)
    report = None
    if accepts_report(quantize):  # the reference does: keep its calibration report
        report = QuantizationReport(run.quantizer)
        quantized = quantize(fp, calibration, run.bits, report=report)  # type: ignore[call-arg]
    else:
        quantized = quantize(fp, calibration, run.bits)
    if not isinstance(quantized, nn.Module):
        raise QuantVLAError(f"the quantizer {run.quantizer!r} returned {type(quantized).__name__} "
                            f"({str(quantized)[:40]!r}), not a model; a quantizer is called as "
                            "quantize(fp_model, calibration, bits) and returns the quantized torch.nn.Module")
    return quantized.eval(), report


@functools.lru_cache(maxsize=2)
def uncalibrated(run: RunConfig) -> nn.Module:
    """The reference run's quantized model without ATM and OHB (same linears, every scale 1)."""
    s = subject(run)
    cfg = quantizers.reference_config(run.quantizer, run.bits)
    with _phase(f"quantize with {run.quantizer} at {run.bits} without ATM/OHB (the drift they correct)"):
        return quantize_model(s.fp, s.calibration, dataclasses.replace(cfg, atm=False, ohb=False)).eval()
