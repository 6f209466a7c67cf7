"""Golden statistics of the model under test: per-head logit Std and per-layer output RMS
(teacher and quantized), alpha and beta, action error against FP, compared with
golden/<model>-<config>-<quantizer>.json."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_quantvla import golden
from pytest_quantvla import subject as subject_module
from pytest_quantvla.checks import layers
from pytest_quantvla.collect import Check, CheckFailed
from pytest_quantvla.options import RunConfig
from pytest_quantvla.quantizers import preset_for
from pytest_quantvla.results import CheckResult
from pytest_quantvla.subject import subject
from quantvla.drift import paired_statistics


@dataclass(kw_only=True)
class GoldenResult(CheckResult):
    """extra: action_cosine_mean, per_block (the paper's Fig. 3), golden_update (what was written)."""

    kind = "golden_statistics"
    action_mse: float
    action_cosine_min: float
    golden: str  # the golden file compared with (or written)

    def measured(self) -> str:
        return f"action MSE {self.action_mse:.3g}, cos {self.action_cosine_min:.4f}"

    def reference(self) -> str:
        return Path(self.golden).name

    def row(self, name: str, verdict: str) -> list[str]:
        return [name, self.measured(), self.reference(), f"{Path(self.golden).parent.name}/", verdict]


def measure(run: RunConfig) -> dict[str, Any]:
    s = subject(run)
    stats = paired_statistics(s.fp, s.quantized, s.held_out)
    return {"model": run.model, "config": run.size, "quantizer": run.quantizer, "bits": run.bits,
            "seed": run.seed, "quantized_layers": len(s.quantized_layers()), **stats}


def per_block(run: RunConfig, stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Per DiT attention block: mean logit Std over heads and output RMS, teacher and quantized,
    and for the reference quantizer also the same layers without ATM/OHB, all on the held-out
    buffer: the data of the paper's Fig. 3."""
    s = subject(run)
    uncalibrated = {}
    cfg = preset_for(run.quantizer, run.bits)
    if cfg is not None and (cfg.atm or cfg.ohb):
        plain = subject_module.uncalibrated(run)
        uncalibrated = {site["name"]: site for site in paired_statistics(s.fp, plain, s.held_out)["sites"]}
    rows = []
    for site in stats["sites"]:
        row = {"name": site["name"], "teacher_std": sum(site["teacher_std"]) / len(site["teacher_std"]),
               "quantized_std": sum(site["student_std"]) / len(site["student_std"]),
               "teacher_rms": site["teacher_rms"], "quantized_rms": site["student_rms"]}
        u = uncalibrated.get(site["name"])
        if u is not None:
            row["uncalibrated_std"] = sum(u["student_std"]) / len(u["student_std"])
            row["uncalibrated_rms"] = u["student_rms"]
        rows.append(row)
    return rows


def golden_statistics(run: RunConfig) -> GoldenResult:
    folder = golden.folder(run)
    path = folder / golden.golden_name(run)
    got = {**measure(run), "layer_relative_error": layers.layer_errors(run)}
    summary = GoldenResult(action_mse=got["action_mse"], action_cosine_min=got["action_cosine_min"], golden=str(path),
                           extra={"action_cosine_mean": got["action_cosine_mean"], "per_block": per_block(run, got)})
    if run.update_golden:
        changes = _changes(path, got)
        _write(path, got)
        summary.extra["golden_update"] = f"wrote {path}: " + "; ".join(changes[:10]) + (
            f" (and {len(changes) - 10} more)" if len(changes) > 10 else "")
        return summary
    expected = golden.load(path)
    if expected is None and golden.own_baseline(run):
        # The first run of a third-party quantizer or on a user's checkpoint: the checks against FP
        # and the paper decide; its own regression baseline is what it measured now, recorded for
        # later runs to compare against.
        _write(path, got)
        summary.extra["golden_update"] = f"baseline recorded at {path}; commit it (later runs compare against it)"
        return summary
    if expected is None:
        opts = f"{golden.subject_options(run)} --quantvla-bits={run.bits}"
        if run.quantizer != "quantvla":
            opts += f" --quantvla-quantizer={run.quantizer}"
        raise CheckFailed(f"no golden at {path}; create it with: pytest {opts} --quantvla-update-golden "
                          f"-k golden_statistics" + (f" --quantvla-golden-dir={folder}" if run.golden_dir else ""))
    diff = golden.compare(expected, got)
    if diff:
        more = f"\n  ... and {len(diff) - 15} more" if len(diff) > 15 else ""
        raise CheckFailed(f"statistics differ from {path} beyond tolerance:\n  " + "\n  ".join(diff[:15]) + more)
    return summary


def _write(path: Path, got: dict[str, Any]) -> None:
    try:
        golden.write(path, got)
    except OSError as err:
        raise CheckFailed(f"cannot write the golden {path} ({type(err).__name__}: {err.strerror or err}); pass "
                          "--quantvla-golden-dir=<a writable folder>") from None


def _changes(path: Path, got: dict[str, Any]) -> list[str]:
    """What an update changes; an unreadable or foreign old golden is simply replaced (update mode
    is the advised way out of it)."""
    try:
        expected = golden.load(path)
        return ["new golden"] if expected is None else golden.compare(expected, got) or ["no change"]
    except golden.GoldenError as err:
        return [f"replaced an unreadable golden ({err})".replace("; regenerate it with --quantvla-update-golden", "")]


def checks(run: RunConfig) -> Iterator[Check]:
    yield Check(f"{run.prefix}/golden_statistics", functools.partial(golden_statistics, run), kind=GoldenResult.kind)
