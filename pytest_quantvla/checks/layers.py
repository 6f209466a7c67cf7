"""Layer-level error bounds: every linear the QuantVLA layout quantizes (LLM and DiT MLP), taken
from the model under test and quantized with the run's bit-width and the DuQuant transform, stays
within the analytic bound (quantvla.quant.bounds) on its own calibration activations and on
Hypothesis-generated adversarial ones (outlier channels, zero rows, magnitudes 1e-6..1e6)."""

from __future__ import annotations

import functools

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_quantvla.collect import CheckFailed
from quantvla.models import build
from quantvla.quant.bounds import output_error_bound, relative_error
from quantvla.quant.config import DuQuantConfig, linear_config
from quantvla.quant.linear import QuantLinear

QUANTIZED_ROLES = ("llm", "dit_mlp")
CALIB_ROWS = 256
ADVERSARIAL_EXAMPLES = 25


@functools.lru_cache(maxsize=4)
def model_and_activations(model_name: str, size: str, seed: int):
    """The FP model (seeded) and, per quantized linear, up to CALIB_ROWS input rows recorded
    through the model's own forward pass on seeded example inputs."""
    torch.manual_seed(seed)
    model = build(model_name, size)
    mods = dict(model.named_modules())
    names = [n for n, r in model.linear_roles().items() if r in QUANTIZED_ROLES]
    acts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [mods[n].register_forward_hook(
        lambda _m, args, _out, n=n: acts[n].append(args[0].detach().reshape(-1, args[0].shape[-1]).float()))
        for n in names]
    try:
        for i in range(2):
            model.sample_actions(model.example_inputs(seed=seed + i), generator=torch.Generator().manual_seed(seed + i))
    finally:
        for h in hooks:
            h.remove()
    # pi0.5's last VLM layer runs only k/v for the actions: its q/o/MLP never see real inputs,
    # so they get seeded Gaussian rows (and the report says so)
    gen = torch.Generator().manual_seed(seed)
    calib = {n: torch.cat(v)[:CALIB_ROWS] if v else torch.randn(CALIB_ROWS, mods[n].in_features, generator=gen)
             for n, v in acts.items()}
    synthetic = frozenset(n for n, v in acts.items() if not v)
    return model, mods, calib, synthetic


def _check_within_bound(layer: QuantLinear, lin, x: torch.Tensor, what: str) -> float:
    ref, bound = output_error_bound(layer, lin.weight, x, lin.bias)
    out = layer(x).to(torch.float64)
    err = (out - ref).abs()
    over = err > bound
    if bool(over.any()):
        m, n = (int(i) for i in over.nonzero()[0])
        raise CheckFailed(f"{layer.name}: on {what}, output [{m}, {n}] is off by {float(err[m, n]):.4g}, "
                          f"over the {layer.config.tag} bound {float(bound[m, n]):.4g} "
                          f"({int(over.sum())} of {over.numel()} outputs over)")
    return relative_error(out, ref)


def layer_bounds(run, name: str) -> dict:
    _, mods, calib, synthetic = model_and_activations(run.model, run.config, run.seed)
    lin, x = mods[name], calib[name]
    layer = QuantLinear.from_linear(lin, linear_config(run.bits, transform=DuQuantConfig()), calib=x, name=name)
    rel = _check_within_bound(layer, lin, x, "calibration activations")
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
        worst["rel"] = max(worst["rel"], _check_within_bound(layer, lin, xa, "adversarial activations"))

    adversarial()
    return {"relative_error": round(rel, 6), "worst_adversarial_relative_error": round(worst["rel"], 6),
            "calibration": "synthetic (not on the action path)" if name in synthetic else "recorded"}


def checks(run):
    calib = model_and_activations(run.model, run.config, run.seed)[2]
    prefix = f"quantvla/{run.model}/{run.bits}"
    for name in calib:
        yield f"{prefix}/layer_bounds[{name}]", functools.partial(layer_bounds, run, name), ()
