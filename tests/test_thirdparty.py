"""Quantizers made with the real libraries (torchao, optimum-quanto: the optional extra
'third-party', which CI installs): recognised by what they store, memory counted from the inner
tensors of their tensor subclasses, and the plugin's checks collected and decided for them."""

import copy
import json

import pytest
import torch
from torch import nn

from pytest_quantvla.checks.memory import budget
from quantvla import CalibrationBuffer, preset, quantized_layer_names
from quantvla.memory import COMPONENT_ROLES, component_memory, is_quantized, quantized_component_names
from quantvla.policy.bundle import load_bundle, shipped_policy

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def pi05():
    bundle = load_bundle(shipped_policy("pi05"))
    recorded = bundle.calibration()
    return bundle.model.eval(), CalibrationBuffer(recorded.inputs[:2], recorded.noise[:2])


def _layout(model) -> list[str]:
    return quantized_layer_names(model, preset("quantvla-w4a8"))


def _fp16_rest(model, quantized_names) -> int:
    mods = dict(model.named_modules())
    return sum(mods[n].weight.numel() * 2 for n, r in model.linear_roles().items()
               if r in COMPONENT_ROLES and n not in quantized_names)


def _bias_bytes(module) -> int:
    return 0 if module.bias is None else module.bias.numel() * module.bias.element_size()


def test_memory_is_the_inner_tensors_of_a_torchao_weight(pi05):
    pytest.importorskip("torchao", reason="the optional extra 'third-party' is not installed")
    from quantvla.thirdparty import torchao_int8_dynamic

    fp, calibration = pi05
    q = torchao_int8_dynamic(fp, calibration, "w8a8")
    names = _layout(fp)
    assert quantized_component_names(fp, q) == names  # every layout layer, all still nn.Linear
    expected = _fp16_rest(fp, set(names))
    for n in names:
        layer = q.get_submodule(n)
        assert type(layer) is nn.Linear
        w = layer.weight  # torchao's Int8Tensor: int8 data, a float scale and an int8 zero point per row
        assert w.qdata.dtype == torch.int8 and w.qdata.shape == w.shape
        expected += w.qdata.numel() + w.scale.numel() * 4 + w.zero_point.numel() + _bias_bytes(layer)
    rep = component_memory(fp, q)
    assert rep.quantized == len(names) and rep.storage_bytes == expected == rep.resident_bytes
    # the logical view would claim 4 bytes per weight (the subclass reports float32)
    logical = sum(q.get_submodule(n).weight.numel() * 4 for n in names)
    assert rep.storage_bytes - _fp16_rest(fp, set(names)) < logical / 3


def test_memory_is_the_packed_data_of_a_quanto_qint4_weight(pi05):
    pytest.importorskip("optimum.quanto", reason="the optional extra 'third-party' is not installed")
    from quantvla.thirdparty import quanto_qint4

    fp, calibration = pi05
    q = quanto_qint4(fp, calibration, "w4a16")
    names = _layout(fp)
    assert quantized_component_names(fp, q) == names
    expected = _fp16_rest(fp, set(names))
    for n in names:
        layer = q.get_submodule(n)
        w = layer.weight  # WeightQBitsTensor around a PackedTensor: two int4 values per uint8
        packed = w._data._data
        assert packed.dtype == torch.uint8 and packed.numel() * 2 == w.numel()
        expected += (packed.numel() + (w._scale.numel() + w._shift.numel()) * 4 + _bias_bytes(layer)
                     + sum(b.numel() * b.element_size() for b in layer.buffers()))
    rep = component_memory(fp, q)
    assert rep.storage_bytes == expected == rep.resident_bytes  # resident: the live parameter is the subclass
    assert rep.storage_bytes <= budget(fp, set(names), 4)


def test_torchao_int4_kept_unpacked_in_int8_exceeds_the_w4_budget(pi05):
    pytest.importorskip("torchao", reason="the optional extra 'third-party' is not installed")
    from quantvla.thirdparty import torchao_int4_weight_only

    fp, calibration = pi05
    q = torchao_int4_weight_only(fp, calibration, "w4a16")
    names = _layout(fp)
    w = q.get_submodule(names[0]).weight
    assert w.qdata.dtype == torch.int8 and int(w.qdata.abs().max()) <= 8  # int4 values, one per byte
    assert component_memory(fp, q).storage_bytes > budget(fp, set(names), 4)


def test_layers_are_recognised_by_what_they_store(pi05):
    import torch.nn.utils.parametrize as parametrize

    fp, _ = pi05
    name = _layout(fp)[0]
    same = copy.deepcopy(fp)
    assert not is_quantized(fp.get_submodule(name), same.get_submodule(name))  # a copy is not a quantization
    in_place = copy.deepcopy(fp)
    with torch.no_grad():  # fake quantization in place: same class, same dtype, rounded values
        w = in_place.get_submodule(name).weight
        s = w.abs().amax(1, keepdim=True) / 7
        w.copy_(torch.round(w / s).clamp(-8, 7) * s)
    assert quantized_component_names(fp, in_place) == [name]

    class Rounded(nn.Module):
        def forward(self, w):
            return torch.round(w * 16) / 16

    parametrized = copy.deepcopy(fp)
    parametrize.register_parametrization(parametrized.get_submodule(name), "weight", Rounded())
    assert quantized_component_names(fp, parametrized) == [name]


def test_fake_quant_in_place_is_counted_and_fails_the_budget(pi05):
    fp, _ = pi05
    names = _layout(fp)
    q = copy.deepcopy(fp)
    with torch.no_grad():
        for n in names:
            w = q.get_submodule(n).weight
            s = w.abs().amax(1, keepdim=True) / 7
            w.copy_(torch.round(w / s).clamp(-8, 7) * s)
    rep = component_memory(fp, q)
    assert rep.quantized == len(names)
    assert rep.storage_bytes > budget(fp, set(names), 4)  # float32 weights, whatever values they hold


IN_PLACE_FAKE = '''
import copy
import torch


def quantize(model, calibration, bits):
    """Rounds the layout's weights to the int4 grid and keeps them as float32 in the same nn.Linear."""
    q = copy.deepcopy(model)
    with torch.no_grad():
        for name, role in model.linear_roles().items():
            if role in ("llm", "dit_mlp"):
                w = q.get_submodule(name).weight
                s = w.abs().amax(1, keepdim=True) / 7
                w.copy_(torch.round(w / s).clamp(-8, 7) * s)
    return q


def unchanged(model, calibration, bits):
    return copy.deepcopy(model)


def weight_only(model, calibration, bits):
    return quantize(model, calibration, bits)


weight_only.bits = "w8a16"


def odd_bits(model, calibration, bits):
    return model


odd_bits.bits = "w3a3"
'''


def test_the_plugin_offers_the_protocols_bit_widths():
    from pytest_quantvla import options
    from quantvla import quantizer

    assert options.BITS == quantizer.BITS  # written twice so that loading the plugin does not import torch
    assert set(options.WEIGHT_ONLY) == {b for b in quantizer.BITS if b.endswith("a16")}


def test_the_plugin_offers_every_shipped_policy_subject():
    from pytest_quantvla import options
    from quantvla import families

    assert options.CONFIGS[:2] == families.TRAINED  # written twice so that loading the plugin does not import torch
    for name in families.names():
        assert set(families.get(name).policies) == set(families.TRAINED), name


def test_in_place_fake_quant_claiming_4_bits_fails_memory(pytester):
    pytester.makepyfile(myq=IN_PLACE_FAKE)
    result = pytester.runpytest_subprocess("--quantvla-model=pi05", "--quantvla-quantizer=myq:quantize", "-q",
                                           "-k", "memory")
    result.stdout.fnmatch_lines(["*memory[[]trained[]]: quantized components store*weights are not stored at the "
                                 "claimed bit-width*"])
    assert result.parseoutcomes()["failed"] == 1


def test_a_quantizer_returning_the_model_unchanged_fails_with_its_own_message(pytester):
    pytester.makepyfile(myq=IN_PLACE_FAKE)
    result = pytester.runpytest_subprocess("--quantvla-model=gr00t-n15", "--quantvla-quantizer=myq:unchanged", "-q",
                                           "-k", "memory")
    result.stdout.fnmatch_lines(["*the quantizer changed none of the LLM/DiT linears*return the model unchanged*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_a_quantizers_declared_bits_name_the_run_and_a_clash_is_a_usage_error(pytester):
    pytester.makepyfile(myq=IN_PLACE_FAKE)
    result = pytester.runpytest_subprocess("--quantvla-model=pi05", "--quantvla-quantizer=myq:weight_only", "--co",
                                           "-q")
    result.stdout.fnmatch_lines(["quantvla/pi05/w8a16/myq:weight_only/memory[[]trained[]]"])
    result = pytester.runpytest_subprocess("--quantvla-model=pi05", "--quantvla-quantizer=myq:weight_only",
                                           "--quantvla-bits=w4a8")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*myq:weight_only quantizes at w8a16, but --quantvla-bits=w4a8*"])
    result = pytester.runpytest_subprocess("--quantvla-model=pi05", "--quantvla-quantizer=myq:odd_bits")
    result.stderr.fnmatch_lines(["*declares bits='w3a3'; a bit-width is one of*"])
    result = pytester.runpytest_subprocess("--quantvla-model=pi05", "--quantvla-bits=w8a16")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--quantvla-bits=w8a16 is weight-only; the reference quantizer*"])


@pytest.mark.slow  # two whole main jobs
@pytest.mark.parametrize(("model", "adapter"), [("pi05", "torchao_int8_dynamic"), ("gr00t-n15", "quanto_w8a8")])
def test_a_library_quantizer_gets_every_check_and_a_baseline_on_its_first_run(pytester, model, adapter):
    import importlib.util

    # find_spec, not an import: pytester drops modules first imported during the test, and torchao
    # cannot register its operators twice in one process
    if importlib.util.find_spec("torchao") is None or importlib.util.find_spec("optimum") is None:
        pytest.skip("the optional extra 'third-party' is not installed")
    spec = f"quantvla.thirdparty:{adapter}"
    args = [f"--quantvla-model={model}", f"--quantvla-quantizer={spec}", "-q", "-p", "xdist", "-n", "2"]
    first = pytester.runpytest_subprocess(*args, f"--quantvla-report={pytester.path / 'first.json'}")
    first.stdout.fnmatch_lines([f"baseline recorded at {pytester.path}/quantvla-golden/*.json; commit it*"])
    checks = json.loads((pytester.path / "first.json").read_text())["checks"]
    prefix = f"quantvla/{model}/w8a8/{spec}"
    layers = [k for k in checks if k.startswith(f"{prefix}/layer_bounds[")]
    assert len(layers) == checks[f"{prefix}/memory[trained]"]["quantized"] > 0
    for name in ("memory[trained]", "attention_drift", "golden_statistics"):
        assert checks[f"{prefix}/{name}"]["outcome"] in ("passed", "failed"), name
    for k in layers:  # each decided against the w8a8 limit: measured when it passed, named when it failed
        r = checks[k]
        assert ("sqnr_db" in r and r["limit"] == 0.05) if r["outcome"] == "passed" else \
            "over the w8a8 limit 0.05 (reference/layer_error.json)" in r["message"], (k, r)
    second = pytester.runpytest_subprocess(*args)
    assert "baseline recorded" not in second.stdout.str()
    assert second.parseoutcomes() == first.parseoutcomes()
