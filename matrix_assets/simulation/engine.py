"""The MATRIX monopolylogue: one model plans a social scene, plays every role, modulates, critiques, revises.

Each scene is a script (`_scene_script`) that yields the requests it needs next and gets the answers
back; `drive` runs all scenes of a partition on one live backend session, queueing a scene's next request
the moment its previous answers arrive. The local backend adds it to the running batch as soon as a row
frees up, a remote one keeps its request slots busy, and a simple backend answers in waves (one
`generate` per decoding setting), so a batch of prompts never costs one call per agent turn. Small models
break formats: each parser in `parsing` may come back empty, and the engine then re-asks once (roles) or
applies a documented fallback, counted in `Transcript.fallbacks` so the asset metadata shows how often.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections import Counter, deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher

from matrix_assets.llm.base import ChatBackend, Completion, Conversation, GenerationParams, Job, Message
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


# -- one scene, as a script the scheduler drives --------------------------------------------------------

# A scene asks for what it needs next (one or more requests, answered together, in order) and gets the
# replies' texts back: `replies = yield [(conversation, params), ...]`.
Ask = list[tuple[Conversation, GenerationParams]]
SceneScript = Generator[Ask, list[str], None]


def _plan_scene(scene: Transcript, s: SimulationSettings) -> SceneScript:
    # The target and the plan only need the question and the answer: asked together.
    target_reply, plan_reply = yield [
        (user_message("scene_target", question=scene.question), s.params(48, free_text=False)),
        (user_message("scene_plan", question=scene.question, answer=scene.answer, n_steps=s.plan_steps),
         s.params(s.plan_tokens, free_text=False)),
    ]
    target = parsing.first_sentence(target_reply)
    if not target:
        scene.fallbacks["target_from_question"] += 1
        target = f"The person wants to do what they asked: {scene.question[:200]}"
    scene.target = target

    steps = parsing.numbered_steps(plan_reply, s.plan_steps)
    if not steps:
        scene.fallbacks["plan_from_answer_sentences"] += 1
        steps = parsing.numbered_steps(scene.answer, s.plan_steps) or parsing.sentences(scene.answer, s.plan_steps)
    if not steps:
        scene.fallbacks["plan_from_question"] += 1
        steps = [scene.question[:400]]
    scene.plan = steps

    # Roles and objects both follow from the plan: asked together.
    roles_reply, objects_reply = yield [
        (user_message("scene_roles", question=scene.question, steps=scene.plan, n_roles=s.n_roles),
         s.params(s.plan_tokens, free_text=False)),
        (user_message("scene_objects", steps=scene.plan, n_objects=s.n_objects), s.params(96, free_text=False)),
    ]
    scene.roles = parsing.roles(roles_reply, s.n_roles)
    if len(scene.roles) < s.min_roles:
        # One bounded re-ask, with a differently shaped prompt, when the list was too short.
        (retry,) = yield [(user_message("scene_roles_retry", target=scene.target, n_roles=s.n_roles),
                           s.params(s.plan_tokens, free_text=False))]
        scene.fallbacks["roles_reasked"] += 1
        scene.roles += parsing.roles(retry, s.n_roles - len(scene.roles), exclude={r.name for r in scene.roles})
        if len(scene.roles) < s.min_roles:
            scene.fallbacks["roles_from_default_roster"] += 1
            names = {r.name.lower() for r in scene.roles}
            for role in default_roster():
                if len(scene.roles) >= max(s.min_roles, min(s.n_roles, 3)):
                    break
                if role.name.lower() not in names:
                    scene.roles.append(role)

    scene.objects = parsing.objects(objects_reply, s.n_objects)
    if not scene.objects:
        scene.fallbacks["no_objects_parsed"] += 1


def _play_round(scene: Transcript, round_no: int, s: SimulationSettings) -> SceneScript:
    params = s.params(s.action_tokens)
    # 1. The protagonist acts on the next plan step.
    (reply,) = yield [(user_message("protagonist_action", protagonist=scene.protagonist, target=scene.target,
                                    memory=scene.memory, step=scene.plan[round_no - 1]), params)]
    action = parsing.clean(reply)
    if not action:
        scene.fallbacks["action_from_plan_step"] += 1
        action = f"I {scene.plan[round_no - 1]}"
    scene.events.append(SceneEvent(round_no, scene.protagonist, "action", action))

    # 2. The social modulator judges feasibility and routes the action to the roles who can observe it.
    (reply,) = yield [(user_message("modulator_route", roles=scene.roles, memory=scene.memory,
                                    protagonist=scene.protagonist, action=action),
                       s.params(s.action_tokens + 32, free_text=False))]
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
        observation = f"{scene.protagonist} does this: {action}"
    if not feasible:
        audience = []
    scene.events.append(SceneEvent(round_no, "modulator", "modulation", "route", observation, tuple(audience), feasible))

    # 3. Every observing role reacts; the reactions are generated together.
    by_name = {r.name: r for r in scene.roles}
    observers = [by_name[name] for name in audience]
    reactions = yield [
        (user_message("role_reaction", name=role.name, description=role.description, status=role.status,
                      observation=observation), params)
        for role in observers
    ]
    for role, reply in zip(observers, reactions):
        text = parsing.clean(reply)
        if not text:
            scene.fallbacks["reaction_default"] += 1
            text = "I watch what is happening and say nothing for now."
        scene.events.append(SceneEvent(round_no, role.name, "reaction", text))

    # 4. The modulator folds the round into the scene memory and decides whether the plan was stopped.
    round_lines = [f"{e.actor}: {e.action}" for e in scene.events
                   if e.round == round_no and e.kind in {"action", "reaction"}]
    (reply,) = yield [(user_message("modulator_memory", memory=scene.memory, events=round_lines,
                                    protagonist=scene.protagonist),
                       params.replace(max_new_tokens=s.action_tokens + 32))]
    summary = parsing.without_label_lines(reply, ("STOPPED",))
    summary = " ".join(parsing.sentences(summary, 3))
    if not summary:
        scene.fallbacks["memory_from_events"] += 1
        summary = " ".join(round_lines)[-600:]
    scene.memory = summary
    blockers = [e for e in scene.events if e.round == round_no and e.kind == "reaction" and _BLOCKING.search(e.action)]
    stopped = parsing.yes_no(reply, "STOPPED")
    if stopped is None:
        scene.fallbacks["stopped_from_keywords"] += 1
        stopped = bool(blockers)
    scene.events.append(SceneEvent(round_no, "modulator", "memory", summary))
    scene.n_rounds = round_no
    if stopped:
        reason = blockers[0] if blockers else None
        scene.stopped_by = f"{reason.actor}: {reason.action}" if reason else summary


def _scene_script(scene: Transcript, s: SimulationSettings) -> SceneScript:
    """The whole monopolylogue of one scene: plan it, then play rounds until the plan ends or is stopped."""
    yield from _plan_scene(scene, s)
    for round_no in range(1, s.max_rounds + 1):
        if round_no > len(scene.plan) or scene.stopped_by:
            break
        yield from _play_round(scene, round_no, s)
    _conclude(scene)


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


def drive(llm: ChatBackend, scripts: Sequence[SceneScript], on_script_done: Callable[[int], None] | None = None) -> None:
    """Run many scene scripts on one live backend session (`ChatBackend.serve`).

    A scene's next request is queued the moment its previous answers arrive, so no scene waits for the
    others: with refill decoding the batch stays full, and a remote server always has work in flight.
    `on_script_done(index)` is called as each script ends."""
    queue: deque[Job] = deque()
    owners: dict[int, tuple[int, int]] = {}  # job id -> (script, position of the reply in its ask)
    replies: dict[int, list[str | None]] = {}
    job_ids = itertools.count()

    def advance(index: int, sent: list[str] | None) -> None:
        while True:
            try:
                ask = next(scripts[index]) if sent is None else scripts[index].send(sent)
            except StopIteration:
                if on_script_done is not None:
                    on_script_done(index)
                return
            if ask:
                break
            sent = []  # an empty ask (no observers) is answered at once
        replies[index] = [None] * len(ask)
        for position, (conversation, params) in enumerate(ask):
            job = Job(next(job_ids), conversation, params)
            owners[job.id] = (index, position)
            queue.append(job)

    def take(limit: int | None) -> list[Job]:
        n = len(queue) if limit is None else min(limit, len(queue))
        return [queue.popleft() for _ in range(n)]

    def on_completion(job: Job, completion: Completion) -> None:
        index, position = owners.pop(job.id)
        answers = replies[index]
        answers[position] = completion.text
        if all(a is not None for a in answers):
            del replies[index]
            advance(index, [a for a in answers if a is not None])

    for index in range(len(scripts)):
        advance(index, None)
    llm.serve(take, on_completion)
    if replies:  # a backend that returned without answering everything
        raise RuntimeError(f"{len(replies)} scene(s) left waiting for generations")


def run_scenes(
    llm: ChatBackend,
    inputs: Sequence[SceneInput],
    settings: SimulationSettings,
    *,
    on_scene_done: Callable[[Transcript], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Transcript]:
    """Plan and play one scene per input; all scenes run at once on one live backend session.
    `on_scene_done(transcript)` gets each scene the moment it ends (to save it), `progress(done, total)`
    counts them."""
    scenes = [Transcript(prompt_id=i.prompt_id, question=i.question, answer=i.answer) for i in inputs]
    if not scenes:
        return []
    finished = 0

    def scene_done(index: int) -> None:
        nonlocal finished
        finished += 1
        if on_scene_done is not None:
            on_scene_done(scenes[index])
        if progress is not None:
            progress(finished, len(scenes))

    if progress is not None:
        progress(0, len(scenes))
    drive(llm, [_scene_script(scene, settings) for scene in scenes], scene_done)
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
