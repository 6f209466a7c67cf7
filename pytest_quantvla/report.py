"""The run's summary: a table (tabulate) of every built-in check with its measured value, the
reference it is held to and that reference's source, and the verdict; the JSON report; a PNG of
per-block attention statistics (the paper's Fig. 3) beside it."""

from __future__ import annotations

from pathlib import Path

from tabulate import tabulate

from quantvla.io import atomic_write, write_json_atomic


def _row(nodeid: str, r: dict) -> list:
    verdict = r["outcome"]
    check = nodeid.split("/")[-1]
    if "kernel_exact" in nodeid:
        gemm = f" ({r['gemm']} GEMM)" if r.get("gemm") else ""
        return [check, f"{r.get('probes', '-')} probes{gemm}", "int64 oracle, bit for bit", "quantvla.quant.kernels",
                verdict]
    if "memory[full" in nodeid and "saving" in r:
        return [check, f"{r['fp16_gib']:.2f} -> {r['storage_gib']:.3f} GiB ({r['saving']:.1%} saved)",
                f"<= {r['paper_quantized']} GB, >= {r['paper_saving']:.1%} saved",
                "paper Table 2 (reference/paper.json)", verdict]
    if "memory[" in nodeid and "saving" in r:
        return [check, f"{r['fp16_bytes']} -> {r['storage_bytes']} B ({r['saving']:.1%} saved)",
                f"<= {r['budget_bytes']} B", "bit-width + 32 B/channel", verdict]
    if "golden_statistics" in nodeid and "action_mse" in r:
        cosine = f", cos {r['action_cosine_min']:.4f}" if "action_cosine_min" in r else ""
        golden = Path(r["golden"])
        return [check, f"action MSE {r['action_mse']:.3g}{cosine}", golden.name, f"{golden.parent.name}/", verdict]
    if "attention_drift" in nodeid and "logit_std_drift" in r:
        return [check, f"std {r['logit_std_drift']:.4f}, rms {r['output_rms_drift']:.4f}",
                f"reference std {r['reference_logit_std_drift']:.4f}, rms {r['reference_output_rms_drift']:.4f}",
                "golden/ (quantvla)", verdict]
    if "calibration_recovery" in nodeid and "atm_reduction" in r:
        return [check, f"planted drift cut {r['atm_reduction']:.1f}x (ATM), {r['ohb_reduction']:.1f}x (OHB)",
                ">= 2x each; alpha per head, clip, band", "pytest_quantvla/checks/calibration.py", verdict]
    if "outlier_layer" in nodeid and "oracle_relative_error" in r:
        return [check, f"rel. error {r['relative_error']:.4f}" + (
                f"; peak/RMS {r['peak_to_rms_without_transform']:.1f} -> {r['peak_to_rms']:.1f}"
                if "peak_to_rms" in r else ""),
                f"<= 1.1 x plain grids {r['oracle_relative_error']:.4f}; transform exact",
                "pytest_quantvla/checks/transform.py", verdict]
    return [check, (r.get("message") or "").splitlines()[-1][:60] if verdict == "failed" else "-", "-", "-", verdict]


def table(results: dict) -> str:
    rows, layers = [], [r for k, r in results.items() if "/layer_bounds[" in k]
    for nodeid, r in sorted(results.items()):
        if "/layer_bounds[" not in nodeid and "/libero[" not in nodeid:
            rows.append(_row(nodeid, r))
    if layers:
        rels = sorted(r["relative_error"] for r in layers if "relative_error" in r)  # a failed layer has none
        sqnr = min((r["sqnr_db"] for r in layers if r.get("sqnr_db") is not None), default=None)
        failed = sum(r["outcome"] != "passed" for r in layers)
        limit = max((r["limit"] for r in layers if "limit" in r), default=None)
        foreign = limit is not None or any("layer_error.json" in (r.get("message") or "") for r in layers)
        held = "analytic bound per element" if not foreign else f"rel. error <= {limit or 'the bits limit'}"
        measured = "-" if not rels else (f"rel. error median {rels[len(rels) // 2]:.4f}, max {rels[-1]:.4f}"
                                         + (f" ({len(rels)} passed)" if failed else "")
                                         + (f"; SQNR >= {sqnr:.1f} dB" if sqnr is not None else ""))
        rows.append([f"layer_bounds ({len(layers)} layers)", measured, f"{held}; 1.25 x golden's error",
                     "reference/layer_error.json" if foreign else "docs/quantizer.md",
                     "passed" if not failed else f"{failed} failed"])
    if not rows:  # a run of LIBERO pairs only: the gate lines say it all
        return ""
    return tabulate(rows, headers=["check", "measured", "reference", "source", "verdict"])


def layer_table(results: dict) -> str:
    """One row per quantized layer (shown with -v): the same table for the reference's QuantLinear
    and for any library's layers."""
    rows = []
    for nodeid, r in sorted(results.items()):
        if "/layer_bounds[" in nodeid:
            rows.append([nodeid.split("/layer_bounds[")[1].rstrip("]"), r.get("relative_error", "-"),
                         r.get("sqnr_db", "-"), r.get("worst_adversarial_relative_error", "-"),
                         r.get("limit", "analytic"), r.get("budget") or "-", r["outcome"]])
    if not rows:
        return ""
    return tabulate(rows, headers=["layer", "rel. error", "SQNR dB", "worst adversarial", "limit", "budget",
                                   "verdict"])


def write_json(path: Path, run, results: dict, verdicts: dict, partial: bool = False) -> None:
    """`partial`: the run was interrupted, so the checks and gates cover only what finished."""
    write_json_atomic(path, {"run": {k: str(v) if v is not None else None for k, v in run.__dict__.items()},
                             "partial": partial, "checks": results,
                             "gates": {s: v.to_dict() for s, v in verdicts.items()}})


def write_plot(path: Path, results: dict) -> bool:
    """PNG of per-block logit Std and output RMS: teacher, quantized, and before calibration."""
    blocks = next((r["per_block"] for k, r in results.items() if k.endswith("/golden_statistics")
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
