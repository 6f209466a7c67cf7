"""(a) Every integer backend is bit-identical to the int64 oracle."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quantvla.errors import KernelUnavailable
from quantvla.quant import kernels
from quantvla.quant.packing import pack_int4

from .strategies import int_matrices

HOST_BACKENDS = ["cpu"]


def _operands(draw, wbits, abits=8):
    m, k, n = draw(st.integers(1, 40)), draw(st.integers(1, 160)), draw(st.integers(1, 70))
    qx = draw(int_matrices(abits, m, k))
    qw = draw(int_matrices(wbits, n, k))
    return qx, qw


@given(data=st.data(), wbits=st.integers(2, 8), abits=st.sampled_from([4, 8]))
def test_cpu_backend_matches_oracle(data, wbits, abits):
    qx, qw = _operands(data.draw, wbits, abits)
    k = qx.shape[1]
    stored = pack_int4(qw) if wbits <= 4 else qw
    want = qx.long() @ qw.long().t()
    got = kernels.int_linear(qx, stored, k, wbits, "cpu")
    assert got.dtype == torch.int32
    assert torch.equal(got.long(), want)
    assert torch.equal(kernels.int_linear(qx, stored, k, wbits, "reference").long(), want)


@given(data=st.data(), tile_bytes=st.integers(1, 400))
def test_cpu_int4_tiling_matches_oracle(data, tile_bytes):
    """Force many row tiles through the scratch buffer (tiles of one row and up)."""
    qx, qw = _operands(data.draw, 4)
    got = kernels.cpu_int4_mm(qx, pack_int4(qw), tile_bytes=tile_bytes)
    assert torch.equal(got.long(), qx.long() @ qw.long().t())


def test_cpu_self_test_passes_on_this_machine():
    assert kernels.cpu_kernel_ok(), "torch._int_mm is inexact here; the cpu backend would fall back"


def test_saturating_operands_at_large_k():
    k = 16384
    qx = torch.full((3, k), -128, dtype=torch.int8)
    qw = torch.full((5, k), -128, dtype=torch.int8)
    assert torch.equal(kernels.int_linear(qx, qw, k, 8, "cpu").long(), qx.long() @ qw.long().t())


def test_backend_errors_are_clear():
    qx = torch.zeros(2, 4, dtype=torch.int8)
    with pytest.raises(KernelUnavailable, match="unknown integer backend"):
        kernels.int_linear(qx, qx, 4, 8, "tpu")
    with pytest.raises(KernelUnavailable, match="needs CUDA tensors"):
        kernels.int_linear(qx, qx, 4, 8, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@given(data=st.data(), wbits=st.sampled_from([4, 8]))
def test_cuda_backend_matches_oracle(data, wbits):
    qx, qw = _operands(data.draw, wbits)
    stored = pack_int4(qw) if wbits <= 4 else qw
    got = kernels.int_linear(qx.cuda(), stored.cuda(), qx.shape[1], wbits, "cuda").cpu()
    assert torch.equal(got.long(), qx.long() @ qw.long().t())
