"""QuantLinear: (c) output within the analytic bound, (f) the source nn.Linear untouched,
state_dict round trip, exact byte accounting, clear errors."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from quantvla.errors import QuantInputError
from quantvla.quant.bounds import output_error_bound
from quantvla.quant.config import ActQuantConfig, DuQuantConfig, LinearQuantConfig, WeightQuantConfig, linear_config
from quantvla.quant.linear import QuantLinear

from .strategies import float_matrices

layer_configs = st.builds(
    LinearQuantConfig,
    weight=st.builds(WeightQuantConfig, bits=st.integers(2, 8)),
    act=st.builds(ActQuantConfig, bits=st.sampled_from([4, 8]),
                  granularity=st.sampled_from(["per_token", "per_tensor"]), symmetric=st.booleans()),
    transform=st.one_of(st.none(), st.builds(DuQuantConfig, block_size=st.sampled_from([4, 16, 64]),
                                             rotation=st.sampled_from(["greedy", "svd"]))),
)


def make_linear(k, n, seed, bias=True, scale=1.0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(scale)
    return lin


# GPTQ rounding: weights may sit more than half a step from FP, so the bound uses the stored error
gptq_configs = st.builds(
    LinearQuantConfig,
    weight=st.builds(WeightQuantConfig, bits=st.integers(2, 8), rounding=st.just("gptq")),
    act=st.builds(ActQuantConfig, bits=st.sampled_from([4, 8]), symmetric=st.booleans()),
    transform=st.one_of(st.none(), st.builds(DuQuantConfig, block_size=st.sampled_from([4, 16, 64]))),
)


@given(x=float_matrices(rows=st.integers(1, 16), cols=st.integers(2, 96)), n=st.integers(1, 48),
       cfg=st.one_of(layer_configs, gptq_configs), seed=st.integers(0, 1000),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), wscale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_output_within_analytic_bound(x, n, cfg, seed, dtype, wscale):
    lin = make_linear(x.shape[1], n, seed, scale=wscale)
    before = copy.deepcopy(lin.state_dict())
    layer = QuantLinear.from_linear(lin, cfg, calib=x, name="probe")
    xin = x.to(dtype)
    ref, bound = output_error_bound(layer, lin.weight, xin, lin.bias)
    err = (layer(xin).to(torch.float64) - ref).abs()
    assert (err <= bound).all(), float((err / bound).max())
    # (f) the source layer is untouched, values and storage
    for key, t in lin.state_dict().items():
        assert torch.equal(t, before[key])


@given(x=float_matrices(rows=st.integers(1, 20), cols=st.integers(1, 90)), n=st.integers(1, 40),
       cfg=layer_configs, seed=st.integers(0, 1000))
def test_backends_bit_identical_end_to_end(x, n, cfg, seed):
    lin = make_linear(x.shape[1], n, seed)
    layer = QuantLinear.from_linear(lin, cfg, calib=x)
    assert torch.equal(layer(x, backend="cpu"), layer(x, backend="reference"))
    rows = x.repeat(-(-16 // x.shape[0]), 1)  # >= ONEDNN_MIN_M rows: the oneDNN kernel itself runs
    assert torch.equal(layer(rows, backend="onednn"), layer(rows, backend="reference"))


@given(x=float_matrices(rows=st.integers(1, 20), cols=st.integers(1, 90)), n=st.integers(1, 40),
       cfg=st.one_of(layer_configs, gptq_configs), seed=st.integers(0, 1000), bias=st.booleans(),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_half_activations_give_the_bits_of_widening_them_first(x, n, cfg, seed, bias, dtype):
    """bf16 / fp16 models stay in their dtype around the integer GEMM (no widening pass in, no
    narrowing pass out): the same bits as widening to fp32 first and rounding the fp32 output once."""
    lin = make_linear(x.shape[1], n, seed, bias=bias)
    layer = QuantLinear.from_linear(lin, cfg, calib=x)
    xh = x.to(dtype)
    if not torch.isfinite(xh).all():
        return  # fp16 overflow: a NaN/Inf input is refused either way (tested in test_bad_input)
    y = layer(xh)
    assert y.dtype == dtype
    assert torch.equal(y.view(torch.int16), layer(xh.float()).to(dtype).view(torch.int16))


@pytest.mark.parametrize("onednn", ["real", "injected"])
def test_onednn_cache_is_counted_rebuilt_and_never_saved(monkeypatch, onednn):
    """The prepacked copy is resident memory (footprint, component memory), follows in-place edits of
    qweight, and is not state: not in the state_dict, dropped by deepcopy, pickling and .to().

    "real" runs oneDNN where its self-test passes. "injected" runs on every CPU: the backend is
    declared available and its GEMM replaced by the oracle, which still refuses a stale handle
    (int_linear checks the handle's source), so the cache logic is tested without oneDNN's arithmetic."""
    from quantvla.quant import kernels
    from quantvla.quant.config import linear_config
    if onednn == "real" and not kernels.onednn_ok():
        pytest.skip(f"the onednn backend is unavailable on this CPU: {kernels.onednn_unavailable_reason()}")
    if onednn == "injected":
        monkeypatch.setattr(kernels, "_onednn_why_not", "")
        monkeypatch.setattr(kernels, "_onednn_int_mm", lambda qx, w, pk: kernels._reference(qx, w))
    x = torch.randn(32, 256)
    layer = QuantLinear.from_linear(make_linear(256, 128, 0), linear_config("w8a8", backend="onednn"))
    assert layer.footprint()["resident"] == layer.footprint()["storage"]  # nothing built yet
    want = layer(x, backend="reference")
    assert torch.equal(layer(x), want)
    pk = layer._prepacked
    assert pk is not None and pk.nbytes >= 256 * 128
    assert layer.footprint()["resident"] == layer.footprint()["storage"] + pk.nbytes
    assert set(layer.state_dict()) == set(layer.nbytes) - {"total"}
    with torch.no_grad():
        layer.qweight[5].neg_()  # a known-bad edit must reach the kernel, not a stale cache
    assert not torch.equal(layer(x), want)
    assert torch.equal(layer(x), layer(x, backend="reference"))
    assert copy.deepcopy(layer)._prepacked is None
    assert torch.equal(copy.deepcopy(layer)(x), layer(x))
    assert layer.to(torch.float32)._prepacked is None
    with torch.inference_mode():  # tensors without a version counter: still prepacked and exact
        inf = QuantLinear.from_linear(make_linear(256, 128, 0), linear_config("w8a8", backend="onednn"))
        assert torch.equal(inf(x), inf(x, backend="reference")) and inf._prepacked is not None
    w4 = QuantLinear.from_linear(make_linear(256, 128, 0), linear_config("w4a8", backend="onednn"))
    w4(x)
    assert w4._prepacked is None  # W4 stays packed: the tile path, no int8 copy


@pytest.mark.parametrize("bits", ["w8a8", "w4a8", "w4a4"])
@pytest.mark.parametrize("rotation", [None, "greedy", "svd"])
def test_state_dict_round_trip(bits, rotation):
    from quantvla.quant.config import linear_config
    cfg = linear_config(bits, transform=DuQuantConfig(rotation=rotation) if rotation else None)
    x = torch.randn(40, 96)
    lin = make_linear(96, 33, 0)
    layer = QuantLinear.from_linear(lin, cfg, calib=x, name="a")
    fresh = QuantLinear(96, 33, True, cfg, name="b")
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))
    assert fresh.nbytes == layer.nbytes


def test_w4_bytes_at_most_027_of_fp16_with_transform():
    k = n = 2048
    lin = make_linear(k, n, 0, bias=False)
    cfg = LinearQuantConfig(WeightQuantConfig(bits=4, clip_ratios=(1.0, 0.9)), ActQuantConfig(bits=8),
                            DuQuantConfig())
    layer = QuantLinear.from_linear(lin, cfg, calib=torch.randn(64, k))
    parts = layer.nbytes
    fp16 = n * k * 2
    assert parts["qweight"] == n * k // 2
    assert parts["total"] == sum(v for key, v in parts.items() if key != "total")
    assert parts["total"] <= 0.27 * fp16, parts
    layer(torch.randn(3, k))
    footprint = layer.footprint()
    # the only cache: the rotations' reflection plans, an index (int64) and a weight (fp32) per block
    # and reflection step, counted as resident
    steps = [int((r.index >= 0).any(dim=0).sum()) for r in (layer.transform.rot1, layer.transform.rot2)]
    plan = sum(steps) * (k // 64) * (8 + 4)
    assert plan > 0
    assert footprint["resident"] == footprint["storage"] + plan


def test_nbytes_counts_every_buffer():
    layer = QuantLinear(10, 6, True, LinearQuantConfig(WeightQuantConfig(bits=8), ActQuantConfig()))
    assert layer.nbytes == {"qweight": 60, "w_scale": 24, "w_sum": 24, "bias": 24, "total": 132}


def test_extra_repr_is_readable():
    layer = QuantLinear(16, 8, False, LinearQuantConfig(), name="lm.layers.0.mlp.up_proj")
    text = repr(layer)
    assert "name=lm.layers.0.mlp.up_proj" in text and "w4a8" in text and "int4-packed" in text


class TestBadInput:
    layer = QuantLinear.from_linear(make_linear(8, 4, 0), LinearQuantConfig(), name="blk.3.fc1")

    @pytest.mark.parametrize("x, match", [
        (torch.zeros(2, 8, dtype=torch.int32), "not floating point"),
        (torch.zeros(2, 7), r"expected \(\.\.\., 8\)"),
        (torch.zeros(0, 8), "is empty"),
        (torch.tensor([[float("nan")] * 8]), "NaN or Inf"),
        (torch.tensor([[float("inf")] + [0.0] * 7]), "NaN or Inf"),
    ])
    def test_bad_activations(self, x, match):
        with pytest.raises(QuantInputError, match=match) as info:
            self.layer(x)
        assert "blk.3.fc1" in str(info.value)

    def test_nan_in_weight(self):
        lin = make_linear(8, 4, 0)
        with torch.no_grad():
            lin.weight[1, 2] = float("nan")
        with pytest.raises(QuantInputError, match="layer fc: weight contains NaN or Inf"):
            QuantLinear.from_linear(lin, LinearQuantConfig(), name="fc")

    def test_bad_bits(self):
        with pytest.raises(QuantInputError, match="2..8"):
            LinearQuantConfig(WeightQuantConfig(bits=9))

    def test_static_scale_needs_calibration(self):
        cfg = LinearQuantConfig(act=ActQuantConfig(granularity="per_tensor"))
        with pytest.raises(QuantInputError, match="layer fc: per-tensor .* needs calibration"):
            QuantLinear.from_linear(make_linear(8, 4, 0), cfg, name="fc")

    def test_gptq_needs_calibration(self):
        cfg = LinearQuantConfig(WeightQuantConfig(rounding="gptq"))
        with pytest.raises(QuantInputError, match="probe: GPTQ rounding needs calibration"):
            QuantLinear.from_linear(make_linear(8, 4, 0), cfg, name="probe")
        nan = torch.randn(4, 8)
        nan[1, 2] = float("nan")
        with pytest.raises(QuantInputError, match="probe: calibration activations contain NaN"):
            QuantLinear.from_linear(make_linear(8, 4, 0), cfg, calib=nan, name="probe")
        svd = LinearQuantConfig(WeightQuantConfig(rounding="gptq"), transform=DuQuantConfig(rotation="svd"))
        with pytest.raises(QuantInputError, match="restore"):
            QuantLinear.from_linear(make_linear(8, 4, 0), svd, calib=torch.randn(4, 8), name="probe")

    def test_empty_weight(self):
        with pytest.raises(QuantInputError, match="empty weight"):
            QuantLinear.from_linear(nn.Linear(0, 4), LinearQuantConfig(), name="fc")

    def test_calibration_of_wrong_width(self):
        with pytest.raises(QuantInputError, match="calibration activations has shape"):
            QuantLinear.from_linear(make_linear(8, 4, 0), LinearQuantConfig(), calib=torch.randn(3, 5), name="fc")


def test_bound_catches_a_broken_layer():
    """The worst-case bound fails gross breakage: a dequantization scale off by 2x, or the nibbles
    of the packed weight read in the wrong order. (It is a worst-case bound, about 5x the typical
    error, so it does not catch a 10% scale drift; the golden statistics are for that.)"""
    lin = make_linear(64, 32, 1)
    x = torch.randn(16, 64)
    layer = QuantLinear.from_linear(lin, LinearQuantConfig(), calib=x)
    ref, bound = output_error_bound(layer, lin.weight, x, lin.bias)
    assert ((layer(x).double() - ref).abs() <= bound).all()
    broken = copy.deepcopy(layer)
    with torch.no_grad():
        broken.w_scale.mul_(2.0)
    assert not ((broken(x).double() - ref).abs() <= bound).all()
    swapped = copy.deepcopy(layer)
    with torch.no_grad():
        p = swapped.qweight
        p.copy_((p >> 4) | (p << 4))
    assert not ((swapped(x).double() - ref).abs() <= bound).all()


def test_reflection_plan_follows_a_loaded_index():
    """The rotations cache their reflection plan; loading other rotations into a layer that has
    already run must rebuild it (a stale plan would apply the old, here empty, reflections)."""
    cfg = linear_config("w4a8", transform=DuQuantConfig())
    x = torch.randn(40, 128) * torch.linspace(0.1, 10, 128)
    fitted = QuantLinear.from_linear(make_linear(128, 64, 0), cfg, calib=x, name="fitted")
    assert any(int((r.index >= 0).sum()) for r in (fitted.transform.rot1, fitted.transform.rot2))
    fresh = QuantLinear(128, 64, True, cfg, name="fresh")
    fresh(x)  # builds the plan of its identity rotations
    assert fresh.transform.cache_nbytes() == 0
    fresh.load_state_dict(fitted.state_dict())
    assert torch.equal(fresh(x), fitted(x))
    assert fresh.transform.cache_nbytes() == fitted.transform.cache_nbytes() > 0


@pytest.mark.parametrize("smooth", [0.0, 0.15])
@pytest.mark.parametrize("permute", [False, True])
def test_forward_leaves_its_input_untouched(smooth, permute):
    """The transform works in place on its own temporaries only (the reflections overwrite the
    output of the smoothing or the permutation, never the caller's activations), and a second
    call gives the same bits."""
    cfg = linear_config("w4a8", transform=DuQuantConfig(smooth_strength=smooth, permute=permute))
    x = torch.randn(25, 256, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.1, 10, 256)
    layer = QuantLinear.from_linear(make_linear(256, 64, 0), cfg, calib=x)
    assert any(int((r.index >= 0).sum()) for r in (layer.transform.rot1, layer.transform.rot2))
    before = x.clone()
    y = layer(x)
    assert torch.equal(x, before)
    assert torch.equal(layer(x), y)


def test_a_greedy_w4a8_call_dispatches_at_most_68_torch_operators():
    """The per-call cost of a small layer is its operator count (each costs about as much as the
    arithmetic): 205 before the lean forward, 74 before the in-place reflections and the unpack
    straight into the weight's layout (bench models reports the same count on the models)."""
    from torch.profiler import ProfilerActivity, profile
    cfg = linear_config("w4a8", transform=DuQuantConfig())
    x = torch.randn(25, 256, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.1, 10, 256)
    layer = QuantLinear.from_linear(make_linear(256, 64, 0), cfg, calib=x)
    assert all(int((r.index >= 0).sum()) for r in (layer.transform.rot1, layer.transform.rot2))
    layer(x)  # the first call builds the caches
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        layer(x)
    top = [e.name for e in prof.events() if e.name.startswith("aten::") and (
        e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    assert 0 < len(top) <= 68, top  # 66 with the int_mm GEMM, 68 with the fp32 one (AVX2 hosts)
