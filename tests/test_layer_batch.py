"""layer_bounds' batch-independence test on its own (fast): a token's output may not depend on the
other tokens in the batch. Every reference preset keeps it (ratio 1 within fp32 rounding); one
activation range taken over the batch at run time, which stays inside the error budget on policies
that see, breaks it."""

from __future__ import annotations

import pytest
import torch

from pytest_quantvla.checks import layers, transform
from pytest_quantvla.collect import CheckFailed
from quantvla import PRESETS, preset
from quantvla.quant.linear import QuantLinear
from tests import teeth


def _layer(name: str) -> tuple[QuantLinear, torch.nn.Linear, torch.Tensor]:
    lin, x = transform.synthetic_layer(0, 64)
    return QuantLinear.from_linear(lin, preset(name).linear, calib=x), lin, x


@pytest.mark.parametrize("name", [p for p in PRESETS if PRESETS[p].linear is not None])
def test_every_preset_keeps_a_tokens_output_its_own(name):
    layer, lin, x = _layer(name)
    assert layers._mixed_batch_ratio(layer, lin, x, "synthetic") <= 1.0 + 1e-3


def test_one_activation_range_over_the_batch_fails_it(monkeypatch):
    variant = teeth.VARIANTS["one activation range per tensor"]
    monkeypatch.setattr(variant.target, variant.replacement)
    layer, lin, x = _layer("quantvla-w4a8")
    with pytest.raises(CheckFailed, match="depends on the other tokens in the batch"):
        layers._mixed_batch_ratio(layer, lin, x, "synthetic")
