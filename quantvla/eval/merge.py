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
    """One verdict per suite from the pair items' results. A pair whose item did not pass (a
    crashed worker, an exception outside the episodes) is unknown on both sides: never a success,
    and the gate is at best inconclusive; the failed item fails the run by itself."""
    pairs: dict[str, list] = {}
    for nodeid, r in sorted(checks.items()):
        if "/libero[" in nodeid:
            suite = nodeid.split("/libero[")[1].split("/")[0]
            if r.get("outcome") == "passed":
                pair = (r.get("fp_success"), r.get("q_success"), bool(r.get("fp_policy_error")),
                        bool(r.get("q_policy_error")))
            else:
                pair = (None, None, False, False)
            pairs.setdefault(suite, []).append(pair)
    return {suite: paired_gate([p[0] for p in o], [p[1] for p in o], paper_delta(model, quantizer, suite), margin,
                               fp_errors=[p[2] for p in o], q_errors=[p[3] for p in o])
            for suite, o in pairs.items()}


def main(out: str, inputs: list[str], allow_inconclusive: bool = False) -> int:
    """Exit status: 1 when a gate fails, or is inconclusive and that is not accepted."""
    merged = merge([Path(p) for p in inputs])
    write_json_atomic(out, merged)
    for suite, g in merged["gates"].items():
        print(f"{suite}: {g['verdict']} over {g['pairs']} pairs ({g['reason']})")
    verdicts = [g["verdict"] for g in merged["gates"].values()]
    return 1 if "fail" in verdicts or ("inconclusive" in verdicts and not allow_inconclusive) else 0
