"""Hypothesis strategies for adversarial tensors: outlier channels, all-zero rows, huge and tiny
magnitudes, exact zeros and ties."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

MAGNITUDES = [1e-30, 1e-6, 1.0, 1e3, 1e30]


@st.composite
def float_matrices(draw, rows=st.integers(1, 12), cols=st.integers(1, 80)) -> torch.Tensor:
    """A float32 [rows, cols] matrix at one base magnitude, with adversarial structure."""
    m, k = draw(rows), draw(cols)
    base = draw(st.sampled_from(MAGNITUDES))
    elems = st.floats(-1.0, 1.0, width=32, allow_subnormal=False)
    a = draw(hnp.arrays(np.float32, (m, k), elements=elems)).astype(np.float64)
    kind = draw(st.sampled_from(["plain", "outlier_channel", "zero_rows", "constant", "sparse"]))
    if kind == "outlier_channel":
        ch = draw(st.integers(0, k - 1))
        a[:, ch] *= draw(st.sampled_from([30.0, 1e3, 1e5]))
    elif kind == "zero_rows":
        a[draw(st.integers(0, m - 1))] = 0.0
    elif kind == "constant":
        a[:] = draw(st.sampled_from([0.0, 1.0, -1.0]))
    elif kind == "sparse":
        a[np.abs(a) < 0.8] = 0.0
    return torch.from_numpy((a * base).astype(np.float32))


@st.composite
def int_matrices(draw, bits: int, rows, cols) -> torch.Tensor:
    """int8 [rows, cols] values of a signed `bits`-bit grid, often pinned at the extremes."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    kind = draw(st.sampled_from(["random", "min", "max", "mixed_extremes"]))
    if kind == "min":
        return torch.full((rows, cols), lo, dtype=torch.int8)
    if kind == "max":
        return torch.full((rows, cols), hi, dtype=torch.int8)
    elems = st.sampled_from([lo, hi]) if kind == "mixed_extremes" else st.integers(lo, hi)
    return torch.from_numpy(draw(hnp.arrays(np.int8, (rows, cols), elements=elems)))
