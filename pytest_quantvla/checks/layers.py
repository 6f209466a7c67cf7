"""Layer-level error bounds. Every linear the quantizer replaced, fed its own calibration
activations and Hypothesis-generated adversarial ones (outlier channels, zero rows, magnitudes
1e-6..1e6), must stay within:
  - for QuantLinear (the reference): the analytic bound of quantvla.quant.bounds, element by element;
  - for any other layer type (third-party quantizers): the relative output error allowed for the
    bit-width in reference/layer_error.json.
"""

from __future__ import annotations

import functools
import json

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_quantvla.collect import CheckFailed
from pytest_quantvla.subject import subject
from quantvla import preset
from quantvla.api import record_activations
from quantvla.quant.bounds import output_error_bound, relative_error, sqnr_db
from quantvla.quant.linear import QuantLinear
from quantvla.reference import reference_dir

ADVERSARIAL_EXAMPLES = 25


@functools.lru_cache(maxsize=2)
def _activations(run) -> dict[str, torch.Tensor]:
    s = subject(run)
    return record_activations(s.fp, s.quantized_layers(), s.calibration, preset("quantvla-w4a8", max_rows=256))


def _allowed_relative_error(bits: str) -> float:
    return json.loads((reference_dir() / "layer_error.json").read_text())["max_relative_error"][bits]


def _check(layer, lin, x: torch.Tensor, what: str, name: str, bits: str) -> float:
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


def layer_bounds(run, name: str) -> dict:
    s = subject(run)
    lin, layer = s.fp.get_submodule(name), s.quantized.get_submodule(name)
    x = _activations(run)[name]
    rel = _check(layer, lin, x, "calibration activations", name, run.bits)
    worst = {"rel": 0.0}

    @settings(max_examples=ADVERSARIAL_EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(rows=st.lists(st.integers(0, x.shape[0] - 1), min_size=1, max_size=16),
           channel=st.integers(0, x.shape[1] - 1), boost=st.sampled_from([1.0, 30.0, 1e3]),
           scale=st.sampled_from([1e-6, 1e-2, 1.0, 1e2, 1e6]), zero_row=st.booleans())
    def adversarial(rows, channel, boost, scale, zero_row):
        xa = x[rows].clone() * scale
        xa[:, channel] *= boost
        if zero_row:
            xa[0] = 0.0
        if not isinstance(layer, QuantLinear) and (boost > 1 or zero_row):
            return  # foreign layers are held to a relative error on realistic inputs only
        worst["rel"] = max(worst["rel"], _check(layer, lin, xa, "adversarial activations", name, run.bits))

    adversarial()
    sqnr = sqnr_db(rel)
    return {"relative_error": round(rel, 6), "sqnr_db": None if sqnr is None else round(sqnr, 2),
            "worst_adversarial_relative_error": round(worst["rel"], 6)}


def checks(run):
    for name in subject(run).quantized_layers():
        yield f"{run.prefix}/layer_bounds[{name}]", functools.partial(layer_bounds, run, name), ()
