"""quantvla.quantize(model, calibration, config): the one verb.

1. copy the FP model's structure (the teacher is never modified); the student shares every weight
   it does not change with the teacher (its own Parameter objects over the teacher's storage), so
   quantizing costs the quantized layers and the folded attention projections, not a second model;
2. record each selected linear's input activations through the teacher on the first
   `act_batches` buffer entries (every denoising step), and replace the student's linears by
   QuantLinear (DuQuant transform + integer kernels) calibrated on them; with `layers_per_pass`,
   a group of that many layers at a time (one teacher pass each), so only one group's recorded
   activations are alive at once: the same student, bit for bit, for less memory and more passes;
3. ATM: run teacher and student on the same entries, noise and time steps, compare per-head
   logit Std at each DiT attention site in turn (earlier sites already corrected), fold alpha
   into W_q;
4. OHB: the same for the output RMS, with every alpha already applied; fold beta into W_o;
5. measure again after both, for the report (paper Fig. 3 data).
Steps 3-5 are `calibrate`, callable on its own.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantvla.calibration.buffer import CalibrationBuffer
from quantvla.calibration.scales import fit_alpha, fit_beta, observing
from quantvla.errors import QuantInputError
from quantvla.presets import QuantConfig, preset
from quantvla.quant.linear import QuantLinear


@dataclass
class SiteReport:
    name: str
    teacher_std: list[float]
    student_std_before: list[float]
    student_std_after_atm: list[float]
    student_std_after: list[float]  # after ATM and OHB
    alpha: list[float]
    teacher_rms: float
    student_rms_before: float
    student_rms_after_atm: float
    student_rms_after: float
    beta: float


@dataclass
class QuantizationReport:
    config: str
    quantized: list[str] = field(default_factory=list)
    sites: list[SiteReport] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def max_abs_log_ratio(self) -> dict[str, float]:
        """Worst |log(student/teacher)| of logit Std over heads (before and after ATM) and of output
        RMS over layers (before and after ATM+OHB)."""
        def worst(pairs):
            vals = [abs(torch.log(torch.tensor(s / t)).item()) for s, t in pairs if t > 0 and s > 0]
            return max(vals, default=0.0)
        std_b = [(s, t) for r in self.sites for s, t in zip(r.student_std_before, r.teacher_std, strict=True)]
        std_a = [(s, t) for r in self.sites for s, t in zip(r.student_std_after_atm, r.teacher_std, strict=True)]
        return {"logit_std_before": worst(std_b), "logit_std_after": worst(std_a),
                "rms_before": worst((r.student_rms_before, r.teacher_rms) for r in self.sites),
                "rms_after": worst((r.student_rms_after, r.teacher_rms) for r in self.sites)}


def quantized_layer_names(model: nn.Module, config: QuantConfig) -> list[str]:
    """The linears `config` quantizes, from the model's role enumeration, in module order."""
    return [n for n, role in model.linear_roles().items() if role in config.roles]


def layout_filter(model: nn.Module, config: QuantConfig | str = "quantvla-w4a8"):
    """The QuantVLA layout as a torchao-style `filter_fn(module, fqn) -> bool`: True for the linears
    `config` quantizes (every LLM linear and the DiT MLPs for the paper's presets), so a library's
    own quantizer touches exactly the layers the paper quantizes. quanto takes the same layers as
    `include=quantized_layer_names(model, preset(...))`."""
    names = frozenset(quantized_layer_names(model, preset(config) if isinstance(config, str) else config))
    return lambda module, fqn: fqn in names and isinstance(module, nn.Linear)


def _run(model, buffer: CalibrationBuffer, entries: range, steps: int | None) -> None:
    for i in entries:
        model.sample_actions(buffer.inputs[i], buffer.noise[i], num_steps=steps)


def record_activations(model, names, buffer: CalibrationBuffer, config: QuantConfig,
                       gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Input rows of each named linear, recorded through `model` on the first config.act_batches
    buffer entries (every denoising step), at most config.max_rows evenly spaced rows per layer.
    Layers the action path never runs (pi0.5's last VLM q/o/MLP) get Gaussian rows from `gen`
    (default: seeded with config.seed), drawn in `names` order; quantize() passes one generator to
    every group, so grouped recording draws the same rows as one pass over all layers."""
    mods = dict(model.named_modules())
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [mods[n].register_forward_hook(
        lambda _m, args, _o, n=n: rows[n].append(args[0].detach().reshape(-1, args[0].shape[-1]).float()))
        for n in names]
    try:
        _run(model, buffer, range(min(config.act_batches, len(buffer))), config.denoising_steps)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    gen = gen if gen is not None else torch.Generator().manual_seed(config.seed)
    for n, chunks in rows.items():
        if not chunks:
            out[n] = torch.randn(256, mods[n].in_features, generator=gen)
            continue
        x = torch.cat(chunks)
        if x.shape[0] > config.max_rows:  # evenly spaced rows: deterministic, covers every call
            x = x[torch.linspace(0, x.shape[0] - 1, config.max_rows).round().long()]
        out[n] = x
    return out


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def sharing_copy(teacher: nn.Module, own: Iterable[nn.Module] = ()) -> nn.Module:
    """A deep copy of `teacher` whose parameters and buffers view the teacher's storage, except those
    of the modules in `own`, which are real copies. Each shared tensor is a new Parameter (or buffer
    tensor) object, so converting or moving the copy (.to, .half, .cuda) rebinds its own tensors and
    leaves the teacher alone; only an in-place edit of a shared tensor's values reaches both."""
    owned = {id(t) for m in own for t in itertools.chain(m.parameters(), m.buffers())}
    memo: dict[int, Any] = {}
    for t in itertools.chain(teacher.parameters(), teacher.buffers()):
        if id(t) in owned or id(t) in memo:
            continue
        memo[id(t)] = nn.Parameter(t.detach(), requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) \
            else t.detach()
    return copy.deepcopy(teacher, memo)


def _measure(model, buffer, entries, steps):
    sites = model.attention_sites()
    with observing(sites) as stats:
        _run(model, buffer, entries, steps)
    return stats


@torch.no_grad()
def quantize(model: nn.Module, calibration: CalibrationBuffer, config: QuantConfig | str = "quantvla-w4a8",
             report: QuantizationReport | None = None, *, layers_per_pass: int | None = None) -> nn.Module:
    """A quantized copy of `model` (left untouched). `report`, if given, is filled in.
    `layers_per_pass` (default: all): how many linears are recorded and replaced per teacher pass.
    Fewer keep less recorded activation memory alive (a full-size model records up to max_rows rows
    of every layer) at the cost of one more teacher pass per group; the result is the same."""
    if isinstance(config, str):
        config = preset(config)
    if layers_per_pass is not None and (isinstance(layers_per_pass, bool) or not isinstance(layers_per_pass, int)
                                        or layers_per_pass < 1):
        raise QuantInputError(f"layers_per_pass must be a positive integer (or None: every layer in one pass), "
                              f"got {layers_per_pass!r}")
    if len(calibration) == 0 and config.linear is not None:
        raise QuantInputError("the calibration buffer is empty; record at least one observation")
    _check_finite(calibration)
    teacher = model.eval()
    folded = [lin for site in teacher.attention_sites() for lin in (site.q_proj, site.o_proj)] \
        if config.atm or config.ohb else []  # ATM folds alpha into W_q, OHB beta into W_o
    student = sharing_copy(teacher, folded)
    names = quantized_layer_names(student, config)
    report = report if report is not None else QuantizationReport(config.name)
    report.quantized = names
    if config.linear is None or not names:
        return student
    mods = dict(student.named_modules())
    gen = torch.Generator().manual_seed(config.seed)  # one stream for every group: see record_activations
    group = layers_per_pass or len(names)
    for start in range(0, len(names), group):
        acts = record_activations(teacher, names[start:start + group], calibration, config, gen)
        for n in names[start:start + group]:  # each record is dropped as soon as its layer is built
            _set_module(student, n, QuantLinear.from_linear(mods[n], config.linear, calib=acts.pop(n), name=n))
    if config.atm or config.ohb:
        calibrate(teacher, student, calibration, config, report)
    return student


@torch.no_grad()
def calibrate(teacher: nn.Module, student: nn.Module, calibration: CalibrationBuffer, config: QuantConfig,
              report: QuantizationReport | None = None) -> nn.Module:
    """ATM and OHB (steps 3-5 above) on a student whose linears are already quantized: fit alpha
    per DiT attention head and fold it into W_q, then, with every alpha folded, beta per layer into
    W_o. The student is changed in place and returned; `report`, if given, gets one SiteReport per
    site."""
    entries = range(min(len(calibration), max(1, config.fit_steps // _steps(student, config))))
    steps = config.denoising_steps
    teacher_stats = _measure(teacher, calibration, entries, steps)
    before = _measure(student, calibration, entries, steps)
    sites = student.attention_sites()
    alphas = [torch.ones(s.num_heads) for s in sites]
    betas = [1.0] * len(sites)
    # Site by site, in model order: each scale is fitted with every earlier site's scale already
    # folded, so it corrects the drift the student will really have (a fit of all sites at once
    # overshoots where upstream corrections already moved a layer).
    if config.atm:
        for i, site in enumerate(sites):
            current = before[i] if i == 0 else _measure(student, calibration, entries, steps)[i]
            alphas[i] = fit_alpha(teacher_stats[i].std, current.std, config.clip_log, config.neutral_log)
            site.fold_alpha(alphas[i])
    after_atm = _measure(student, calibration, entries, steps)  # beta is measured with alpha applied
    if config.ohb:
        for i, site in enumerate(sites):
            current = after_atm[i] if i == 0 else _measure(student, calibration, entries, steps)[i]
            betas[i] = float(fit_beta(torch.tensor(teacher_stats[i].rms), torch.tensor(current.rms),
                                      config.clip_log, config.neutral_log))
            site.fold_beta(betas[i])
    after = _measure(student, calibration, entries, steps)
    for i, site in enumerate(sites if report is not None else []):
        report.sites.append(SiteReport(
            site.name, teacher_stats[i].std.tolist(), before[i].std.tolist(), after_atm[i].std.tolist(),
            after[i].std.tolist(),
            alphas[i].tolist(), teacher_stats[i].rms, before[i].rms, after_atm[i].rms, after[i].rms, betas[i]))
    student.quantvla_scales = {"alpha": {s.name: a.tolist() for s, a in zip(sites, alphas, strict=True)},
                               "beta": {s.name: b for s, b in zip(sites, betas, strict=True)}}
    return student


def _check_finite(calibration: CalibrationBuffer) -> None:
    """NaN or Inf in an observation poisons every range and scale fitted from it (smoothing would
    even hide it); name the entry so the recording can be fixed."""
    for i, (inputs, noise) in enumerate(zip(calibration.inputs, calibration.noise, strict=True)):
        fields = {f.name: getattr(inputs, f.name) for f in dataclasses.fields(inputs)} | {"noise": noise}
        for name, t in fields.items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise QuantInputError(f"calibration entry {i}: its {name} holds {bad} non-finite values (NaN or "
                                      "Inf); drop or re-record that observation before quantizing")


def _steps(model, config: QuantConfig) -> int:
    return config.denoising_steps or model.config.num_steps
