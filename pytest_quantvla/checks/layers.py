"""Layer-level error bounds. Every linear the quantizer replaced, fed its own calibration
activations and Hypothesis-generated adversarial ones (outlier channels, zero rows, magnitudes
1e-6..1e6), must stay within:
  - for QuantLinear (the reference): the analytic bound of quantvla.quant.bounds, element by element;
  - for any other layer type (third-party quantizers): the relative output error allowed for the
    bit-width in reference/layer_error.json;
and, for every layer, two tests that do not come from the layer itself:
  - an error budget: at most BUDGET_FACTOR x the relative error the same layer showed when the
    run's golden was recorded (golden key "layer_relative_error"). The analytic bound grows with
    the layer's own scales, so a coarser grid (per-tensor instead of per-channel weight scales)
    raises its own bound and passes it; the budget does not move with the layer.
  - batch independence: a token's output may not depend on the other tokens in the batch. Rows
    scaled by SMALL_ROWS, quantized beside full-size rows, must keep (within BUDGET_FACTOR) the
    relative error they have alone. A range taken over the whole batch at run time fails it: the
    small rows fall below one step of the large rows' grid. On policies that see, token ranges
    are alike enough that such a range stays inside the budget (measured: every layer of both
    seeing policies), so the budget alone does not catch it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_quantvla import golden
from pytest_quantvla.collect import Check, CheckFailed
from pytest_quantvla.options import RunConfig
from pytest_quantvla.results import CheckResult
from pytest_quantvla.subject import subject
from quantvla import preset
from quantvla.api import record_activations
from quantvla.quant.bounds import output_error_bound, relative_error, sqnr_db
from quantvla.quant.linear import QuantLinear
from quantvla.reference import reference_dir

ADVERSARIAL_EXAMPLES = 25
# The reference quantizer's layer errors are deterministic for a seed on a machine; between CPUs the
# integer GEMMs stay exact and only fp32 rounding (transform, epilogue, FP model) differs (goldens
# re-recorded on another host moved by about 1e-5 relative), far inside 25%. Measured on the trained policies,
# per-tensor weight scales raise the worst layer's error 1.76x (pi0.5) / 1.77x (GR00T), one
# activation range per tensor 1.39x / 1.37x.
BUDGET_FACTOR = 1.25
# Magnitudes a foreign layer is held to under Hypothesis (the reference: 1e-6..1e6). Libraries floor
# their dynamic scales at float32 eps: torchao's int8 dynamic activations on pi0.5's trained policy
# give relative error 0.0128 at every scale from 1e-4 to 1e6 and 0.048 at 1e-6 (single rows 0.075),
# a documented design choice rather than a fault, and activations that small do not occur in a VLA.
FOREIGN_SCALES = (1e-2, 1e2)
# How much smaller the probe's rows are than their neighbours in the batch-independence test. Per-token
# and static ranges give the same error on them alone and in the batch (ratio 1.000 on every layer of
# the seeing GR00T); one range over the batch puts them at relative error 1.0 (ratio 24-150).
SMALL_ROWS = 1e-3


@dataclass(kw_only=True)
class LayerResult(CheckResult):
    """One quantized layer; the summary table shows all of them in one row (summary_row)."""

    kind = "layer_bounds"
    relative_error: float
    sqnr_db: float | None
    worst_adversarial_relative_error: float
    limit: float | None  # a foreign layer's allowed relative error (reference/layer_error.json); None: QuantLinear
    budget: float | None
    budget_source: str
    mixed_batch_ratio: float  # small rows' error beside full-size rows / their error alone

    def layer_row(self, layer: str, verdict: str) -> list[Any]:
        """The per-layer table's row (shown with -v)."""
        return [layer, self.relative_error, "-" if self.sqnr_db is None else self.sqnr_db,
                self.worst_adversarial_relative_error, self.limit or "analytic", self.budget or "-", verdict]

    @staticmethod
    def summary_row(entries: list[dict[str, Any]]) -> list[str]:
        """All layers in one row of the summary table: the median and worst error, the lowest SQNR,
        what they are held to and how many failed."""
        results = [r for r in (CheckResult.from_dict(e) for e in entries) if isinstance(r, LayerResult)]
        failed = sum(e["outcome"] != "passed" for e in entries)
        rels = sorted(r.relative_error for r in results)
        sqnr = min((r.sqnr_db for r in results if r.sqnr_db is not None), default=None)
        limit = max((r.limit for r in results if r.limit is not None), default=None)
        foreign = limit is not None or any("layer_error.json" in (e.get("message") or "") for e in entries)
        held = "analytic bound per element" if not foreign else f"rel. error <= {limit or 'the bits limit'}"
        measured = "-" if not rels else (f"rel. error median {rels[len(rels) // 2]:.4f}, max {rels[-1]:.4f}"
                                         + (f" ({len(rels)} passed)" if failed else "")
                                         + (f"; SQNR >= {sqnr:.1f} dB" if sqnr is not None else ""))
        return [f"layer_bounds ({len(entries)} layers)", measured, f"{held}; 1.25 x golden's error; batch-independent",
                "reference/layer_error.json" if foreign else "docs/quantizer.md",
                "passed" if not failed else f"{failed} failed"]


@functools.lru_cache(maxsize=2)
def _activations(run: RunConfig) -> dict[str, torch.Tensor]:
    s = subject(run)
    return record_activations(s.fp, s.quantized_layers(), s.calibration, preset("quantvla-w4a8", max_rows=256))


@functools.lru_cache(maxsize=2)
def layer_errors(run: RunConfig) -> dict[str, float]:
    """Relative output error of every replaced layer on its calibration activations, against the FP
    layer in float64: what the golden records as each layer's budget."""
    s = subject(run)
    acts = _activations(run)
    out = {}
    with torch.no_grad():
        for name in s.quantized_layers():
            lin, x = _linear(s.fp, name), acts[name]
            ref = torch.nn.functional.linear(x.to(torch.float64), lin.weight.to(torch.float64),
                                             None if lin.bias is None else lin.bias.to(torch.float64))
            out[name] = round(relative_error(s.quantized.get_submodule(name)(x), ref), 6)
    return out


def _linear(model: torch.nn.Module, name: str) -> torch.nn.Linear:
    lin = model.get_submodule(name)
    assert isinstance(lin, torch.nn.Linear), f"{name} is a {type(lin).__name__} in the FP model"
    return lin


def _budget(run: RunConfig, name: str) -> tuple[float | None, str]:
    """(recorded relative error of this layer, where it was read), or None when nothing is recorded."""
    path = golden.folder(run) / golden.golden_name(run)
    if run.update_golden:
        return None, "not applied while goldens are updated"
    try:
        recorded = (golden.load(path) or {}).get("layer_relative_error") or {}
    except golden.GoldenError:
        return None, f"{path} is unreadable (golden_statistics says why)"
    value = recorded.get(name)
    return (None, f"not recorded in {path}") if not isinstance(value, (int, float)) else (float(value), str(path))


def _allowed_relative_error(bits: str) -> float:
    path = reference_dir() / "layer_error.json"
    limits = json.loads(path.read_text())["max_relative_error"]
    if bits not in limits:
        raise CheckFailed(f"{path} gives no layer error limit for {bits} (it has {', '.join(limits)})")
    return float(limits[bits])


@torch.no_grad()
def _check(layer: torch.nn.Module, lin: torch.nn.Linear, x: torch.Tensor, what: str, name: str, bits: str) -> float:
    out = layer(x).to(torch.float64)
    if isinstance(layer, QuantLinear):
        ref, bound = output_error_bound(layer, lin.weight, x, lin.bias)
        err = (out - ref).abs()
        over = err > bound
        if bool(over.any()):
            m, n = (int(i) for i in over.nonzero()[0])
            raise CheckFailed(f"{name}: on {what}, output [{m}, {n}] is off by {float(err[m, n]):.4g}, "
                              f"over the {layer.config.tag} bound {float(bound[m, n]):.4g} "
                              f"({int(over.sum())} of {over.numel()} outputs over)")
        return relative_error(out, ref)
    ref = lin(x).to(torch.float64)
    rel = relative_error(out, ref)
    allowed = _allowed_relative_error(bits)
    if rel > allowed:
        raise CheckFailed(f"{name}: on {what}, relative output error {rel:.4g} is over the {bits} limit {allowed} "
                          "(reference/layer_error.json)")
    return rel


@torch.no_grad()
def _mixed_batch_ratio(layer: torch.nn.Module, lin: torch.nn.Linear, x: torch.Tensor, name: str) -> float:
    """Relative error of every other row scaled by SMALL_ROWS, quantized beside the full-size rows, over
    their error quantized alone; errors are measured against the FP product without the bias, which
    would otherwise dominate small rows' outputs and hide what the quantizer does to them."""
    if x.shape[0] < 2:  # no neighbour to depend on
        return 1.0
    small = x[1::2] * SMALL_ROWS
    mixed = x.clone()
    mixed[1::2] = small
    bias = 0.0 if lin.bias is None else lin.bias.to(torch.float64)
    product = torch.nn.functional.linear(small.to(torch.float64), lin.weight.to(torch.float64))

    def error(out: torch.Tensor) -> float:
        return relative_error(out.to(torch.float64) - bias, product)

    alone, beside = error(layer(small)), error(layer(mixed)[1::2])
    ratio = beside / alone if alone > 0 else (1.0 if beside == 0 else float("inf"))
    if ratio > BUDGET_FACTOR:
        raise CheckFailed(f"{name}: rows scaled by {SMALL_ROWS:g} have relative output error {beside:.4g} beside "
                          f"full-size rows but {alone:.4g} alone ({ratio:.3g}x, allowed {BUDGET_FACTOR}x): a token's "
                          "output depends on the other tokens in the batch (an activation range taken over the "
                          "batch at run time instead of per token or calibrated once)")
    return ratio


def layer_bounds(run: RunConfig, name: str) -> LayerResult:
    s = subject(run)
    lin, layer = _linear(s.fp, name), s.quantized.get_submodule(name)
    x = _activations(run)[name]
    rel = _check(layer, lin, x, "calibration activations", name, run.bits)
    budget, source = _budget(run, name)
    if budget is not None and rel > BUDGET_FACTOR * budget + 1e-6:
        raise CheckFailed(f"{name}: relative output error {rel:.4g} on calibration activations is over its budget "
                          f"{BUDGET_FACTOR} x {budget:.4g} (the error this layer had when {source} was recorded); "
                          "a coarser grid or a broken transform, or regenerate the golden if the change is meant")
    ratio = _mixed_batch_ratio(layer, lin, x, name)
    worst = {"rel": 0.0}

    @settings(max_examples=ADVERSARIAL_EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(rows=st.lists(st.integers(0, x.shape[0] - 1), min_size=1, max_size=16),
           channel=st.integers(0, x.shape[1] - 1), boost=st.sampled_from([1.0, 30.0, 1e3]),
           scale=st.sampled_from([1e-6, 1e-2, 1.0, 1e2, 1e6]), zero_row=st.booleans())
    def adversarial(rows: list[int], channel: int, boost: float, scale: float, zero_row: bool) -> None:
        xa = x[rows].clone() * scale
        xa[:, channel] *= boost
        if zero_row:
            xa[0] = 0.0
        if not isinstance(layer, QuantLinear) and (boost > 1 or zero_row or not FOREIGN_SCALES[0] <= scale
                                                   <= FOREIGN_SCALES[1]):
            return  # foreign layers are held to a relative error on realistic inputs only
        worst["rel"] = max(worst["rel"], _check(layer, lin, xa, "adversarial activations", name, run.bits))

    adversarial()
    sqnr = sqnr_db(rel)
    return LayerResult(relative_error=round(rel, 6), sqnr_db=None if sqnr is None else round(sqnr, 2),
                       limit=None if isinstance(layer, QuantLinear) else _allowed_relative_error(run.bits),
                       worst_adversarial_relative_error=round(worst["rel"], 6),
                       budget=None if budget is None else round(BUDGET_FACTOR * budget, 6), budget_source=source,
                       mixed_batch_ratio=round(ratio, 4))


def checks(run: RunConfig) -> Iterator[Check]:
    for name in subject(run).quantized_layers():
        yield Check(f"{run.prefix}/layer_bounds[{name}]", functools.partial(layer_bounds, run, name),
                    kind=LayerResult.kind, identity={"layer": name})
