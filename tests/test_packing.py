"""(e) int4 pack/unpack is the identity, for every shape including odd K."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quantvla.errors import QuantInputError
from quantvla.quant.packing import pack_int4, unpack_int4

from .strategies import int_matrices


@given(data=st.data(), n=st.integers(1, 50), k=st.integers(1, 129))
def test_round_trip(data, n, k):
    q = data.draw(int_matrices(4, n, k))
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (n, (k + 1) // 2)
    assert torch.equal(unpack_int4(packed, k), q)


def test_layout_is_split_halves():
    q = torch.tensor([[1, -2, 3, -8]], dtype=torch.int8)  # H = 2: bytes hold (q0, q2), (q1, q3)
    assert pack_int4(q).tolist() == [[(1 & 0xF) | (3 << 4), (-2 & 0xF) | ((-8 & 0xF) << 4)]]


def test_out_of_range_values_are_rejected():
    with pytest.raises(QuantInputError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[8]], dtype=torch.int8))
