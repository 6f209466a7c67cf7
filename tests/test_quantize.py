"""quantvla.quantize: layout, pairing, ATM, OHB, folding, baselines, determinism, artifacts."""

import copy
import math

import pytest
import torch

from quantvla import CalibrationBuffer, QuantizationReport, preset, quantize, quantized_layer_names
from quantvla.artifact import ArtifactError, load_quantized, save_quantized
from quantvla.calibration.scales import clip_scale, fit_alpha, observing
from quantvla.errors import QuantInputError
from quantvla.models import build
from quantvla.quant.linear import QuantLinear

FAMILIES = ["pi05", "gr00t-n15"]


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    torch.manual_seed(0)
    model = build(request.param, "tiny")
    return model, CalibrationBuffer.synthetic(model, 8, seed=0), CalibrationBuffer.synthetic(model, 8, seed=1)


@pytest.mark.parametrize("family, expected", [("pi05", 180), ("gr00t-n15", 116)])
def test_quantvla_layout_counts_on_full_size_models(family, expected):
    with torch.device("meta"):
        model = build(family, "full")
    names = quantized_layer_names(model, preset("quantvla-w4a8"))
    assert len(names) == expected  # paper Table 1
    roles = model.linear_roles()
    assert all(roles[n] in ("llm", "dit_mlp") for n in names)
    full = quantized_layer_names(model, preset("duquant-full-w4a8"))
    assert len(full) == {"pi05": 252, "gr00t-n15": 180}[family]


def test_selected_layers_become_integer_layers_and_the_teacher_is_untouched(setup):
    model, buf, _ = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize(model, buf, "quantvla-w4a8")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical FP model
    mods = dict(q.named_modules())
    names = quantized_layer_names(model, preset("quantvla-w4a8"))
    assert all(isinstance(mods[n], QuantLinear) for n in names)
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == len(names)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_vision_preset_quantizes_the_tower_and_the_model_still_runs(family):
    # the models read their compute dtype from linear weights; a quantized vision tower has none
    torch.manual_seed(0)
    model = build(family, "tiny")
    buf = CalibrationBuffer.synthetic(model, 4, seed=0)
    q = quantize(model, buf, "quantvla-w4a8-vision")
    roles = model.linear_roles()
    quantized = {n for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    vision = {n for n in quantized if roles[n] == "vision"}
    assert vision == {n for n, r in roles.items() if r == "vision"} and vision
    with torch.no_grad():
        fp_actions = model.sample_actions(buf.inputs[0], noise=buf.noise[0])
        q_actions = q.sample_actions(buf.inputs[0], noise=buf.noise[0])
    assert torch.isfinite(q_actions).all() and q_actions.shape == fp_actions.shape
    assert not torch.equal(q_actions, fp_actions)


def test_the_student_shares_what_it_does_not_change(setup):
    """No second FP model: every tensor the quantizer leaves alone views the teacher's storage; the
    attention projections ATM/OHB fold into are the student's own; converting the student leaves
    the teacher's tensors alone."""
    model, buf, _ = setup
    q = quantize(model, buf, "quantvla-w4a8")
    fp_ptr = {n: t.data_ptr() for n, t in model.state_dict().items()}
    q_state = q.state_dict()
    module_name = {id(m): n for n, m in q.named_modules()}
    folded = {module_name[id(lin)] for site in q.attention_sites() for lin in (site.q_proj, site.o_proj)}
    replaced = set(quantized_layer_names(model, preset("quantvla-w4a8")))  # QuantLinear owns its bias
    kept = [n for n in q_state if n in fp_ptr and n.rsplit(".", 1)[0] not in folded | replaced]
    assert kept and all(q_state[n].data_ptr() == fp_ptr[n] for n in kept)
    assert folded and all(q_state[f"{n}.weight"].data_ptr() != fp_ptr[f"{n}.weight"] for n in folded)
    shared = sum(q_state[n].numel() * q_state[n].element_size() for n in kept)
    assert shared > 0.2 * sum(t.numel() * t.element_size() for t in model.state_dict().values())
    q.to(torch.float64)
    assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())


@pytest.mark.parametrize("per_pass", [1, 7])
def test_layers_recorded_a_group_at_a_time_give_the_same_student(setup, per_pass, monkeypatch):
    """Streaming quantization: at most `per_pass` layers' activations recorded per teacher pass, and
    the student bit for bit the one-pass student's (pi0.5's never-run layers draw their Gaussian
    rows from one generator across groups, so they agree too)."""
    import quantvla.api as api

    model, buf, _ = setup
    whole = quantize(model, buf, "quantvla-w4a8").state_dict()
    groups: list[int] = []
    real = api.record_activations

    def spy(m, names, *args):
        groups.append(len(names))
        return real(m, names, *args)
    monkeypatch.setattr(api, "record_activations", spy)
    grouped = quantize(model, buf, "quantvla-w4a8", layers_per_pass=per_pass).state_dict()
    n = len(quantized_layer_names(model, preset("quantvla-w4a8")))
    assert max(groups) <= per_pass and sum(groups) == n and len(groups) == math.ceil(n / per_pass)
    assert whole.keys() == grouped.keys()
    assert all(torch.equal(whole[k], grouped[k]) for k in whole), [k for k in whole
                                                                   if not torch.equal(whole[k], grouped[k])]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(QuantInputError, match="layers_per_pass must be a positive integer"):
            quantize(model, buf, "quantvla-w4a8", layers_per_pass=bad)


def test_component_memory_counts_the_onednn_cache(setup, monkeypatch):
    """A model run on the opt-in prepacked backend keeps more than it stores, and the report says so.
    Where oneDNN is inexact (no VNNI) its availability is injected and its GEMM is the oracle: the
    caches are still built, so the accounting is tested on every CPU."""
    import dataclasses

    from quantvla.memory import component_memory
    from quantvla.quant import kernels
    if not kernels.onednn_ok():
        monkeypatch.setattr(kernels, "_onednn_why_not", "")
        monkeypatch.setattr(kernels, "_onednn_int_mm", lambda qx, w, pk: kernels._reference(qx, w))
    model, buf, _ = setup
    cfg = preset("smoothquant-w8a8")
    q = quantize(model, buf, dataclasses.replace(cfg, linear=dataclasses.replace(cfg.linear, backend="onednn")))
    assert component_memory(model, q).resident_bytes == component_memory(model, q).storage_bytes
    q.sample_actions(buf.inputs[0], buf.noise[0])
    rep = component_memory(model, q)
    cached = sum(m._prepacked.nbytes for m in q.modules() if isinstance(m, QuantLinear) and m._prepacked)
    assert cached > 0 and rep.resident_bytes == rep.storage_bytes + cached


# ----------------------------------------------------------------------------- ATM / OHB maths
def test_alpha_is_one_over_c_for_a_head_scaled_by_c():
    teacher = torch.tensor([1.0, 2.0, 3.0])
    for c in (0.8, 1.1, 1.25):
        student = teacher.clone()
        student[1] *= c
        alpha = fit_alpha(teacher, student, clip_log=0.30, neutral_log=0.03)
        assert alpha[1].item() == pytest.approx(1 / c, rel=1e-5)
        assert alpha[0].item() == 1.0 and alpha[2].item() == 1.0


def test_clip_and_neutral_band_edges():
    raw = torch.tensor([math.exp(0.0299), math.exp(-0.0299), math.exp(0.0301), math.exp(0.2999), math.exp(0.5),
                        math.exp(-0.5)])
    out = clip_scale(raw, clip_log=0.30, neutral_log=0.03).double().log()
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.0301, 0.2999, 0.30, -0.30], abs=1e-6)
    assert clip_scale(torch.tensor([math.exp(0.39)]), 0.4, 0.03).log().item() == pytest.approx(0.39, abs=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_measured_alpha_undoes_a_known_logit_scaling(family):
    """End to end: scale one head's logits by c in a copy of the model; calibration finds 1/c."""
    torch.manual_seed(0)
    teacher = build(family, "tiny")
    student = copy.deepcopy(teacher)
    site = student.attention_sites()[-1]  # the last site: no downstream attention changes
    c = 1.2
    alpha = torch.ones(site.num_heads)
    alpha[0] = c
    site.fold_alpha(alpha)
    buf = CalibrationBuffer.synthetic(teacher, 4)
    stats = []
    for m in (teacher, student):
        with observing(m.attention_sites()) as st:
            for x, z in zip(buf.inputs, buf.noise, strict=True):
                m.sample_actions(x, z)
        stats.append(st[-1])
    fitted = fit_alpha(stats[0].std, stats[1].std, 0.30, 0.03)
    assert fitted[0].item() == pytest.approx(1 / c, rel=1e-4)
    assert torch.all(fitted[1:] == 1.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_model_equals_runtime_scaled_model(family):
    torch.manual_seed(0)
    base = build(family, "tiny")
    folded, runtime = copy.deepcopy(base), copy.deepcopy(base)
    gen = torch.Generator().manual_seed(0)
    for fs, rs in zip(folded.attention_sites(), runtime.attention_sites(), strict=True):
        alpha = 0.8 + 0.4 * torch.rand(fs.num_heads, generator=gen)
        beta = float(0.8 + 0.4 * torch.rand(1, generator=gen))
        fs.fold_alpha(alpha)
        fs.fold_beta(beta)
        rs.runtime_alpha, rs.runtime_beta = alpha, beta
    x = base.example_inputs(seed=3)
    noise = torch.randn(1, base.config.action_horizon, base.config.action_dim, generator=gen)
    a, b = folded.sample_actions(x, noise), runtime.sample_actions(x, noise)
    assert float((a - b).abs().max()) <= 1e-6 * max(1.0, float(b.abs().max()))


def test_atm_and_ohb_move_every_ratio_toward_one(setup):
    """With the paper's band (0.03) nothing fires on the random tiny models (their drift is below
    it); without a band, ATM and OHB must pull every head and every layer toward the teacher."""
    model, buf, _ = setup
    report = QuantizationReport("quantvla-w4a8")
    quantize(model, buf, preset("quantvla-w4a8", neutral_log=0.0), report)
    for site in report.sites:
        for t, b, a in zip(site.teacher_std, site.student_std_before, site.student_std_after_atm, strict=True):
            assert abs(math.log(a / t)) <= abs(math.log(b / t)) + 1e-9, site.name
        assert abs(math.log(site.student_rms_after / site.teacher_rms)) <= \
            abs(math.log(site.student_rms_after_atm / site.teacher_rms)) + 1e-9, site.name
    worst = report.max_abs_log_ratio()
    assert worst["logit_std_after"] < worst["logit_std_before"]
    assert worst["rms_after"] < worst["rms_before"]


def _action_mse(model, q, test):
    return sum(float(((q.sample_actions(x, z) - model.sample_actions(x, z)) ** 2).mean())
               for x, z in zip(test.inputs, test.noise, strict=True)) / len(test)


def test_action_error_orders_the_presets(setup):
    """quantvla-w4a8 <= layout-only-w4a8 < duquant-full-w4a8 < rtn-full-w4a4 in action MSE against FP.
    On the random tiny models ATM/OHB stay in their neutral band, so the first two are equal."""
    model, buf, test = setup
    mse = {name: _action_mse(model, quantize(model, buf, name), test)
           for name in ("quantvla-w4a8", "layout-only-w4a8", "duquant-full-w4a8", "rtn-full-w4a4")}
    assert mse["quantvla-w4a8"] <= mse["layout-only-w4a8"] < mse["duquant-full-w4a8"] < mse["rtn-full-w4a4"], mse
    assert _action_mse(model, quantize(model, buf, "fp16"), test) == 0.0


def test_same_seed_same_scales_and_artifact_bytes(setup, tmp_path):
    model, buf, _ = setup
    cfg = preset("quantvla-w4a8", neutral_log=0.0)
    paths = []
    for run in ("a", "b"):
        q = quantize(model, buf, cfg)
        paths.append(save_quantized(q, tmp_path / run, cfg, model, buf))
    for name in ("model.safetensors", "quantvla.json"):
        assert (paths[0] / name).read_bytes() == (paths[1] / name).read_bytes()


def test_artifact_round_trip_and_validation(setup, tmp_path):
    model, buf, test = setup
    cfg = preset("quantvla-w4a8", neutral_log=0.0)
    q = quantize(model, buf, cfg)
    out = save_quantized(q, tmp_path / "art", cfg, model, buf)
    loaded = load_quantized(out, source=model, calibration=buf)
    x, z = test.inputs[0], test.noise[0]
    assert torch.equal(loaded.sample_actions(x, z), q.sample_actions(x, z))
    assert loaded.quantvla_scales == q.quantvla_scales
    with pytest.raises(ArtifactError, match="not calibrated on the given buffer"):
        load_quantized(out, calibration=test)
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(ArtifactError, match="not made from the given source model"):
        load_quantized(out, source=other)
    (out / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ArtifactError, match="sha256 differs"):
        load_quantized(out)
    (out / "quantvla.json").unlink()
    with pytest.raises(ArtifactError, match="quantvla.json is missing"):
        load_quantized(out)


def test_calibration_buffer_round_trip(setup, tmp_path):
    _, buf, _ = setup
    path = buf.save(tmp_path / "calib.safetensors")
    again = CalibrationBuffer.load(path)
    assert again.digest() == buf.digest() and len(again) == len(buf)


def test_buffer_recorded_from_observations_through_the_models_pipeline():
    import numpy as np

    from quantvla.policy.model_policy import ModelPolicy
    torch.manual_seed(0)
    model = build("pi05", "tiny")
    rng = np.random.default_rng(0)
    obs = [{"agentview_image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
            "robot0_eye_in_hand_image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
            "robot0_eef_pos": rng.normal(size=3), "robot0_eef_quat": np.array([0.0, 0.0, 0.0, 1.0]),
            "robot0_gripper_qpos": np.array([0.03, -0.03])} for _ in range(3)]
    texts = ["pick up the black bowl", "open the top drawer", "put the bowl on the plate"]
    adapter = ModelPolicy.for_model(model, texts).adapter
    buf = CalibrationBuffer.record(adapter, list(zip(obs, texts, strict=True)), model, seed=4)
    assert len(buf) == 3 and buf.inputs[0].images.shape[-1] == model.config.vision.image
    again = CalibrationBuffer.record(adapter, list(zip(obs, texts, strict=True)), model, seed=4)
    assert buf.digest() == again.digest()
    q = quantize(model, buf, "quantvla-w4a8")
    assert torch.isfinite(q.sample_actions(buf.inputs[0], buf.noise[0])).all()
