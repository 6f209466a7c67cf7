"""Attention drift against the reference quantizer. The paper's diagnosis (Sec. 3.2.2) is that
quantization shifts the DiT attention's temperature (logit Std per head) and energy (output RMS
per layer). For any quantizer, the worst |log(quantized / FP)| of both, measured on the held-out
buffer, may exceed the reference quantizer's (its golden: golden/<model>-<config>-quantvla-<bits>.json;
weight-only settings against the reference's a8 setting at the same weight bits)
by at most DRIFT_FACTOR, or DRIFT_SLACK in absolute terms, whichever allows more."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pytest_quantvla import golden
from pytest_quantvla.checks.golden import measure
from pytest_quantvla.collect import Check, CheckFailed
from pytest_quantvla.options import RunConfig
from pytest_quantvla.results import CheckResult

DRIFT_FACTOR = 1.5
DRIFT_SLACK = 0.005


@dataclass(kw_only=True)
class DriftResult(CheckResult):
    kind = "attention_drift"
    source = "golden/ (quantvla)"
    logit_std_drift: float
    output_rms_drift: float
    reference_logit_std_drift: float
    reference_output_rms_drift: float

    def measured(self) -> str:
        return f"std {self.logit_std_drift:.4f}, rms {self.output_rms_drift:.4f}"

    def reference(self) -> str:
        return f"reference std {self.reference_logit_std_drift:.4f}, rms {self.reference_output_rms_drift:.4f}"


def worst_drift(stats: dict[str, Any]) -> dict[str, Any]:
    """Largest |log(student/teacher)| of logit Std (over heads) and output RMS (over layers), with where."""
    std = max(((abs(math.log(s / t)), f"{site['name']} head {h}")
               for site in stats["sites"] for h, (s, t) in enumerate(zip(site["student_std"], site["teacher_std"],
                                                                         strict=True)) if s > 0 and t > 0),
              default=(0.0, "-"))
    rms = max(((abs(math.log(site["student_rms"] / site["teacher_rms"])), site["name"])
               for site in stats["sites"] if site["student_rms"] > 0 and site["teacher_rms"] > 0), default=(0.0, "-"))
    return {"logit_std": std, "output_rms": rms}


def attention_drift(run: RunConfig) -> DriftResult:
    ref_run = dataclasses.replace(run, quantizer="quantvla", bits=run.reference_bits)
    path = golden.folder(ref_run) / golden.golden_name(ref_run)
    reference = golden.load(path)
    ours = measure(run)
    if reference is None and golden.own_baseline(ref_run) and path == golden.folder(run) / golden.golden_name(run):
        reference = ours  # the reference quantizer's first run on this checkpoint: golden_statistics records it
    if reference is None:
        raise CheckFailed(f"no reference golden at {path}; create it with: pytest {golden.subject_options(run)} "
                          f"--quantvla-bits={ref_run.bits} --quantvla-update-golden -k golden_statistics")
    got, ref = worst_drift(ours), worst_drift(reference)
    problems = []
    for key, label in (("logit_std", "logit Std"), ("output_rms", "output RMS")):
        (value, where), (ref_value, _) = got[key], ref[key]
        limit = max(DRIFT_FACTOR * ref_value, ref_value + DRIFT_SLACK)
        if value > limit:
            problems.append(f"{label} drift |log(quantized/FP)| = {value:.4f} at {where}, over the limit "
                            f"{limit:.4f} (the larger of {DRIFT_FACTOR}x and +{DRIFT_SLACK} over the reference "
                            f"quantvla-{ref_run.bits}'s {ref_value:.4f})")
    if problems:
        raise CheckFailed("; ".join(problems))
    return DriftResult(logit_std_drift=round(got["logit_std"][0], 6), output_rms_drift=round(got["output_rms"][0], 6),
                       reference_logit_std_drift=round(ref["logit_std"][0], 6),
                       reference_output_rms_drift=round(ref["output_rms"][0], 6))


def checks(run: RunConfig) -> Iterator[Check]:
    yield Check(f"{run.prefix}/attention_drift", functools.partial(attention_drift, run), kind=DriftResult.kind)
