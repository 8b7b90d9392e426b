"""The MATRIX monopolylogue: one model plans a social scene and plays every party in it.

Each scene is a script (`scene_script`) that asks for what it needs next; `llm.scripts.drive` runs all scenes
of a partition on one live backend session. One round of a scene:

1. the protagonist (the asker, acting on the answer) carries out the next plan step, knowing what it has
   noticed so far and the state of the scene's objects;
2. the social modulator judges whether the action is feasible (read from its next-token distribution:
   "yes" / "no"), decides who notices it, in which order they react, what they notice, and how the objects
   change;
3. each noticing role reacts in character, in the modulator's order, with its own memory of what it observed;
   the modulator routes every reaction to the people who would notice it (the asker included), who remember it
   and, if they have not reacted yet this round, react in turn (up to `max_reactions` per round);
4. the modulator folds the round into the scene's memory and judges whether anyone stopped the plan
   (again from its next-token distribution).

Small models break formats: each parser in `parsing` may come back empty. The engine then re-asks once (roles)
or applies a named fallback, counted per scene in `Transcript.fallbacks`, so the asset metadata and its checks
show how much of a scene the model really played. `structured_output` names the steps (plan, roles) decoded under
a JSON schema instead (`prompts/*.schema.json`); their JSON is turned into the same lines the parsers read, and a
reply that is not valid JSON counts as `structured_plan_invalid` or `structured_roles_invalid` before the usual
fallbacks apply.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

from matrix_assets.llm.base import ChatBackend, Conversation, GenerationParams, choice_probabilities
from matrix_assets.llm.scripts import Answer, Generate, Score, Script, drive
from matrix_assets.methods.matrix import parsing
from matrix_assets.methods.matrix.scene import Role, SceneEvent, SceneInput, Transcript, shorten
from matrix_assets.templates import read_text, user_message

YES_NO = ("yes", "no")

# Fallback families the asset check watches: a scene that needed one of these was not really planned or judged
# by the model.
PLANNING_FALLBACKS = {
    "roles": ("roles_from_default_roster",),
    "plan": ("plan_from_answer_sentences", "plan_from_question"),
    "feasibility": ("feasible_assumed",),
}


@dataclass(frozen=True)
class SceneSettings:
    """Scene size and token budgets (the method's settings pass them in)."""

    n_roles: int = 3
    min_roles: int = 3
    plan_steps: int = 3
    max_rounds: int = 2
    n_objects: int = 3
    max_reactions: int = 3
    plan_tokens: int = 160
    action_tokens: int = 64
    # The model names the protagonist (the reference code's "ego" role, e.g. "Thief") instead of the fixed
    # PROTAGONIST; a name that cannot be used falls back to PROTAGONIST (counted).
    name_protagonist: bool = False
    # Roles through the reference code's chain: the situation the question is asked in -> what happens next if
    # the answer is followed -> the social characters involved -> the n most important. Off: the roles are asked
    # directly from the plan (one call; what a 135M model can follow).
    roles_chain: bool = False
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.15
    structured_output: tuple[str, ...] = ()  # scene steps decoded under a JSON schema: any of STRUCTURED_STEPS

    def __post_init__(self) -> None:
        unknown = set(self.structured_output) - set(STRUCTURED_STEPS)
        if unknown:
            raise ValueError(f"structured_output: unknown step(s) {sorted(unknown)}; choose from {STRUCTURED_STEPS}")
        if self.temperature < 0.0 or not 0.0 < self.top_p <= 1.0 or self.repetition_penalty <= 0.0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1 and repetition_penalty > 0")

    def params(self, max_new_tokens: int, *, free_text: bool = True, json_schema: str | None = None
               ) -> GenerationParams:
        """Free text (actions, reactions) gets the repetition penalty that keeps small models out of loops;
        structured replies (lists, labelled lines) do not, because it penalises their repeated markup."""
        return GenerationParams(max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                                repetition_penalty=self.repetition_penalty if free_text else 1.0,
                                json_schema=json_schema)


STRUCTURED_STEPS = ("plan", "roles")
# The JSON field of each structured step, and how one of its items reads as a line for the step's parser.
_STRUCTURED_FIELDS: dict[str, tuple[str, Callable[[object], str]]] = {
    "plan": ("steps", lambda item: f"1. {item}"),
    "roles": ("people", lambda item: " - ".join(str(item.get(k, "")) for k in ("name", "who", "state"))
              if isinstance(item, dict) else str(item)),
}


def step_schema(step: str, max_items: int) -> str:
    """The step's JSON schema file with its list capped at `max_items`, as canonical JSON (a cache-key part)."""
    schema = json.loads(read_text(f"matrix/scene_{step}.schema.json"))
    schema["properties"][_STRUCTURED_FIELDS[step][0]]["maxItems"] = max_items
    return json.dumps(schema, sort_keys=True)


def _structured_lines(scene: Transcript, step: str, reply: str) -> str:
    """A structured reply as the lines the free-text parser reads; the raw reply (counted) if it is not the JSON
    the schema asked for (a reply cut off by the token budget, or a server that ignored the schema)."""
    field_name, as_line = _STRUCTURED_FIELDS[step]
    try:
        items = json.loads(reply)[field_name]
        if not isinstance(items, list):
            raise TypeError(field_name)
    except (ValueError, TypeError, KeyError):
        scene.fallbacks[f"structured_{step}_invalid"] += 1
        return reply
    return "\n".join(as_line(item) for item in items)


def default_roster() -> list[Role]:
    rows = []
    for line in read_text("matrix/default_roles.txt").splitlines():
        if line.strip() and not line.startswith("#"):
            name, description, status = (part.strip() for part in line.split("|"))
            rows.append(Role(name, description, status))
    return rows


def _p_yes(answer: Answer) -> float | None:
    probs = choice_probabilities(answer) if isinstance(answer, dict) else None
    return None if probs is None else probs["yes"]


def _verdict(scene: Transcript, answer: Answer, reply: str, label: str, fallback: str, default: bool
             ) -> tuple[bool, float | None]:
    """A yes/no verdict: from the next-token distribution when the backend gives one, else from the labelled
    line of the generated reply, else the named fallback (counted)."""
    p_yes = _p_yes(answer)
    if p_yes is not None:
        return p_yes >= 0.5, p_yes
    scene.fallbacks[f"{label.lower()}_from_text"] += 1
    parsed = parsing.yes_no(reply, label)
    if parsed is None:
        scene.fallbacks[fallback] += 1
        return default, None
    return parsed, None


def _people(scene: Transcript) -> list[dict[str, str]]:
    return [{"name": scene.protagonist, "description": "the person who asked, now acting on the answer"}] + [
        {"name": r.name, "description": r.description} for r in scene.roles
    ]


def _plan_scene(scene: Transcript, s: SceneSettings) -> Script:
    # The target, the plan and (for the roles chain) the situation only need the question and the answer: asked
    # together.
    plan_structured = "plan" in s.structured_output
    first: list[Generate] = [
        Generate(user_message("matrix/scene_target", question=scene.question), s.params(48, free_text=False)),
        Generate(user_message("matrix/scene_plan", question=scene.question, answer=scene.answer,
                              n_steps=s.plan_steps, structured=plan_structured),
                 s.params(s.plan_tokens, free_text=False,
                          json_schema=step_schema("plan", s.plan_steps) if plan_structured else None)),
    ]
    if s.roles_chain:
        first.append(Generate(user_message("matrix/scene_situation", question=scene.question),
                              s.params(s.plan_tokens)))
    elif s.name_protagonist:
        first.append(_ask_protagonist(scene, None, s))
    replies = yield first
    target_reply, plan_reply = replies[0], replies[1]
    target = parsing.first_sentence(str(target_reply))
    if not target:
        scene.fallbacks["target_from_question"] += 1
        target = shorten(scene.question, 200)
    scene.target = target

    plan_text = _structured_lines(scene, "plan", str(plan_reply)) if plan_structured else str(plan_reply)
    steps = parsing.numbered_steps(plan_text, s.plan_steps)
    if not steps:
        scene.fallbacks["plan_from_answer_sentences"] += 1
        steps = parsing.numbered_steps(scene.answer, s.plan_steps) or parsing.sentences(scene.answer, s.plan_steps)
    if not steps:
        scene.fallbacks["plan_from_question"] += 1
        steps = [shorten(scene.question, 400)]
    scene.plan = steps

    if s.roles_chain:
        roles_conversation = yield from _roles_chain(scene, str(replies[2]), s)
    else:
        if s.name_protagonist:
            _set_protagonist(scene, str(replies[2]))
        roles_conversation = user_message("matrix/scene_roles", question=scene.question, steps=scene.plan,
                                          n_roles=s.n_roles, structured="roles" in s.structured_output)

    # Roles and objects both follow from what came before: asked together.
    roles_structured = "roles" in s.structured_output
    roles_reply, objects_reply = yield [
        Generate(roles_conversation, s.params(s.plan_tokens, free_text=False,
                                              json_schema=step_schema("roles", s.n_roles) if roles_structured
                                              else None)),
        Generate(user_message("matrix/scene_objects", steps=scene.plan, n_objects=s.n_objects),
                 s.params(96, free_text=False)),
    ]
    roles_text = _structured_lines(scene, "roles", str(roles_reply)) if roles_structured else str(roles_reply)
    scene.roles = parsing.roles(roles_text, s.n_roles, exclude={scene.protagonist})
    if len(scene.roles) < s.min_roles:
        # One bounded re-ask, with a differently shaped prompt, when the list was too short.
        (retry,) = yield [Generate(user_message("matrix/scene_roles_retry", target=scene.target, n_roles=s.n_roles),
                                   s.params(s.plan_tokens, free_text=False))]
        scene.fallbacks["roles_reasked"] += 1
        scene.roles += parsing.roles(str(retry), s.n_roles - len(scene.roles),
                                     exclude={r.name for r in scene.roles} | {scene.protagonist})
        if len(scene.roles) < s.min_roles:
            scene.fallbacks["roles_from_default_roster"] += 1
            names = {r.name.lower() for r in scene.roles} | {scene.protagonist.lower()}
            for role in default_roster():
                if len(scene.roles) >= max(s.min_roles, min(s.n_roles, 3)):
                    break
                if role.name.lower() not in names:
                    scene.roles.append(role)

    scene.objects = parsing.objects(str(objects_reply), s.n_objects)
    if not scene.objects:
        scene.fallbacks["no_objects_parsed"] += 1


def _ask_protagonist(scene: Transcript, situation: str | None, s: SceneSettings) -> Generate:
    return Generate(user_message("matrix/scene_protagonist", question=scene.question, situation=situation),
                    s.params(16, free_text=False))


def _set_protagonist(scene: Transcript, reply: str) -> None:
    name = parsing.protagonist_name(reply)
    if name is None:
        scene.fallbacks["protagonist_from_default"] += 1
        return
    scene.protagonist = name


def _roles_chain(scene: Transcript, situation_reply: str, s: SceneSettings) -> Generator[list, list, Conversation]:
    """Situation -> (the protagonist's name, from the situation) and what happens next -> the characters involved
    -> the conversation that selects the roles (asked by the caller, beside the objects)."""
    situation = " ".join(parsing.sentences(situation_reply, 4))
    if not situation:
        scene.fallbacks["situation_from_question"] += 1
        situation = f"Someone asks: {shorten(scene.question, 300)}"
    asked = [Generate(user_message("matrix/scene_future", situation=situation, question=scene.question,
                                   answer=scene.answer), s.params(s.plan_tokens))]
    if s.name_protagonist:
        asked.append(_ask_protagonist(scene, situation, s))
    replies = yield asked
    if s.name_protagonist:
        _set_protagonist(scene, str(replies[1]))
    future = " ".join(parsing.sentences(str(replies[0]), 5))
    if not future:
        scene.fallbacks["future_from_plan"] += 1
        future = " ".join(scene.plan)
    (characters_reply,) = yield [Generate(user_message("matrix/scene_characters", situation=situation,
                                                       future=future), s.params(s.plan_tokens))]
    characters = parsing.clean(str(characters_reply)) or future
    return user_message("matrix/scene_roles_select", situation=situation, characters=shorten(characters, 1200),
                        n_roles=s.n_roles, protagonist=scene.protagonist,
                        structured="roles" in s.structured_output)


def _route(scene: Transcript, reply: str, exclude: str) -> tuple[list[str], str | None]:
    """Who notices (in the order the modulator named them) and what they notice, from a routing reply."""
    # Names are told apart against everyone in the scene, the actor included: a word the actor's name shares
    # with another role's names neither of them.
    names = [scene.protagonist] + [r.name for r in scene.roles]
    seen_line = parsing.labelled_line(reply, "SEEN BY")
    if seen_line is not None and seen_line.strip().lower().startswith("nobody"):
        return [], parsing.labelled_line(reply, "WHAT THEY NOTICE")
    mentioned = parsing.mentioned_names_in_order(seen_line, names) if seen_line else []
    return [n for n in mentioned if n != exclude], parsing.labelled_line(reply, "WHAT THEY NOTICE")


def _observe(scene: Transcript, audience: Sequence[str], observation: str) -> None:
    for name in audience:
        if name == scene.protagonist:
            scene.protagonist_memory.append(observation)
        elif (role := scene.role(name)) is not None:
            role.memory.append(observation)


def _play_round(scene: Transcript, round_no: int, s: SceneSettings) -> Script:
    params = s.params(s.action_tokens)
    step = scene.plan[round_no - 1]
    protagonist = scene.protagonist
    # 1. The protagonist acts on the next plan step.
    (reply,) = yield [Generate(user_message(
        "matrix/protagonist_action", protagonist=protagonist, target=scene.target, memory=scene.memory,
        objects=scene.objects, noticed=scene.protagonist_memory[-4:], step=step), params)]
    action = parsing.clean(str(reply))
    if not action:
        scene.fallbacks["action_from_plan_step"] += 1
        action = step
    scene.events.append(SceneEvent(round_no, protagonist, "action", action))

    # 2. The modulator judges feasibility and routes the action: who notices it, in which order, what they
    #    notice, and how the objects change.
    route_reply, feasible_answer = yield [
        Generate(user_message("matrix/modulator_route", people=_people(scene), objects=scene.objects,
                              memory=scene.memory, actor=protagonist, action=action),
                 s.params(s.action_tokens + 48, free_text=False)),
        Score(user_message("matrix/modulator_feasible", memory=scene.memory, objects=scene.objects,
                           actor=protagonist, action=action), YES_NO),
    ]
    route_reply = str(route_reply)
    feasible, p_yes = _verdict(scene, feasible_answer, route_reply, "FEASIBLE", "feasible_assumed", True)
    audience, observation = _route(scene, route_reply, exclude=protagonist)
    if not audience:
        scene.fallbacks["action_noticed_by_nobody"] += 1
    if not observation:
        scene.fallbacks["observation_is_action"] += 1
        observation = f"{protagonist} does this: {action}"
    if not feasible:
        observation = f"{protagonist} tries, but cannot: {action}"
    scene.events.append(SceneEvent(round_no, "modulator", "modulation", "route", observation, tuple(audience),
                                   feasible, p_yes))
    _observe(scene, audience, observation)
    changes = parsing.object_changes(route_reply, scene.objects) if feasible else []
    if changes:
        for obj, state in changes:
            obj.state = state
        scene.events.append(SceneEvent(round_no, "modulator", "objects",
                                       "; ".join(f"{o.name}: {st}" for o, st in changes)))

    # 3. Roles react in the modulator's order; every reaction is routed to the people who would notice it.
    queue = [name for name in audience if name != protagonist]
    reacted: list[str] = []
    last_seen: dict[str, str] = {name: observation for name in queue}
    while queue and len(reacted) < s.max_reactions:
        name = queue.pop(0)
        role = scene.role(name)
        if role is None or name in reacted:
            continue
        (reply,) = yield [Generate(user_message(
            "matrix/role_reaction", name=role.name, description=role.description, status=role.status,
            memory=role.memory[:-1][-4:], observation=last_seen[name]), params)]
        reaction = parsing.clean(str(reply))
        if not reaction:
            scene.fallbacks["reaction_missing"] += 1
            continue
        reacted.append(name)
        (route,) = yield [Generate(user_message(
            "matrix/modulator_route_reaction", people=_people(scene), memory=scene.memory, actor=name,
            reaction=reaction), s.params(s.action_tokens + 32, free_text=False))]
        noticed_by, noticed = _route(scene, str(route), exclude=name)
        noticed = noticed or f"{name} does this: {reaction}"
        scene.events.append(SceneEvent(round_no, name, "reaction", reaction, noticed, tuple(noticed_by)))
        _observe(scene, noticed_by, noticed)
        for other in noticed_by:
            if other != protagonist and other not in reacted and other not in queue:
                queue.append(other)
            last_seen[other] = noticed

    # 4. The modulator folds the round into the scene's memory and judges whether the plan was stopped.
    round_lines = [f"{e.actor}: {e.action}" for e in scene.events
                   if e.round == round_no and e.kind in {"action", "reaction"}]
    memory_reply, stopped_answer = yield [
        Generate(user_message("matrix/modulator_memory", memory=scene.memory, events=round_lines,
                              protagonist=protagonist),
                 params.replace(max_new_tokens=s.action_tokens + 32)),
        Score(user_message("matrix/modulator_stopped", memory=scene.memory, events=round_lines,
                           protagonist=protagonist), YES_NO),
    ]
    summary = " ".join(parsing.sentences(parsing.without_label_lines(str(memory_reply), ("STOPPED",)), 3))
    if not summary:
        scene.fallbacks["memory_from_events"] += 1
        summary = shorten(" ".join(round_lines), 600, keep_end=True)  # the latest events matter most
    stopped, p_stop = _verdict(scene, stopped_answer, str(memory_reply), "STOPPED", "stopped_assumed_no", False)
    scene.memory = summary
    scene.events.append(SceneEvent(round_no, "modulator", "memory", summary, feasible=None, p_yes=p_stop))
    scene.n_rounds = round_no
    if stopped:
        scene.stopped = True
        reactions = [e for e in scene.events if e.round == round_no and e.kind == "reaction"]
        scene.stopped_by = f"{reactions[-1].actor}: {reactions[-1].action}" if reactions else summary


def scene_script(scene: Transcript, s: SceneSettings) -> Script:
    """The whole monopolylogue of one scene: plan it, then play rounds until the plan ends or is stopped."""
    yield from _plan_scene(scene, s)
    for round_no in range(1, s.max_rounds + 1):
        if round_no > len(scene.plan) or scene.stopped:
            break
        yield from _play_round(scene, round_no, s)
    _conclude(scene)


def _conclude(scene: Transcript) -> None:
    scene.outcome = _outcome(scene)
    # The consequence is what happened to the others: every reaction, in the modulator's order.
    reactions = [f"{e.actor}: {e.action}" for e in scene.events if e.kind == "reaction"]
    scene.consequence = " ".join(reactions[-5:]) if reactions else scene.memory


def _outcome(scene: Transcript) -> str:
    """What became of the plan, in the modulator's own terms: a step counts as carried out only when the modulator
    judged the attempt feasible (an infeasible one is played as "tries, but cannot"), so the outcome the critique
    reads never claims more than the transcript shows."""
    verdicts = [e.feasible for e in scene.events if e.kind == "modulation"]
    attempted, infeasible = len(verdicts), verdicts.count(False)
    planned = len(scene.plan)
    if scene.stopped:
        judged = (f", after the modulator judged {infeasible} of the {attempted} attempted steps infeasible"
                  if infeasible else "")
        return f"The plan was stopped in round {scene.n_rounds} of {planned}{judged}: {scene.stopped_by}"
    if not infeasible:
        return f"{scene.protagonist} carried out {attempted} of {planned} planned steps without being stopped."
    if infeasible == attempted:
        return (f"{scene.protagonist} attempted {attempted} of {planned} planned steps but carried out none of "
                "them: the modulator judged every attempt infeasible. Nobody stopped the plan.")
    return (f"{scene.protagonist} attempted {attempted} of {planned} planned steps and carried out "
            f"{attempted - infeasible}: the modulator judged the other {infeasible} infeasible. Nobody stopped the "
            "plan.")


def run_scenes(
    llm: ChatBackend,
    inputs: Sequence[SceneInput],
    settings: SceneSettings,
    *,
    on_scene_done: Callable[[Transcript], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Transcript]:
    """Plan and play one scene per input, all at once on one live backend session. `on_scene_done(transcript)`
    gets each scene the moment it ends (to save it), `progress(done, total)` counts them."""
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
    drive(llm, [scene_script(scene, settings) for scene in scenes], scene_done)
    return scenes


def fallback_totals(scenes: Sequence[Transcript]) -> Counter[str]:
    total: Counter[str] = Counter()
    for scene in scenes:
        total.update(scene.fallbacks)
    return total


def scenes_relying_on(scenes: Sequence[Transcript]) -> dict[str, int]:
    """How many scenes needed a fallback for their roles, their plan, or a feasibility verdict."""
    return {family: sum(1 for s in scenes if any(s.fallbacks.get(name) for name in names))
            for family, names in PLANNING_FALLBACKS.items()}
