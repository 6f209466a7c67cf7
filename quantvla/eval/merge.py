"""Merge the JSON reports of sharded runs (nightly: suites spread over a CI matrix) and decide
each suite's gate once over all pairs, exactly as a single run would. A report holds its pairs as
quantvla.eval.gate.PairRecord dicts ("pairs"); the gate is decided by quantvla.eval.gate.gates."""

from __future__ import annotations

import json
from pathlib import Path

from quantvla.eval.gate import PairRecord, gates
from quantvla.io import write_json_atomic
from quantvla.presets import preset_name


def merge(reports: list[Path], margin: float | None = None) -> dict:
    runs, checks, pairs = [], {}, {}
    for path in reports:
        data = json.loads(Path(path).read_text())
        runs.append(data["run"])
        checks.update(data.get("checks", {}))
        for d in data.get("pairs", []):
            record = PairRecord.from_dict(d)
            key = (record.suite, record.task, record.init)
            if key in pairs and pairs[key] != record:
                raise ValueError(f"pair {key} appears in two reports with different outcomes: shards overlap")
            pairs[key] = record
    if not pairs:  # nothing to decide must never read as a passing gate
        raise ValueError("the reports hold no LIBERO pairs (\"pairs\"): were they written with -m libero, by "
                         "this version of pytest-quantvla?")
    keys = {(r["model"], r["size"], r["bits"], r["quantizer"], r["seed"]) for r in runs}
    if len(keys) != 1:
        raise ValueError(f"the reports come from different runs: {sorted(keys)}")
    run = runs[0]
    margin = float(run["margin"]) if margin is None else margin
    records = [pairs[k] for k in sorted(pairs)]
    verdicts = gates(records, run["model"], preset_name(run["quantizer"], run["bits"]), margin)
    return {"run": run, "shards": len(reports), "checks": checks, "pairs": [p.to_dict() for p in records],
            "gates": {suite: v.to_dict() for suite, v in verdicts.items()}}


def main(out: str, inputs: list[str], allow_inconclusive: bool = False) -> int:
    """Exit status: 1 when a gate fails, or is inconclusive and that is not accepted."""
    merged = merge([Path(p) for p in inputs])
    write_json_atomic(out, merged)
    for suite, g in merged["gates"].items():
        print(f"{suite}: {g['verdict']} over {g['pairs']} pairs ({g['reason']})")
    verdicts = [g["verdict"] for g in merged["gates"].values()]
    return 1 if "fail" in verdicts or ("inconclusive" in verdicts and not allow_inconclusive) else 0
