"""(b) Element-wise weight and activation error within half a step (plus clipping)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quantvla.errors import QuantInputError
from quantvla.quant import grids
from quantvla.quant.config import ActQuantConfig, WeightQuantConfig

from .strategies import float_matrices

SLACK = 1 + 1e-6
ROUNDING = grids.ROUNDING  # fp32 rounding, relative to |x|


@given(w=float_matrices(), bits=st.integers(2, 8), clip=st.booleans())
def test_weight_error_within_half_step_plus_clipping(w, bits, clip):
    cfg = WeightQuantConfig(bits=bits) if clip else WeightQuantConfig(bits=bits, clip_ratios=(1.0,))
    before = w.clone()
    q, scale = grids.quantize_weight(w, cfg)
    lo, hi = grids.signed_range(bits)
    assert q.dtype == torch.int8 and int(q.min()) >= lo and int(q.max()) <= hi
    err = (q.double() * scale.double()[:, None] - w.double()).abs()
    allowed = grids.weight_error_allowance(w, scale, bits)
    assert (err <= allowed * SLACK).all()
    if not clip:  # no clipping: plain half a step
        assert (err <= scale.double()[:, None] / 2 * SLACK + ROUNDING * w.double().abs()).all()
    assert torch.equal(w, before)


@given(w=float_matrices(rows=st.integers(1, 6), cols=st.integers(8, 64)), bits=st.integers(2, 8))
def test_mse_search_never_worse_than_no_clipping(w, bits):
    q, s = grids.quantize_weight(w, WeightQuantConfig(bits=bits))
    q1, s1 = grids.quantize_weight(w, WeightQuantConfig(bits=bits, clip_ratios=(1.0,)))
    mse = ((q.double() * s.double()[:, None] - w.double()) ** 2).sum(1)
    mse1 = ((q1.double() * s1.double()[:, None] - w.double()) ** 2).sum(1)
    assert (mse <= mse1 * (1 + 1e-9) + 1e-300).all()


@given(x=float_matrices(), bits=st.integers(2, 8), symmetric=st.booleans())
def test_per_token_activation_error_within_half_step(x, bits, symmetric):
    cfg = ActQuantConfig(bits=bits, granularity="per_token", symmetric=symmetric)
    qa = grids.quantize_activation(x, cfg)
    err = (qa.dequantize().double() - x.double()).abs()
    half_step = qa.scale.double() / 2
    # per-token grids never clip: plain half a step
    assert (err <= half_step * SLACK + ROUNDING * x.double().abs()).all()


@given(calib=float_matrices(rows=st.integers(2, 16)), x=float_matrices(rows=st.integers(1, 8)),
       bits=st.integers(2, 8), symmetric=st.booleans(), pct=st.sampled_from([90.0, 99.9, 100.0]))
def test_static_activation_error_within_half_step_plus_clipping(calib, x, bits, symmetric, pct):
    k = min(calib.shape[1], x.shape[1])
    calib, x = calib[:, :k], x[:, :k]
    cfg = ActQuantConfig(bits=bits, granularity="per_tensor", symmetric=symmetric, percentile=pct)
    scale, zero = grids.calibrate_static(calib, cfg)
    qa = grids.quantize_activation(x, cfg, scale, zero)
    err = (qa.dequantize().double() - x.double()).abs()
    assert (err <= grids.activation_error_allowance(x, qa, bits) * SLACK + 1e-45).all()


def test_bits_outside_range_are_rejected():
    for bad in (1, 9, 0, 4.0):
        with pytest.raises(QuantInputError, match="bits must be an integer in 2..8"):
            WeightQuantConfig(bits=bad)
        with pytest.raises(QuantInputError, match="bits must be an integer in 2..8"):
            ActQuantConfig(bits=bad)


def test_per_channel_activation_scales_are_refused():
    with pytest.raises(QuantInputError, match="smoothing"):
        ActQuantConfig(granularity="per_channel")


def _correlated_activations(t: int, k: int, seed: int) -> torch.Tensor:
    """Activations that share a few directions (as a transformer's do), plus one loud channel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, 4, generator=g) @ torch.randn(4, k, generator=g) + 0.1 * torch.randn(t, k, generator=g)
    x[:, 0] *= 20
    return x


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_gptq_rounding_cuts_the_output_error_on_calibration_activations(bits):
    x = _correlated_activations(512, 96, seed=bits)
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(1))
    q_rtn, scale = grids.quantize_weight(w, WeightQuantConfig(bits=bits))
    q = grids.gptq_round(w, scale, x, bits)
    lo, hi = grids.signed_range(bits)
    assert q.dtype == torch.int8 and int(q.min()) >= lo and int(q.max()) <= hi

    def out_err(qi):
        return float((x.double() @ (w.double() - qi.double() * scale.double()[:, None]).t()).norm())

    assert out_err(q) < 0.7 * out_err(q_rtn), (out_err(q), out_err(q_rtn))
    assert torch.equal(q, grids.gptq_round(w, scale, x, bits))  # deterministic


def test_gptq_rounding_tolerates_dead_columns():
    x = _correlated_activations(64, 32, seed=0)
    x[:, 5] = 0  # a channel the calibration never excites: rounded to nearest, no feedback from it
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    q_rtn, scale = grids.quantize_weight(w, WeightQuantConfig(bits=4))
    q = grids.gptq_round(w, scale, x, 4)
    assert torch.equal(q[:, 5], q_rtn[:, 5])
    assert not torch.equal(q, q_rtn)  # the live columns did get error feedback


def test_weight_rounding_is_validated():
    with pytest.raises(QuantInputError, match="rounding"):
        WeightQuantConfig(rounding="stochastic")
    with pytest.raises(QuantInputError, match="gptq_damp"):
        WeightQuantConfig(rounding="gptq", gptq_damp=0.0)
