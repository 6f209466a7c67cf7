"""Golden statistics: expected files beside the plugin, compared under documented tolerances,
regenerated with --quantvla-update-golden (atomic write, with a summary of what changed)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from pytest_quantvla.options import RunConfig
from quantvla.io import write_json_atomic

# Tolerances. Statistics are deterministic for a seed on one machine; these absorb BLAS and
# oneDNN differences across CPUs while catching any change to the quantizer's numbers.
REL_STATS = 0.02  # logit Std, output RMS: 2% relative
ABS_SCALES = 1e-3  # alpha, beta
REL_ACTION = 0.25  # action MSE: 25% relative (a squared, small quantity)
ABS_ACTION = 1e-9


def own_baseline(run: RunConfig) -> bool:
    """Whether the run's golden is its own regression baseline, recorded on its first run under
    <rootdir>/quantvla-golden: a third-party quantizer's, and any quantizer's on a checkpoint given
    with --quantvla-checkpoint (the shipped goldens were measured on the shipped subjects' weights
    and say nothing about other weights)."""
    from pytest_quantvla.quantizers import is_reference

    return run.checkpoint is not None or not is_reference(run.quantizer)


def folder(run: RunConfig) -> Path:
    """Where a run's golden lives: --quantvla-golden-dir when given; else <rootdir>/quantvla-golden
    for a run that records its own baseline (own_baseline), and the goldens shipped with the plugin
    for the reference quantizer and its presets on the shipped subjects."""
    from quantvla.data import data_dir

    if run.golden_dir is not None:
        return run.golden_dir
    if own_baseline(run):
        return (run.rootdir or Path.cwd()) / "quantvla-golden"
    return data_dir("golden")


def checkpoint_tag(checkpoint: Path) -> str:
    """A file-name-safe tag for a checkpoint: its folder's name or its file's stem."""
    name = checkpoint.name if checkpoint.is_dir() else checkpoint.stem
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "checkpoint"


def golden_name(run: RunConfig) -> str:
    q = run.quantizer_name
    if ":" in q or "." in q:
        q = q.replace(":", "_").replace(".", "_") + f"-{run.bits}"
    seed = f"-seed{run.seed}" if run.seed else ""
    weights = f"-{checkpoint_tag(run.checkpoint)}" if run.checkpoint is not None else ""
    return f"{run.model}-{run.size}{weights}-{q}{seed}.json"


def subject_options(run: RunConfig) -> str:
    """The command-line options that name the run's subject (for the commands error messages give)."""
    opts = f"--quantvla-model={run.model} --quantvla-config={run.size}"
    return opts + (f" --quantvla-checkpoint={run.checkpoint}" if run.checkpoint is not None else "")


def _close(a: float, b: float, rel: float, abs_: float) -> bool:
    return abs(a - b) <= max(abs_, rel * max(abs(a), abs(b)))


def compare(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """Differences beyond tolerance, as readable lines (empty when everything matches)."""
    try:
        return _compare(expected, got)
    except (KeyError, TypeError, ValueError) as err:
        raise GoldenError(f"the golden lacks or mangles a field ({type(err).__name__}: {err}); regenerate it with "
                          "--quantvla-update-golden") from None


def _compare(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    out = []
    if expected.get("quantized_layers") != got.get("quantized_layers"):
        out.append(f"quantized layers: {expected.get('quantized_layers')} -> {got.get('quantized_layers')}")
    if not _close(expected["action_mse"], got["action_mse"], REL_ACTION, ABS_ACTION):
        out.append(f"action MSE: {expected['action_mse']:.4g} -> {got['action_mse']:.4g}")
    e_sites = {s["name"]: s for s in expected["sites"]}
    for s in got["sites"]:
        e = e_sites.get(s["name"])
        if e is None:
            out.append(f"{s['name']}: not in the golden")
            continue
        for key in ("teacher_std", "student_std"):
            for h, (a, b) in enumerate(zip(e[key], s[key], strict=True)):
                if not _close(a, b, REL_STATS, 1e-12):
                    out.append(f"{s['name']} head {h} {key}: {a:.5g} -> {b:.5g}")
        for key in ("teacher_rms", "student_rms"):
            if not _close(e[key], s[key], REL_STATS, 1e-12):
                out.append(f"{s['name']} {key}: {e[key]:.5g} -> {s[key]:.5g}")
        for key in ("alpha", "beta"):
            a, b = e.get(key), s.get(key)
            a_list = a if isinstance(a, list) else [a]
            b_list = b if isinstance(b, list) else [b]
            if (a is None) != (b is None) or (a is not None and any(
                    not math.isclose(x, y, abs_tol=ABS_SCALES) for x, y in zip(a_list, b_list, strict=True))):
                out.append(f"{s['name']} {key}: {a} -> {b}")
    return out


class GoldenError(ValueError):
    """A golden file that cannot be read or lacks what a comparison needs."""


def load(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "sites" not in data or "action_mse" not in data:
            raise ValueError("it lacks 'sites' or 'action_mse'")
        return data
    except ValueError as err:
        raise GoldenError(f"golden {path} is corrupt ({err}); regenerate it with --quantvla-update-golden") from None


def write(path: Path, data: dict[str, Any]) -> None:
    """Stamped with the library version that measured it (compare() ignores the stamp)."""
    from quantvla import __version__

    write_json_atomic(path, {"quantvla_version": __version__, **data})
