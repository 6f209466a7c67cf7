"""Success statistics and the paired non-inferiority gate (exact score test on the paired table),
with its error rates measured by simulation."""

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from quantvla.eval.gate import (
    confidence_limits,
    decide,
    detectable_regression,
    paired_gate,
    pass_probability,
    tango_z,
    wilson,
)
from quantvla.eval.protocols import load_protocol


def test_wilson_matches_the_closed_form():
    r = wilson(45, 50)
    assert r.rate == 0.9
    # Wilson 95% for 45/50: (0.7864, 0.9565)
    assert r.low == pytest.approx(0.7864, abs=1e-3) and r.high == pytest.approx(0.9565, abs=1e-3)


@pytest.mark.parametrize("gains,losses,n,delta", [(3, 5, 20, -0.1), (0, 0, 20, -0.1), (2, 0, 20, -0.2),
                                                  (1, 4, 20, 0.05), (0, 7, 30, -0.3)])
def test_tango_statistic_uses_the_restricted_maximum_likelihood(gains, losses, n, delta):
    """The closed-form root equals a numeric maximisation of the trinomial likelihood on Delta = delta."""
    def nll(q):
        return -(losses * np.log(q) + gains * np.log(q + delta) + (n - gains - losses) * np.log(1 - 2 * q - delta))
    q = minimize_scalar(nll, bounds=(max(0, -delta) + 1e-12, (1 - delta) / 2 - 1e-12), method="bounded",
                        options={"xatol": 1e-12}).x
    expected = (gains - losses - n * delta) / np.sqrt(n * (2 * q + delta * (1 - delta)))
    assert float(tango_z(gains, losses, n, delta)) == pytest.approx(expected, rel=1e-6)


def pairs(rng, n, p11, p10, p01):
    """n (FP, quantized) outcome pairs from the joint distribution (p00 is the rest)."""
    p = np.array([p11, p10, p01, max(0.0, 1 - p11 - p10 - p01)])
    cell = rng.choice(4, size=n, p=p / p.sum())
    return [c in (0, 1) for c in cell], [c in (0, 2) for c in cell]


def table(fp, q):
    gains = sum(b and not a for a, b in zip(fp, q, strict=True))
    losses = sum(a and not b for a, b in zip(fp, q, strict=True))
    return gains, losses


def simulated_pass_rate(n, p11, p10, p01, draws, seed):
    """Share of "pass" over seeded draws of n pairs, each decided by the gate's decision on its
    table (paired_gate's own verdict is that decision: test_the_gate_reports_its_decision)."""
    rng = np.random.default_rng(seed)
    return sum(decide(*table(*pairs(rng, n, p11, p10, p01)), n, delta0=-0.10)[0] == "pass"
               for _ in range(draws)) / draws


def test_the_gate_reports_its_decision():
    rng = np.random.default_rng(0)
    for n, cells in ((10, (0.6, 0.3, 0.1)), (20, (0.85, 0.1, 0.0)), (50, (0.5, 0.2, 0.1)), (50, (0.9, 0.05, 0.05))):
        for _ in range(4):
            fp, q = pairs(rng, n, *cells)
            v = paired_gate(fp, q, paper_delta=0.0, margin=0.10)
            assert v.decision == decide(*table(fp, q), n, -0.10)[0]


# On the boundary Delta = delta0 = -0.10: FP near 1 (LIBERO policies), near 0.5, and between.
BOUNDARY = {"fp 0.98, no gains": (0.88, 0.10, 0.0), "fp 0.5": (0.3, 0.2, 0.1), "fp 0.8, few gains": (0.63, 0.17, 0.07)}


@pytest.mark.parametrize("n", [10, 20, 50])
@pytest.mark.parametrize("setting", list(BOUNDARY))
def test_false_pass_rate_at_the_margin_is_at_most_five_percent(n, setting):
    p11, p10, p01 = BOUNDARY[setting]
    assert p01 - p10 == pytest.approx(-0.10)
    rate = simulated_pass_rate(n, p11, p10, p01, draws=4000, seed=n)
    exact = pass_probability(n, -0.10, p_gain=p01, p_loss=p10)
    print(f"n={n} {setting}: simulated false-pass {rate:.4f}, exact {exact:.4f}")
    assert rate <= 0.05 and exact <= 0.05
    assert abs(rate - exact) < 0.012  # the simulation and the enumeration agree (4000 draws: sd <= 0.0035)


def test_power_at_no_true_difference_is_measured_for_the_default_and_grows_with_pairs():
    # a quantizer equal to FP, FP at 0.95, 5% of pairs discordant each way
    powers = {n: simulated_pass_rate(n, 0.90, 0.05, 0.05, draws=3000, seed=1) for n in (20, 50, 100)}
    print("power at Delta = 0, delta0 = -0.10:", powers)
    assert powers[20] < powers[50] < powers[100]
    assert powers[100] > 0.8 and powers[20] < 0.5  # 20 pairs cannot certify a 10-point margin


def test_agreeing_pairs_are_underpowered_not_a_pass():
    """Every pair agreeing used to give p = 0; 0 losses in 20 pairs still allow ~14% (rule of three)."""
    v = paired_gate([True] * 20, [True] * 20, paper_delta=0.0, margin=0.10)
    assert v.decision == "inconclusive" and "underpowered" in v.reason
    assert v.detectable == pytest.approx(1 - 0.05 ** (1 / 20), abs=2e-3)  # 0.139
    assert v.detectable == pytest.approx(detectable_regression(20, 0.0))
    assert "smallest detectable regression 0.139" in v.line()
    v50 = paired_gate([True] * 50, [True] * 50, paper_delta=0.0, margin=0.10)
    assert v50.decision == "pass" and v50.detectable < 0.10


def test_gate_passes_an_equal_quantizer_and_fails_a_broken_one():
    fp = [True] * 40 + [False] * 10
    assert paired_gate(fp, list(fp), paper_delta=0.0, margin=0.10).decision == "pass"
    v = paired_gate(fp, [False] * 50, paper_delta=0.0, margin=0.10)
    assert v.decision == "fail" and v.mean_difference == -0.8 and v.losses == 40


def test_gate_is_inconclusive_near_the_margin_and_with_simulator_errors():
    fp = [True] * 30
    q = [True] * 27 + [False] * 3  # -10 points, exactly at a 10-point margin
    assert paired_gate(fp, q, 0.0, 0.10).decision == "inconclusive"
    v = paired_gate([True] * 50, [True] * 49 + [None], 0.0, 0.1)
    assert v.decision == "inconclusive" and "simulator error" in v.reason
    assert v.quantized.successes == 49  # an errored episode is never a success


def test_a_quantized_policy_that_errors_where_fp_runs_fails_the_gate():
    fp, q = [True] * 4, [False] * 4
    v = paired_gate(fp, q, 0.0, 0.1, q_errors=[True] * 4)  # 4 pairs: too few for any statistic
    assert v.decision == "fail" and "errored in 4 pairs" in v.reason
    # the same errors on both arms are failures of both, not a verdict against quantization
    both = paired_gate([True] * 49 + [False], [True] * 49 + [False], 0.0, 0.1, fp_errors=[False] * 49 + [True],
                       q_errors=[False] * 49 + [True])
    assert both.decision == "pass" and both.policy_errors == {"fp": 1, "quantized": 1}


def test_confidence_limits_bracket_the_estimate_and_match_the_verdicts():
    low, high = confidence_limits(gains=2, losses=6, n=50)
    assert low < (2 - 6) / 50 < high
    assert paired_gate([True] * 44 + [False] * 6, [True] * 44 + [True] * 2 + [False] * 4, 0.0, 0.0).delta0 == 0.0
    # passing at delta0 means the lower limit lies above it, failing that the upper one lies below
    for fp, q in (([True] * 50, [True] * 50), ([True] * 50, [True] * 36 + [False] * 14)):
        v = paired_gate(fp, q, 0.0, 0.10)
        assert (v.decision == "pass") == (v.lower_bound > v.delta0)
        assert (v.decision == "fail") == (v.upper_bound < v.delta0)


def test_gate_uses_the_papers_delta():
    fp = [True] * 25 + [False] * 25
    # the paper claims +2.5 points; with a 1-point margin, delta0 = +1.5 points: equal is not enough
    assert paired_gate(fp, list(fp), paper_delta=0.025, margin=0.01).decision != "pass"


def test_unpaired_outcomes_are_an_error():
    with pytest.raises(ValueError, match="unpaired"):
        paired_gate([True], [True, False], 0.0, 0.1)


def test_protocols_as_data():
    openpi, gr00t = load_protocol("openpi"), load_protocol("gr00t")
    assert openpi.steps_for("libero_10") == 520 and gr00t.steps_for("libero_10") == 1000
    assert (openpi.replan_steps, openpi.seed, openpi.trials_per_task) == (5, 7, 50)
    assert (gr00t.replan_steps, gr00t.denoising_steps, gr00t.binarize_gripper) == (1, 8, True)
    assert load_protocol("quantvla-pi05").seed == 42
