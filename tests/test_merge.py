"""Merging sharded reports gives the verdicts a single run would."""

import json

import pytest

from quantvla.__main__ import main
from quantvla.eval.merge import merge

RUN = {"model": "pi05", "size": "tiny", "bits": "w4a8", "quantizer": "quantvla", "seed": "0", "margin": "0.1"}


def _report(path, suite, ks, lose_every=0):
    pairs = [{"suite": suite, "task": k % 10, "init": k // 10, "fp": True,
              "quantized": not (lose_every and k % lose_every == 0), "fp_policy_error": False, "q_policy_error": False}
             for k in ks]
    path.write_text(json.dumps({"run": RUN, "checks": {}, "pairs": pairs, "gates": {}}))
    return path


def test_shards_merge_into_one_verdict_per_suite(tmp_path):
    a = _report(tmp_path / "a.json", "libero_spatial", range(0, 25))
    b = _report(tmp_path / "b.json", "libero_spatial", range(25, 50))
    c = _report(tmp_path / "c.json", "libero_object", range(0, 20), lose_every=2)
    merged = merge([a, b, c])
    assert merged["gates"]["libero_spatial"]["pairs"] == 50 and merged["gates"]["libero_spatial"]["verdict"] == "pass"
    assert merged["gates"]["libero_object"]["verdict"] == "fail"
    assert main(["merge-reports", str(tmp_path / "out.json"), str(a), str(b), str(c)]) == 1  # a failing gate
    assert main(["merge-reports", str(tmp_path / "ab.json"), str(a), str(b)]) == 0


def test_an_underpowered_merge_fails_unless_accepted(tmp_path):
    a = _report(tmp_path / "a.json", "libero_spatial", range(0, 20))  # 20 agreeing pairs: underpowered
    assert merge([a])["gates"]["libero_spatial"]["verdict"] == "inconclusive"
    assert main(["merge-reports", str(tmp_path / "out.json"), str(a)]) == 1
    assert main(["merge-reports", "--allow-inconclusive", str(tmp_path / "out.json"), str(a)]) == 0


def test_overlapping_or_foreign_shards_are_refused(tmp_path):
    a = _report(tmp_path / "a.json", "libero_spatial", range(0, 10))
    b = _report(tmp_path / "b.json", "libero_spatial", range(5, 15), lose_every=3)
    with pytest.raises(ValueError, match="shards overlap"):
        merge([a, b])
    other = json.loads(a.read_text())
    other["run"] = {**RUN, "bits": "w4a4"}
    (tmp_path / "o.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="different runs"):
        merge([a, tmp_path / "o.json"])


def test_reports_without_pairs_are_refused_not_passed(tmp_path):
    """A report of a run without -m libero (or from before reports held "pairs") decides nothing."""
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"run": RUN, "checks": {}, "gates": {}}))
    with pytest.raises(ValueError, match="no LIBERO pairs"):
        merge([a])
    assert main(["merge-reports", str(tmp_path / "out.json"), str(a)]) == 2
