"""Bar charts for the benchmarks' PNGs (matplotlib, from the dev extra; skipped when it is absent)."""

from __future__ import annotations

from pathlib import Path

from quantvla.io import atomic_write


def grouped_bars(path: str | Path, labels: list[str], panels: list[tuple[str, dict[str, list[float]]]],
                 title: str = "", reference: float | None = None) -> bool:
    """One panel per (y label, {series: values per label}); False when matplotlib is missing.
    reference draws a dashed horizontal line (e.g. ratio 1.0) on every panel."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.0, 1.1 * len(labels) * len(panels) + 2), 3.8),
                             squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels, strict=True):
        width = 0.8 / max(1, len(series))
        for i, (name, values) in enumerate(series.items()):
            ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))], values, width, label=name)
        if reference is not None:
            ax.axhline(reference, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return True
