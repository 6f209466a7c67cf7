"""The run's summary: a table (tabulate) of every built-in check with its measured value, the
reference it is held to and that reference's source, and the verdict; the JSON report; a PNG of
per-block attention statistics (the paper's Fig. 3) beside it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tabulate import tabulate

from pytest_quantvla.options import RunConfig
from pytest_quantvla.results import CheckResult
from quantvla.io import atomic_write, write_json_atomic

if TYPE_CHECKING:
    from quantvla.eval.gate import PairRecord

# Result kinds: the classes live beside their checks (pytest_quantvla/checks/), imported when a
# table is made (they pull in torch; an xdist controller never collects the checks itself).
LAYER, PAIR = "layer_bounds", "libero_pair"


def _register_kinds() -> None:
    import pytest_quantvla.checks  # noqa: F401 - defines every CheckResult kind


def _row(nodeid: str, entry: dict[str, Any]) -> list[Any]:
    """A check's row: its result renders it; a check that failed shows the last line of its message."""
    name, verdict = nodeid.split("/")[-1], entry["outcome"]
    _register_kinds()
    result = CheckResult.from_dict(entry)
    if result is not None:
        return result.row(name, verdict)
    failure = (entry.get("message") or "").splitlines()[-1][:60] if verdict == "failed" else "-"
    return [name, failure, "-", "-", verdict]


def table(results: dict[str, Any]) -> str:
    """The summary: a row per check, the layers in one row (LayerResult.summary_row), LIBERO pairs
    left to the gate lines."""
    from pytest_quantvla.checks.layers import LayerResult

    rows, layers = [], []
    for nodeid, entry in sorted(results.items()):
        if entry.get("kind") == LAYER:
            layers.append(entry)
        elif entry.get("kind") != PAIR:
            rows.append(_row(nodeid, entry))
    if layers:
        rows.append(LayerResult.summary_row(layers))
    if not rows:  # a run of LIBERO pairs only: the gate lines say it all
        return ""
    return str(tabulate(rows, headers=["check", "measured", "reference", "source", "verdict"]))


def layer_table(results: dict[str, Any]) -> str:
    """One row per quantized layer (shown with -v): the same table for the reference's QuantLinear
    and for any library's layers."""
    from pytest_quantvla.checks.layers import LayerResult

    rows = []
    for entry in sorted((e for e in results.values() if e.get("kind") == LAYER), key=lambda e: e["layer"]):
        result = CheckResult.from_dict(entry)
        if isinstance(result, LayerResult):
            rows.append(result.layer_row(entry["layer"], entry["outcome"]))
        else:
            rows.append([entry["layer"], "-", "-", "-", "-", "-", entry["outcome"]])
    if not rows:
        return ""
    return str(tabulate(rows, headers=["layer", "rel. error", "SQNR dB", "worst adversarial", "limit", "budget",
                                       "verdict"]))


def pair_records(results: dict[str, Any]) -> list[PairRecord]:
    """The LIBERO pairs of a run as the gate's records (quantvla.eval.gate.PairRecord), in a fixed
    order (xdist delivers them in any)."""
    from pytest_quantvla.checks.libero import pair_record

    pairs = [pair_record(e) for e in results.values() if e.get("kind") == PAIR]
    return sorted(pairs, key=lambda p: (p.suite, p.task, p.init))


def write_json(path: Path, run: RunConfig, results: dict[str, Any], verdicts: dict[str, Any],
               partial: bool = False) -> None:
    """`partial`: the run was interrupted, so the checks and gates cover only what finished."""
    from quantvla import __version__

    write_json_atomic(path, {"quantvla_version": __version__,
                             "run": {k: str(v) if v is not None else None for k, v in run.__dict__.items()},
                             "partial": partial, "checks": results,
                             "pairs": [p.to_dict() for p in pair_records(results)],
                             "gates": {s: v.to_dict() for s, v in verdicts.items()}})


def write_plot(path: Path, results: dict[str, Any]) -> bool:
    """PNG of per-block logit Std and output RMS: teacher, quantized, and before calibration."""
    blocks = next((r["per_block"] for r in results.values() if r.get("kind") == "golden_statistics"
                   and r.get("per_block")), None)
    if not blocks:
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    x = list(range(len(blocks)))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((axes[0], "std", "attention logit Std (mean over heads)"),
                           (axes[1], "rms", "attention output RMS")):
        ax.plot(x, [b[f"teacher_{key}"] for b in blocks], "o-", label="teacher (FP)")
        if all(f"uncalibrated_{key}" in b for b in blocks):
            ax.plot(x, [b[f"uncalibrated_{key}"] for b in blocks], "s--", label="quantized, no ATM/OHB")
        ax.plot(x, [b[f"quantized_{key}"] for b in blocks], "^-", label="quantized")
        ax.set_title(title)
        ax.set_xticks(x)
        ax.set_xlabel("DiT attention block")
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return True
