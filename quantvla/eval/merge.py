"""Merge the JSON reports of sharded runs (nightly: suites spread over a CI matrix) and decide
each suite's gate once over all pairs, exactly as a single run would."""

from __future__ import annotations

import json
from pathlib import Path

from quantvla.eval.stats import paired_gate
from quantvla.io import write_json_atomic
from quantvla.reference import paper_delta


def merge(reports: list[Path], margin: float | None = None) -> dict:
    runs, checks = [], {}
    for path in reports:
        data = json.loads(Path(path).read_text())
        runs.append(data["run"])
        for nodeid, result in data["checks"].items():
            if nodeid in checks and checks[nodeid] != result:
                raise ValueError(f"{nodeid} appears in two reports with different results: shards overlap")
            checks[nodeid] = result
    keys = {(r["model"], r["config"], r["bits"], r["quantizer"], r["seed"]) for r in runs}
    if len(keys) != 1:
        raise ValueError(f"the reports come from different runs: {sorted(keys)}")
    run = runs[0]
    margin = float(run["margin"]) if margin is None else margin
    quantizer = run["quantizer"] if run["quantizer"] != "quantvla" else f"quantvla-{run['bits']}"
    gates = {suite: v.to_dict() for suite, v in gates_from_checks(checks, run["model"], quantizer, margin).items()}
    return {"run": run, "shards": len(reports), "checks": checks, "gates": gates}


def gates_from_checks(checks: dict, model: str, quantizer: str, margin: float) -> dict:
    """One verdict per suite from the pair items' results (a pair whose item did not pass counts
    as errored on both sides: never a success, and the gate is at best inconclusive)."""
    pairs: dict[str, list] = {}
    for nodeid, r in sorted(checks.items()):
        if "/libero[" in nodeid:
            suite = nodeid.split("/libero[")[1].split("/")[0]
            ok = r.get("outcome") == "passed"
            pair = (r.get("fp_success"), r.get("q_success")) if ok else (None, None)
            pairs.setdefault(suite, []).append(pair)
    return {suite: paired_gate([f for f, _ in o], [q for _, q in o], paper_delta(model, quantizer, suite), margin)
            for suite, o in pairs.items()}


def main(out: str, inputs: list[str]) -> int:
    merged = merge([Path(p) for p in inputs])
    write_json_atomic(out, merged)
    for suite, g in merged["gates"].items():
        print(f"{suite}: {g['verdict']} over {g['pairs']} pairs ({g['reason']})")
    return 1 if any(g["verdict"] == "fail" for g in merged["gates"].values()) else 0
