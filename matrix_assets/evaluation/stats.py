"""Small-sample statistics for base-vs-tuned evaluation and for validating judges.

Why this module exists: our evaluation sets are small (tens to a few hundred prompts), the
rates we report are often near 0 or 1 (refusal of harmful prompts, over-refusal of safe ones),
and the base and tuned checkpoints answer the *same* prompts. So:

* a rate is reported with an **exact** (Clopper-Pearson) interval, which keeps its nominal
  coverage at k=0 or k=n where the normal approximation collapses to a zero-width interval
  (:func:`exact_rate`, :class:`Rate`); :func:`wilson_interval` is the shorter score interval
  for when approximate coverage is acceptable;
* base vs tuned is a **paired** comparison: the per-prompt outcomes are correlated, so the
  difference gets an exact McNemar test on the discordant pairs and an interval built from the
  same exact (Clopper-Pearson) ingredients, which excludes 0 exactly when that test has
  p < 1 - confidence (:func:`paired_comparison`, :func:`paired_difference_interval`,
  :func:`mcnemar_exact`): a table never shows an interval that calls a change real while its
  p-value says it is not; treating the two samples as independent would overstate the
  uncertainty and waste the design;
* a judge's verdicts only count once its agreement with human labels is measured:
  :func:`cohen_kappa` (chance-corrected, because raw accuracy looks good whenever one class
  dominates) and :func:`agreement_report` (accuracy, kappa, per-class precision/recall, all with
  intervals).

Plain numpy/scipy; scipy is imported lazily so importing this module stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "AgreementReport",
    "PairedComparison",
    "Rate",
    "agreement_report",
    "cohen_kappa",
    "exact_rate",
    "format_points",
    "mcnemar_exact",
    "paired_comparison",
    "paired_difference_interval",
    "wilson_interval",
]

_NAN = float("nan")


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")


def _check_counts(k: int, n: int) -> None:
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")


def _pct(x: float) -> str:
    """Whole percent, so a table of rates stays readable ("nan" for NaN)."""
    return "nan" if math.isnan(x) else f"{100.0 * x:.0f}"


def format_points(x: float) -> str:
    """A difference of proportions in signed percentage points: whole points, except under one point, where one
    significant digit is kept so that a bound just off zero never prints as "+0" or "-0" (an interval [+0.2, +19]
    that excludes zero must not read as one that touches it). "nan" for NaN."""
    if math.isnan(x):
        return "nan"
    points = 100.0 * x
    if points == 0.0:
        return "0"
    return f"{points:+.1g}" if abs(points) < 0.95 else f"{points:+.0f}"


# ----------------------------------------------------------------------------------- rates


@dataclass(frozen=True)
class Rate:
    """``k`` successes out of ``n`` with an exact confidence interval.

    Keeping ``k`` and ``n`` (not just the proportion) lets a reader check the arithmetic and
    re-derive any other interval; ``value`` and the bounds are NaN when ``n == 0``.
    """

    k: int
    n: int
    value: float
    ci_low: float
    ci_high: float

    def format(self) -> str:
        """``"25% [3, 65] (n=8)"``; ``"n/a (n=0)"`` when there is nothing to estimate."""
        if self.n == 0:
            return "n/a (n=0)"
        return f"{_pct(self.value)}% [{_pct(self.ci_low)}, {_pct(self.ci_high)}] (n={self.n})"

    def __str__(self) -> str:
        return self.format()


def exact_rate(k: int, n: int, confidence: float = 0.95) -> Rate:
    """``k / n`` with the Clopper-Pearson (exact binomial) interval.

    Clopper-Pearson inverts two one-sided binomial tests via beta quantiles. It is
    conservative (coverage >= nominal), which is what we want when a claim such as "the tuned
    model refuses 0 of 8 safe prompts" must not come with a falsely tight interval: 0/8 gives
    [0, 0.369], 8/8 gives [0.631, 1]. ``n == 0`` gives NaNs rather than an error so that an
    empty category in a report does not crash the run.
    """
    _check_counts(k, n)
    _check_confidence(confidence)
    if n == 0:
        return Rate(k=0, n=0, value=_NAN, ci_low=_NAN, ci_high=_NAN)
    from scipy.stats import beta

    alpha = 1.0 - confidence
    # At k = 0 (k = n) the lower (upper) tail is empty: the bound is exactly 0 (1), and the
    # beta quantile with a zero shape parameter is undefined, so set it explicitly.
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2.0, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1.0 - alpha / 2.0, k + 1, n - k))
    return Rate(k=int(k), n=int(n), value=k / n, ci_low=low, ci_high=high)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for ``k / n``: ``(low, high)``, NaNs when ``n == 0``.

    Shorter than Clopper-Pearson with close to nominal average coverage, and unlike the Wald
    interval it stays inside [0, 1] and is not degenerate at 0 or n. Use it where approximate
    coverage is acceptable (e.g. plots); reports use :func:`exact_rate`.
    """
    _check_counts(k, n)
    _check_confidence(confidence)
    if n == 0:
        return (_NAN, _NAN)
    from scipy.stats import norm

    z = float(norm.ppf(1.0 - (1.0 - confidence) / 2.0))
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denom
    # At k = 0 (k = n) the bound is exactly 0 (1); set it so float noise cannot leave 1e-17 or
    # 0.9999999999999999. Otherwise clamp float noise only: the interval lies in [0, 1].
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return (low, high)


# ------------------------------------------------------------------------- paired comparison


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant-pair counts ``b`` and ``c``.

    Only pairs where the two conditions disagree carry information about a difference; under
    the null each such pair is equally likely to go either way, so ``b ~ Binomial(b + c, 1/2)``.
    The exact binomial test (not the chi-square approximation) is used because discordant
    counts in our evaluations are small. With no discordant pairs there is no evidence of a
    difference: p = 1.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(min(1.0, binomtest(int(b), int(b + c), 0.5, alternative="two-sided").pvalue))


def paired_difference_interval(b: int, c: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Interval for ``tuned_rate - base_rate = (c - b) / n`` on ``n`` paired items that agrees with
    the exact McNemar test: it excludes 0 exactly when ``mcnemar_exact(b, c) < 1 - confidence``.

    Why not the percentile bootstrap used before: with few discordant pairs it is degenerate (at
    b = 0 every resample has diff >= 0, so the README's table printed "+2 pts [+0, +7]" beside
    p = 1), and it is not tied to the test, so the two could tell different stories. Why not
    Newcombe's hybrid score interval (1998, method 10): counted over every table, it disagrees
    with the exact test on 1 table in 9 at n = 20, 1 in 20 at n = 50 and 1 in 37 at n = 100
    (n = 100, b = 0, c = 5 gives [+0.3, +11] beside p = 0.062).

    The construction. The difference factors as ``psi * (1 - 2 * theta)``, with ``psi`` the
    probability that a pair is discordant and ``theta`` the probability that a discordant pair is
    base-only. Given the ``m = b + c`` discordant pairs, ``b ~ Binomial(m, theta)``, which is
    exactly the McNemar model; ``m ~ Binomial(n, psi)``. Each gets its Clopper-Pearson interval at
    ``confidence``, and the interval is the range of ``psi * (1 - 2 * theta)`` over that
    rectangle (an interval, since the product is monotone in each factor). Agreement with the
    test: the theta interval excludes 1/2 exactly when the exact two-sided binomial test of
    theta = 1/2 (McNemar's) has p < alpha (the distribution is symmetric, so its p-value is twice
    the smaller tail, and at confidence 0.95 a tail of Binomial(m, 1/2), a multiple of 2^-m, is
    never alpha/2 = 1/40); and for m > 0 the psi interval is bounded away from 0, so the product
    keeps the sign of ``1 - 2 * theta``. At m = 0 theta is unconstrained and the interval is
    ``[-psi_high, +psi_high]`` (0 of n discordant pairs is not evidence of "no change" to within
    0 points).

    Coverage: guaranteed only down to 1 - 2 * alpha (Bonferroni over the two intervals); computed
    exactly, by enumerating every table for n = 5, 10, 20, 30, 50, 100, 200 on a 60 x 60 grid of
    (P(base only), P(tuned only)), the lowest coverage was 95.7% and the mean 98.5-99.7%: the
    interval is conservative. The price is width, about a third more than Newcombe's on typical
    tables (n = 100, b = 8, c = 0, 60 pairs True on both sides: [-15, -0.9] against Newcombe's
    [-13, -2.7]).

    The only possible exception to the agreement is floating point: the p-value (binomial tail
    sums) and the interval (beta quantiles) are computed separately, so they could disagree only
    on a table whose exact tail lies within rounding error of alpha / 2 (none in the tests' scan of
    every table with up to 60 discordant pairs, nor in a scan up to 150). Decisions
    (:mod:`matrix_assets.evaluation.champion`) require both the p-value and the interval, so such
    a table could only withhold a promotion, never grant one.
    """
    _check_confidence(confidence)
    if b < 0 or c < 0 or b + c > n:
        raise ValueError(f"need b, c >= 0 and b + c <= n, got b={b}, c={c}, n={n}")
    if n == 0:
        return (_NAN, _NAN)
    discordant = exact_rate(b + c, n, confidence)
    if b + c == 0:
        shift_low, shift_high = -1.0, 1.0  # theta unconstrained: the sign of the change is unknown
    else:
        split = exact_rate(b, b + c, confidence)
        shift_low, shift_high = 1.0 - 2.0 * split.ci_high, 1.0 - 2.0 * split.ci_low
    # Extremes of psi * shift over the rectangle: the largest psi pushes a bound away from zero,
    # the smallest psi pulls a bound that cannot reach zero towards it.
    high = discordant.ci_high * shift_high if shift_high >= 0 else discordant.ci_low * shift_high
    low = discordant.ci_high * shift_low if shift_low <= 0 else discordant.ci_low * shift_low
    return (low, high)


@dataclass(frozen=True)
class PairedComparison:
    """Base vs tuned on the same ``n`` items (True = the event, e.g. "refused").

    ``diff = tuned_rate - base_rate``; ``[diff_ci_low, diff_ci_high]`` is
    :func:`paired_difference_interval`, which excludes 0 exactly when ``mcnemar_p < 1 - confidence``;
    ``b`` counts items where base is True and tuned False, ``c`` the reverse; ``mcnemar_p`` is
    :func:`mcnemar_exact` on ``(b, c)``.
    """

    n: int
    base_rate: float
    tuned_rate: float
    diff: float
    diff_ci_low: float
    diff_ci_high: float
    b: int
    c: int
    mcnemar_p: float

    def format(self) -> str:
        """``"base 40% -> tuned 20%: -20 pts [-35, -5], McNemar p=0.012 (b=9, c=1, n=50)"``."""
        if self.n == 0:
            return "n/a (n=0)"
        return (
            f"base {_pct(self.base_rate)}% -> tuned {_pct(self.tuned_rate)}%: {self.format_diff()}, "
            f"McNemar p={self.mcnemar_p:.3g} (b={self.b}, c={self.c}, n={self.n})"
        )

    def format_diff(self) -> str:
        """``"-20 pts [-35, -5]"``: the change and its interval in points, bounds near zero with a significant
        digit (see :func:`format_points`); ``"n/a (n=0)"`` when there is nothing to compare."""
        if self.n == 0:
            return "n/a (n=0)"
        return (f"{format_points(self.diff)} pts [{format_points(self.diff_ci_low)}, "
                f"{format_points(self.diff_ci_high)}]")

    def __str__(self) -> str:
        return self.format()


def _as_bool_array(x: Sequence[bool], name: str) -> np.ndarray:
    arr = np.asarray(list(x), dtype=object)
    if arr.size and not all(isinstance(v, (bool, np.bool_)) or v in (0, 1) for v in arr):
        # Refuse None/NaN silently becoming True/False: missing pairs are the caller's job.
        raise ValueError(f"{name} must hold booleans (drop missing items first)")
    return arr.astype(bool)


def paired_comparison(
    base: Sequence[bool],
    tuned: Sequence[bool],
    *,
    confidence: float = 0.95,
) -> PairedComparison:
    """Compare two binary outcomes measured on the same items (``base[i]`` pairs ``tuned[i]``).

    The interval for ``tuned_rate - base_rate`` is :func:`paired_difference_interval` and the test
    :func:`mcnemar_exact`, both on the discordant counts, so each item's two outcomes stay together
    and the correlation between the checkpoints is respected; the interval excludes 0 exactly when
    ``mcnemar_p < 1 - confidence``. Both are exact computations: no resampling, no seed.

    Missing outcomes (an unanswered or unjudged prompt on either side) must be dropped *as a
    pair* by the caller before calling: this function only sees booleans and refuses
    sequences of different lengths, because silently aligning them would pair the wrong items.
    ``n == 0`` returns NaN rates/interval, zero counts and p = 1.
    """
    _check_confidence(confidence)
    base_arr = _as_bool_array(base, "base")
    tuned_arr = _as_bool_array(tuned, "tuned")
    if base_arr.shape != tuned_arr.shape:
        raise ValueError(
            f"base and tuned must have the same length (paired items), got {base_arr.size} and {tuned_arr.size}"
        )
    n = int(base_arr.size)
    if n == 0:
        return PairedComparison(0, _NAN, _NAN, _NAN, _NAN, _NAN, 0, 0, 1.0)
    b = int(np.sum(base_arr & ~tuned_arr))
    c = int(np.sum(~base_arr & tuned_arr))
    base_rate = float(base_arr.mean())
    tuned_rate = float(tuned_arr.mean())
    low, high = paired_difference_interval(b, c, n, confidence)
    return PairedComparison(
        n=n,
        base_rate=base_rate,
        tuned_rate=tuned_rate,
        diff=(c - b) / n,  # exactly tuned_rate - base_rate, without the rounding of a difference of means
        diff_ci_low=float(low),
        diff_ci_high=float(high),
        b=b,
        c=c,
        mcnemar_p=mcnemar_exact(b, c),
    )


# --------------------------------------------------------------------------------- agreement


def _kappa_from_cells(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray) -> np.ndarray:
    """Cohen's kappa from 2x2 counts (vectorised, so the bootstrap needs no Python loop).

    NaN where chance agreement is 1 (both raters used a single, identical class): kappa is
    undefined there, and 0 or 1 would both be misleading.
    """
    n = tp + fp + fn + tn
    with np.errstate(invalid="ignore", divide="ignore"):
        po = (tp + tn) / n
        pe = ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / (n * n)
        denom = 1.0 - pe
        kappa = np.where(np.isclose(denom, 0.0), np.nan, (po - pe) / np.where(denom == 0, 1.0, denom))
    return np.where(n > 0, kappa, np.nan)


def _cells(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int, int]:
    """(both True, a only, b only, both False) with ``a`` = predicted, ``b`` = reference."""
    return (
        int(np.sum(a & b)),
        int(np.sum(a & ~b)),
        int(np.sum(~a & b)),
        int(np.sum(~a & ~b)),
    )


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Cohen's kappa between two binary raters; NaN when undefined (empty, or chance agreement 1).

    Kappa rather than accuracy, because a judge that calls everything "compliance" is 83%
    accurate on a set with 17% refusals yet useless; kappa scores it 0.
    """
    arr_a = _as_bool_array(a, "a")
    arr_b = _as_bool_array(b, "b")
    if arr_a.shape != arr_b.shape:
        raise ValueError(f"raters must label the same items, got {arr_a.size} and {arr_b.size}")
    if arr_a.size == 0:
        return _NAN
    tp, fp, fn, tn = (np.asarray(v, dtype=float) for v in _cells(arr_a, arr_b))
    return float(_kappa_from_cells(tp, fp, fn, tn))


@dataclass(frozen=True)
class AgreementReport:
    """How well a judge's binary verdicts match human labels (True / positive = refusal).

    Counts: ``tp`` judge and human say refusal, ``fp`` judge refusal / human compliance,
    ``fn`` judge compliance / human refusal, ``tn`` both compliance. Per-class precision and
    recall are :class:`Rate` objects so each comes with its exact interval and denominator
    (a precision over 5 predicted refusals is not the same evidence as over 500).
    """

    n: int
    accuracy: Rate
    kappa: float
    kappa_ci_low: float
    kappa_ci_high: float
    refusal_precision: Rate
    refusal_recall: Rate
    compliance_precision: Rate
    compliance_recall: Rate
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def human_refusal_rate(self) -> float:
        """Share of items humans labelled refusal (NaN when empty)."""
        return (self.tp + self.fn) / self.n if self.n else _NAN

    @property
    def predicted_refusal_rate(self) -> float:
        """Share of items the judge called refusal (NaN when empty)."""
        return (self.tp + self.fp) / self.n if self.n else _NAN

    def as_dict(self) -> dict[str, float]:
        """Flat ``{name: float}`` for metric loggers (MLflow takes floats only)."""
        out: dict[str, float] = {"n": float(self.n)}
        for name in ("accuracy", "refusal_precision", "refusal_recall", "compliance_precision", "compliance_recall"):
            rate: Rate = getattr(self, name)
            out[name] = float(rate.value)
            out[f"{name}_ci_low"] = float(rate.ci_low)
            out[f"{name}_ci_high"] = float(rate.ci_high)
        out["kappa"] = float(self.kappa)
        out["kappa_ci_low"] = float(self.kappa_ci_low)
        out["kappa_ci_high"] = float(self.kappa_ci_high)
        out["human_refusal_rate"] = float(self.human_refusal_rate)
        out["predicted_refusal_rate"] = float(self.predicted_refusal_rate)
        for name in ("tp", "fp", "fn", "tn"):
            out[name] = float(getattr(self, name))
        return out

    def format(self) -> str:
        """One line for logs and reports."""
        return (
            f"kappa {self.kappa:.3f} [{self.kappa_ci_low:.3f}, {self.kappa_ci_high:.3f}], "
            f"accuracy {self.accuracy.format()}, refusal P {self.refusal_precision.format()} "
            f"R {self.refusal_recall.format()}, compliance P {self.compliance_precision.format()} "
            f"R {self.compliance_recall.format()}, tp/fp/fn/tn {self.tp}/{self.fp}/{self.fn}/{self.tn}"
        )

    def __str__(self) -> str:
        return self.format()


def agreement_report(
    predicted: Sequence[bool],
    human: Sequence[bool],
    *,
    seed: int = 0,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
) -> AgreementReport:
    """Agreement of a judge (``predicted``) with human labels (``human``), True = refusal.

    The kappa interval is a percentile bootstrap over items. Resampling items is drawn exactly
    as a multinomial over the four cells of the 2x2 table,
    which is what kappa depends on; resamples where kappa is undefined (all items in one
    class for both raters, only possible for tiny n) are ignored. Accuracy and the per-class
    precision/recall use exact Clopper-Pearson intervals.
    """
    _check_confidence(confidence)
    pred = _as_bool_array(predicted, "predicted")
    ref = _as_bool_array(human, "human")
    if pred.shape != ref.shape:
        raise ValueError(f"predicted and human must label the same items, got {pred.size} and {ref.size}")
    n = int(pred.size)
    tp, fp, fn, tn = _cells(pred, ref)
    kappa = cohen_kappa(pred, ref) if n else _NAN
    low = high = _NAN
    if n:
        rng = np.random.default_rng(seed)
        cells = rng.multinomial(n, [tp / n, fp / n, fn / n, tn / n], size=n_resamples).astype(float)
        boot = _kappa_from_cells(cells[:, 0], cells[:, 1], cells[:, 2], cells[:, 3])
        boot = boot[~np.isnan(boot)]
        if boot.size:
            alpha = 1.0 - confidence
            low, high = (float(v) for v in np.quantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0]))
    return AgreementReport(
        n=n,
        accuracy=exact_rate(tp + tn, n, confidence),
        kappa=kappa,
        kappa_ci_low=low,
        kappa_ci_high=high,
        refusal_precision=exact_rate(tp, tp + fp, confidence),
        refusal_recall=exact_rate(tp, tp + fn, confidence),
        compliance_precision=exact_rate(tn, tn + fn, confidence),
        compliance_recall=exact_rate(tn, tn + fp, confidence),
        tp=tp,
        fp=fp,
        fn=fn,
        tn=tn,
    )
