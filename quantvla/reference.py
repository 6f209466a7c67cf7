"""The paper's numbers and the evaluation protocols, as data (reference/, found by quantvla.data)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from quantvla.data import data_dir


def reference_dir() -> Path:
    return data_dir("reference")


@lru_cache(maxsize=1)
def paper() -> dict:
    return json.loads((reference_dir() / "paper.json").read_text())


# Our presets that the paper's QuantVLA row stands for: the paper verbatim (round to nearest) and
# our reference (the same recipe with GPTQ rounding) are held to the same published result.
PAPER_ROW = {"quantvla-rtn-w4a8": "quantvla-w4a8"}


def paper_delta(model: str, quantizer: str, suite: str) -> float:
    """The paper's quantized-minus-FP16 success difference (a fraction) for a suite; 0 when the paper
    has no row for this quantizer."""
    success = paper()["success"]
    rows = success.get(model, {})
    quantizer = PAPER_ROW.get(quantizer, quantizer)
    if quantizer not in rows:
        return 0.0
    i = success["suites"].index(suite)
    return (rows[quantizer][i] - rows["fp16"][i]) / 100
