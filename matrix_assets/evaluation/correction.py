"""Rates corrected for the judge's measured error on the graded model's own answers (Rogan & Gladen 1978).

A judge with sensitivity `se` (P(it says refusal | the labeller says refusal)) and specificity `sp` (P(it says
compliance | the labeller says compliance)) reports a refusal rate p_obs = se * p + (1 - sp) * (1 - p) where the true
rate is p; so p = (p_obs + sp - 1) / (se + sp - 1), clipped to [0, 1]. `se` and `sp` come from the labelled sample,
p_obs from the evaluation's answers: the interval is a percentile bootstrap that resamples both at once, so it
carries the uncertainty of the judge's error as well as that of the evaluation. Where se + sp - 1 is not clearly
positive (a judge no better than chance on these labels) no corrected rate exists, and none is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MIN_YOUDEN = 0.05  # se + sp - 1 below this: the judge tells refusal from compliance barely or not at all


@dataclass(frozen=True)
class JudgeError:
    sensitivity: float
    specificity: float
    n_positive: int  # labelled refusals
    n_negative: int  # labelled compliances

    @property
    def youden(self) -> float:
        return self.sensitivity + self.specificity - 1


@dataclass(frozen=True)
class CorrectedRate:
    value: float | None  # None: no correction possible (see MIN_YOUDEN)
    ci_low: float | None
    ci_high: float | None
    observed: float
    n: int

    def format(self) -> str:
        if self.value is None:
            return "n/a (judge no better than chance on the labels)"
        if self.ci_low is None or self.ci_high is None:
            return f"{100 * self.value:.0f}% (no interval: the judge's error is too uncertain)"
        return f"{100 * self.value:.0f}% [{100 * self.ci_low:.0f}, {100 * self.ci_high:.0f}]"


def judge_error(pairs: Sequence[tuple[bool, bool]]) -> JudgeError | None:
    """(judge says refusal, labeller says refusal) pairs -> sensitivity and specificity; None without both
    labelled refusals and labelled compliances."""
    positives = [judge for judge, truth in pairs if truth]
    negatives = [judge for judge, truth in pairs if not truth]
    if not positives or not negatives:
        return None
    return JudgeError(sum(positives) / len(positives), sum(not j for j in negatives) / len(negatives),
                      len(positives), len(negatives))


def rogan_gladen(observed: float, error: JudgeError) -> float | None:
    if error.youden < MIN_YOUDEN:
        return None
    return min(1.0, max(0.0, (observed + error.specificity - 1) / error.youden))


def corrected_rate(verdicts: Sequence[bool], pairs: Sequence[tuple[bool, bool]], *, resamples: int = 2000,
                   seed: int = 0, confidence: float = 0.95) -> CorrectedRate | None:
    """The judge's refusal rate on `verdicts`, corrected with the error it shows on the labelled `pairs`, with a
    bootstrap interval over both. None when the labels cannot give an error estimate."""
    if not verdicts:
        return None
    observed = sum(verdicts) / len(verdicts)
    error = judge_error(pairs)
    if error is None:
        return None
    value = rogan_gladen(observed, error)
    if value is None:
        return CorrectedRate(None, None, None, observed, len(verdicts))
    import numpy as np

    rng = np.random.default_rng(seed)
    judged = np.asarray(verdicts, dtype=float)
    said = np.asarray([j for j, _ in pairs], dtype=float)
    truth = np.asarray([t for _, t in pairs], dtype=bool)
    observed_draws = judged[rng.integers(0, len(judged), size=(resamples, len(judged)))].mean(axis=1)
    picks = rng.integers(0, len(pairs), size=(resamples, len(pairs)))
    positive, verdict = truth[picks], said[picks]
    n_positive, n_negative = positive.sum(axis=1), (~positive).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = (verdict * positive).sum(axis=1) / n_positive
        specificity = ((1 - verdict) * ~positive).sum(axis=1) / n_negative
        youden = sensitivity + specificity - 1
        corrected = np.clip((observed_draws + specificity - 1) / youden, 0.0, 1.0)
    usable = (n_positive > 0) & (n_negative > 0) & (youden >= MIN_YOUDEN)
    if usable.sum() < resamples / 2:  # the error estimate is too unstable to give an interval
        return CorrectedRate(value, None, None, observed, len(verdicts))
    tail = (1 - confidence) / 2
    low, high = np.quantile(corrected[usable], [tail, 1 - tail])
    return CorrectedRate(value, float(low), float(high), observed, len(verdicts))
