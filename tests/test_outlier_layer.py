"""The outlier_layer check on its own (fast): every reference preset passes it, and a rotation
applied from the wrong side, which the policies cannot show (one reflection per block is its own
transpose), fails it."""

from __future__ import annotations

import pytest
import torch

from pytest_quantvla.checks import transform
from pytest_quantvla.collect import CheckFailed
from pytest_quantvla.options import RunConfig
from quantvla import PRESETS, preset
from quantvla.quant.linear import QuantLinear
from tests import teeth


def _run(quantizer: str, bits: str = "w4a8") -> RunConfig:
    return RunConfig(model="pi05", size="trained", bits=bits, device="cpu", seed=0, quantizer=quantizer,
                     checkpoint=None, golden_dir=None, update_golden=False, report=None)


@pytest.mark.parametrize("quantizer", [p for p in PRESETS if PRESETS[p].linear is not None])
def test_every_preset_passes(quantizer):
    result = transform.outlier_layer(_run(quantizer))
    assert result.relative_error <= transform.ORACLE_FACTOR * result.oracle_relative_error


def test_the_rotation_matrix_is_orthogonal_and_not_symmetric_with_probe_reflections():
    lin, x = transform.synthetic_layer(0, 64)
    layer = QuantLinear.from_linear(lin, preset("quantvla-w4a8").linear, calib=x)
    probe = transform._with_probe_rotations(layer.transform, 0)
    r = transform.rotation_matrix(probe.rot1)
    assert (r @ r.t() - torch.eye(r.shape[0], dtype=r.dtype)).abs().max() < 1e-12
    assert (r - r.t()).abs().max() > 0.1


@pytest.mark.parametrize("name", ["weight-side rotation not transposed", "permutation not folded into the weight",
                                  "greedy rotation takes no reflection", "tightest clip ratio always"])
def test_a_transform_or_grid_fault_fails_it(name, monkeypatch):
    variant = teeth.VARIANTS[name]
    monkeypatch.setattr(variant.target, variant.replacement)
    with pytest.raises(CheckFailed, match="synthetic outlier layer"):
        transform.outlier_layer(_run("quantvla"))
