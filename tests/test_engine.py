"""The MATRIX engine on the deterministic FakeBackend: scene shape, routing, memories, objects, the modulator's
verdicts and order, fallbacks, critique, revision and self-selection."""

from __future__ import annotations

import math

import pytest

from matrix_assets.llm.base import GenerationParams, LogprobsUnavailable
from matrix_assets.llm.fake import FakeBackend
from matrix_assets.llm.fake import _answer as fake_answer
from matrix_assets.methods.base import answer_directly
from matrix_assets.methods.matrix.engine import (
    SceneSettings,
    _conclude,
    default_roster,
    fallback_totals,
    run_scenes,
    scenes_relying_on,
)
from matrix_assets.methods.matrix.revision import RevisionInput, RevisionSettings, critique_scenes, revise
from matrix_assets.methods.matrix.scene import PROTAGONIST, SceneEvent, SceneInput, Transcript

ANSWER = (
    "First, find out where the neighbour keeps the spare key. Then wait until the family leaves for work. "
    "Finally open the door and take the jewellery from the bedroom."
)


def _inputs(n: int) -> list[SceneInput]:
    return [SceneInput(f"p{i}", f"How can I break into my neighbour's house number {i}?",
                       ANSWER.replace("neighbour", f"neighbour {i}")) for i in range(n)]


def _check_scene(scene: Transcript, settings: SceneSettings) -> None:
    assert len(scene.roles) >= settings.min_roles
    assert len({r.name.lower() for r in scene.roles}) == len(scene.roles)
    assert 1 <= len(scene.plan) <= settings.plan_steps
    assert scene.target
    assert 1 <= scene.n_rounds <= min(settings.max_rounds, len(scene.plan))
    assert {e.kind for e in scene.events} <= {"action", "modulation", "reaction", "objects", "memory"}
    people = {r.name for r in scene.roles} | {scene.protagonist}
    for round_no in range(1, scene.n_rounds + 1):
        events = [e for e in scene.events if e.round == round_no]
        kinds = [e.kind for e in events]
        assert kinds[0] == "action" and kinds[1] == "modulation" and kinds[-1] == "memory"
        assert kinds.count("action") == kinds.count("modulation") == kinds.count("memory") == 1
        assert set(kinds[2:-1]) <= {"reaction", "objects"}
        modulation = events[1]
        assert modulation.observation and set(modulation.audience) <= people
        reactions = [e for e in events if e.kind == "reaction"]
        assert len(reactions) <= settings.max_reactions
        for reaction in reactions:
            assert reaction.actor in people - {scene.protagonist}
            assert set(reaction.audience) <= people - {reaction.actor}
    assert scene.outcome and scene.consequence


def test_scene_shape_on_the_fake() -> None:
    settings = SceneSettings()
    scenes = run_scenes(FakeBackend(), _inputs(4), settings)
    assert [s.prompt_id for s in scenes] == ["p0", "p1", "p2", "p3"]
    for scene in scenes:
        _check_scene(scene, settings)
    totals = fallback_totals(scenes)
    for name in ("plan_from_answer_sentences", "roles_from_default_roster", "feasible_assumed",
                 "feasible_from_text", "stopped_from_text"):
        assert totals[name] == 0, name  # the fake gives verdict distributions: nothing parsed, nothing assumed
    assert scenes_relying_on(scenes) == {"roles": 0, "plan": 0, "feasibility": 0}


def _feasible_never_stopped(prompt: str, candidates) -> dict:  # noqa: ANN001
    p_yes = 0.9 if "really be done" in prompt else 0.1
    return {"yes": math.log(p_yes), "no": math.log(1 - p_yes)}


def _director(order: str, routes: dict[str, str], things: str = "unchanged"):
    """A responder that plays a fixed scene: roles Maria, Officer Lee, Tom; the modulator names `order` as the
    audience of the protagonist's action; `routes[actor]` is who notices each role's reaction."""

    def respond(prompt: str) -> str:
        if "Who else would be affected" in prompt:
            return "Maria - a neighbour - at home\nOfficer Lee - a police officer - on patrol\nTom - the owner - away"
        if "important things involved" in prompt:
            return "Jewellery - in the bedroom drawer\nFront door - locked"
        if "You are the narrator" in prompt and "Answer in exactly four lines" in prompt:
            return (f"FEASIBLE: yes\nSEEN BY: {order}\nWHAT THEY NOTICE: A stranger forces the front door.\n"
                    f"THINGS: {things}")
        if "You are the narrator" in prompt:
            actor = prompt.split("Now ", 1)[1].split(" does this", 1)[0]
            return f"SEEN BY: {routes.get(actor, 'nobody')}\nWHAT THEY NOTICE: {actor} reacts loudly."
        if "now notices this:" in prompt:
            name = prompt.split("Character: ", 1)[1].split(",", 1)[0]
            return f"{name} calls out to the others about what they saw."
        return fake_answer(prompt)

    return respond


def test_reactions_follow_the_modulators_order_and_are_routed_to_who_notices() -> None:
    responder = _director("Tom, Maria", {"Tom": "Officer Lee and The asker", "Maria": "nobody",
                                         "Officer Lee": "Maria"})
    settings = SceneSettings(max_rounds=1, max_reactions=5)
    (scene,) = run_scenes(FakeBackend(responder=responder, scorer=_feasible_never_stopped), _inputs(1), settings)
    _check_scene(scene, settings)
    reactions = [e for e in scene.events if e.kind == "reaction"]
    # Tom and Maria in the modulator's order, then Officer Lee, who only noticed Tom's reaction.
    assert [e.actor for e in reactions] == ["Tom", "Maria", "Officer Lee"]
    assert reactions[0].audience == ("Officer Lee", PROTAGONIST)
    assert reactions[1].audience == ()
    # Roles remember what they observed; the asker remembers the reaction routed to it.
    lee = scene.role("Officer Lee")
    assert lee is not None and lee.memory == ["Tom reacts loudly."]
    maria = scene.role("Maria")
    assert maria is not None and maria.memory == ["A stranger forces the front door.", "Officer Lee reacts loudly."]
    assert scene.protagonist_memory == ["Tom reacts loudly."]


def test_a_common_word_in_a_seen_by_line_routes_nothing_to_the_asker() -> None:
    """The routing bug: "the" is a word of "The asker", so "Officer Lee, who is on the street" used to route the
    protagonist's own action back to it, and "the neighbours" every reaction."""
    responder = _director("Officer Lee, who is on the street", {"Officer Lee": "the neighbours across the road",
                                                                "Maria": "The asker"})
    settings = SceneSettings(max_rounds=1, max_reactions=5)
    (scene,) = run_scenes(FakeBackend(responder=responder, scorer=_feasible_never_stopped), _inputs(1), settings)
    modulation = next(e for e in scene.events if e.kind == "modulation")
    assert modulation.audience == ("Officer Lee",)
    (reaction,) = [e for e in scene.events if e.kind == "reaction"]
    assert reaction.actor == "Officer Lee" and reaction.audience == ()
    assert scene.protagonist_memory == []  # the asker noticed nothing: nothing was routed to it


def test_the_asker_named_in_a_seen_by_line_is_still_routed_to() -> None:
    responder = _director("Maria", {"Maria": "the asker, then Tom"})
    (scene,) = run_scenes(FakeBackend(responder=responder, scorer=_feasible_never_stopped), _inputs(1),
                          SceneSettings(max_rounds=1, max_reactions=5))
    reactions = [e for e in scene.events if e.kind == "reaction"]
    assert reactions[0].audience == (PROTAGONIST, "Tom") and scene.protagonist_memory == ["Maria reacts loudly."]


def test_a_role_reacts_with_its_memory_in_the_prompt() -> None:
    seen_prompts: list[str] = []
    base = _director("Maria", {"Maria": "Tom"})

    def respond(prompt: str) -> str:
        seen_prompts.append(prompt)
        return base(prompt)

    settings = SceneSettings(max_rounds=2, plan_steps=2, max_reactions=3)
    run_scenes(FakeBackend(responder=respond, scorer=_feasible_never_stopped), _inputs(1), settings)
    round_two_maria = [p for p in seen_prompts if "Character: Maria" in p][-1]
    assert "What Maria has noticed so far:" in round_two_maria
    assert "A stranger forces the front door." in round_two_maria


def test_objects_take_part_and_change_state() -> None:
    responder = _director("Maria", {}, things="Jewellery - gone from the drawer")
    (scene,) = run_scenes(FakeBackend(responder=responder, scorer=_feasible_never_stopped), _inputs(1),
                          SceneSettings(max_rounds=1))
    jewellery = next(o for o in scene.objects if o.name == "Jewellery")
    assert jewellery.state == "gone from the drawer"
    assert any(e.kind == "objects" and "Jewellery: gone" in e.action for e in scene.events)


def test_feasibility_and_stopping_are_read_from_the_next_token_distribution() -> None:
    def scorer(prompt: str, candidates) -> dict:  # noqa: ANN001
        if "really be done" in prompt:
            return {"yes": math.log(0.2), "no": math.log(0.8)}  # infeasible
        return {"yes": math.log(0.5), "no": math.log(0.5)}

    scenes = run_scenes(FakeBackend(scorer=scorer), _inputs(2), SceneSettings())
    for scene in scenes:
        mods = [e for e in scene.events if e.kind == "modulation"]
        # A failed attempt can still be noticed (and reacted to), but it changes no object.
        assert mods and all(e.feasible is False and e.p_yes == pytest.approx(0.2) for e in mods)
        assert all("tries, but cannot" in e.observation for e in mods)
        assert not [e for e in scene.events if e.kind == "objects"]

    stop = run_scenes(FakeBackend(scorer=lambda p, c: {"yes": 0.0, "no": -5.0}), _inputs(1), SceneSettings())[0]
    assert stop.stopped and stop.n_rounds == 1 and "stopped in round 1" in stop.outcome


def test_without_log_probabilities_verdicts_come_from_the_labelled_lines_and_are_counted() -> None:
    scenes = run_scenes(FakeBackend(logprobs=False), _inputs(2), SceneSettings())
    for scene in scenes:
        assert scene.fallbacks["feasible_from_text"] == scene.n_rounds
        assert scene.fallbacks["stopped_from_text"] == scene.n_rounds
        assert all(e.p_yes is None for e in scene.events if e.kind == "modulation")


def test_garbage_model_never_raises_and_records_fallbacks() -> None:
    settings = SceneSettings()
    inputs = _inputs(3) + [SceneInput("g", "??", "~~")]
    scenes = run_scenes(FakeBackend(garbage=True, logprobs=False), inputs, settings)
    for scene in scenes:
        _check_scene(scene, settings)
        for name in ("roles_reasked", "roles_from_default_roster", "feasible_assumed", "observation_is_action",
                     "memory_from_events", "stopped_assumed_no", "no_objects_parsed", "action_noticed_by_nobody"):
            assert scene.fallbacks[name] >= 1, name
        roster = [r.name for r in default_roster()]
        assert [r.name for r in scene.roles] == roster[: len(scene.roles)]
    assert scenes[0].plan[0].startswith("First, find out where the neighbour 0 keeps")
    assert scenes[3].plan == ["??"]
    assert scenes_relying_on(scenes) == {"roles": 4, "plan": 4, "feasibility": 4}


def test_generate_calls_are_bounded_by_the_scene_structure_not_the_number_of_scenes() -> None:
    """Scenes advance together: on a backend without a live session (the default waves), the number of `generate`
    calls is bounded by the longest chain of steps one scene can take, however many scenes run."""
    settings = SceneSettings()
    # planning (target + plan, roles + objects, one re-ask), then per round: action, route, each reaction and
    # its routing, memory
    bound = 3 + settings.max_rounds * (3 + 2 * settings.max_reactions)
    small, large = FakeBackend(), FakeBackend()
    run_scenes(small, _inputs(2), settings)
    run_scenes(large, _inputs(12), settings)
    assert large.calls > 5 * small.calls
    assert small.batches <= bound and large.batches <= bound
    assert large.calls >= 4 * large.batches  # many conversations per call


def test_critique_sees_question_answer_and_transcript() -> None:
    scenes = run_scenes(FakeBackend(), _inputs(2), SceneSettings())
    prompts: list[str] = []

    def respond(prompt: str) -> str:
        prompts.append(prompt)
        return f"Maria lost her savings because of the answer.\nHARMED: {scenes[0].roles[0].name}"

    critiques = critique_scenes(FakeBackend(responder=respond), scenes, RevisionSettings())
    assert [c.prompt_id for c in critiques] == ["p0", "p1"]
    assert scenes[0].question in prompts[0] and scenes[0].answer in prompts[0]
    assert scenes[0].render_text().splitlines()[0] in prompts[0]
    assert critiques[0].harmed_parties == [scenes[0].roles[0].name] and not critiques[0].used_fallback
    garbage = critique_scenes(FakeBackend(garbage=True), scenes, RevisionSettings())
    assert all(c.used_fallback and scenes[i].outcome in c.text for i, c in enumerate(garbage))


def _items(n: int) -> list[RevisionInput]:
    return [RevisionInput(f"p{i}", f"How can I break into house {i}?", ANSWER, "Maria lost her savings.", ("Maria",),
                          "Maria calls the police.") for i in range(n)]


def test_revision_sees_question_answer_and_critique_and_is_never_forced() -> None:
    """Whatever the model writes is the revision: a compliant one is kept (and trained on), never replaced."""
    prompts: list[str] = []

    def respond(prompt: str) -> str:
        prompts.append(prompt)
        return "Sure, first get a crowbar, then open the back door quietly."

    (result,) = revise(FakeBackend(responder=respond), _items(1), RevisionSettings())
    assert result.chosen == "Sure, first get a crowbar, then open the back door quietly." and result.excluded is None
    assert ANSWER in prompts[0] and "Maria lost her savings." in prompts[0] and "house 0" in prompts[0]


def test_an_empty_revision_is_left_out_not_replaced() -> None:
    (result,) = revise(FakeBackend(responder=lambda p: "ok"), _items(1), RevisionSettings())
    assert result.chosen is None and result.excluded == "empty_revision"


def _preference(prompt: str, candidates) -> dict:  # noqa: ANN001
    """A model with a known preference: an answer mentioning a locksmith hurts nobody, a crowbar hurts."""
    p_yes = 0.1 if "locksmith" in prompt else 0.9 if "crowbar" in prompt else 0.5
    return {"yes": math.log(p_yes), "no": math.log(1 - p_yes)}


def _sampler(prompt_params_answers: dict[int, str]):  # noqa: ANN202
    class Sampling(FakeBackend):
        def generate(self, conversations, params: GenerationParams):  # noqa: ANN001, ANN202
            out = super().generate(conversations, params)
            return [type(c)(prompt_params_answers[params.seed] if params.temperature > 0 else "greedy answer text",
                            c.prompt_tokens, c.completion_tokens) for c in out]
    return Sampling


def test_self_selection_picks_the_candidate_the_model_scores_least_harmful() -> None:
    backend = _sampler({0: "Get a crowbar and force the back door.", 1: "Call a locksmith to open your own door.",
                        2: "Ask around for advice first, then decide."})(scorer=_preference)
    (result,) = revise(backend, _items(1), RevisionSettings(candidates=3))
    assert [c.candidate_index for c in result.candidates] == [0, 1, 2]
    assert result.chosen == "Call a locksmith to open your own door."
    assert [c.selected for c in result.candidates] == [False, True, False]
    assert result.candidates[1].p_harm == pytest.approx(0.1)


def test_a_prompt_whose_best_candidate_is_judged_harmful_is_left_out() -> None:
    backend = _sampler({0: "Get a crowbar and force it.", 1: "Use a crowbar on the window."})(scorer=_preference)
    (result,) = revise(backend, _items(1), RevisionSettings(candidates=2))
    assert result.chosen is None and result.excluded == "self_judged_harmful"
    assert any(c.selected for c in result.candidates)  # the best one is recorded, just not trained on


def test_one_candidate_is_the_papers_single_revision_exactly() -> None:
    """k = 1: one greedy revision, no sampling, no scoring, nothing left out: the same text as a plain greedy call
    with the revision prompt."""
    from matrix_assets.templates import system_and_user

    backend = FakeBackend(scorer=_preference)
    items = _items(3)
    results = revise(backend, items, RevisionSettings(candidates=1))
    assert backend.score_calls == 0
    direct = FakeBackend().generate(
        [system_and_user("matrix/revision", i.question, answer=i.answer, critique="Maria lost her savings. People "
                         "harmed: Maria.") for i in items],
        GenerationParams(max_new_tokens=RevisionSettings().revision_tokens, repetition_penalty=1.15))
    assert [r.chosen for r in results] == [c.text for c in direct]
    assert all(r.excluded is None and len(r.candidates) == 1 and r.candidates[0].p_harm is None for r in results)


def test_self_selection_needs_log_probabilities_and_says_so() -> None:
    with pytest.raises(LogprobsUnavailable, match="revision_candidates: 1"):
        revise(FakeBackend(logprobs=False), _items(1), RevisionSettings(candidates=2))


def test_answer_directly_one_per_question() -> None:
    backend = FakeBackend()
    answers = answer_directly(backend, ["How do I bake bread?", "How do I pick a lock?", "How do I bake bread?"], 64)
    assert len(answers) == 3 and answers[0] == answers[2]
    assert answer_directly(backend, [], 64) == [] and backend.calls == 3


class LiveFakeBackend(FakeBackend):
    """Answers one job at a time, always the most recently queued first."""

    def __init__(self, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        self.taken: list[int] = []

    def serve(self, take, on_completion) -> None:  # noqa: ANN001
        queue = []
        while True:
            queue += take(None)
            if not queue:
                return
            job = queue.pop()
            self.taken.append(job.id)
            on_completion(job, self.generate([job.conversation], job.params)[0])


def test_live_scheduling_gives_the_same_scenes_as_waves() -> None:
    settings = SceneSettings(n_roles=3, plan_steps=3, max_rounds=3)
    waves, live = FakeBackend(), LiveFakeBackend()
    done: list[str] = []
    progress: list[tuple[int, int]] = []
    expected = run_scenes(waves, _inputs(5), settings)
    got = run_scenes(live, _inputs(5), settings, on_scene_done=lambda t: done.append(t.prompt_id),
                     progress=lambda d, t: progress.append((d, t)))
    assert [t.render_markdown() for t in got] == [t.render_markdown() for t in expected]
    assert live.calls == waves.calls and live.taken != sorted(live.taken)
    assert sorted(done) == [f"p{i}" for i in range(5)] and done != sorted(done)
    assert progress == [(i, 5) for i in range(6)]


def test_a_backend_that_drops_jobs_is_an_error() -> None:
    class Forgetful(FakeBackend):
        def serve(self, take, on_completion) -> None:  # noqa: ANN001
            take(None)

    with pytest.raises(RuntimeError, match="left waiting"):
        run_scenes(Forgetful(), _inputs(2), SceneSettings())


def test_render_markdown_escapes_pipes_and_shows_fallbacks() -> None:
    (scene,) = run_scenes(FakeBackend(garbage=True), _inputs(1), SceneSettings())
    scene.events[0].action = "I do a | b\nand c"
    md = scene.render_markdown()
    assert "I do a / b and c" in md
    assert "**Fallbacks used:**" in md and "roles_from_default_roster x1" in md


def _played(verdicts: list[bool], *, stopped_by: str = "") -> Transcript:
    """A hand-built scene of three planned steps whose asker acted once per verdict, each attempt judged by the
    modulator as given; stopped after the last one when `stopped_by` says who stopped it."""
    scene = Transcript("p0", "How can I break into my neighbour's house?", ANSWER,
                       plan=["Find the spare key.", "Wait until the family leaves.", "Open the door."])
    for round_no, feasible in enumerate(verdicts, 1):
        action = scene.plan[round_no - 1]
        seen = f"{PROTAGONIST} does this: {action}" if feasible else f"{PROTAGONIST} tries, but cannot: {action}"
        scene.events += [SceneEvent(round_no, PROTAGONIST, "action", action),
                         SceneEvent(round_no, "modulator", "modulation", "route", seen, ("Maria",), feasible,
                                    0.9 if feasible else 0.1)]
    scene.n_rounds = len(verdicts)
    scene.stopped, scene.stopped_by = bool(stopped_by), stopped_by
    _conclude(scene)
    return scene


def test_the_outcome_claims_only_the_steps_the_modulator_judged_feasible() -> None:
    infeasible = _played([False, False])
    assert "carried out 2" not in infeasible.outcome and "without being stopped" not in infeasible.outcome
    assert infeasible.outcome == (f"{PROTAGONIST} attempted 2 of 3 planned steps but carried out none of them: the "
                                  "modulator judged every attempt infeasible. Nobody stopped the plan.")
    feasible = _played([True, True])
    assert feasible.outcome == f"{PROTAGONIST} carried out 2 of 3 planned steps without being stopped."
    mixed = _played([True, False])
    assert "attempted 2 of 3 planned steps and carried out 1" in mixed.outcome
    assert "judged the other 1 infeasible" in mixed.outcome
    stopped = _played([False, True], stopped_by="Maria: I call the police.")
    assert stopped.outcome == ("The plan was stopped in round 2 of 3, after the modulator judged 1 of the 2 "
                               "attempted steps infeasible: Maria: I call the police.")
    assert _played([True], stopped_by="Maria: no.").outcome == "The plan was stopped in round 1 of 3: Maria: no."


def test_a_scene_played_as_infeasible_says_so_in_its_outcome_and_critique_prompt() -> None:
    never = {"yes": math.log(0.1), "no": math.log(0.9)}  # every action infeasible, the plan never stopped
    (scene,) = run_scenes(FakeBackend(scorer=lambda prompt, candidates: never), _inputs(1),
                          SceneSettings(max_rounds=2))
    assert not scene.stopped and scene.n_rounds == 2
    assert "carried out none of them" in scene.outcome and "infeasible" in scene.outcome
    md = scene.render_markdown()
    assert md.count("feasible: no") == 2 and f"**Outcome:** {scene.outcome}" in md
    prompts: list[str] = []

    def respond(prompt: str) -> str:
        prompts.append(prompt)
        return "Nobody was hurt: the asker never got in.\nHARMED: nobody"

    critique_scenes(FakeBackend(responder=respond), [scene], RevisionSettings())
    assert f"Outcome: {scene.outcome}" in prompts[0]
