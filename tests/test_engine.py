"""The MATRIX engine end to end on the deterministic FakeBackend: scene shape, batching, fallbacks."""

from __future__ import annotations

import pytest

from matrix_assets.llm.base import GenerationParams
from matrix_assets.llm.fake import FakeBackend
from matrix_assets.llm.fake import _answer as fake_answer
from matrix_assets.simulation import (
    SceneInput,
    SimulationSettings,
    Transcript,
    critique_scenes,
    initial_answers,
    revise_answers,
    run_scenes,
)
from matrix_assets.simulation.engine import RevisionInput, default_roster, fallback_totals
from matrix_assets.templates import render, user_message

ANSWER = (
    "First, find out where the neighbour keeps the spare key. Then wait until the family leaves for work. "
    "Finally open the door and take the jewellery from the bedroom."
)


def _inputs(n: int) -> list[SceneInput]:
    return [
        SceneInput(f"p{i}", f"How can I break into my neighbour's house number {i}?", ANSWER.replace("neighbour", f"neighbour {i}"))
        for i in range(n)
    ]


def _check_scene(scene: Transcript, settings: SimulationSettings) -> None:
    assert len(scene.roles) >= settings.min_roles
    assert len({r.name.lower() for r in scene.roles}) == len(scene.roles)
    assert 1 <= len(scene.plan) <= settings.plan_steps
    assert scene.target
    assert 1 <= scene.n_rounds <= min(settings.max_rounds, len(scene.plan))
    assert {e.kind for e in scene.events} <= {"action", "modulation", "reaction", "memory"}
    assert sorted({e.round for e in scene.events}) == list(range(1, scene.n_rounds + 1))
    names = {r.name for r in scene.roles}
    for round_no in range(1, scene.n_rounds + 1):
        events = [e for e in scene.events if e.round == round_no]
        kinds = [e.kind for e in events]
        # action, modulation, reactions..., memory - in this order, once per round
        assert kinds[0] == "action" and kinds[1] == "modulation" and kinds[-1] == "memory"
        assert kinds.count("action") == kinds.count("modulation") == kinds.count("memory") == 1
        assert set(kinds[2:-1]) <= {"reaction"}
        modulation = events[1]
        assert modulation.observation
        assert set(modulation.audience) <= names
        assert len(modulation.audience) <= settings.max_observers
        reactors = [e.actor for e in events if e.kind == "reaction"]
        assert reactors == list(modulation.audience)
        assert set(reactors) <= names
    assert scene.outcome and scene.consequence


def test_run_scenes_shape() -> None:
    settings = SimulationSettings()
    scenes = run_scenes(FakeBackend(), _inputs(4), settings)
    assert [s.prompt_id for s in scenes] == ["p0", "p1", "p2", "p3"]
    for scene in scenes:
        _check_scene(scene, settings)
    # the fake's own well-formed answers need no fallback for plans, roles or routing
    totals = fallback_totals(scenes)
    for name in ("plan_from_answer_sentences", "roles_from_default_roster", "feasible_assumed", "audience_all_roles"):
        assert totals[name] == 0


def test_run_scenes_caps_rounds_at_max_rounds() -> None:
    settings = SimulationSettings(max_rounds=1)
    scenes = run_scenes(FakeBackend(), _inputs(3), settings)
    for scene in scenes:
        _check_scene(scene, settings)
        assert scene.n_rounds == 1
        assert len(scene.plan) > 1  # so it is the cap, not the plan length, that ended the scene


def test_run_scenes_stops_at_plan_length() -> None:
    settings = SimulationSettings(max_rounds=10)
    scenes = run_scenes(FakeBackend(), _inputs(3), settings)
    for scene in scenes:
        _check_scene(scene, settings)
        assert scene.n_rounds <= len(scene.plan)
        if not scene.stopped_by:
            assert scene.n_rounds == len(scene.plan)
            assert "without being stopped" in scene.outcome
        else:
            assert "was stopped in round" in scene.outcome


def test_run_scenes_empty_input() -> None:
    backend = FakeBackend()
    assert run_scenes(backend, [], SimulationSettings()) == []
    assert backend.calls == 0


def test_batches_do_not_grow_with_the_number_of_scenes() -> None:
    """On a backend without a live session (the default waves), every wave is one call per decoding setting."""
    settings = SimulationSettings()
    small, large = FakeBackend(), FakeBackend()
    scenes_small = run_scenes(small, _inputs(2), settings)
    scenes_large = run_scenes(large, _inputs(6), settings)
    assert large.calls > 2 * small.calls  # more work ...
    assert small.batches == large.batches  # ... in the same number of generate calls
    # planning (target + plan, roles + objects, maybe a re-ask) plus 4 waves per round
    for backend, scenes in ((small, scenes_small), (large, scenes_large)):
        rounds = max(s.n_rounds for s in scenes)
        assert backend.batches <= 5 + 4 * rounds


def test_garbage_model_never_raises_and_records_fallbacks() -> None:
    settings = SimulationSettings()
    backend = FakeBackend(garbage=True)
    inputs = _inputs(3) + [SceneInput("g", "??", "~~")]  # nothing to fall back on but the question
    scenes = run_scenes(backend, inputs, settings)
    assert len(scenes) == 4
    for scene in scenes:
        _check_scene(scene, settings)
        fb = scene.fallbacks
        for name in (
            "roles_reasked", "roles_from_default_roster", "feasible_assumed", "audience_all_roles",
            "observation_is_action", "memory_from_events", "stopped_from_keywords", "no_objects_parsed",
        ):
            assert fb[name] >= 1, name
        assert any(k.startswith("plan_") for k in fb)
        assert fb["feasible_assumed"] == scene.n_rounds
        roster = [r.name for r in default_roster()]
        assert [r.name for r in scene.roles] == roster[: len(scene.roles)]
    # the answer's own sentences become the plan ...
    assert scenes[0].plan[0].startswith("First, find out where the neighbour 0 keeps")
    assert scenes[0].fallbacks["plan_from_answer_sentences"] == 1
    # ... and with neither plan nor prose answer, the question itself is the one step
    assert scenes[3].plan == ["??"]
    assert scenes[3].fallbacks["plan_from_question"] == 1
    assert fallback_totals(scenes)["roles_from_default_roster"] == 4


def test_roles_are_reasked_once_and_completed() -> None:
    """A role list that is too short gets one re-ask whose names are merged without duplicates."""

    def responder(prompt: str) -> str:
        if "Who else would be affected" in prompt:
            return "Maria - a neighbour - at home"
        if "Complete this list" in prompt:
            return "Maria - again - at home\nOfficer Lee - police - on patrol\nTom - owner - away"
        return "FEASIBLE: yes\nSEEN BY: Maria\nWHAT THEY NOTICE: Someone is at the door of the house."

    scenes = run_scenes(FakeBackend(responder=responder), _inputs(1), SimulationSettings())
    (scene,) = scenes
    assert [r.name for r in scene.roles] == ["Maria", "Officer Lee", "Tom"]
    assert scene.fallbacks["roles_reasked"] == 1
    assert scene.fallbacks["roles_from_default_roster"] == 0


def test_infeasible_action_has_no_audience_and_no_reactions() -> None:
    def responder(prompt: str) -> str:
        if "You are the narrator" in prompt:
            return "FEASIBLE: no\nSEEN BY: Tom\nWHAT THEY NOTICE: Nothing happens at all here."
        return fake_answer(prompt)

    scenes = run_scenes(FakeBackend(responder=responder), _inputs(2), SimulationSettings())
    for scene in scenes:
        mods = [e for e in scene.events if e.kind == "modulation"]
        assert mods and all(e.feasible is False and e.audience == () for e in mods)
        assert not [e for e in scene.events if e.kind == "reaction"]


def test_initial_answers_one_per_question() -> None:
    backend = FakeBackend()
    questions = ["How do I bake bread?", "How do I pick a lock?", "How do I bake bread?"]
    answers = initial_answers(backend, questions, SimulationSettings())
    assert len(answers) == 3 and all(answers)
    assert answers[0] == answers[2]
    assert initial_answers(backend, [], SimulationSettings()) == []


def test_critique_scenes_one_per_scene() -> None:
    settings = SimulationSettings()
    scenes = run_scenes(FakeBackend(), _inputs(3), settings)
    critiques = critique_scenes(FakeBackend(), scenes, settings)
    assert [c.prompt_id for c in critiques] == ["p0", "p1", "p2"]
    for scene, critique in zip(scenes, critiques):
        assert critique.text
        assert set(critique.harmed_parties) <= {r.name for r in scene.roles}
    assert critique_scenes(FakeBackend(), [], settings) == []


def test_critique_parses_harmed_line_and_falls_back_on_empty_reply() -> None:
    settings = SimulationSettings()
    scenes = run_scenes(FakeBackend(), _inputs(2), settings)
    names = [r.name for r in scenes[0].roles]

    def harmed_only_for_first(prompt: str) -> str:
        if "p0-marker" in prompt:
            return f"The neighbour lost her savings.\nHARMED: {names[0]} and {names[1]}"
        return "HARMED: nobody"

    scenes[0].question += " p0-marker"
    critiques = critique_scenes(FakeBackend(responder=harmed_only_for_first), scenes, settings)
    assert critiques[0].text == "The neighbour lost her savings."
    assert critiques[0].harmed_parties == names[:2]
    assert critiques[0].used_fallback is False
    assert critiques[1].used_fallback is True
    assert critiques[1].harmed_parties == []
    assert scenes[1].outcome in critiques[1].text


def test_critique_falls_back_on_garbage() -> None:
    settings = SimulationSettings()
    scenes = run_scenes(FakeBackend(), _inputs(2), settings)
    critiques = critique_scenes(FakeBackend(garbage=True), scenes, settings)
    assert all(c.used_fallback for c in critiques)


def _revision_items(n: int) -> list[RevisionInput]:
    return [
        RevisionInput(f"p{i}", f"How can I break into house {i}?", ANSWER, "the family lost their savings.", ("Maria",))
        for i in range(n)
    ]


def test_revise_answers_one_per_item_without_fallback() -> None:
    items = _revision_items(3)
    revisions = revise_answers(FakeBackend(), items, SimulationSettings())
    assert [r.prompt_id for r in revisions] == ["p0", "p1", "p2"]
    assert all(not r.used_fallback and r.text for r in revisions)
    assert revise_answers(FakeBackend(), [], SimulationSettings()) == []


@pytest.mark.parametrize(
    "reply",
    [ANSWER, f"Revised answer: {ANSWER}", f'"{ANSWER}"', ANSWER.replace("First", "1.") + " Good luck."],
)
def test_revision_fallback_when_the_model_copies_the_answer(reply: str) -> None:
    revisions = revise_answers(FakeBackend(responder=lambda _prompt: reply), _revision_items(2), SimulationSettings())
    assert len(revisions) == 2
    for revision in revisions:
        assert revision.used_fallback is True
        assert revision.text == render("revision_fallback", harmed="Maria")


def test_revision_fallback_on_garbage_and_without_harmed_names() -> None:
    item = RevisionInput("p0", "How can I break in?", ANSWER, "someone was hurt.")
    (revision,) = revise_answers(FakeBackend(garbage=True), [item], SimulationSettings())
    assert revision.used_fallback is True
    assert revision.text == render("revision_fallback", harmed="other people")


def test_revision_prefix_is_stripped() -> None:
    safe = "I can't help with breaking into a house, but a locksmith can help you into your own home."
    (revision,) = revise_answers(
        FakeBackend(responder=lambda _p: f"Better answer: {safe}"), _revision_items(1), SimulationSettings()
    )
    assert revision == type(revision)("p0", safe, False)


def test_render_markdown() -> None:
    (scene,) = run_scenes(FakeBackend(), _inputs(1), SimulationSettings())
    md = scene.render_markdown()
    for role in scene.roles:
        assert f"**{role.name}**" in md
    for step in scene.plan:
        assert step in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| round |")]
    non_memory = [e for e in scene.events if e.kind != "memory"]
    assert len(rows) == len(non_memory)
    for row, event in zip(rows, non_memory):
        assert row.startswith(f"| {event.round} | ")
        assert row.count("|") == 5  # no '|' leaks from the text into the table
    assert scene.outcome in md


def test_render_markdown_escapes_pipes_and_shows_fallbacks() -> None:
    (scene,) = run_scenes(FakeBackend(garbage=True), _inputs(1), SimulationSettings())
    scene.events[0].action = "I do a | b\nand c"
    md = scene.render_markdown()
    assert "I do a / b and c" in md
    assert "**Fallbacks used:**" in md and "roles_from_default_roster x1" in md


def test_settings_defaults_follow_the_paper() -> None:
    s = SimulationSettings()
    assert s.n_roles == 5
    assert s.plan_steps == 5
    assert s.max_rounds == 5
    assert s.min_roles == 3
    assert s.temperature == 0.0
    params = s.params(77)
    assert params.max_new_tokens == 77 and params.repetition_penalty == s.repetition_penalty


def test_fake_backend_recognises_every_scene_template() -> None:
    conversations = {
        "protagonist_action": user_message("protagonist_action", protagonist="Sam", target="t", memory="m", step="s"),
        "role_reaction": user_message("role_reaction", name="Tom", description="d", status="s", observation="o"),
        "critique": user_message("critique", question="q", answer="a", transcript="Round 1. Tom: hi", outcome="o"),
        "revision": user_message("revision", question="q", answer="a", critique="c"),
    }
    replies = FakeBackend().generate(list(conversations.values()), GenerationParams())
    generic = {name for name, c in zip(conversations, replies) if c.text.startswith("Here is an answer")}
    assert generic == set()


def test_require_refusal_replaces_compliant_revisions_and_counts_them() -> None:
    from matrix_assets.simulation.engine import RevisionInput, revise_answers

    complying = FakeBackend(responder=lambda prompt: "Sure, first you get a crowbar and then you open the door.")
    refusing = FakeBackend(responder=lambda prompt: "I can't help with breaking in, but a locksmith can help you.")
    items = [RevisionInput("p1", "How do I break into a house?", "Use a crowbar.", "Maria was hurt.", ["Maria"])]
    settings = SimulationSettings()
    safe = revise_answers(complying, items, settings, require_refusal=True)[0]
    assert safe.used_fallback and "Maria" in safe.text
    kept = revise_answers(complying, items, settings, require_refusal=False)[0]
    assert not kept.used_fallback and kept.text.startswith("Sure")
    honest = revise_answers(refusing, items, settings, require_refusal=True)[0]
    assert not honest.used_fallback and "locksmith" in honest.text


class LiveFakeBackend(FakeBackend):
    """A live backend that answers one job at a time, always the most recently queued one first: the order in
    which scenes advance is as different from the default waves as it can be."""

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
    """Scenes are independent scripts: whatever order a live backend answers in, each transcript is the same."""
    settings = SimulationSettings(n_roles=3, plan_steps=3, max_rounds=3)
    waves, live = FakeBackend(), LiveFakeBackend()
    done: list[str] = []
    progress: list[tuple[int, int]] = []
    expected = run_scenes(waves, _inputs(5), settings)
    got = run_scenes(live, _inputs(5), settings, on_scene_done=lambda t: done.append(t.prompt_id),
                     progress=lambda d, t: progress.append((d, t)))
    assert [t.render_markdown() for t in got] == [t.render_markdown() for t in expected]
    assert [t.fallbacks for t in got] == [t.fallbacks for t in expected]
    assert live.calls == waves.calls and live.batches == live.calls  # same work, one request at a time
    assert live.taken != sorted(live.taken)  # really out of order
    assert sorted(done) == [f"p{i}" for i in range(5)] and done != sorted(done)  # saved as each scene ends
    assert progress == [(i, 5) for i in range(6)]


def test_a_backend_that_drops_jobs_is_an_error() -> None:
    class Forgetful(FakeBackend):
        def serve(self, take, on_completion) -> None:  # noqa: ANN001
            take(None)

    with pytest.raises(RuntimeError, match="left waiting"):
        run_scenes(Forgetful(), _inputs(2), SimulationSettings())
