"""The built-in calibration check has teeth: each fault below, monkeypatched into the library's
ATM/OHB (never an edit of the source), fails calibration_recovery; the reference passes it. The
faults act only when a scale leaves 1, which is why the goldens of the real run cannot see them."""

from __future__ import annotations

import pytest

from pytest_quantvla.checks import calibration as check
from pytest_quantvla.collect import CheckFailed
from pytest_quantvla.options import RunConfig
from pytest_quantvla.subject import uncalibrated
from tests import teeth

RUN = RunConfig(model="pi05", size="trained", bits="w4a8", device="cpu", seed=0, quantizer="quantvla",
                checkpoint=None, golden_dir=None, update_golden=False, report=None)


@pytest.fixture(autouse=True)
def built():
    uncalibrated(RUN)  # build and quantize before any fault is patched in (a no-op once cached)


# the ATM / OHB / calibration variants of the teeth module, aimed at this one check
FAULTS = {name: (v.target, v.replacement) for name, v in teeth.VARIANTS.items()
          if v.area in ("atm", "ohb", "calibration")}


def test_reference_calibration_passes():
    measured = check.calibration_recovery(RUN)
    assert measured.atm_reduction >= 2 and measured.ohb_reduction >= 2


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_fails_the_check(fault, monkeypatch):
    target, replacement = FAULTS[fault]
    monkeypatch.setattr(target, replacement)
    with pytest.raises(CheckFailed):
        check.calibration_recovery(RUN)
