"""(d) The DuQuant transform is exactly function-preserving with quantization off (float64)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quantvla.errors import QuantInputError
from quantvla.quant.config import DuQuantConfig
from quantvla.quant.duquant import DuQuantTransform

from .strategies import float_matrices

configs = st.builds(
    DuQuantConfig,
    block_size=st.sampled_from([2, 3, 8, 16, 64]),
    smooth_strength=st.sampled_from([0.0, 0.15, 0.5]),
    rotation=st.sampled_from(["greedy", "svd"]),
    rotation_steps=st.integers(0, 6),
    permute=st.booleans(),
    restore_output=st.booleans(),
)


@given(x=float_matrices(rows=st.integers(1, 24), cols=st.integers(1, 150)), n=st.integers(1, 80),
       cfg=configs, seed=st.integers(0, 2**16))
def test_function_preserving_in_float64(x, n, cfg, seed):
    k = x.shape[1]
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w_before = w.clone()
    x64 = x.to(torch.float64)
    t = DuQuantTransform(k, n, cfg).fit(w, x64)
    y = x64 @ w.t()
    y_t = t.restore_output(t.apply_act(x64) @ t.fold_weight(w).t())
    scale = (x64.abs() @ w.abs().t()).max()
    assert float((y - y_t).abs().max()) <= 1e-9 * float(scale) + 1e-300
    assert torch.equal(w, w_before)  # the source weight is never mutated (the authors' bug B1)


@given(x=float_matrices(rows=st.integers(4, 24), cols=st.integers(8, 130)))
def test_zigzag_is_a_permutation_and_rotations_are_orthogonal(x):
    k = x.shape[1]
    t = DuQuantTransform(k, 7, DuQuantConfig(block_size=16)).fit(torch.randn(7, k), x)
    assert sorted(t.perm.tolist()) == list(range(k))
    for rot in (t.rot1, t.rot2):
        full, rem = rot.matrices(torch.float64)
        eye = torch.eye(full.shape[-1], dtype=torch.float64)
        assert torch.allclose(full @ full.mT, eye.expand_as(full), atol=1e-12)


def test_greedy_rotation_spreads_an_outlier_channel():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=gen)
    x[:, 7] *= 100.0
    cfg = DuQuantConfig(block_size=64, smooth_strength=0.0, permute=False)
    t = DuQuantTransform(128, 32, cfg).fit(torch.randn(32, 128, generator=gen), x)
    before = x.abs().amax() / x.abs().mean()
    after_x = t.apply_act(x)
    after = after_x.abs().amax() / after_x.abs().mean()
    assert after < before / 4, (before, after)
    assert int(t.rot1.index[0, 0]) == 7  # the first reflection targets the outlier channel


def test_transform_without_activations_is_a_clear_error():
    with pytest.raises(QuantInputError, match="needs calibration activations"):
        DuQuantTransform(8, 4, DuQuantConfig()).fit(torch.randn(4, 8), None)
    # the authors' SVD variant without smoothing needs weights only
    DuQuantTransform(8, 4, DuQuantConfig(rotation="svd", smooth_strength=0.0)).fit(torch.randn(4, 8), None)
