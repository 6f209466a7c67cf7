"""reference/: the paper's numbers as data, consistent with themselves."""

import json
from pathlib import Path

REF = Path(__file__).resolve().parents[1] / "reference"


def test_paper_tables_are_consistent():
    paper = json.loads((REF / "paper.json").read_text())
    t = paper["tables"]
    for model in ("pi05", "gr00t-n15"):
        for table in ("table1_layer_selection_no_atm_ohb", "table2_main"):
            for row in t[table][model]:
                # reported averages are the mean of the four suites, rounded half up to 0.1 (paper.md)
                assert abs(sum(row["success"]) / 4 - row["avg"]) <= 0.05 + 1e-9, (model, row)
        main = {r["method"]: r for r in t["table2_main"][model]}
        assert paper["success"][model]["quantvla-w4a8"] == main["QuantVLA"]["success"]
        assert paper["memory_gb"][model]["quantvla-w4a8"] == main["QuantVLA"]["memory_gb"]
        saving = 1 - main["QuantVLA"]["memory_gb"] / main["FP16"]["memory_gb"]
        assert round(saving, 3) == paper["memory_gb"][model]["quantvla-w4a8_saving"]
        assert "source" in t["table2_main"]
    assert [r["count"] for r in t["table1_layer_selection_no_atm_ohb"]["pi05"]][-1] == 180


def test_protocols_and_layer_error_limits_parse():
    protocols = json.loads((REF / "protocols.json").read_text())
    assert {"openpi", "gr00t", "quantvla-pi05"} <= set(protocols)
    limits = json.loads((REF / "layer_error.json").read_text())["max_relative_error"]
    from quantvla.quantizer import BITS

    assert set(limits) == set(BITS)  # a limit for every bit-width a run can claim
