"""Success statistics and gates, decided on paired episodes (same init state, same seed).

* per suite: success rate with a Wilson interval (scipy.stats.binomtest(...).proportion_ci);
* the gate: a one-sided non-inferiority test on the paired differences D_i = Q_i - FP_i in
  {-1, 0, 1} (scipy.stats.ttest_1samp, alternative="greater") of H0: mean(D) <= delta0 against
  H1: mean(D) > delta0, where delta0 = (the paper's quantized - FP16 success difference) - margin.
  Verdicts: "pass" (non-inferiority shown at the confidence), "fail" (the upper confidence bound
  of mean(D) is below delta0: inferiority shown), "inconclusive" (neither, too few pairs, or any
  errored episode). An errored episode is never a success.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sps

MIN_PAIRS = 10


@dataclass(frozen=True)
class Rate:
    successes: int
    episodes: int
    low: float
    high: float

    @property
    def rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0


def wilson(successes: int, episodes: int, confidence: float = 0.95) -> Rate:
    if episodes == 0:
        return Rate(0, 0, 0.0, 1.0)
    ci = sps.binomtest(successes, episodes).proportion_ci(confidence_level=confidence, method="wilson")
    return Rate(successes, episodes, float(ci.low), float(ci.high))


@dataclass(frozen=True)
class Verdict:
    verdict: str  # pass | fail | inconclusive
    pairs: int
    fp: Rate
    quantized: Rate
    mean_difference: float
    delta0: float
    p_value: float | None
    upper_bound: float | None
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def paired_gate(fp: list[bool | None], quantized: list[bool | None], paper_delta: float, margin: float,
                confidence: float = 0.95) -> Verdict:
    """fp[i], quantized[i]: the outcome of pair i (None: the episode errored)."""
    if len(fp) != len(quantized):
        raise ValueError(f"unpaired outcomes: {len(fp)} FP episodes against {len(quantized)} quantized")
    errored = sum(o is None for o in fp) + sum(o is None for o in quantized)
    f = np.array([bool(o) for o in fp], dtype=float)  # None -> False: an error is never a success
    q = np.array([bool(o) for o in quantized], dtype=float)
    n = len(f)
    rate_f, rate_q = wilson(int(f.sum()), n, confidence), wilson(int(q.sum()), n, confidence)
    delta0 = paper_delta - margin
    d = q - f
    mean = float(d.mean()) if n else 0.0

    def verdict(v, p, ub, reason):
        return Verdict(v, n, rate_f, rate_q, mean, delta0, p, ub, reason)

    if n < MIN_PAIRS:
        return verdict("inconclusive", None, None, f"{n} pairs, fewer than {MIN_PAIRS}")
    if d.std() == 0:  # every pair differs by the same amount: no spread to test with
        p, ub = (0.0, mean) if mean > delta0 else (1.0, mean)
    else:
        p = float(sps.ttest_1samp(d, popmean=delta0, alternative="greater").pvalue)
        ub = float(sps.t.ppf(confidence, n - 1) * d.std(ddof=1) / np.sqrt(n) + mean)
    if errored:
        return verdict("inconclusive", p, ub, f"{errored} episodes errored")
    if p < 1 - confidence:
        return verdict("pass", p, ub, f"non-inferior: mean difference {mean:+.3f} > {delta0:+.3f} (p={p:.3g})")
    if ub < delta0:
        return verdict("fail", p, ub, f"inferior: upper bound {ub:+.3f} < {delta0:+.3f}")
    return verdict("inconclusive", p, ub, f"mean difference {mean:+.3f}, bound {delta0:+.3f}, p={p:.3g}: "
                                          "more episodes needed")
