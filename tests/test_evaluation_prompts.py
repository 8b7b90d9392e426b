"""Which held-out prompts an evaluation answers, and whether it is a headline or an exploratory evaluation."""

from pathlib import Path

import pytest

from matrix_assets import profiles
from matrix_assets.defs.assets.evaluation import eval_prompts
from matrix_assets.evaluation.settings import EvaluationSettings, evaluation_kind
from matrix_assets.store import Store

PROFILES = {p: profiles.evaluation(p) for p in profiles.PROFILES}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 's.db'}")


def test_per_category_leaves_the_per_set_limit_on_a_set_without_categories(store: Store) -> None:
    settings = EvaluationSettings(harmful_sets=("advbench",), safe_sets=(), helpfulness_sets=(),
                                  max_harmful_per_set=10, per_category=2)
    prompts = eval_prompts(store, settings)
    assert not any(p.category for p in prompts)  # AdvBench has no categories
    assert len(prompts) == 10  # not 2: a set without categories is not one category ""


def test_per_category_samples_each_category_of_a_set_that_has_them(store: Store) -> None:
    settings = EvaluationSettings(harmful_sets=("harmfulqa",), safe_sets=(), helpfulness_sets=(),
                                  max_harmful_per_set=2, per_category=1)
    prompts = eval_prompts(store, settings)
    categories = [p.category for p in prompts]
    assert len(categories) > 1 and len(set(categories)) == len(categories)  # one of each category


def test_only_a_profiles_default_prompts_make_a_headline_evaluation() -> None:
    assert evaluation_kind(EvaluationSettings(), PROFILES) == "headline"
    assert evaluation_kind(profiles.evaluation("paper"), PROFILES) == "headline"
    # Other answer lengths or judges do not change which prompts are answered.
    assert evaluation_kind(EvaluationSettings(answer_tokens=32, model_judge=True), PROFILES) == "headline"
    for exploratory in (EvaluationSettings(max_harmful_per_set=2), EvaluationSettings(per_category=5),
                        EvaluationSettings(harmful_sets=("dangerousqa",)),
                        EvaluationSettings(helpfulness_sets=("vicuna_bench", "mt_bench"))):
        assert evaluation_kind(exploratory, PROFILES) == "exploratory", exploratory
    # The Launchpad hands lists where the settings hold tuples: still the same prompts.
    as_lists = EvaluationSettings(harmful_sets=["advbench", "dangerousqa"], safe_sets=["xstest_safe"],  # type: ignore[arg-type]
                                  helpfulness_sets=["vicuna_bench"])  # type: ignore[arg-type]
    assert evaluation_kind(as_lists, PROFILES) == "headline"
