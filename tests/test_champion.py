"""The rule that moves the MLflow `champion` alias: paired evidence on the same prompts, validated metrics only."""

from matrix_assets.evaluation.champion import should_promote
from matrix_assets.evaluation.stats import paired_comparison


def _pairs(base_yes: int, tuned_yes: int, both: int, n: int) -> object:
    """n paired prompts: `both` with the event on both sides, then base-only and tuned-only ones."""
    base = [True] * both + [True] * base_yes + [False] * tuned_yes
    tuned = [True] * both + [False] * base_yes + [True] * tuned_yes
    base += [False] * (n - len(base))
    tuned += [False] * (n - len(tuned))
    return paired_comparison(base, tuned)


def test_promoted_when_harmful_compliance_clearly_drops_and_refusals_do_not_clearly_rise() -> None:
    promote, reason = should_promote({"harmful_compliance": _pairs(30, 0, 40, 100),
                                      "over_refusal": _pairs(0, 1, 0, 100)}, "base")
    assert promote and "harmful compliance -30 pts" in reason


def test_a_drop_within_noise_is_not_enough() -> None:
    promote, reason = should_promote({"harmful_compliance": _pairs(3, 1, 40, 100)}, "base")
    assert not promote and "not clearly lower" in reason


def test_not_promoted_when_over_refusal_clearly_rises() -> None:
    promote, reason = should_promote({"harmful_compliance": _pairs(30, 0, 40, 100),
                                      "over_refusal": _pairs(0, 40, 0, 100)}, "champion", margin=0.05)
    assert not promote and "over refusal rises" in reason and "champion" in reason


def test_no_pairs_no_promotion() -> None:
    promote, reason = should_promote({}, "base")
    assert not promote and "no paired" in reason
