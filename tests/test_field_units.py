"""Numbers in the field's own units beside ours: SQNR in dB (torchao) for layers, and the cosine
similarity of action chunks against FP (GR00T's deployment checks) for models."""

import pytest
import torch

from quantvla import CalibrationBuffer, quantize
from quantvla.drift import paired_statistics
from quantvla.models import build
from quantvla.quant.bounds import relative_error, sqnr_db


def test_sqnr_is_torchaos_decibels():
    ref = torch.randn(64, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noisy = ref + 0.1 * ref.norm() / ref.numel() ** 0.5 * torch.randn(64, 32, dtype=torch.float64)
    expected = 20 * torch.log10(ref.norm() / (noisy - ref).norm())
    assert sqnr_db(relative_error(noisy, ref)) == pytest.approx(float(expected), rel=1e-9)
    assert sqnr_db(0.1) == pytest.approx(20.0) and sqnr_db(0.0) is None


@pytest.mark.parametrize("model", ["pi05", "gr00t-n15"])
def test_action_cosine_is_one_for_the_teacher_and_lower_when_quantized(model):
    fp = build(model, "tiny").eval()
    buffer = CalibrationBuffer.synthetic(fp, 2, seed=0)
    same = paired_statistics(fp, fp, buffer)
    assert same["action_cosine_min"] == pytest.approx(1.0, abs=1e-12) and same["action_mse"] == 0.0
    w4a4 = paired_statistics(fp, quantize(fp, buffer, "rtn-w4a4"), buffer)
    assert w4a4["action_cosine_min"] <= w4a4["action_cosine_mean"] < 1.0
