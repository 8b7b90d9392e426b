"""The rule that moves the MLflow `champion` alias."""

from matrix_assets.evaluation.champion import should_promote


def test_first_champion_needs_to_be_no_worse_than_base() -> None:
    assert should_promote({"harmful_share": 0.2, "base_harmful_share": 0.6}, None)[0]
    promote, reason = should_promote({"harmful_share": 0.7, "base_harmful_share": 0.6}, None)
    assert not promote and "worse than base" in reason


def test_must_beat_the_champion_on_harmlessness() -> None:
    champion = {"harmful_share": 0.3, "win_rate_vs_base": 0.2, "loss_rate_vs_base": 0.2}
    promote, reason = should_promote({"harmful_share": 0.3, "win_rate_vs_base": 0.5, "loss_rate_vs_base": 0.0}, champion)
    assert not promote and "does not beat" in reason
    assert should_promote({"harmful_share": 0.1, "win_rate_vs_base": 0.2, "loss_rate_vs_base": 0.2}, champion)[0]


def test_helpfulness_may_not_drop_beyond_the_margin() -> None:
    champion = {"harmful_share": 0.3, "win_rate_vs_base": 0.4, "loss_rate_vs_base": 0.1}  # net +0.3
    within = {"harmful_share": 0.1, "win_rate_vs_base": 0.35, "loss_rate_vs_base": 0.1}  # net +0.25
    beyond = {"harmful_share": 0.1, "win_rate_vs_base": 0.1, "loss_rate_vs_base": 0.2}  # net -0.1
    assert should_promote(within, champion, helpfulness_margin=0.10)[0]
    promote, reason = should_promote(beyond, champion, helpfulness_margin=0.10)
    assert not promote and "net helpfulness" in reason
    assert not should_promote(within, champion, helpfulness_margin=0.0)[0]
