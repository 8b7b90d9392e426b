"""Tests for matrix_assets.evaluation.stats against hand-checkable values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from matrix_assets.evaluation.stats import (
    AgreementReport,
    PairedComparison,
    Rate,
    agreement_report,
    cohen_kappa,
    exact_rate,
    format_points,
    mcnemar_exact,
    paired_comparison,
    paired_difference_interval,
    wilson_interval,
)

# ------------------------------------------------------------------------ Clopper-Pearson


def test_exact_rate_all_successes() -> None:
    # k = n: upper bound 1, lower bound solves p^n = alpha/2, i.e. 0.025 ** (1/8).
    r = exact_rate(8, 8)
    assert (r.k, r.n, r.value) == (8, 8, 1.0)
    assert r.ci_low == pytest.approx(0.025 ** (1 / 8), abs=1e-9)
    assert r.ci_low == pytest.approx(0.631, abs=5e-4)
    assert r.ci_high == 1.0


def test_exact_rate_no_successes() -> None:
    r = exact_rate(0, 8)
    assert r.value == 0.0 and r.ci_low == 0.0
    assert r.ci_high == pytest.approx(1 - 0.025 ** (1 / 8), abs=1e-9)
    assert r.ci_high == pytest.approx(0.369, abs=5e-4)


def test_exact_rate_three_of_ten() -> None:
    # Published Clopper-Pearson 95% interval for 3/10: [0.0667, 0.6525].
    r = exact_rate(3, 10)
    assert r.value == pytest.approx(0.3)
    assert r.ci_low == pytest.approx(0.066739, abs=1e-5)
    assert r.ci_high == pytest.approx(0.652453, abs=1e-5)


def test_exact_rate_confidence_widens() -> None:
    r95, r99 = exact_rate(3, 10), exact_rate(3, 10, confidence=0.99)
    assert r99.ci_low < r95.ci_low and r99.ci_high > r95.ci_high


def test_exact_rate_empty_and_invalid() -> None:
    r = exact_rate(0, 0)
    assert r.n == 0 and math.isnan(r.value) and math.isnan(r.ci_low) and math.isnan(r.ci_high)
    with pytest.raises(ValueError):
        exact_rate(5, 4)
    with pytest.raises(ValueError):
        exact_rate(-1, 4)
    with pytest.raises(ValueError):
        exact_rate(1, 4, confidence=1.0)


def test_rate_format() -> None:
    assert exact_rate(2, 8).format() == "25% [3, 65] (n=8)"
    assert str(exact_rate(8, 8)) == "100% [63, 100] (n=8)"
    assert exact_rate(0, 0).format() == "n/a (n=0)"
    assert isinstance(exact_rate(1, 2), Rate)


# --------------------------------------------------------------------------------- Wilson


def test_wilson_interval_known_values() -> None:
    low, high = wilson_interval(3, 10)
    assert low == pytest.approx(0.10779, abs=1e-4)
    assert high == pytest.approx(0.60322, abs=1e-4)
    # Hand formula with z = 1.959964: centre (p + z^2/2n) / (1 + z^2/n).
    z = 1.959963984540054
    centre = (0.3 + z * z / 20) / (1 + z * z / 10)
    assert (low + high) / 2 == pytest.approx(centre, abs=1e-9)


def test_wilson_interval_edges() -> None:
    low, high = wilson_interval(0, 10)
    assert low == 0.0
    assert high == pytest.approx(0.27753, abs=1e-4)
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(0.72247, abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    # Wilson is shorter than the exact interval.
    cp = exact_rate(3, 10)
    w_low, w_high = wilson_interval(3, 10)
    assert w_high - w_low < cp.ci_high - cp.ci_low


# -------------------------------------------------------------------------------- McNemar


def test_mcnemar_exact_known_values() -> None:
    assert mcnemar_exact(0, 5) == pytest.approx(0.0625)  # 2 * (1/2)^5
    assert mcnemar_exact(5, 0) == pytest.approx(0.0625)
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)  # 2 * (C(10,0) + C(10,1)) / 2^10
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(7, 7) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


# ------------------------------------------------------------------------ paired comparison


def _pairs() -> tuple[list[bool], list[bool]]:
    # 40 items: 12 both True, 10 base only (b), 2 tuned only (c), 16 both False.
    base = [True] * 12 + [True] * 10 + [False] * 2 + [False] * 16
    tuned = [True] * 12 + [False] * 10 + [True] * 2 + [False] * 16
    return base, tuned


def test_paired_comparison_counts_and_rates() -> None:
    base, tuned = _pairs()
    pc = paired_comparison(base, tuned)
    assert isinstance(pc, PairedComparison)
    assert (pc.n, pc.b, pc.c) == (40, 10, 2)
    assert pc.base_rate == pytest.approx(22 / 40)
    assert pc.tuned_rate == pytest.approx(14 / 40)
    assert pc.diff == pytest.approx(-8 / 40)
    assert pc.diff_ci_low <= pc.diff <= pc.diff_ci_high
    assert pc.diff_ci_high < 0  # 10 vs 2 discordant pairs: a clear drop
    assert pc.mcnemar_p == pytest.approx(mcnemar_exact(10, 2))
    assert "McNemar" in pc.format()


def test_paired_comparison_uses_the_exact_interval() -> None:
    base, tuned = _pairs()
    pc = paired_comparison(base, tuned)
    assert (pc.diff_ci_low, pc.diff_ci_high) == paired_difference_interval(10, 2, 40)
    # Deterministic: no resampling, so the same pairs always give the same comparison.
    assert paired_comparison(base, tuned) == pc


def test_paired_comparison_identical_and_empty() -> None:
    same = paired_comparison([True, False, True], [True, False, True])
    assert (same.b, same.c, same.diff, same.mcnemar_p) == (0, 0, 0.0, 1.0)
    # No discordant pair among 3 is no evidence of "no change": the interval is [-psi_high, +psi_high],
    # psi_high the Clopper-Pearson upper bound of 0/3 discordant pairs.
    assert same.diff_ci_high == pytest.approx(1 - 0.025 ** (1 / 3)) and same.diff_ci_low == -same.diff_ci_high
    empty = paired_comparison([], [])
    assert empty.n == 0 and math.isnan(empty.diff) and math.isnan(empty.diff_ci_low)
    assert (empty.b, empty.c, empty.mcnemar_p) == (0, 0, 1.0)
    assert empty.format() == "n/a (n=0)"


def test_paired_comparison_rejects_unpaired_or_missing() -> None:
    with pytest.raises(ValueError):
        paired_comparison([True, False], [True])
    with pytest.raises(ValueError):
        paired_comparison([True, None], [True, False])  # type: ignore[list-item]


def _excludes_zero(interval: tuple[float, float]) -> bool:
    low, high = interval
    return low > 0 or high < 0


def test_interval_agrees_with_exact_mcnemar_on_every_small_table() -> None:
    # Every (b, c) with up to 60 discordant pairs, each with n = b + c (every pair discordant), one concordant
    # pair more, and n = 200: the interval excludes 0 exactly when McNemar's exact p < 0.05.
    significant = 0
    for m in range(61):
        for b in range(m + 1):
            c = m - b
            p = mcnemar_exact(b, c)
            for n in {max(m, 1), m + 1, 200}:
                low, high = paired_difference_interval(b, c, n)
                assert low <= (c - b) / n <= high
                assert _excludes_zero((low, high)) == (p < 0.05), (b, c, n, p, low, high)
            significant += p < 0.05
    assert 0 < significant < 61 * 62 / 2  # the scan holds both kinds of table


@pytest.mark.parametrize(("b", "c", "p", "excludes"), [
    (0, 5, 0.0625, False),  # the largest one-sided table that is not significant
    (0, 6, 0.03125, True),
    (5, 0, 0.0625, False),
    (6, 0, 0.03125, True),
    (1, 7, 0.0703125, False),
    (1, 8, 0.0390625, True),
    (2, 10, 0.0385742, True),
    (3, 11, 0.0574, False),
])
def test_interval_at_the_significance_boundary(b: int, c: int, p: float, excludes: bool) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(p, abs=1e-4)
    for n in (b + c, 20, 100):
        assert _excludes_zero(paired_difference_interval(b, c, n)) is excludes


def test_interval_examples_the_old_bootstrap_got_wrong() -> None:
    # The README's "+2 pts [+0, +7] p=1": one tuned-only pair among 42 prompts.
    low, high = paired_difference_interval(0, 1, 42)
    assert low < 0 < high and low == pytest.approx(-0.119, abs=1e-3) and high == pytest.approx(0.126, abs=1e-3)
    # 0 discordant pairs of 100: symmetric, as wide as the exact upper bound of 0/100.
    assert paired_difference_interval(0, 0, 100) == pytest.approx((-0.0362, 0.0362), abs=1e-4)
    assert all(math.isnan(v) for v in paired_difference_interval(0, 0, 0))
    with pytest.raises(ValueError):
        paired_difference_interval(3, 3, 5)


def test_interval_covers_at_least_nominally_on_a_grid() -> None:
    # Exact coverage at n = 20: sum, over every (b, c), of the multinomial probability of the tables whose
    # interval holds the true difference P(tuned only) - P(base only).
    from scipy.stats import multinomial

    n = 20
    tables = [(b, c) for b in range(n + 1) for c in range(n + 1 - b)]
    intervals = np.array([paired_difference_interval(b, c, n) for b, c in tables])
    counts = np.array([(b, c, n - b - c) for b, c in tables])
    lowest = 1.0
    for p_base in np.linspace(0.02, 0.9, 9):
        for p_tuned in np.linspace(0.02, 0.9, 9):
            if p_base + p_tuned >= 1:
                continue
            weights = multinomial.pmf(counts, n, [p_base, p_tuned, 1 - p_base - p_tuned])
            truth = p_tuned - p_base
            inside = (intervals[:, 0] <= truth + 1e-12) & (truth - 1e-12 <= intervals[:, 1])
            lowest = min(lowest, float(weights[inside].sum()))
    assert lowest >= 0.95


def test_format_points_never_prints_a_bound_off_zero_as_zero() -> None:
    assert format_points(0.002) == "+0.2" and format_points(-0.004) == "-0.4" and format_points(0.0004) == "+0.04"
    assert format_points(-0.38) == "-38" and format_points(0.0) == "0" and format_points(float("nan")) == "nan"
    pc = paired_comparison([False] * 2 + [True] * 8, [True] * 2 + [True] * 8)
    assert pc.format_diff().startswith("+20 pts [")


# ---------------------------------------------------------------------------------- kappa


def test_cohen_kappa_known_values() -> None:
    # 2x2 table tp=20, fp=5, fn=10, tn=15: po = 0.7, pe = (25*30 + 25*20) / 50^2 = 0.5 -> 0.4.
    a = [True] * 20 + [True] * 5 + [False] * 10 + [False] * 15
    b = [True] * 20 + [False] * 5 + [True] * 10 + [False] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa([True, False, True, False], [True, False, True, False]) == 1.0
    assert cohen_kappa([True, True, False, False], [True, False, True, False]) == pytest.approx(0.0)
    assert cohen_kappa([True, False], [False, True]) == pytest.approx(-1.0)


def test_cohen_kappa_matches_sklearn() -> None:
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(0)
    a = rng.random(300) < 0.2
    b = np.where(rng.random(300) < 0.9, a, ~a)
    assert cohen_kappa(list(a), list(b)) == pytest.approx(cohen_kappa_score(a, b))


def test_cohen_kappa_undefined_is_nan() -> None:
    assert math.isnan(cohen_kappa([True, True], [True, True]))  # chance agreement 1
    assert math.isnan(cohen_kappa([], []))
    with pytest.raises(ValueError):
        cohen_kappa([True], [True, False])


# ------------------------------------------------------------------------ agreement report


def test_agreement_report_counts_and_rates() -> None:
    predicted = [True] * 20 + [True] * 5 + [False] * 10 + [False] * 15
    human = [True] * 20 + [False] * 5 + [True] * 10 + [False] * 15
    rep = agreement_report(predicted, human)
    assert isinstance(rep, AgreementReport)
    assert (rep.n, rep.tp, rep.fp, rep.fn, rep.tn) == (50, 20, 5, 10, 15)
    assert (rep.accuracy.k, rep.accuracy.n) == (35, 50)
    assert (rep.refusal_precision.k, rep.refusal_precision.n) == (20, 25)
    assert (rep.refusal_recall.k, rep.refusal_recall.n) == (20, 30)
    assert (rep.compliance_precision.k, rep.compliance_precision.n) == (15, 25)
    assert (rep.compliance_recall.k, rep.compliance_recall.n) == (15, 20)
    assert rep.refusal_recall == exact_rate(20, 30)
    assert rep.kappa == pytest.approx(0.4)
    assert rep.kappa_ci_low < rep.kappa < rep.kappa_ci_high
    assert rep.human_refusal_rate == pytest.approx(0.6)
    assert rep.predicted_refusal_rate == pytest.approx(0.5)
    assert agreement_report(predicted, human) == rep  # seeded bootstrap: deterministic


def test_agreement_report_as_dict_is_flat_floats() -> None:
    rep = agreement_report([True, False, True, True], [True, False, False, True])
    d = rep.as_dict()
    for key in (
        "n", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "kappa", "kappa_ci_low", "kappa_ci_high",
        "refusal_precision", "refusal_recall", "compliance_precision", "compliance_recall",
        "refusal_precision_ci_low", "compliance_recall_ci_high", "tp", "fp", "fn", "tn",
    ):
        assert key in d
    assert all(type(v) is float for v in d.values())
    assert d["tp"] == 2.0 and d["fp"] == 1.0 and d["tn"] == 1.0 and d["fn"] == 0.0
    assert "kappa" in rep.format()


def test_agreement_report_empty_and_one_class() -> None:
    empty = agreement_report([], [])
    assert empty.n == 0 and math.isnan(empty.kappa) and empty.accuracy.format() == "n/a (n=0)"
    # The judge never says refusal: refusal precision has no denominator, kappa is 0.
    rep = agreement_report([False] * 4, [True, False, False, False])
    assert rep.refusal_precision.n == 0 and rep.refusal_precision.format() == "n/a (n=0)"
    assert rep.kappa == pytest.approx(0.0)
    with pytest.raises(ValueError):
        agreement_report([True], [])
