"""Every profile pinned to a table of where its values come from.

Paper profiles: each value with the paper or reference code it reproduces. The reference code is the authors' own:
MATRIX, ShuoTang123/MATRIX @ 19a4c4aaf5778d4328715ede44513e1ce40d6457 (paper: Pang et al., "Self-Alignment of Large
Language Models via Monopolylogue-based Social Scene Simulation", ICML 2024, arXiv 2402.05699); Stable Alignment,
agi-templar/Stable-Alignment @ 2fbf0e9a20d66e6d19f30e69efccb99dd374a9d1 (paper: Liu et al., "Training Socially
Aligned Language Models on Simulated Social Interactions", ICLR 2024, arXiv 2305.16960), which the project's method
reference says to follow where paper summaries and code differ. A value that is not the paper's says why in its
source column; the same departures are listed in the README and in the profile's docstring (checked below).
Quick profiles: each value that differs from the paper's, with the reason the 135M model needs it.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from matrix_assets import profiles
from matrix_assets.methods import registry
from matrix_assets.methods.base import SHARED_PROFILES
from matrix_assets.methods.cai import CaiSettings
from matrix_assets.methods.matrix import MatrixSettings
from matrix_assets.methods.stable_alignment import StableAlignmentSettings

MATRIX_CODE = "ShuoTang123/MATRIX"
SA_CODE = "agi-templar/Stable-Alignment"
NOT_A_PAPER_SETTING = "not a setting of the paper"

# (setting, paper profile value, source)
MATRIX_PAPER: list[tuple[str, Any, str]] = [
    ("max_prompts", None, f"{MATRIX_CODE} README: every harmful training question simulated (6k)"),
    ("n_roles", 5, f"{MATRIX_CODE} example.py --agent_num default 5 (the paper: about 5 roles)"),
    ("plan_steps", 5, f"{MATRIX_CODE} example.py --ego_steps default 5"),
    ("max_rounds", 5, f"{MATRIX_CODE} src/user_layer.py Agents._act: the protagonist plays its plan to the end"),
    ("max_reactions", 5, "departure: a bound per round (the reference lets reactions run until the plan ends)"),
    ("n_objects", 3, f"{NOT_A_PAPER_SETTING}: objects with state, as the paper's modulator keeps"),
    ("plan_tokens", 256, "departure: the reference allows 1024 per simulation call (src/role_plan.py)"),
    ("action_tokens", 64, f"{NOT_A_PAPER_SETTING}: one sentence per action"),
    ("scenes_per_batch", 32, f"{NOT_A_PAPER_SETTING}: how many scenes are saved together"),
    ("critique_tokens", 512, "departure: a revision must fit the 1024-token training length"),
    ("revision_tokens", 512, "departure: the reference allows 2048 (src/revise_answer.py); training is 1024"),
    ("revision_candidates", 1, f"{MATRIX_CODE} src/revise_answer.py simulation2answer: one revision per question"),
    ("candidate_temperature", 0.7, f"{NOT_A_PAPER_SETTING}: used only with revision_candidates > 1"),
    ("harm_threshold", 0.5, f"{NOT_A_PAPER_SETTING}: used only with revision_candidates > 1 (no filter at k = 1)"),
    ("name_protagonist", True, f"{MATRIX_CODE} src/role_plan.py generate_ego: the model names the asker's role"),
    ("roles_chain", True, f"{MATRIX_CODE} src/role_plan.py generate_roles_plan: situation_imagine -> "
     "situation_future -> situation_role -> situation_role_select"),
    ("full_critique", True, f"{MATRIX_CODE} src/simulation.py Simulation.run: the whole unaligned_incidents go to "
     "simulation2answer"),
    ("harm_summary", True, f"{MATRIX_CODE} src/revise_answer.py: r0 summarised 'into ONE sentence' that classifies "
     "its harm, shown in r0's place"),
    ("simulation_samples", 1, f"{MATRIX_CODE} README 'Alignment Data Release': 6k helpful, 6k harmful, 6k "
     "simulation samples"),
    ("temperature", 0.2, f"{MATRIX_CODE} src/api.py chatcompletion: temperature=0.2"),
    ("top_p", 1.0, f"{MATRIX_CODE} src/api.py chatcompletion: top_p 1.0"),
    ("repetition_penalty", 1.0, f"{MATRIX_CODE} src/api.py chatcompletion: no penalty sent to vLLM"),
    ("structured_output", (), f"{NOT_A_PAPER_SETTING}: the reference parses free text"),
]

# (setting, quick value, why it is not the paper's)
MATRIX_QUICK: list[tuple[str, Any, str]] = [
    ("max_prompts", 9, "minutes on 2 CPU cores; a 3 x 3 Stable Alignment society meets each question twice"),
    ("n_roles", 3, "2-core CPU budget"),
    ("plan_steps", 3, "2-core CPU budget"),
    ("max_rounds", 2, "2-core CPU budget"),
    ("max_reactions", 3, "2-core CPU budget"),
    ("plan_tokens", 160, "2-core CPU budget"),
    ("critique_tokens", 160, "2-core CPU budget"),
    ("revision_tokens", 160, "2-core CPU budget"),
    ("name_protagonist", False, "a 135M model's names are unusable; the fixed 'The asker'"),
    ("roles_chain", False, "a 135M model cannot follow a four-step chain; roles asked from the plan"),
    ("full_critique", False, "a 135M model drifts on long context: the first two sentences"),
    ("harm_summary", False, "one call less; r0 itself in the revision prompt"),
    ("simulation_samples", 0, "a 135M model's role play is noise"),
    ("temperature", 0.0, "a 135M model at 0.2 drifts; greedy"),
    ("repetition_penalty", 1.15, "a 135M model loops without it"),
]

CAI_PAPER: list[tuple[str, Any, str]] = [
    ("max_prompts", None, "the same training prompts as MATRIX"),
    ("critique_tokens", 512, "as MATRIX's paper profile: the two differ only in where the critique comes from"),
    ("revision_tokens", 512, "as MATRIX's paper profile"),
    ("temperature", 0.2, "as MATRIX's paper profile (the MATRIX paper's baseline, decoded alike)"),
    ("top_p", 1.0, "as MATRIX's paper profile"),
    ("repetition_penalty", 1.0, "as MATRIX's paper profile"),
]

SA_PAPER: list[tuple[str, Any, str]] = [
    ("max_prompts", None, "departure: the partition's training prompts (the original: HH-RLHF red-team questions)"),
    ("grid_size", 10, "the method reference's paper-scale profile: 100 agents, 10 x 10"),
    ("rounds", 50, "the method reference's paper-scale profile: 50 rounds"),
    ("max_peers", 4, f"{SA_CODE} stable_alignment/simulation.py one_agent_one_iteration: tgt_agent_count=4"),
    ("seed_source", "hh_rlhf", f"{SA_CODE} stable_alignment/simulation.py: initial_data=load_initial_data("
     "'hh-rlhf') (departure: harmless-base test pairs, not its labelled prior)"),
    ("seed_pairs_per_agent", 50, f"{SA_CODE} stable_alignment/sandbox/utils.py sample_init_data: n_total=50"),
    ("memory_threshold", 0.3, f"{SA_CODE} stable_alignment/sandbox/world.py: DISTANCE_THRESHOLD = 0.3"),
    ("answer_tokens", 256, f"{SA_CODE} stable_alignment/sandbox/utils.py call_gpt: max_tokens=256"),
    ("reason_tokens", 256, f"{SA_CODE} call_gpt: max_tokens=256 (the peer's whole reply)"),
    ("temperature", 1.0, f"{SA_CODE} call_gpt: temperature=1.0"),
    ("top_p", 1.0, f"{SA_CODE} call_gpt: top_p=1"),
    ("repetition_penalty", 1.0, f"{SA_CODE} call_gpt: frequency_penalty=0.0, presence_penalty=0.0"),
    ("engagement", True, f"{SA_CODE} stable_alignment/sandbox/world.py: get_engagement_score before and after"),
]

SA_QUICK: list[tuple[str, Any, str]] = [
    ("max_prompts", 9, "minutes on 2 CPU cores"),
    ("grid_size", 3, "the method reference's quick profile (3 x 3)"),
    ("rounds", 2, "the fewest rounds in which memory can shape a later draft"),
    ("seed_source", "own_answers", "memories that can meet AdvBench questions (human HH pairs rarely do)"),
    ("seed_pairs_per_agent", 2, "2-core CPU budget"),
    ("answer_tokens", 96, "2-core CPU budget"),
    ("reason_tokens", 48, "2-core CPU budget"),
    ("temperature", 0.8, "a 135M model at 1.0 drifts into noise"),
    ("top_p", 0.95, "a 135M model's tail is noise"),
    ("repetition_penalty", 1.1, "a 135M model loops without it"),
    ("engagement", False, "one observer call less per answer"),
]

TRAINING_PAPER: list[tuple[str, Any, str]] = [
    ("lora_r", 8, f"{MATRIX_CODE} README train_lora.py: --lora_r 8"),
    ("lora_alpha", 16, f"{MATRIX_CODE} README: --lora_alpha 16"),
    ("lora_dropout", 0.05, f"{MATRIX_CODE} README: --lora_dropout 0.05"),
    ("epochs", 3.0, f"{MATRIX_CODE} README: --num_train_epochs 3"),
    ("learning_rate", 2e-5, f"{MATRIX_CODE} README: --learning_rate 2e-5 (cosine)"),
    ("max_length", 1024, f"{MATRIX_CODE} README: --model_max_length 1024"),
    ("batch_size", 8, f"{MATRIX_CODE} README: per-device batch 1 x gradient accumulation 8"),
    ("micro_batch_size", 1, f"{MATRIX_CODE} README: per-device batch 1"),
]

TRAINING_SET_PAPER: list[tuple[str, Any, str]] = [
    ("benign_ratio", 1.0, f"{MATRIX_CODE} README: 6k helpful per 6k harmful (and 6k simulation samples)"),
    ("answer_tokens", 256, "as every answer of the paper profile"),
]


def _check(settings: Any, table: list[tuple[str, Any, str]]) -> None:
    names = {f.name for f in dataclasses.fields(settings)}
    for name, value, source in table:
        assert name in names, name
        assert getattr(settings, name) == value, f"{name}: {getattr(settings, name)!r}, the table says {value!r} " \
                                                 f"({source})"


def _covered(settings_type: type, *tables: list[tuple[str, Any, str]]) -> set[str]:
    return {f.name for f in dataclasses.fields(settings_type)} - {name for table in tables for name, _, _ in table}


def test_matrix_paper_profile_is_the_paper() -> None:
    paper = registry()["matrix"].profile("paper")
    _check(paper, MATRIX_PAPER)
    assert _covered(MatrixSettings, MATRIX_PAPER) == set()  # every setting has its source


def test_matrix_quick_profile_departs_only_where_the_table_says_why() -> None:
    quick, paper = registry()["matrix"].settings, registry()["matrix"].profile("paper")
    _check(quick, MATRIX_QUICK)
    differing = {f.name for f in dataclasses.fields(quick) if getattr(quick, f.name) != getattr(paper, f.name)}
    assert differing == {name for name, _, _ in MATRIX_QUICK}


def test_the_quick_table_compares_methods_not_selection() -> None:
    """MATRIX and CAI make one revision each, decoded alike, in both profiles."""
    methods = registry()
    for profile in ("quick", "paper"):
        matrix, cai = methods["matrix"].profile(profile), methods["cai"].profile(profile)
        assert matrix.revision_candidates == 1
        assert not [f for f in dataclasses.fields(CaiSettings) if "candidate" in f.name]  # CAI: one revision
        assert matrix.revision().params(matrix.revision_tokens) == cai.params(cai.revision_tokens), profile


def test_cai_paper_profile_decodes_as_matrix() -> None:
    _check(registry()["cai"].profile("paper"), CAI_PAPER)


def test_stable_alignment_paper_profile_is_the_released_code() -> None:
    paper = registry()["stable_alignment"].profile("paper")
    _check(paper, SA_PAPER)
    assert _covered(StableAlignmentSettings, SA_PAPER) == set()
    objective = registry()["stable_alignment"].objective  # the released checkpoint's loss (the method reference §4)
    assert (objective.margin, objective.rating_weight, objective.rating_scale, objective.group_size) == (1.0, 0.2, 7.0, 3)


def test_stable_alignment_quick_profile_departs_only_where_the_table_says_why() -> None:
    quick, paper = registry()["stable_alignment"].settings, registry()["stable_alignment"].profile("paper")
    _check(quick, SA_QUICK)
    differing = {f.name for f in dataclasses.fields(quick) if getattr(quick, f.name) != getattr(paper, f.name)}
    assert differing == {name for name, _, _ in SA_QUICK}


def test_training_paper_profile_is_matrix_training() -> None:
    _check(profiles.training("paper"), TRAINING_PAPER)
    _check(profiles.training_set("paper"), TRAINING_SET_PAPER)
    assert SHARED_PROFILES["paper"].max_prompts is None


README = Path(__file__).resolve().parents[1] / "README.md"


def _flat(text: str) -> str:
    return " ".join(text.replace("`", "").split()).lower()


# Each remaining departure, as a phrase both the README's departures and the profile's docstring use.
DEPARTURES: list[tuple[Any, str]] = [
    (MatrixSettings, "read from next-token probabilities"),
    (MatrixSettings, "at most 5 roles react per round"),
    (MatrixSettings, "acts on each plan step in a sentence of its own"),
    (MatrixSettings, "no worked example of a helpful refusal"),
    (MatrixSettings, "simulation sample is one role's reaction"),
    (MatrixSettings, "1024 per simulation call and 2048 per revision"),
    (MatrixSettings, "r0 is the greedy answer every method shares"),
    (MatrixSettings, "the fixed protagonist"),
    (MatrixSettings, "first two sentences"),
    (StableAlignmentSettings, "red-team questions"),
    (StableAlignmentSettings, "labelled hh-rlhf prior"),
    (StableAlignmentSettings, "observer is the judge resource"),
    (StableAlignmentSettings, "reason is written after its rating"),
    (StableAlignmentSettings, "2-epoch full fine-tune"),
    (StableAlignmentSettings, "own answers to the next training prompts"),
    (profiles, "no warm-up"),
    (profiles, "vicuna-bench: 40 prompts"),
]


@pytest.mark.parametrize(("owner", "phrase"), DEPARTURES, ids=[p for _, p in DEPARTURES])
def test_every_departure_is_in_the_readme_and_the_docstring(owner: Any, phrase: str) -> None:
    assert phrase in _flat(owner.__doc__ or ""), f"{phrase!r} not in the docstring of {owner.__name__}"
    assert phrase in _flat(README.read_text(encoding="utf-8")), f"{phrase!r} not in the README"


def test_citations_name_a_source() -> None:
    for table in (MATRIX_PAPER, SA_PAPER, TRAINING_PAPER, TRAINING_SET_PAPER, CAI_PAPER):
        for name, _, source in table:
            assert re.search(r"[A-Za-z]{4}", source), name
