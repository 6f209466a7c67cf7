"""Success statistics and the paired non-inferiority gate."""

import pytest

from quantvla.eval.protocols import load_protocol
from quantvla.eval.stats import paired_gate, wilson


def test_wilson_matches_the_closed_form():
    r = wilson(45, 50)
    assert r.rate == 0.9
    # Wilson 95% for 45/50: (0.7864, 0.9565)
    assert r.low == pytest.approx(0.7864, abs=1e-3) and r.high == pytest.approx(0.9565, abs=1e-3)


def test_gate_passes_an_equal_quantizer_and_fails_a_broken_one():
    fp = [True] * 40 + [False] * 10
    same = list(fp)
    assert paired_gate(fp, same, paper_delta=0.0, margin=0.10).verdict == "pass"
    broken = [False] * 50  # every episode lost
    v = paired_gate(fp, broken, paper_delta=0.0, margin=0.10)
    assert v.verdict == "fail" and v.mean_difference == -0.8


def test_gate_is_inconclusive_near_the_margin_and_with_few_or_errored_episodes():
    fp = [True] * 30
    q = [True] * 27 + [False] * 3  # -10 points, exactly at a 10-point margin
    assert paired_gate(fp, q, 0.0, 0.10).verdict == "inconclusive"
    assert paired_gate([True] * 5, [True] * 5, 0.0, 0.1).verdict == "inconclusive"
    v = paired_gate([True] * 20, [True] * 19 + [None], 0.0, 0.1)
    assert v.verdict == "inconclusive" and "errored" in v.reason
    assert v.quantized.successes == 19  # an errored episode is never a success


def test_gate_uses_the_papers_delta():
    fp = [True] * 25 + [False] * 25
    q = list(fp)
    # the paper claims +2.5 points; with a 1-point margin, delta0 = +1.5 points: equal is not enough
    assert paired_gate(fp, q, paper_delta=0.025, margin=0.01).verdict != "pass"


def test_unpaired_outcomes_are_an_error():
    with pytest.raises(ValueError, match="unpaired"):
        paired_gate([True], [True, False], 0.0, 0.1)


def test_protocols_as_data():
    openpi, gr00t = load_protocol("openpi"), load_protocol("gr00t")
    assert openpi.steps_for("libero_10") == 520 and gr00t.steps_for("libero_10") == 1000
    assert (openpi.replan_steps, openpi.seed, openpi.trials_per_task) == (5, 7, 50)
    assert (gr00t.replan_steps, gr00t.denoising_steps, gr00t.binarize_gripper) == (1, 8, True)
    assert load_protocol("quantvla-pi05").seed == 42
