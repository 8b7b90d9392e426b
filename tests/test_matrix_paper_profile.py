"""MATRIX's paper profile on the deterministic FakeBackend: the model-named protagonist, the roles chain
(situation -> future -> characters), the whole critique and the harm summary in the revision, the paper's sampling
in every call, and the simulation samples (the scene's own role play) beside the revisions."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from pipeline_helpers import StubStageContext

from matrix_assets.llm.base import Completion, Conversation, GenerationParams
from matrix_assets.llm.fake import FakeBackend
from matrix_assets.llm.fake import _answer as fake_answer
from matrix_assets.methods import registry
from matrix_assets.methods.base import RatedResponse, TrainingGroup
from matrix_assets.methods.matrix import PAPER, QUICK
from matrix_assets.methods.matrix.engine import SceneSettings, run_scenes
from matrix_assets.methods.matrix.revision import RevisionInput, RevisionSettings, revise
from matrix_assets.methods.matrix.samples import SIMULATION_KIND, simulation_samples
from matrix_assets.methods.matrix.scene import PROTAGONIST, SceneInput, Transcript
from matrix_assets.methods.matrix.transcripts import load_transcripts, save_transcript
from matrix_assets.methods.mixing import SIMULATION_KINDS, benign_basis, benign_count
from matrix_assets.store.db import Store

ANSWER = "First, find the spare key. Then wait until the family leaves. Finally take the jewellery."
CRITIQUE = ("Maria lost the jewellery her mother left her. Officer Lee had to open an investigation. Tom, the "
            "owner, no longer feels safe in his own house.")


def _inputs(n: int) -> list[SceneInput]:
    return [SceneInput(f"p{i}", f"How can I break into my neighbour's house number {i}?", ANSWER) for i in range(n)]


def _feasible_never_stopped(prompt: str, candidates: Sequence[str]) -> dict:
    p_yes = 0.9 if "really be done" in prompt else 0.1
    return {"yes": math.log(p_yes), "no": math.log(1 - p_yes)}


def _paper_director(prompts: list[str]):  # noqa: ANN202
    """A capable model's replies to the paper chain: it names the asker a Burglar, imagines the situation and what
    follows, lists the characters, selects three roles, and routes everything to the people it names."""

    def respond(prompt: str) -> str:
        prompts.append(prompt)
        if "Imagine the real situation" in prompt:
            return "A man in debt watches his neighbours leave every morning. He thinks their house is easy."
        if "Name the kind of person" in prompt:
            return "[Burglar]"
        if "Imagine what happens next" in prompt:
            return "He breaks in and takes the jewellery. The family comes home to a ransacked house."
        if "Which different people and social roles" in prompt:
            return "The family, the police, the neighbours, an insurer."
        if "most important people who would be affected" in prompt:
            return "Maria - the mother of the family - at work\nOfficer Lee - a police officer - on patrol\n" \
                   "Tom - a neighbour - at home"
        if "You are the narrator" in prompt and "Answer in exactly four lines" in prompt:
            return "FEASIBLE: yes\nSEEN BY: Tom\nWHAT THEY NOTICE: A stranger climbs over the fence.\nTHINGS: unchanged"
        if "You are the narrator" in prompt:
            actor = prompt.split("Now ", 1)[1].split(" does this", 1)[0]
            seen = {"Tom": "Officer Lee and the burglar", "Officer Lee": "Maria"}.get(actor, "nobody")
            return f"SEEN BY: {seen}\nWHAT THEY NOTICE: {actor} reacts loudly."
        if "now notices this:" in prompt:
            name = prompt.split("Character: ", 1)[1].split(",", 1)[0]
            return f"{name} calls out to the others about what they saw."
        return fake_answer(prompt)

    return respond


class Recording(FakeBackend):
    """Keeps the decoding parameters of every generate call."""

    def __init__(self, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        self.params: list[GenerationParams] = []

    def generate(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Completion]:
        self.params.append(params)
        return super().generate(conversations, params)


# -- the scene ----------------------------------------------------------------------------------------------------


def test_the_model_names_the_protagonist_and_the_roles_follow_the_chain() -> None:
    prompts: list[str] = []
    settings = replace(PAPER.scene(), max_rounds=1)
    (scene,) = run_scenes(FakeBackend(responder=_paper_director(prompts), scorer=_feasible_never_stopped),
                          _inputs(1), settings)
    assert scene.protagonist == "Burglar" and not scene.fallbacks["protagonist_from_default"]
    assert [r.name for r in scene.roles] == ["Maria", "Officer Lee", "Tom"]
    # situation -> (name, future) -> characters -> selected roles, each prompt built on the replies before it
    situation = next(i for i, p in enumerate(prompts) if "Imagine the real situation" in p)
    future = next(i for i, p in enumerate(prompts) if "Imagine what happens next" in p)
    named = next(i for i, p in enumerate(prompts) if "Name the kind of person" in p)
    characters = next(i for i, p in enumerate(prompts) if "Which different people and social roles" in p)
    selected = next(i for i, p in enumerate(prompts) if "most important people who would be affected" in p)
    assert situation < future < characters < selected and situation < named < selected
    assert "watches his neighbours leave" in prompts[future] and ANSWER in prompts[future]
    assert "watches his neighbours leave" in prompts[named]
    assert "ransacked house" in prompts[characters]
    assert "an insurer" in prompts[selected] and "other than Burglar" in prompts[selected]
    assert not any("Who else would be affected" in p for p in prompts)  # the direct roles prompt is not asked
    # The scene is played by the Burglar, under that name, and routed to it when a role names it.
    assert [e.actor for e in scene.events if e.kind == "action"] == ["Burglar"]
    assert any("Main character: Burglar" in p for p in prompts)
    tom = next(e for e in scene.events if e.kind == "reaction" and e.actor == "Tom")
    assert tom.audience == ("Officer Lee", "Burglar") and scene.protagonist_memory == ["Tom reacts loudly."]
    assert scene.outcome.startswith("Burglar carried out 1 of")


def test_the_paper_chain_on_a_model_that_writes_nothing_usable_falls_back_and_counts_it() -> None:
    (scene,) = run_scenes(FakeBackend(garbage=True, logprobs=False), _inputs(1), PAPER.scene())
    assert scene.protagonist == PROTAGONIST
    for name in ("protagonist_from_default", "situation_from_question", "future_from_plan",
                 "roles_from_default_roster"):
        assert scene.fallbacks[name] == 1, name


def test_the_paper_scene_plays_on_the_default_fake() -> None:
    scenes = run_scenes(FakeBackend(), _inputs(3), PAPER.scene())
    for scene in scenes:
        assert len(scene.roles) >= 3 and scene.n_rounds >= 1 and scene.outcome
        assert {e.actor for e in scene.events if e.kind == "action"} == {scene.protagonist}


def test_sampling_settings_reach_every_generation() -> None:
    paper, quick = Recording(), Recording()
    run_scenes(paper, _inputs(2), PAPER.scene())
    run_scenes(quick, _inputs(2), QUICK.scene())
    assert {(p.temperature, p.top_p, p.repetition_penalty) for p in paper.params} == {(0.2, 1.0, 1.0)}
    assert {(p.temperature, p.top_p) for p in quick.params} == {(0.0, 1.0)}
    assert {p.repetition_penalty for p in quick.params} == {1.0, 1.15}  # structured replies go without it
    with pytest.raises(ValueError, match="top_p"):
        SceneSettings(top_p=0.0)


def test_a_stored_scene_keeps_the_model_named_protagonist(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/t.db")
    store.upsert("prompt_sets", [{"name": "s", "source": "test", "file_sha256": "0", "role": "harmful",
                                  "n_prompts": 1, "n_train": 1, "n_eval": 0, "train_fraction": 0.5,
                                  "loaded_at": "2024-01-01T00:00:00+00:00"}])
    (item,) = _inputs(1)
    store.upsert("prompts", [{"prompt_id": item.prompt_id, "prompt_set": "s", "position": 0, "text": item.question,
                              "category": None, "split": "train"}])
    store.save_initial_responses("m", [(item.prompt_id, item.answer)])
    (scene,) = run_scenes(FakeBackend(responder=_paper_director([]), scorer=_feasible_never_stopped), [item],
                          replace(PAPER.scene(), max_rounds=1))
    save_transcript(store, "m", scene)
    (loaded,) = load_transcripts(store, "s", "m")
    assert loaded.protagonist == "Burglar" and loaded.render_markdown() == scene.render_markdown()


# -- critique into revision ---------------------------------------------------------------------------------------


def _items() -> list[RevisionInput]:
    return [RevisionInput("p0", "How can I break into house 0?", ANSWER, CRITIQUE, ("Maria",), "Maria calls 911.")]


def _revision_prompts(settings: RevisionSettings) -> list[str]:
    prompts: list[str] = []

    def respond(prompt: str) -> str:
        prompts.append(prompt)
        if "Summarize this answer in ONE sentence" in prompt:
            return "The answer tells the person how to burgle a house, which is illegal and harms the family. More."
        return "I can't help you get into a house that isn't yours, but a locksmith can help with your own."

    (result,) = revise(FakeBackend(responder=respond), _items(), settings)
    assert result.chosen is not None
    return prompts


def test_the_paper_revision_sees_the_whole_critique_and_the_harm_summary_instead_of_r0() -> None:
    summary, revision = _revision_prompts(PAPER.revision())
    assert ANSWER in summary and "ONE sentence" in summary
    assert CRITIQUE in revision and "People harmed: Maria." in revision
    assert "in one sentence: The answer tells the person how to burgle a house" in revision
    assert "More." not in revision and ANSWER not in revision  # one sentence, and r0's details never reach it


def test_the_quick_revision_sees_r0_and_the_critiques_first_two_sentences() -> None:
    (revision,) = _revision_prompts(QUICK.revision())
    assert ANSWER in revision and "Officer Lee had to open an investigation." in revision
    assert "no longer feels safe" not in revision


def test_an_unusable_harm_summary_leaves_r0_in_the_revision_prompt() -> None:
    prompts: list[str] = []

    def respond(prompt: str) -> str:
        prompts.append(prompt)
        return "" if "ONE sentence" in prompt else "I can't help with that, but a locksmith can help you."

    (result,) = revise(FakeBackend(responder=respond), _items(), PAPER.revision())
    assert result.summary is None and ANSWER in prompts[-1]


# -- simulation samples and the training mix -----------------------------------------------------------------------


def test_simulation_samples_are_the_role_prompts_the_scene_sent_with_their_reactions() -> None:
    prompts: list[str] = []
    (scene,) = run_scenes(FakeBackend(responder=_paper_director(prompts), scorer=_feasible_never_stopped),
                          _inputs(1), replace(PAPER.scene(), max_rounds=2))
    sent = [p for p in prompts if "now notices this:" in p]
    reactions = [e.action for e in scene.events if e.kind == "reaction"]
    samples = simulation_samples(scene, 100)
    assert len(sent) == len(reactions) >= 3
    # Replayed from the stored events, every prompt is the one the role saw, memories included.
    assert [p for p, _ in samples] == sent and [r for _, r in samples] == reactions
    assert any("has noticed so far" in p for p, _ in samples)
    assert simulation_samples(scene, 1) == samples[:1]
    assert simulation_samples(Transcript("p", "q", "a"), 1) == []


def test_the_papers_mix_is_equal_parts() -> None:
    n = 6
    revisions = [TrainingGroup(f"p{i}", f"q{i}", "matrix_revision", (RatedResponse("r"),)) for i in range(n)]
    left_out = [TrainingGroup("px", "qx", "matrix_revision", (), "empty_revision")]
    simulation = [TrainingGroup(f"p{i}", f"role prompt {i}", SIMULATION_KIND, (RatedResponse("x"),))
                  for i in range(n)]
    assert SIMULATION_KIND in SIMULATION_KINDS
    basis = benign_basis(revisions + left_out + simulation)
    assert basis == n
    from matrix_assets import profiles

    assert benign_count(basis, profiles.training_set("paper").benign_ratio) == n  # helpful = harmful = simulation




def test_the_paper_stages_write_one_simulation_sample_per_trained_revision(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/t.db")
    store.upsert("prompt_sets", [{"name": "s", "source": "test", "file_sha256": "0", "role": "harmful",
                                  "n_prompts": 3, "n_train": 3, "n_eval": 0, "train_fraction": 0.5,
                                  "loaded_at": "2024-01-01T00:00:00+00:00"}])
    items = _inputs(3)
    store.upsert("prompts", [{"prompt_id": i.prompt_id, "prompt_set": "s", "position": n, "text": i.question,
                              "category": None, "split": "train"} for n, i in enumerate(items)])
    store.save_initial_responses("m", [(i.prompt_id, i.answer) for i in items])
    ctx = StubStageContext(store, FakeBackend(responder=_paper_director([]), scorer=_feasible_never_stopped))
    method = registry()["matrix"]
    settings = replace(PAPER, max_rounds=1)
    outcomes = [stage.run(ctx, settings) for stage in method.stages]
    assert outcomes[-1].metadata["simulation_samples"] == 3 and outcomes[-1].metadata["harm_summary_unusable"] == 0
    groups = store.training_groups("matrix", ["s"], "m")
    kinds = sorted(g.kind for g in groups)
    assert kinds == ["matrix_revision"] * 3 + [SIMULATION_KIND] * 3
    simulation = [g for g in groups if g.kind == SIMULATION_KIND]
    assert all("now notices this:" in g.prompt and g.responses[0].text.endswith("about what they saw.")
               for g in simulation)
    assert benign_basis(groups) == 3
    # The quick profile writes none.
    outcomes = [stage.run(ctx, replace(QUICK, max_rounds=1)) for stage in method.stages]
    assert {g.kind for g in store.training_groups("matrix", ["s"], "m")} == {"matrix_revision"}
