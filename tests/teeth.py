"""Known-bad variants of the reference quantizer, each a monkeypatch of one library function (never
an edit of the source), and a runner that puts a variant through the PR tier's built-in checks
in-process: the checks of `pytest --quantvla-model=pi05`, then of gr00t-n15 if pi05's all pass.

A variant is killed when a check fails (CheckFailed) or errors; a skip is not a kill. The list
covers classes of faults (kernels, grids, packing, DuQuant, layout, GPTQ, ATM, OHB, calibration),
not the seeded faults of any one review."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import pytest
import torch

from pytest_quantvla import checks, subject
from pytest_quantvla.checks import layers
from pytest_quantvla.collect import CheckFailed
from pytest_quantvla.options import RunConfig
from quantvla import api, calibrate
from quantvla.calibration import scales
from quantvla.quant import duquant, grids, kernels, packing

MODELS = ("pi05", "gr00t-n15")


def run_for(model: str) -> RunConfig:
    return RunConfig(model=model, size="trained", bits="w4a8", device="cpu", seed=0, quantizer="quantvla",
                     checkpoint=None, golden_dir=None, update_golden=False, report=None)


# the originals, taken before any patch (a replacement that called the patched name would recurse)
_quantize_weight, _quantize_activation = grids.quantize_weight, grids.quantize_activation
_pack_int4, _unpack_int4_halves = packing.pack_int4, packing.unpack_int4_halves
_gptq_round = grids.gptq_round


# ----------------------------------------------------------------------------------- kernels
def _int4_high_nibbles_dropped(packed, out_lo=None, out_hi=None):
    lo, hi = _unpack_int4_halves(packed, out_lo, out_hi)
    return lo, torch.zeros_like(hi)


def _int4_halves_swapped(packed, out_lo=None, out_hi=None):
    lo, hi = _unpack_int4_halves(packed, out_lo, out_hi)
    return hi, lo


def _int16_accumulator(qx, w, w_max=128):
    return kernels._reference(qx, w).clamp(-(1 << 15), (1 << 15) - 1)  # sums saturate at int16


# ------------------------------------------------------------------------------------- grids
def _per_tensor_weight_scale(w, cfg):
    _, scale = _quantize_weight(w, cfg)
    qmin, qmax = grids.signed_range(cfg.bits)
    one = scale.max().expand_as(scale).contiguous()
    return torch.round(w.double() / one.double()[:, None]).clamp_(qmin, qmax).to(torch.int8), one


def _per_tensor_activation_range(x, cfg, static_scale=None, static_zero=None):
    if cfg.granularity != "per_token" or cfg.symmetric:
        return _quantize_activation(x, cfg, static_scale, static_zero)
    static = dataclasses.replace(cfg, granularity="per_tensor")
    scale, zero = grids.calibrate_static(x, dataclasses.replace(static, percentile=100.0))
    qa = _quantize_activation(x, static, scale, zero)
    m = x.shape[0]
    return grids.QuantizedActivation(qa.q, qa.scale.expand(m, 1).contiguous(), qa.zero.expand(m, 1).contiguous())


def _one_bit_coarser(w, scale, x, bits, damp=0.1, block=128):
    # GPTQ rounds onto the grid of one bit fewer (steps twice as long), stored as W<bits> integers
    return (_gptq_round(w, 2 * scale, x, bits - 1, damp, block) * 2).clamp_(*grids.signed_range(bits))


def _activation_zero_point_dropped(x, cfg, static_scale=None, static_zero=None):
    qa = _quantize_activation(x, cfg, static_scale, static_zero)
    return grids.QuantizedActivation(qa.q, qa.scale, None)


def _tightest_clip_always(w, cfg):
    return _quantize_weight(w, dataclasses.replace(cfg, clip_ratios=(min(cfg.clip_ratios),)))


# ----------------------------------------------------------------------------------- packing
def _pack_nibbles_swapped(q):
    p = _pack_int4(q)
    return ((p >> 4) | (p << 4)).contiguous()


def _unpack_unsigned(packed, out_lo=None, out_hi=None):
    p = packed.view(torch.uint8)
    return (p & 0xF).view(torch.int8).clone(), (p >> 4).view(torch.int8).clone()


# ----------------------------------------------------------------------------------- DuQuant
_apply_inverse = duquant.BlockRotation.apply_inverse
_fold_weight = duquant.DuQuantTransform.fold_weight
_fit = duquant.DuQuantTransform.fit


def _rotation_not_transposed(self, w, transpose=False):
    return _apply_inverse(self, w, False)


def _fold_without(attr):
    def fold(self, w):
        saved = getattr(self, attr)
        setattr(self, attr, None)
        try:
            return _fold_weight(self, w)
        finally:
            setattr(self, attr, saved)
    return fold


def _second_rotation_skipped_online(self, x):
    if self.smooth is not None:
        x = x / self.smooth.to(x.dtype)
    if self.rot1 is not None:
        x = self.rot1.apply(x)
    return x if self.perm is None else x.index_select(1, self.perm)


def _smoothing_inverted(self, weight, calib):
    _fit(self, weight, calib)
    if self.smooth is not None:  # activations divided by 1/s, the weight multiplied by it: exact, but harmful
        self.smooth.reciprocal_()
    return self


def _no_reflections(x, size, steps):
    return torch.full((x.shape[0], steps), -1, dtype=torch.int16)


# ------------------------------------------------------------------------------- layout, GPTQ
_layer_names = api.quantized_layer_names


def _layout_with(role):
    def names(model, config):
        return _layer_names(model, dataclasses.replace(config, roles=config.roles + (role,)))
    return names


def _llm_mlp_left_in_float(model, config):
    return [n for n in _layer_names(model, config)
            if not (model.linear_roles()[n] == "llm" and ".mlp." in n)]


def _gptq_without_feedback(w, scale, x, bits, damp=0.1, block=128):
    qmin, qmax = grids.signed_range(bits)
    return torch.round(w.double() / scale.double()[:, None]).clamp_(qmin, qmax).to(torch.int8)


# ------------------------------------------------------------------------- ATM, OHB, calibration
def _reciprocal_alpha(teacher_std, student_std, clip_log, neutral_log):
    return scales.clip_scale(student_std.double() / (teacher_std.double() + scales.EPS), clip_log, neutral_log)


def _per_layer_alpha(teacher_std, student_std, clip_log, neutral_log):
    alpha = scales.fit_alpha(teacher_std, student_std, clip_log, neutral_log)
    return torch.full_like(alpha, float(alpha.log().mean().exp()))


def _beta_before_alpha(teacher, student, buffer, config, report=None):
    betas = calibrate(teacher, copy.deepcopy(student), buffer, dataclasses.replace(config, atm=False))
    calibrate(teacher, student, buffer, dataclasses.replace(config, ohb=False))
    for site in student.attention_sites():
        site.fold_beta(betas.quantvla_scales["beta"][site.name])
    student.quantvla_scales["beta"] = betas.quantvla_scales["beta"]
    return student


def _first_entry_only(measure):
    return lambda model, buffer, entries, steps: measure(model, buffer, range(entries.start, entries.start + 1), steps)


@dataclass(frozen=True)
class Variant:
    area: str
    target: str  # "module.attribute" that monkeypatch replaces
    replacement: object


VARIANTS = {
    "int4 GEMM drops the high nibbles": Variant("kernels", "quantvla.quant.kernels.unpack_int4_halves",
                                                _int4_high_nibbles_dropped),
    "int4 GEMM swaps the weight halves": Variant("kernels", "quantvla.quant.kernels.unpack_int4_halves",
                                                 _int4_halves_swapped),
    "int8 GEMM accumulates in int16": Variant("kernels", "quantvla.quant.kernels._cpu_int_mm", _int16_accumulator),
    "per-tensor weight scales": Variant("grids", "quantvla.quant.grids.quantize_weight", _per_tensor_weight_scale),
    "one activation range per tensor": Variant("grids", "quantvla.quant.grids.quantize_activation",
                                               _per_tensor_activation_range),
    "GPTQ onto a grid one bit coarser": Variant("grids", "quantvla.quant.grids.gptq_round", _one_bit_coarser),
    "activation zero point dropped": Variant("grids", "quantvla.quant.grids.quantize_activation",
                                             _activation_zero_point_dropped),
    "tightest clip ratio always": Variant("grids", "quantvla.quant.grids.quantize_weight", _tightest_clip_always),
    "nibbles packed high-low": Variant("packing", "quantvla.quant.linear.pack_int4", _pack_nibbles_swapped),
    "int4 unpacked without sign extension": Variant("packing", "quantvla.quant.kernels.unpack_int4_halves",
                                                    _unpack_unsigned),
    "weight-side rotation not transposed": Variant("duquant", "quantvla.quant.duquant.BlockRotation.apply_inverse",
                                                   _rotation_not_transposed),
    "smoothing not folded into the weight": Variant("duquant", "quantvla.quant.duquant.DuQuantTransform.fold_weight",
                                                    _fold_without("smooth")),
    "permutation not folded into the weight": Variant("duquant",
                                                      "quantvla.quant.duquant.DuQuantTransform.fold_weight",
                                                      _fold_without("perm")),
    "second rotation skipped online": Variant("duquant", "quantvla.quant.duquant.DuQuantTransform.apply_act",
                                              _second_rotation_skipped_online),
    "smoothing inverted (consistently)": Variant("duquant", "quantvla.quant.duquant.DuQuantTransform.fit",
                                                 _smoothing_inverted),
    "greedy rotation takes no reflection": Variant("duquant", "quantvla.quant.duquant._greedy_indices",
                                                   _no_reflections),
    "DiT attention quantized too": Variant("layout", "quantvla.api.quantized_layer_names", _layout_with("dit_attn")),
    "LLM MLP left in float": Variant("layout", "quantvla.api.quantized_layer_names", _llm_mlp_left_in_float),
    "GPTQ without error feedback": Variant("gptq", "quantvla.quant.grids.gptq_round", _gptq_without_feedback),
    "alpha in the reciprocal direction": Variant("atm", "quantvla.api.fit_alpha", _reciprocal_alpha),
    "one alpha per layer, not per head": Variant("atm", "quantvla.api.fit_alpha", _per_layer_alpha),
    "alpha not clipped": Variant("atm", "quantvla.api.fit_alpha", lambda t, s, c, n: scales.fit_alpha(t, s, 10.0, n)),
    "neutral band ten times too wide": Variant("calibration", "quantvla.api.fit_alpha",
                                               lambda t, s, c, n: scales.fit_alpha(t, s, c, 10 * n)),
    "beta in the reciprocal direction": Variant("ohb", "quantvla.api.fit_beta",
                                                lambda t, s, c, n: scales.fit_beta(s, t, c, n)),
    "beta never leaves 1": Variant("ohb", "quantvla.api.fit_beta",
                                   lambda t, s, c, n: torch.ones_like(t, dtype=torch.float32)),
    "beta fitted before alpha is folded": Variant("calibration", "pytest_quantvla.checks.calibration.calibrate",
                                                  _beta_before_alpha),
    "only the first buffer entry used": Variant("calibration", "quantvla.api._measure",
                                                _first_entry_only(api._measure)),
}


def clear_caches() -> None:
    """Everything the checks memoise per process, so the next run quantizes afresh."""
    subject.subject.cache_clear()
    subject.uncalibrated.cache_clear()
    layers._activations.cache_clear()
    layers.layer_errors.cache_clear()


def first_kill(models=MODELS) -> tuple[str, str] | None:
    """(check id, why) of the first built-in check that fails, or None when every check passes."""
    for model in models:
        for check in checks.all_checks(run_for(model)):
            check_id = check.name
            try:
                check.run()
            except CheckFailed as err:
                return check_id, str(err).splitlines()[0][:300]
            except pytest.skip.Exception:
                continue
            except Exception as err:  # noqa: BLE001 - an erroring check turns the PR tier red too
                return check_id, f"errored: {type(err).__name__}: {str(err)[:200]}"
    return None


def kernel_state_settled() -> None:
    """Run the one-time kernel self-tests before a variant is patched in: a kernel variant stands for
    a fault outside the self-test's probes, which the checks must still catch."""
    kernels.cpu_kernel_ok()
    kernels.onednn_ok()

