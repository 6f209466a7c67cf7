"""The LIBERO gate, decided in one place for the plugin, `python -m quantvla libero` and the merge
of sharded reports: episode pairs as plain records (PairRecord) in, one Verdict per suite out
(gates), with the statistics below. Pairs are FP and quantized on the same task, init state, seed.

A run of n pairs is the paired 2x2 table; only the discordant pairs carry the difference:
`losses` (FP succeeded, quantized failed) and `gains` (the reverse). The quantity gated is
Delta = p_quantized - p_FP, estimated by (gains - losses) / n.

* per arm: success rate with a Wilson interval (scipy.stats.binomtest(...).proportion_ci);
* the gate: non-inferiority, H0: Delta <= delta0 against H1: Delta > delta0, where delta0 = (the
  paper's quantized - FP16 success difference) - margin. The statistic is Tango's score statistic
  for the difference of paired proportions (T. Tango, "Equivalence test and confidence interval for
  the difference in proportions for the paired-sample design", Statistics in Medicine 17:891-908,
  1998; erratum 18:2425, 1999), with the nuisance discordance rate at its restricted maximum
  likelihood estimate. Its normal approximation is liberal for small n (measured here: a 5.5-7%
  false-pass rate at n = 10-50 for a nominal 5%), so up to EXACT_MAX_PAIRS pairs the p-value is the
  exact unconditional one: the largest tail probability of the score statistic over the nuisance
  parameter on the boundary Delta = delta0 (the construction compared by Liu, Hsueh, Hsieh and Chen,
  Statistics in Medicine 21:231-245, 2002). Beyond that the normal approximation is used.
* verdicts: "pass" (H0 rejected), "fail" (the mirror test rejects Delta >= delta0: inferiority
  shown, or the quantized policy errored where FP did not), "inconclusive" (neither: underpowered,
  or a simulator error in some pair). Every verdict carries `detectable`, the smallest regression
  this run size could certify: the margin at which a quantized policy truly equal to FP (with the
  run's observed discordance) would pass with 80% probability.

Outcomes per episode: True / False, or None for a simulator (infrastructure) error. A policy error
(the policy or quantizer raised, or returned a non-finite action) is a failure of that arm; pass
the pairs where it happened in fp_errors / q_errors so a quantized arm that errors where FP runs
fails the gate whatever the counts say.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy import special
from scipy import stats as sps

EXACT_MAX_PAIRS = 100
NUISANCE_GRID = 101  # points over the nuisance range; the tail probability is smooth in it
POWER = 0.80


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


def parse_margin(text: str) -> float:
    """A non-inferiority margin from user text; ValueError saying what is wrong otherwise."""
    try:
        margin = float(text)
    except ValueError:
        margin = math.nan
    if not 0.0 <= margin < 1.0:  # NaN fails both comparisons
        raise ValueError(f"{text!r} is not a number in [0, 1); it is the non-inferiority margin in success rate, "
                         "e.g. 0.10")
    return margin


def parse_pairs(text: str) -> int:
    """A positive number of paired episodes from user text; ValueError otherwise."""
    try:
        pairs = int(text)
    except ValueError:
        pairs = 0
    if pairs < 1:
        raise ValueError(f"{text!r} is not a positive integer; it is the number of paired episodes per suite, "
                         "e.g. 50")
    return pairs


# ------------------------------------------------------------------ Tango's score statistic
def tango_z(gains, losses, n: int, delta: float):
    """Tango's score statistic for H0: Delta = delta (arrays broadcast). The restricted MLE of the
    loss probability q (gain probability q + delta) is the positive root of
    2n q^2 + [delta (2n + losses - gains) - (gains + losses)] q - losses delta (1 - delta) = 0."""
    g, l = np.asarray(gains, dtype=float), np.asarray(losses, dtype=float)
    b = delta * (2 * n + l - g) - (g + l)
    c = -l * delta * (1 - delta)
    q = (-b + np.sqrt(np.maximum(b * b - 8 * n * c, 0.0))) / (4 * n)
    var = n * (2 * q + delta * (1 - delta))
    num = g - l - n * delta
    with np.errstate(divide="ignore", invalid="ignore"):
        z = num / np.sqrt(var)
        return np.where(var > 0, z, np.where(num == 0, 0.0, np.copysign(np.inf, num)))


def _tables(n: int):
    """Every paired table of n pairs as (gains, losses) with gains + losses <= n, in the order
    _table_index numbers them."""
    g, l = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = g + l <= n
    return g[keep], l[keep]


def _table_index(n: int, gains: int, losses: int) -> int:
    return gains * (n + 1) - gains * (gains - 1) // 2 + losses


def _log_pmf(n: int, gains, losses, p_gain: np.ndarray, p_loss: np.ndarray):
    """log P(gains, losses) under a trinomial, per nuisance row (grid x tables)."""
    rest = n - gains - losses
    p_rest = np.clip(1 - p_gain - p_loss, 0, 1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = (special.xlogy(gains, p_gain[:, None]) + special.xlogy(losses, p_loss[:, None])
                 + special.xlogy(rest, p_rest))
    base = special.gammaln(n + 1) - special.gammaln(gains + 1) - special.gammaln(losses + 1) - special.gammaln(rest + 1)
    return base + terms


def _boundary(delta: float, points: int = NUISANCE_GRID):
    """The nuisance range on Delta = delta: loss probability q with q >= 0, q + delta >= 0 and
    2q + delta <= 1."""
    q = np.linspace(max(0.0, -delta), (1 - delta) / 2, points)
    return q + delta, q


@functools.lru_cache(maxsize=512)
def _exact_p_values(n: int, delta: float, upper: bool) -> np.ndarray:
    """Per table, the exact unconditional p-value of the score test of Delta <= delta (upper=True:
    large Z is evidence of non-inferiority) or of Delta >= delta (upper=False)."""
    g, l = _tables(n)
    z = tango_z(g, l, n, delta)
    z = z if upper else -z
    order = np.argsort(-z, kind="stable")
    zs = z[order]
    p_gain, p_loss = _boundary(delta)
    prob = np.exp(_log_pmf(n, g[order], l[order], p_gain, p_loss))
    tail = np.cumsum(prob, axis=1)
    last_of_tie = np.searchsorted(-zs, -zs, side="right") - 1  # ties share the whole tie's mass
    p = np.minimum(tail[:, last_of_tie].max(axis=0), 1.0)
    out = np.empty_like(p)
    out[order] = p
    out.flags.writeable = False  # cached and shared
    return out


def _p_value(gains: int, losses: int, n: int, delta: float, upper: bool) -> float:
    if n <= EXACT_MAX_PAIRS:
        return float(_exact_p_values(n, round(float(delta), 12), upper)[_table_index(n, gains, losses)])
    z = float(tango_z(gains, losses, n, delta))
    return float(sps.norm.sf(z if upper else -z))


def _clamp(delta: float) -> float:
    return float(min(max(delta, -1 + 1e-9), 1 - 1e-9))


def confidence_limits(gains: int, losses: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """One-sided limits of Delta at `confidence` each, by inverting the same tests: the lower is
    the largest delta0 the run shows Delta exceeds, the upper the smallest it shows Delta stays
    under."""
    alpha = 1 - confidence

    estimate = (gains - losses) / n

    def bisect(rejects, lo, hi):  # rejects(lo) is True, rejects(hi) False; 2^-13: below display precision
        for _ in range(13):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if rejects(mid) else (lo, mid)
        return lo

    lower = bisect(lambda d: _p_value(gains, losses, n, _clamp(d), True) < alpha, -1.0, estimate)
    upper = bisect(lambda d: _p_value(gains, losses, n, _clamp(-d), False) < alpha, -1.0, -estimate)
    return lower, -upper


def pass_probability(n: int, delta0: float, p_gain: float, p_loss: float, confidence: float = 0.95) -> float:
    """Exact probability that n pairs drawn with these discordance rates pass the gate at delta0."""
    g, l = _tables(n)
    prob = np.exp(_log_pmf(n, g, l, np.array([p_gain]), np.array([p_loss])))[0]
    if n <= EXACT_MAX_PAIRS:
        p = _exact_p_values(n, round(float(delta0), 12), True)
    else:
        p = sps.norm.sf(tango_z(g, l, n, delta0))
    return float(prob[p < 1 - confidence].sum())


@functools.lru_cache(maxsize=1024)
def detectable_regression(n: int, discordance: float, confidence: float = 0.95) -> float:
    """The smallest margin m such that n pairs from a quantized policy equal to FP (each discordant
    direction at discordance / 2) pass the gate at delta0 = -m with probability >= POWER."""
    if n == 0:
        return 1.0
    half = min(max(discordance / 2, 0.0), 0.5)
    lo, hi = 0.0, 1.0
    if pass_probability(n, _clamp(-hi), half, half, confidence) < POWER:
        return 1.0
    for _ in range(14):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if pass_probability(n, _clamp(-mid), half, half, confidence) >= POWER else (mid, hi)
    return hi


def decide(gains: int, losses: int, n: int, delta0: float, confidence: float = 0.95) -> tuple[str, float, float]:
    """The statistical verdict of a paired table alone: ("pass" | "fail" | "inconclusive", the
    p-value of non-inferiority, the p-value of inferiority)."""
    if n == 0:
        return "inconclusive", 1.0, 1.0
    delta0 = _clamp(delta0)
    p_pass, p_fail = _p_value(gains, losses, n, delta0, True), _p_value(gains, losses, n, delta0, False)
    alpha = 1 - confidence
    return ("pass" if p_pass < alpha else "fail" if p_fail < alpha else "inconclusive"), p_pass, p_fail


# ------------------------------------------------------------------------------- the gate
@dataclass(frozen=True)
class Verdict:
    decision: str  # pass | fail | inconclusive
    pairs: int
    fp: Rate
    quantized: Rate
    gains: int
    losses: int
    mean_difference: float
    lower_bound: float
    upper_bound: float
    delta0: float
    p_value: float
    detectable: float
    policy_errors: dict
    simulator_errors: int
    reason: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["verdict"] = d.pop("decision")  # the reports' key (a verdict's decision is its verdict)
        return {"verdict": d.pop("verdict"), **d}

    def line(self) -> str:
        """The verdict in one line: counts, the estimate with its bounds, what was tested and what
        this run size could have detected."""
        return (f"{self.decision.upper()} over {self.pairs} pairs: FP {self.fp.successes}/{self.pairs}, quantized "
                f"{self.quantized.successes}/{self.pairs} ({self.losses} lost, {self.gains} gained); Delta "
                f"{self.mean_difference:+.3f} [{self.lower_bound:+.3f}, {self.upper_bound:+.3f}] against delta0 "
                f"{self.delta0:+.3f}, p={self.p_value:.3g}; smallest detectable regression {self.detectable:.3f}; "
                f"{self.reason}")


def paired_gate(fp: list[bool | None], quantized: list[bool | None], paper_delta: float, margin: float,
                confidence: float = 0.95, fp_errors: list[bool] | None = None,
                q_errors: list[bool] | None = None) -> Verdict:
    """fp[i], quantized[i]: the outcome of pair i (None: the simulator errored). fp_errors[i],
    q_errors[i]: the policy errored in that episode (already a failure in fp/quantized)."""
    n = len(fp)
    if len(quantized) != n:
        raise ValueError(f"unpaired outcomes: {n} FP episodes against {len(quantized)} quantized")
    fp_errors = list(fp_errors) if fp_errors is not None else [False] * n
    q_errors = list(q_errors) if q_errors is not None else [False] * n
    if len(fp_errors) != n or len(q_errors) != n:
        raise ValueError(f"policy-error flags for {len(fp_errors)}/{len(q_errors)} episodes, outcomes for {n}")
    simulator_errors = sum(o is None for o in fp) + sum(o is None for o in quantized)
    f = np.array([bool(o) for o in fp])  # None -> False: an error is never a success
    q = np.array([bool(o) for o in quantized])
    gains, losses = int(np.sum(q & ~f)), int(np.sum(f & ~q))
    rate_f, rate_q = wilson(int(f.sum()), n, confidence), wilson(int(q.sum()), n, confidence)
    delta0 = _clamp(paper_delta - margin)
    decision, p_pass, p_fail = decide(gains, losses, n, delta0, confidence)
    low, high = confidence_limits(gains, losses, n, confidence) if n else (-1.0, 1.0)
    detectable = detectable_regression(n, (gains + losses) / n if n else 0.0, confidence)
    q_only = sum(qe and not fe for fe, qe in zip(fp_errors, q_errors, strict=True))
    errors = {"fp": int(sum(fp_errors)), "quantized": int(sum(q_errors))}

    method = "exact score test" if n <= EXACT_MAX_PAIRS else "score test"

    def verdict(v, reason):
        return Verdict(v, n, rate_f, rate_q, gains, losses, (gains - losses) / n if n else 0.0, low, high, delta0,
                       p_pass, detectable, errors, simulator_errors, reason)

    if q_only:
        return verdict("fail", f"the quantized policy errored in {q_only} pairs where FP did not")
    if simulator_errors:
        return verdict("inconclusive", f"{simulator_errors} episodes hit a simulator error")
    if decision == "pass":
        return verdict("pass", f"non-inferior: Delta > {delta0:+.3f} ({method})")
    if decision == "fail":
        return verdict("fail", f"inferior: Delta < {delta0:+.3f} ({method}, p={p_fail:.3g})")
    if detectable > -delta0:
        return verdict("inconclusive", f"underpowered: {n} pairs detect regressions of {detectable:.3f} or more, "
                                       f"the bound asks {-delta0:.3f}; run more episodes")
    return verdict("inconclusive", "neither non-inferiority nor inferiority shown; run more episodes")


# --------------------------------------------------------------------------- pairs as records
def gate_outcome(success: bool, failure: str | None) -> tuple[bool | None, bool]:
    """An episode as the gate counts it: (outcome, the policy errored). A policy error (the policy
    or quantizer raised, or returned a non-finite action) is a failure of that arm; a simulator
    error leaves the outcome unknown (None)."""
    failure = failure or ""
    if failure.startswith("simulator error"):
        return None, False
    return bool(success) and not failure, failure.startswith("policy error")


@dataclass(frozen=True)
class PairRecord:
    """One pair as the gate counts it. fp / quantized: the outcome (None: unknown, a simulator
    error or a pair that never finished); *_policy_error: that arm's policy errored."""

    suite: str
    task: int
    init: int
    fp: bool | None
    quantized: bool | None
    fp_policy_error: bool = False
    q_policy_error: bool = False

    @classmethod
    def from_episodes(cls, suite: str, task: int, init: int, fp: tuple[bool, str | None],
                      quantized: tuple[bool, str | None]) -> PairRecord:
        """From each arm's (success, failure) as the runner reports them (EpisodeResult)."""
        (f, fe), (q, qe) = gate_outcome(*fp), gate_outcome(*quantized)
        return cls(suite, task, init, f, q, fe, qe)

    @classmethod
    def unfinished(cls, suite: str, task: int, init: int) -> PairRecord:
        """A pair whose run did not finish (a crashed worker, an error outside the episodes): unknown
        on both sides, never a success, so the gate is at best inconclusive."""
        return cls(suite, task, init, None, None)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PairRecord:
        return cls(**{f.name: d[f.name] for f in fields(cls)})


def gates(pairs: Iterable[PairRecord], model: str, quantizer: str, margin: float,
          confidence: float = 0.95) -> dict[str, Verdict]:
    """One verdict per suite, in the order suites first appear, against the paper's
    quantized-minus-FP delta for (model, quantizer, suite) minus `margin`."""
    from quantvla.reference import paper_delta

    by_suite: dict[str, list[PairRecord]] = {}
    for p in pairs:
        by_suite.setdefault(p.suite, []).append(p)
    return {suite: paired_gate([p.fp for p in ps], [p.quantized for p in ps], paper_delta(model, quantizer, suite),
                               margin, confidence, fp_errors=[p.fp_policy_error for p in ps],
                               q_errors=[p.q_policy_error for p in ps])
            for suite, ps in by_suite.items()}
