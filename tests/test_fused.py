"""The fused CPU forward (quantvla/quant/fused.py): the eager forward's bits in one C++ call, on
adversarial layers and inputs and on whole action chunks of the trained policies; NaN gives the
same error; no tensor is kept beyond the layer's own; an unavailable extension falls back to eager.

Skipped, with the builder's reason, where the extension cannot be built (no C++ compiler or ninja)."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quantvla import families, quantize
from quantvla.errors import QuantInputError
from quantvla.quant import fused
from quantvla.quant.config import ActQuantConfig, DuQuantConfig, LinearQuantConfig, WeightQuantConfig
from quantvla.quant.linear import QuantLinear

from .strategies import float_matrices
from .test_linear import make_linear

pytestmark = pytest.mark.skipif(bool(fused.build_error()), reason=f"fused forward: {fused.build_error()}")

# every variant the fused path covers, and the svd rotations it hands back to eager
fused_configs = st.builds(
    LinearQuantConfig,
    weight=st.builds(WeightQuantConfig, bits=st.sampled_from([2, 4, 8]),
                     rounding=st.sampled_from(["nearest", "gptq"])),
    act=st.builds(ActQuantConfig, bits=st.sampled_from([4, 8]),
                  granularity=st.sampled_from(["per_token", "per_tensor"]), symmetric=st.booleans()),
    transform=st.one_of(st.none(), st.builds(
        DuQuantConfig, block_size=st.sampled_from([4, 16, 64]), smooth_strength=st.sampled_from([0.0, 0.15, 0.5]),
        permute=st.booleans(), rotation=st.sampled_from(["greedy", "greedy", "svd"]))),
)


def test_self_test_passes_where_it_builds():
    """The probe layers give the eager bits (a fused kernel that does not is refused, and that is a bug)."""
    assert fused.available(), fused.unavailable_reason()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def _eager_and_fused(layer: QuantLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        with fused.forward_override("eager"):
            eager = layer(x)
        with fused.forward_override("fused"):
            fast = layer(x)
    return eager, fast


@given(x=float_matrices(rows=st.integers(1, 40), cols=st.integers(2, 200)), n=st.integers(1, 80),
       cfg=fused_configs, seed=st.integers(0, 1000), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float32, torch.bfloat16]))
def test_fused_forward_is_bit_identical_to_eager(x, n, cfg, seed, bias, dtype):
    if cfg.weight.rounding == "gptq" and cfg.transform is not None and cfg.transform.rotation == "svd":
        cfg = LinearQuantConfig(cfg.weight, cfg.act, DuQuantConfig(rotation="svd", restore_output=False))
    lin = make_linear(x.shape[1], n, seed, bias=bias)
    layer = QuantLinear.from_linear(lin, cfg, calib=x, name="probe")
    xin = (x * torch.linspace(0.5, 2.0, x.shape[0])[:, None]).to(dtype)  # other rows than calibration saw
    eager, fast = _eager_and_fused(layer, xin)
    assert fast.dtype == eager.dtype and fast.shape == eager.shape
    assert torch.equal(_bits(fast), _bits(eager)), float((fast.float() - eager.float()).abs().max())
    with fused.forward_override("fused"):
        ran = fused.run(layer, xin.reshape(-1, x.shape[1]).float(), "auto")
    covered = (cfg.transform is None or cfg.transform.rotation == "greedy") and not (
        cfg.weight.bits <= 4 and x.shape[1] % 2)
    assert (ran is not None) == covered  # the fused path really ran wherever it claims to


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_nan_input_gives_the_eager_error(granularity):
    cfg = LinearQuantConfig(WeightQuantConfig(bits=4), ActQuantConfig(granularity=granularity),
                            DuQuantConfig(block_size=16))
    calib = torch.randn(32, 64)
    layer = QuantLinear.from_linear(make_linear(64, 24, 0), cfg, calib=calib, name="probe")
    x = torch.randn(5, 64)
    x[3, 17] = float("nan")
    for mode in ("eager", "fused"):
        with fused.forward_override(mode), pytest.raises(QuantInputError, match="probe: input contains NaN or Inf"):
            layer(x)
    x[3, 17] = float("inf")
    with fused.forward_override("fused"), pytest.raises(QuantInputError, match="NaN or Inf"):
        layer(x)


def test_fused_forward_keeps_no_tensor_and_follows_in_place_edits():
    cfg = LinearQuantConfig(WeightQuantConfig(bits=4), ActQuantConfig(), DuQuantConfig(block_size=16))
    calib = torch.randn(32, 64) * torch.logspace(-1, 1, 64)
    layer = QuantLinear.from_linear(make_linear(64, 24, 1), cfg, calib=calib, name="probe")
    x = torch.randn(7, 64)
    eager, fast = _eager_and_fused(layer, x)
    before = layer.footprint()
    eager, fast = _eager_and_fused(layer, x)
    assert layer.footprint() == before
    # the C++ arguments reference the layer's buffers and the rotations' (counted) plans, and copy none
    own = {t.data_ptr() for t in layer.buffers()}
    own |= {t.data_ptr() for rot in (layer.transform.rot1, layer.transform.rot2)
            for *_, steps in rot._plan[1] for pair in steps for t in pair}
    args = fused._build_args(layer)
    held = [a for a in args if isinstance(a, torch.Tensor)] + [t for a in args if isinstance(a, list) for t in a
                                                               if isinstance(t, torch.Tensor)]
    assert held and all(t.data_ptr() in own for t in held)
    assert torch.equal(fast, eager)
    with torch.no_grad():  # edits in place (load_state_dict does these) reach the fused call
        layer.w_scale.mul_(2)
        layer.transform.rot1.index[:, 0] = torch.arange(layer.transform.rot1.index.shape[0], dtype=torch.int16)
    eager2, fast2 = _eager_and_fused(layer, x)
    assert torch.equal(fast2, eager2) and not torch.equal(fast2, fast)


def test_unavailable_extension_warns_once_and_runs_eager(monkeypatch):
    layer = QuantLinear.from_linear(make_linear(32, 8, 2), LinearQuantConfig(), name="probe")
    x = torch.randn(3, 32)
    with torch.no_grad():
        eager = layer(x)
    monkeypatch.setattr(fused, "_why_not", "no compiler here")
    monkeypatch.setattr(fused, "_warned", False)
    with fused.forward_override("fused"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with torch.no_grad():
            assert torch.equal(layer(x), eager)
            assert torch.equal(layer(x), eager)
    assert [str(w.message) for w in seen if w.category is RuntimeWarning] == [
        "fused QuantLinear forward unavailable (no compiler here); running the eager forward, "
        "which gives the same bits"]


def test_unknown_forward_is_one_clear_error():
    with pytest.raises(Exception, match="unknown forward 'jit'; choose one of"):
        fused.set_forward("jit")


@pytest.mark.parametrize("family", ["pi05", "gr00t-n15"])
def test_trained_policy_chunks_identical(family):
    """Whole action chunks of the shipped policies, quantized by the reference and by the preset
    with DiT attention quantized too: the fused forward gives the eager chunk, bit for bit."""
    loaded = families.load_fp(family, "trained", entries=8, seed=0)
    inputs, noise = loaded.calibration.inputs[0], loaded.calibration.noise[0]
    for preset in ("quantvla-w4a8", "quantvla-w8a8"):
        q = quantize(loaded.model, loaded.calibration, preset)
        with torch.no_grad():
            with fused.forward_override("eager"):
                eager = q.sample_actions(inputs, noise)
            with fused.forward_override("fused"):
                fast = q.sample_actions(inputs, noise)
        assert torch.equal(fast, eager), (preset, float((fast - eager).abs().max()))


pytest_plugins = ["pytester"]


def test_options_list_the_library_forwards():
    from pytest_quantvla import options

    assert options.FORWARDS == fused.FORWARDS  # written twice so that loading the plugin does not import torch


def test_a_fused_kernel_off_by_one_ulp_fails_fused_exact(pytester):
    """Known-bad: a fused kernel that passed its self-test but is one ulp off on the model's layers."""
    pytester.makeconftest(
        "import types\n"
        "import torch\n"
        "from quantvla.quant import fused\n"
        "assert fused.available()\n"
        "class OneUlpUp:\n"
        "    def __init__(self, *args):\n"
        "        self.inner = Layer(*args)\n"
        "    def forward(self, *args):\n"
        "        y, ok = self.inner.forward(*args)\n"
        "        return (y.nextafter(torch.full_like(y, float('inf'))) if ok else y), ok\n"
        "Layer = fused._module.Layer\n"
        "fused._module = types.SimpleNamespace(Layer=OneUlpUp)\n"
    )
    result = pytester.runpytest_subprocess("--quantvla-model=pi05", "--quantvla-forward=fused", "-q",
                                           "-k", "fused_exact")
    assert result.parseoutcomes() == {"failed": 1, "deselected": 29}, result.stdout.str()[-2000:]
    result.stdout.fnmatch_lines(["*fused_exact: held-out entry 0: the fused forward's action chunk differs*"])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["pi05", "gr00t-n15"])
def test_main_job_on_the_fused_forward_passes_every_check(pytester, model):
    """The whole main job measured on the fused forward: every check passes against the goldens the
    eager forward recorded (the same bits), and fused_exact reports every quantized-layer call fused."""
    result = pytester.runpytest_subprocess(f"--quantvla-model={model}", "--quantvla-forward=fused", "-q")
    outcomes = result.parseoutcomes()
    assert result.ret == 0 and "failed" not in outcomes, result.stdout.str()[-3000:]
    result.stdout.fnmatch_lines(["fused_exact * chunks identical; * quantized-layer calls fused*"])


@pytest.mark.parametrize("gemm", ["int_mm", "u8_weight", "fp32"])
def test_every_cpu_gemm_gives_the_eager_bits(gemm):
    """Whichever GEMM the cpu backend takes on this host's instruction set (int_mm with VNNI or off x86,
    else u8_weight, whose small layers and the fused path's take the exact fp32 GEMM)."""
    from quantvla.quant import kernels

    g = torch.Generator().manual_seed(3)
    with kernels.cpu_gemm_override(gemm):
        for wbits, k, n, m in [(4, 256, 64, 25), (8, 128, 256, 10), (4, 64, 256, 1)]:
            cfg = LinearQuantConfig(WeightQuantConfig(bits=wbits), ActQuantConfig(), DuQuantConfig(block_size=64))
            calib = torch.randn(64, k, generator=g) * torch.logspace(-1, 1, k)
            layer = QuantLinear.from_linear(make_linear(k, n, wbits), cfg, calib=calib, name="probe")
            x = torch.randn(m, k, generator=g) * 3
            eager, fast = _eager_and_fused(layer, x)
            assert torch.equal(fast, eager), (gemm, wbits, k, n, m)
            with fused.forward_override("fused"):
                assert fused.run(layer, x, "auto") is not None


def test_without_a_compiler_the_eager_forward_runs_with_one_warning(tmp_path):
    """A machine whose C++ compiler is missing: one warning naming why, the eager bits, no traceback."""
    import os
    import subprocess
    import sys

    code = (
        "import warnings, torch\n"
        "from quantvla.quant import fused\n"
        "from quantvla.quant.config import LinearQuantConfig\n"
        "from quantvla.quant.linear import QuantLinear\n"
        "torch.manual_seed(0)\n"
        "layer = QuantLinear.from_linear(torch.nn.Linear(32, 8), LinearQuantConfig())\n"
        "x = torch.randn(3, 32)\n"
        "eager = layer(x)\n"
        "fused.set_forward('fused')\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    same = torch.equal(layer(x), eager) and torch.equal(layer(x), eager)\n"
        "print(same, len(seen), seen[0].message if seen else '')\n"
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("True 1 fused QuantLinear forward unavailable (the C++ extension did not build ("), \
        out.stdout
    assert "it needs a C++ compiler and ninja); running the eager forward, which gives the same bits" in out.stdout


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_each_instruction_set_build_gives_the_eager_bits(isa, monkeypatch):
    """The loops are compiled per instruction set and picked at load time (GCC target_clones), so a
    host runs only one of them: build the baseline (SSE2) and the AVX2 one alone and run the self-test
    probes, and a trained chunk, through each."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"instruction-set clones are built on x86-64 only, this is {platform.machine()}")
    if isa == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip(f"this CPU has no AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})")
    flags = ("-DQV_NO_CLONES",) + (("-mavx2",) if isa == "avx2" else ())
    monkeypatch.setattr(fused, "_module", fused.build(f"quantvla_fused_linear_{isa}", flags))
    assert fused._self_test() == ""
    loaded = families.load_fp("gr00t-n15", "trained", entries=4, seed=0)
    q = quantize(loaded.model, loaded.calibration, "quantvla-w4a8")
    inputs, noise = loaded.calibration.inputs[0], loaded.calibration.noise[0]
    with torch.no_grad():
        with fused.forward_override("eager"):
            eager = q.sample_actions(inputs, noise)
        before = fused.fused_calls()
        with fused.forward_override("fused"):
            fast = q.sample_actions(inputs, noise)
    assert fused.fused_calls() > before and torch.equal(fast, eager)
