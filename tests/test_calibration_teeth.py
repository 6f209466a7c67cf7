"""The built-in calibration check has teeth: each fault below, monkeypatched into the library's
ATM/OHB (never an edit of the source), fails calibration_recovery; the reference passes it. The
faults act only when a scale leaves 1, which is why the goldens of the real run cannot see them."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from pytest_quantvla.checks import calibration as check
from pytest_quantvla.collect import CheckFailed
from pytest_quantvla.options import RunConfig
from pytest_quantvla.subject import uncalibrated
from quantvla import api, calibrate
from quantvla.calibration import scales

RUN = RunConfig(model="pi05", config="trained", bits="w4a8", device="cpu", seed=0, quantizer="quantvla",
                checkpoint=None, golden_dir=None, update_golden=False, report=None)


@pytest.fixture(scope="module", autouse=True)
def built():
    uncalibrated(RUN)  # build and quantize before any fault is patched in


def _reciprocal_alpha(teacher_std, student_std, clip_log, neutral_log):
    return scales.clip_scale(student_std.double() / (teacher_std.double() + scales.EPS), clip_log, neutral_log)


def _per_layer_alpha(teacher_std, student_std, clip_log, neutral_log):
    alpha = scales.fit_alpha(teacher_std, student_std, clip_log, neutral_log)
    return torch.full_like(alpha, float(alpha.log().mean().exp()))


def _beta_before_alpha(teacher, student, buffer, config, report=None):
    betas = calibrate(teacher, copy.deepcopy(student), buffer, dataclasses.replace(config, atm=False))
    calibrate(teacher, student, buffer, dataclasses.replace(config, ohb=False))
    for site in student.attention_sites():
        site.fold_beta(betas.quantvla_scales["beta"][site.name])
    student.quantvla_scales["beta"] = betas.quantvla_scales["beta"]
    return student


def _first_entry_only(measure):
    return lambda model, buffer, entries, steps: measure(model, buffer, range(entries.start, entries.start + 1), steps)


FAULTS = {
    "alpha in the reciprocal direction": ("quantvla.api.fit_alpha", _reciprocal_alpha),
    "one alpha per layer, not per head": ("quantvla.api.fit_alpha", _per_layer_alpha),
    "alpha not clipped": ("quantvla.api.fit_alpha", lambda t, s, c, n: scales.fit_alpha(t, s, 10.0, n)),
    "neutral band ten times too wide": ("quantvla.api.fit_alpha", lambda t, s, c, n: scales.fit_alpha(t, s, c, 10 * n)),
    "beta in the reciprocal direction": ("quantvla.api.fit_beta", lambda t, s, c, n: scales.fit_beta(s, t, c, n)),
    "beta never leaves 1": ("quantvla.api.fit_beta", lambda t, s, c, n: torch.ones_like(t, dtype=torch.float32)),
    "beta fitted before alpha is folded": ("pytest_quantvla.checks.calibration.calibrate", _beta_before_alpha),
    "only the first buffer entry used": ("quantvla.api._measure", _first_entry_only(api._measure)),
}


def test_reference_calibration_passes():
    measured = check.calibration_recovery(RUN)
    assert measured["atm_reduction"] >= 2 and measured["ohb_reduction"] >= 2


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_fails_the_check(fault, monkeypatch):
    target, replacement = FAULTS[fault]
    monkeypatch.setattr(target, replacement)
    with pytest.raises(CheckFailed):
        check.calibration_recovery(RUN)
