"""MATRIX (Pang et al., "Self-Alignment of Large Language Models via Monopolylogue-based Social Scene
Simulation", ICML 2024): the model plays out the social consequences of its own answer, critiques the answer
from the scene, and revises it; the revisions are its fine-tuning data.

Stages (each a Dagster asset `matrix/NAME`, partitioned by prompt set): `scenes` (the monopolylogue, see
`engine`), `critiques` and `revisions` (see `revision`; with `simulation_samples` the revisions stage also writes
the scenes' own role play as training samples, see `samples`). Self-selection among `revision_candidates`
sampled revisions is this project's addition; 1 reproduces the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from matrix_assets.methods.base import (
    DEFAULT_MAX_PROMPTS,
    CritiqueRecord,
    Markdown,
    Method,
    CheckVerdict,
    RatedResponse,
    StageCheck,
    StageContext,
    StageOutcome,
    StageSpec,
    TrainingGroup,
    initial_responses,
)
from matrix_assets.methods.matrix.engine import SceneSettings, fallback_totals, run_scenes, scenes_relying_on
from matrix_assets.methods.matrix.revision import RevisionInput, RevisionSettings, critique_scenes, revise
from matrix_assets.methods.matrix.samples import SIMULATION_KIND, simulation_samples
from matrix_assets.methods.matrix.scene import RevisionCandidate, SceneInput, Transcript
from matrix_assets.methods.matrix.transcripts import TranscriptStore, load_transcripts, save_transcript

NAME = "matrix"


@dataclass(frozen=True)
class MatrixSettings:
    """The quick profile (defaults) runs in minutes on a 2-core CPU with the bundled 135M model. `PAPER` is the
    paper and its reference code (ShuoTang123/MATRIX): 5 roles and 5 plan steps played out, the protagonist named
    by the model, roles through situation -> future -> characters, one revision from the whole critique and a
    one-sentence harm summary of r0, simulation samples beside the revisions, temperature 0.2 and top-p 1.0
    without a repetition penalty. Its remaining departures (the README lists the same):

    - token budgets: 512 per critique and revision (the reference allows 1024 per simulation call and 2048 per
      revision), so that a revision fits the paper's 1024-token training length;
    - incidents are routed per action and per reaction, memory is summarised every round, at most 5 roles react
      per round, and the modulator's yes/no verdicts are read from next-token probabilities (not parsed);
    - the protagonist acts on each plan step in a sentence of its own (the reference replays the step as is);
    - the revision prompt has no worked example of a helpful refusal (a small model copies it verbatim);
    - a simulation sample is one role's reaction (the reference logs every call of its scenes);
    - r0 is the greedy answer every method shares (the reference samples it at 0.2).

    The quick profile departs further, each because the 135M model needs it: the fixed protagonist "The asker",
    roles asked directly from the plan, the critique's first two sentences, no harm summary, no simulation
    samples, 3 roles, 3 steps, 2 rounds, greedy decoding with a 1.15 repetition penalty on free text. Its k = 1
    is the paper's and CAI's: the quick table compares methods, not selection."""

    max_prompts: int | None = field(default=DEFAULT_MAX_PROMPTS, metadata={
        "help": "Training prompts per prompt set whose answers are simulated (None: all).", "ge": 1})
    n_roles: int = field(default=3, metadata={
        "help": "Roles the model casts in each scene besides the protagonist (paper 5).", "ge": 1})
    plan_steps: int = field(default=3, metadata={
        "help": "Steps of the protagonist's plan, each one action (paper 5).", "ge": 1})
    max_rounds: int = field(default=2, metadata={
        "help": "Rounds of actions and reactions before the scene is summarised.", "ge": 1})
    max_reactions: int = field(default=3, metadata={
        "help": "Roles that react in a round, at most (the modulator picks who notices).", "ge": 0})
    n_objects: int = field(default=3, metadata={
        "help": "Objects of the scene (things an action can change).", "ge": 0})
    plan_tokens: int = field(default=160, metadata={
        "help": "Tokens for the plan, the roles and the objects.", "ge": 1})
    action_tokens: int = field(default=64, metadata={
        "help": "Tokens per action, reaction and modulator verdict.", "ge": 1})
    scenes_per_batch: int = field(default=32, metadata={
        "help": "Scenes simulated together (one live session); each is stored as it ends.", "ge": 1})
    critique_tokens: int = field(default=160, metadata={
        "help": "Tokens of the critique written from the transcript (paper 512).", "ge": 1})
    revision_tokens: int = field(default=160, metadata={
        "help": "Tokens of the revision (paper 512).", "ge": 1})
    # 1: one revision, as the paper and as CAI, so that MATRIX and CAI differ only in what the critique comes from.
    revision_candidates: int = field(default=1, metadata={
        "help": "Revisions sampled per prompt; above 1 the model picks the least harmful by its own verdict "
        "(1: the paper, and CAI).", "ge": 1})
    candidate_temperature: float = field(default=0.7, metadata={
        "help": "Sampling temperature of the candidates when revision_candidates > 1.", "ge": 0.0})
    harm_threshold: float = field(default=0.5, metadata={
        "help": "With several candidates: one the model itself judges harmful with P(yes) above this is left "
        "out.", "ge": 0.0, "le": 1.0})
    name_protagonist: bool = field(default=False, metadata={
        "help": "The model names the protagonist (e.g. 'Thief', as the paper) instead of the fixed 'The asker'."})
    roles_chain: bool = field(default=False, metadata={
        "help": "Roles through the paper's chain: the situation of the question -> what happens next -> the social "
        "characters involved -> the most important ones (off: asked directly from the plan)."})
    full_critique: bool = field(default=False, metadata={
        "help": "The revision sees the whole critique (paper); off: its first two sentences."})
    harm_summary: bool = field(default=False, metadata={
        "help": "r0 is condensed into one sentence that says whether it is harmful, and the revision sees that "
        "sentence in its place (paper)."})
    simulation_samples: int = field(default=0, metadata={
        "help": "Role reactions from each trained prompt's scene added as training samples (the paper's "
        "simulation data; 1 makes them as many as the revisions).", "ge": 0})
    temperature: float = field(default=0.0, metadata={
        "help": "Sampling temperature of every scene, critique and revision call (0: greedy; paper 0.2).",
        "ge": 0.0})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (paper 1.0).", "gt": 0.0, "le": 1.0})
    repetition_penalty: float = field(default=1.15, metadata={
        "help": "On free text (actions, reactions, critique, revision); 1.0: none (paper). A 135M model loops "
        "without it.", "gt": 0.0})
    # Off by default, measured on the validation split with the bundled 135M model: under a JSON schema more plans
    # fell back and half the roles it wrote were degenerate (benchmarks/structured_output.py; figures in the README).
    structured_output: tuple[str, ...] = field(default=(), metadata={
        "help": "Scene steps decoded under a JSON schema (xgrammar), by name: plan, roles; none by default (with "
        "the 135M model more plans fell back under a schema)."})

    def scene(self) -> SceneSettings:
        return SceneSettings(n_roles=self.n_roles, plan_steps=self.plan_steps, max_rounds=self.max_rounds,
                             n_objects=self.n_objects, max_reactions=self.max_reactions,
                             plan_tokens=self.plan_tokens, action_tokens=self.action_tokens,
                             name_protagonist=self.name_protagonist, roles_chain=self.roles_chain,
                             temperature=self.temperature, top_p=self.top_p,
                             repetition_penalty=self.repetition_penalty,
                             structured_output=tuple(self.structured_output))

    def revision(self) -> RevisionSettings:
        return RevisionSettings(critique_tokens=self.critique_tokens, revision_tokens=self.revision_tokens,
                                candidates=self.revision_candidates,
                                candidate_temperature=self.candidate_temperature,
                                harm_threshold=self.harm_threshold, full_critique=self.full_critique,
                                harm_summary=self.harm_summary, temperature=self.temperature, top_p=self.top_p,
                                repetition_penalty=self.repetition_penalty)


QUICK = MatrixSettings()
# Sizes: the reference code's defaults (example.py: 5 agents, 5 ego steps); the rest as the class docstring says.
PAPER = replace(QUICK, max_prompts=None, n_roles=5, plan_steps=5, max_rounds=5, max_reactions=5, plan_tokens=256,
                critique_tokens=512, revision_tokens=512, revision_candidates=1, name_protagonist=True,
                roles_chain=True, full_critique=True, harm_summary=True, simulation_samples=1, temperature=0.2,
                top_p=1.0, repetition_penalty=1.0)


def _scenes(ctx: StageContext, s: MatrixSettings) -> StageOutcome:
    store: TranscriptStore = ctx.store  # type: ignore[assignment]
    rows = initial_responses(ctx, s.max_prompts)
    progress = ctx.progress("scene simulation", unit="scenes")
    scenes: list[Transcript] = []
    for start in range(0, len(rows), s.scenes_per_batch):
        batch = rows[start : start + s.scenes_per_batch]
        scenes += run_scenes(ctx.llm, [SceneInput(r.prompt_id, r.prompt, r.response) for r in batch], s.scene(),
                             on_scene_done=lambda scene: save_transcript(store, ctx.model_id, scene),
                             progress=progress)
        ctx.log(f"scenes saved: {len(scenes)}/{len(rows)}")
    relying = scenes_relying_on(scenes)
    events = [e for scene in scenes for e in scene.events]
    reactions = [e for e in events if e.kind == "reaction"]
    return StageOutcome(
        n_items=len(scenes),
        metadata={
            "n_scenes": len(scenes),
            # Rounded: the UI shows a float's every digit, and two decimals are all a mean over scenes says.
            "mean_roles": round(sum(len(s.roles) for s in scenes) / len(scenes), 2),
            "mean_rounds": round(sum(s.n_rounds for s in scenes) / len(scenes), 2),
            "stopped_scenes": sum(1 for s in scenes if s.stopped),
            "infeasible_actions": sum(1 for e in events if e.kind == "modulation" and e.feasible is False),
            "reactions": len(reactions),
            "reactions_routed_to_someone": sum(1 for e in reactions if e.audience),
            "object_changes": sum(1 for e in events if e.kind == "objects"),
            "sample_transcript": Markdown(scenes[0].render_markdown()),
        },
        fallbacks=dict(fallback_totals(scenes)),
        items_with_fallback=relying,
    )


def _played_the_scene(outcome: StageOutcome) -> CheckVerdict:
    """Over half of the partition's scenes relying on a fallback for one family means the model did not play."""
    shares = {family: count / outcome.n_items for family, count in outcome.items_with_fallback.items()}
    weak = {family: share for family, share in shares.items() if share > 0.5}
    verdict = (f"the model is too weak to simulate this: over half the scenes rely on a fallback for "
               f"{', '.join(sorted(weak))}") if weak else "the model played it"
    return CheckVerdict(passed=not weak, metadata={"n_items": outcome.n_items,
                                                   **{f"share/{k}": round(v, 3) for k, v in shares.items()},
                                                   "verdict": verdict})


PLAYED_THE_SCENE = StageCheck(
    "model_played_the_scene", "Warns when more than half of the partition's items relied on a fallback for roles, "
    "plan or feasibility: the model is too weak to simulate.", _played_the_scene)


def _critiques(ctx: StageContext, s: MatrixSettings) -> StageOutcome:
    store: TranscriptStore = ctx.store  # type: ignore[assignment]
    scenes = load_transcripts(store, ctx.partition, ctx.model_id, limit=s.max_prompts)
    if not scenes:
        raise LookupError(f"no scenes for {ctx.partition!r}; materialize matrix/scenes first")
    critiques = critique_scenes(ctx.llm, scenes, s.revision())
    store.save_records("critiques", [CritiqueRecord(c.prompt_id, c.text, c.harmed_parties, c.used_fallback)
                                     for c in critiques], method=NAME, model_id=ctx.model_id)
    sample = [{"prompt": t.question, "critique": c.text, "harmed": ", ".join(c.harmed_parties)}
              for t, c in list(zip(scenes, critiques))[:3]]
    return StageOutcome(
        n_items=len(critiques),
        metadata={"n_critiques": len(critiques),
                  "naming_harmed_parties": sum(1 for c in critiques if c.harmed_parties),
                  "sample": sample},
        fallbacks={"critique_from_scene_record": sum(1 for c in critiques if c.used_fallback)},
    )


def _revisions(ctx: StageContext, s: MatrixSettings) -> StageOutcome:
    store: TranscriptStore = ctx.store  # type: ignore[assignment]
    scenes = {t.prompt_id: t for t in load_transcripts(store, ctx.partition, ctx.model_id, limit=s.max_prompts)}
    critiques = {c.prompt_id: c for c in store.load_records("critiques", CritiqueRecord, prompt_set=ctx.partition,
                                                              method=NAME, model_id=ctx.model_id)}
    items = [RevisionInput(pid, t.question, t.answer, critiques[pid].text, critiques[pid].harmed_parties,
                           t.consequence) for pid, t in scenes.items() if pid in critiques]
    if not items:
        raise LookupError(f"no critiques for {ctx.partition!r}; materialize matrix/critiques first")
    results = revise(ctx.llm, items, s.revision())
    candidates: list[RevisionCandidate] = [c for r in results for c in r.candidates]
    store.save_records("revision_candidates", candidates, method=NAME, model_id=ctx.model_id)
    groups = [
        TrainingGroup(i.prompt_id, i.question, "matrix_revision",
                      (RatedResponse(r.chosen),) if r.chosen is not None else (), r.excluded)
        for i, r in zip(items, results)
    ]
    # The paper's simulation data, one part per trained revision: only prompts that are trained on contribute.
    simulation = [TrainingGroup(i.prompt_id, prompt, SIMULATION_KIND, (RatedResponse(reaction),))
                  for i, r in zip(items, results) if r.chosen is not None and s.simulation_samples
                  for prompt, reaction in simulation_samples(scenes[i.prompt_id], s.simulation_samples)]
    store.save_training_groups(NAME, ctx.model_id, ctx.partition, groups + simulation)
    excluded = [r.excluded for r in results if r.excluded]
    scored = [c.p_harm for c in candidates if c.p_harm is not None]
    sample = [{"prompt": i.question, "initial": i.answer, **({"harm_summary": r.summary} if s.harm_summary else {}),
               "revised": r.chosen or f"(left out: {r.excluded})"} for i, r in list(zip(items, results))[:3]]
    return StageOutcome(
        n_items=len(results),
        metadata={
            "n_revisions": len(results),
            "revision_candidates": s.revision_candidates,
            "trained_on": len(results) - len(excluded),
            "excluded/self_judged_harmful": excluded.count("self_judged_harmful"),
            "excluded/empty_revision": excluded.count("empty_revision"),
            "mean_self_judged_p_harm": sum(scored) / len(scored) if scored else float("nan"),
            "same_as_initial_answer": sum(1 for i, r in zip(items, results) if r.chosen and
                                          r.chosen.strip() == i.answer.strip()),
            "simulation_samples": len(simulation),
            **({"harm_summary_unusable": sum(1 for r in results if r.summary is None)} if s.harm_summary else {}),
            "side_by_side": sample,
        },
    )


_SAMPLING = ("temperature", "top_p", "repetition_penalty")  # every stage that generates shows them

METHOD = Method(
    name=NAME,
    title="MATRIX",
    description="Social-scene simulation: the model plays everyone its answer affects, critiques the answer from "
    "the scene and revises it (ICML 2024).",
    reference="Pang et al., Self-Alignment of Large Language Models via Monopolylogue-based Social Scene "
    "Simulation, ICML 2024",
    settings=QUICK,
    profiles={"paper": PAPER},
    order=10,
    stages=(
        StageSpec("scenes", "The monopolylogue: the model plans a social scene around each answer and plays "
                  "every role; a social modulator judges feasibility, routes every action and reaction to those "
                  "who notice it, updates the objects and keeps the scene's memory.", _scenes,
                  deps=("initial_responses",),
                  settings=("max_prompts", "n_roles", "plan_steps", "max_rounds", "max_reactions", "n_objects",
                            "plan_tokens", "action_tokens", "scenes_per_batch", "name_protagonist", "roles_chain",
                            *_SAMPLING, "structured_output"),
                  checks=(PLAYED_THE_SCENE,)),
        StageSpec("critiques", "What the answer did to the people in the scene, from the question, the answer "
                  "and the transcript.", _critiques, deps=("matrix/scenes",),
                  settings=("max_prompts", "critique_tokens", *_SAMPLING)),
        StageSpec("revisions", "r1: the answer revised in the light of the critique, helpful where it can be and "
                  "harmless where it must be; with several candidates, the model's own choice.", _revisions,
                  deps=("matrix/critiques",),
                  settings=("max_prompts", "revision_tokens", "revision_candidates", "candidate_temperature",
                            "harm_threshold", "full_critique", "harm_summary", "simulation_samples", *_SAMPLING)),
    ),
)

__all__ = ["METHOD", "MatrixSettings", "PAPER", "QUICK"]

