"""The MATRIX monopolylogue: one model plans a social scene, plays every role, modulates, critiques, revises.

Every stage is batched across scenes (and, within a round, across the roles that react), so a batch of
prompts costs a handful of large `generate` calls instead of thousands of single ones. Small models
break formats: each parser in `parsing` may come back empty, and the engine then re-asks once (roles) or
applies a documented fallback, counted in `Transcript.fallbacks` so the asset metadata shows how often.
"""

from __future__ import annotations

import logging
import re
from difflib import SequenceMatcher
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from matrix_assets.llm.base import ChatBackend, Conversation, GenerationParams, Message
from matrix_assets.simulation import parsing
from matrix_assets.simulation.scene import Critique, Revision, Role, SceneEvent, SceneInput, Transcript
from matrix_assets.simulation.templates import read_text, render, system_and_user, user_message

logger = logging.getLogger(__name__)

# Reactions that oppose or block the protagonist (used when the modulator's STOPPED line is missing).
_BLOCKING = re.compile(
    r"\b(police|report(?:ed|ing)?|call(?:ed|ing)? (?:the )?(?:police|911|authorities|security)|arrest|stop(?:ped)?|"
    r"refus(?:e|ed)|block(?:ed)?|alert(?:ed)?|confront(?:ed)?|warn(?:ed)?|lawyer|sue)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class SimulationSettings:
    """Scene size and decoding budgets. Defaults follow the reference implementation (~5 roles, ~5 steps)."""

    n_roles: int = 5
    min_roles: int = 3
    plan_steps: int = 5
    max_rounds: int = 5
    n_objects: int = 3
    max_observers: int = 5
    answer_tokens: int = 192
    plan_tokens: int = 160
    action_tokens: int = 64
    critique_tokens: int = 160
    revision_tokens: int = 192
    temperature: float = 0.0
    repetition_penalty: float = 1.15
    seed: int = 0

    def params(self, max_new_tokens: int, *, free_text: bool = True) -> GenerationParams:
        """Free text (actions, reactions, critiques) gets the repetition penalty that keeps small models out of
        loops; structured replies (lists, labelled lines) do not, because it penalises their repeated markup."""
        return GenerationParams(
            max_new_tokens=max_new_tokens, temperature=self.temperature, seed=self.seed,
            repetition_penalty=self.repetition_penalty if free_text else 1.0,
        )


def _generate(llm: ChatBackend, conversations: Sequence[Conversation], params: GenerationParams) -> list[str]:
    if not conversations:
        return []
    return [c.text for c in llm.generate(conversations, params)]


def initial_answers(llm: ChatBackend, questions: Sequence[str], settings: SimulationSettings) -> list[str]:
    """r0: the model's direct answer, with nothing but the question in the prompt."""
    convs = [user_message("initial_response", question=q) for q in questions]
    # No repetition penalty: r0 (and the benign self-answers) must be the model's plain behaviour.
    return _generate(llm, convs, settings.params(settings.answer_tokens, free_text=False))


def default_roster() -> list[Role]:
    rows = []
    for line in read_text("default_roles.txt").splitlines():
        if line.strip() and not line.startswith("#"):
            name, description, status = (part.strip() for part in line.split("|"))
            rows.append(Role(name, description, status))
    return rows


# -- scene planning ---------------------------------------------------------------------------------


def plan_scenes(llm: ChatBackend, scenes: list[Transcript], s: SimulationSettings) -> None:
    targets = _generate(llm, [user_message("scene_target", question=t.question) for t in scenes], s.params(48, free_text=False))
    for scene, reply in zip(scenes, targets):
        target = parsing.first_sentence(reply)
        if not target:
            scene.fallbacks["target_from_question"] += 1
            target = f"The person wants to do what they asked: {scene.question[:200]}"
        scene.target = target

    plans = _generate(
        llm,
        [user_message("scene_plan", question=t.question, answer=t.answer, n_steps=s.plan_steps) for t in scenes],
        s.params(s.plan_tokens, free_text=False),
    )
    for scene, reply in zip(scenes, plans):
        steps = parsing.numbered_steps(reply, s.plan_steps)
        if not steps:
            scene.fallbacks["plan_from_answer_sentences"] += 1
            steps = parsing.numbered_steps(scene.answer, s.plan_steps) or parsing.sentences(scene.answer, s.plan_steps)
        if not steps:
            scene.fallbacks["plan_from_question"] += 1
            steps = [scene.question[:400]]
        scene.plan = steps

    replies = _generate(
        llm,
        [user_message("scene_roles", question=t.question, steps=t.plan, n_roles=s.n_roles) for t in scenes],
        s.params(s.plan_tokens, free_text=False),
    )
    for scene, reply in zip(scenes, replies):
        scene.roles = parsing.roles(reply, s.n_roles)
    # One bounded re-ask, with a differently shaped prompt, for scenes whose list was too short.
    short = [t for t in scenes if len(t.roles) < s.min_roles]
    retry = _generate(
        llm, [user_message("scene_roles_retry", target=t.target, n_roles=s.n_roles) for t in short],
        s.params(s.plan_tokens, free_text=False),
    )
    for scene, reply in zip(short, retry):
        scene.fallbacks["roles_reasked"] += 1
        extra = parsing.roles(reply, s.n_roles - len(scene.roles), exclude={r.name for r in scene.roles})
        scene.roles += extra
        if len(scene.roles) < s.min_roles:
            scene.fallbacks["roles_from_default_roster"] += 1
            names = {r.name.lower() for r in scene.roles}
            for role in default_roster():
                if len(scene.roles) >= max(s.min_roles, min(s.n_roles, 3)):
                    break
                if role.name.lower() not in names:
                    scene.roles.append(role)

    replies = _generate(
        llm,
        [user_message("scene_objects", steps=t.plan, n_objects=s.n_objects) for t in scenes],
        s.params(96, free_text=False),
    )
    for scene, reply in zip(scenes, replies):
        scene.objects = parsing.objects(reply, s.n_objects)
        if not scene.objects:
            scene.fallbacks["no_objects_parsed"] += 1


# -- the modulated rounds -----------------------------------------------------------------------------


def _play_round(llm: ChatBackend, scenes: list[Transcript], round_no: int, s: SimulationSettings) -> None:
    params = s.params(s.action_tokens)
    # 1. The protagonist acts on the next plan step.
    actions = _generate(
        llm,
        [
            user_message("protagonist_action", protagonist=t.protagonist, target=t.target, memory=t.memory,
                         step=t.plan[round_no - 1])
            for t in scenes
        ],
        params,
    )
    for scene, reply in zip(scenes, actions):
        action = parsing.clean(reply)
        if not action:
            scene.fallbacks["action_from_plan_step"] += 1
            action = f"I {scene.plan[round_no - 1]}"
        scene.events.append(SceneEvent(round_no, scene.protagonist, "action", action))

    # 2. The social modulator judges feasibility and routes the action to the roles who can observe it.
    routes = _generate(
        llm,
        [
            user_message("modulator_route", roles=t.roles, memory=t.memory, protagonist=t.protagonist,
                         action=t.events[-1].action)
            for t in scenes
        ],
        s.params(s.action_tokens + 32, free_text=False),
    )
    reaction_jobs: list[tuple[Transcript, Role, str]] = []
    for scene, reply in zip(scenes, routes):
        names = [r.name for r in scene.roles]
        feasible = parsing.yes_no(reply, "FEASIBLE")
        if feasible is None:
            scene.fallbacks["feasible_assumed"] += 1
            feasible = True
        seen_line = parsing.labelled_line(reply, "SEEN BY")
        audience = parsing.mentioned_names(seen_line or "", names) or parsing.mentioned_names(reply, names)
        if not audience:
            scene.fallbacks["audience_all_roles"] += 1
            audience = names
        audience = audience[: s.max_observers]
        observation = parsing.labelled_line(reply, "WHAT THEY NOTICE")
        if not observation:
            scene.fallbacks["observation_is_action"] += 1
            observation = f"{scene.protagonist} does this: {scene.events[-1].action}"
        if not feasible:
            audience = []
        scene.events.append(
            SceneEvent(round_no, "modulator", "modulation", "route", observation, tuple(audience), feasible)
        )
        by_name = {r.name: r for r in scene.roles}
        reaction_jobs += [(scene, by_name[name], observation) for name in audience]

    # 3. Every observing role of every scene reacts, in one batch.
    reactions = _generate(
        llm,
        [
            user_message("role_reaction", name=role.name, description=role.description, status=role.status,
                         observation=obs)
            for _, role, obs in reaction_jobs
        ],
        params,
    )
    for (scene, role, _), reply in zip(reaction_jobs, reactions):
        text = parsing.clean(reply)
        if not text:
            scene.fallbacks["reaction_default"] += 1
            text = "I watch what is happening and say nothing for now."
        scene.events.append(SceneEvent(round_no, role.name, "reaction", text))

    # 4. The modulator folds the round into the scene memory and decides whether the plan was stopped.
    round_lines = {
        id(t): [f"{e.actor}: {e.action}" for e in t.events if e.round == round_no and e.kind in {"action", "reaction"}]
        for t in scenes
    }
    summaries = _generate(
        llm,
        [
            user_message("modulator_memory", memory=t.memory, events=round_lines[id(t)], protagonist=t.protagonist)
            for t in scenes
        ],
        params.replace(max_new_tokens=s.action_tokens + 32),
    )
    for scene, reply in zip(scenes, summaries):
        summary = parsing.without_label_lines(reply, ("STOPPED",))
        summary = " ".join(parsing.sentences(summary, 3))
        if not summary:
            scene.fallbacks["memory_from_events"] += 1
            summary = " ".join(round_lines[id(scene)])[-600:]
        scene.memory = summary
        blockers = [
            e for e in scene.events if e.round == round_no and e.kind == "reaction" and _BLOCKING.search(e.action)
        ]
        stopped = parsing.yes_no(reply, "STOPPED")
        if stopped is None:
            scene.fallbacks["stopped_from_keywords"] += 1
            stopped = bool(blockers)
        scene.events.append(SceneEvent(round_no, "modulator", "memory", summary))
        scene.n_rounds = round_no
        if stopped:
            reason = blockers[0] if blockers else None
            scene.stopped_by = f"{reason.actor}: {reason.action}" if reason else summary


def _conclude(scene: Transcript) -> None:
    if scene.stopped_by:
        scene.outcome = f"The plan was stopped in round {scene.n_rounds} of {len(scene.plan)}: {scene.stopped_by}"
    else:
        scene.outcome = (
            f"{scene.protagonist.capitalize()} carried out {scene.n_rounds} of {len(scene.plan)} planned steps "
            "without being stopped."
        )
    opposing = [f"{e.actor}: {e.action}" for e in scene.events if e.kind == "reaction" and _BLOCKING.search(e.action)]
    scene.consequence = " ".join(opposing[:5]) if opposing else scene.memory


def run_scenes(llm: ChatBackend, inputs: Sequence[SceneInput], settings: SimulationSettings) -> list[Transcript]:
    """Plan and play one scene per input, all scenes in lock-step so that every model call is batched."""
    scenes = [Transcript(prompt_id=i.prompt_id, question=i.question, answer=i.answer) for i in inputs]
    if not scenes:
        return []
    plan_scenes(llm, scenes, settings)
    for round_no in range(1, settings.max_rounds + 1):
        active = [t for t in scenes if round_no <= len(t.plan) and not t.stopped_by]
        if not active:
            break
        logger.info("round %d: %d active scenes", round_no, len(active))
        _play_round(llm, active, round_no, settings)
    for scene in scenes:
        _conclude(scene)
    return scenes


# -- critique and revision -------------------------------------------------------------------------


def critique_scenes(llm: ChatBackend, scenes: Sequence[Transcript], s: SimulationSettings) -> list[Critique]:
    replies = _generate(
        llm,
        [
            user_message("critique", question=t.question, answer=t.answer, transcript=t.render_text(),
                         outcome=t.outcome)
            for t in scenes
        ],
        s.params(s.critique_tokens),
    )
    result = []
    for scene, reply in zip(scenes, replies):
        names = [r.name for r in scene.roles]
        body = parsing.without_label_lines(reply, ("HARMED",))
        harmed_line = parsing.labelled_line(reply, "HARMED")
        harmed = parsing.mentioned_names(harmed_line, names) if harmed_line else parsing.mentioned_names(body, names)
        used_fallback = not parsing.sentences(body, 1)  # empty, or no real sentence in it
        if used_fallback:
            body = f"If the person followed the answer: {scene.outcome} {scene.consequence}".strip()
        result.append(Critique(scene.prompt_id, body, harmed, used_fallback))
    return result


@dataclass(frozen=True)
class RevisionInput:
    prompt_id: str
    question: str
    answer: str
    critique: str
    harmed: Sequence[str] = ()


def _short(critique: str, harmed: Sequence[str]) -> str:
    """The critique's first two sentences (small models drift on long context), plus who was harmed."""
    text = " ".join(parsing.sentences(critique, 2)) or critique[:300]
    if harmed:
        text += f" People harmed: {', '.join(harmed)}."
    return text


_REVISION_PREFIX = re.compile(r"^\s*(better|revised|updated|final)?\s*answer\s*:\s*", re.IGNORECASE)


def revise_answers(
    llm: ChatBackend, items: Sequence[RevisionInput], s: SimulationSettings, *, require_refusal: bool = False
) -> list[Revision]:
    """r1 for each item, from the question and the simulation's critique.

    `require_refusal` is a safety net for small models, which often comply again even after the simulation
    showed harm: a revision that neither declines nor redirects (rule-based check) is replaced by the
    recorded fallback answer. Leave it off with a capable model."""

    def conversation(item: RevisionInput) -> list[Message]:
        return system_and_user("revision", item.question, critique=_short(item.critique, item.harmed))

    return revise_answers_with(llm, items, s, conversation, require_refusal=require_refusal)


def revise_answers_with(
    llm: ChatBackend,
    items: Sequence[RevisionInput],
    s: SimulationSettings,
    conversation: Callable[[RevisionInput], list[Message]],
    *,
    require_refusal: bool,
) -> list[Revision]:
    """Shared by every method: generate, clean, and apply the recorded fallback where the reply is unusable."""
    from matrix_assets.evaluation.rules import is_refusal

    replies = _generate(llm, [conversation(i) for i in items], s.params(s.revision_tokens))
    result = []
    for item, reply in zip(items, replies):
        text = _REVISION_PREFIX.sub("", reply.strip()).strip().strip('"').strip()
        copied = SequenceMatcher(None, text[:600], item.answer.strip()[:600]).ratio() > 0.6
        used_fallback = len(text) < 20 or copied or (require_refusal and not is_refusal(text))
        if used_fallback:
            harmed = ", ".join(item.harmed) if item.harmed else "other people"
            text = render("revision_fallback", harmed=harmed)
        result.append(Revision(item.prompt_id, text, used_fallback))
    return result


def fallback_totals(scenes: Sequence[Transcript]) -> Counter[str]:
    total: Counter[str] = Counter()
    for scene in scenes:
        total.update(scene.fallbacks)
    return total
