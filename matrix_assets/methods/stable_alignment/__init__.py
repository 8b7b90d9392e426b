"""Stable Alignment (Liu et al., "Training Socially Aligned Language Models on Simulated Social Interactions",
ICLR 2024, arXiv 2305.16960): a simulated society (SANDBOX) rates and revises the model's answers, and a
rating-margin contrastive loss (`matrix_assets.training.rating_contrastive`) trains on the rated groups.
Protocol and data format after agi-templar/Stable-Alignment (Apache-2.0), prompts reworded.

One stage, `stable_alignment/interactions` (partitioned by prompt set): a SANDBOX world over the partition's first
`max_prompts` training prompts (the same prompts MATRIX trains on), with the judge model as the observer; every
interaction and rating is a row of the store, and the three kinds of rated groups, mixed 5 : 1 : 1, are the
method's training data for the rating-margin contrastive loss.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace

from matrix_assets.methods.stable_alignment.data import (
    DEFAULT_MIX, KINDS, REVISED_MARKER, AlignmentData, RatedGroup, build_alignment_data,
)
from matrix_assets.methods.stable_alignment.sandbox import (
    PAPER, Interaction, MemoryHit, PeerFeedback, Rating, SandboxResult, SandboxSettings, minilm_embedder,
    run_sandbox,
)

from matrix_assets.methods.base import (  # noqa: E402
    DEFAULT_MAX_PROMPTS, Markdown, Method, RatedResponse, StageContext, StageOutcome, StageSpec, TrainingGroup,
)
from matrix_assets.training.sft import StableAlignmentObjective  # noqa: E402

NAME = "stable_alignment"
_SANDBOX = SandboxSettings()


@dataclass(frozen=True)
class StableAlignmentSettings:
    """The quick profile (defaults) and `PAPER_PROFILE`, as in the method reference: a 3 x 3 world over 2 rounds
    for a 135M model on a CPU; 10 x 10 over 50 rounds at paper scale."""

    max_prompts: int | None = field(default=DEFAULT_MAX_PROMPTS, metadata={
        "help": "Questions the society is asked: the partition's first training prompts (the ones MATRIX uses)."})
    grid_size: int = field(default=_SANDBOX.grid_size, metadata={"help": "g: a g x g grid of agents (paper 10)."})
    rounds: int = field(default=_SANDBOX.rounds, metadata={"help": "Rounds of interactions (paper 50; >= 2)."})
    max_peers: int = field(default=_SANDBOX.max_peers, metadata={"help": "Neighbours rating each draft (<= 4)."})
    seed_pairs_per_agent: int = field(default=_SANDBOX.seed_pairs_per_agent, metadata={
        "help": "Memories each agent starts with: its own answers to the next training prompts (never trained on)."})
    memory_threshold: float = field(default=_SANDBOX.memory_threshold, metadata={
        "help": "Cosine distance under which a remembered question is shown with the draft prompt."})
    answer_tokens: int = field(default=_SANDBOX.answer_tokens, metadata={"help": "Drafts and revisions."})
    reason_tokens: int = field(default=_SANDBOX.reason_tokens, metadata={"help": "A peer's reason."})
    temperature: float = field(default=_SANDBOX.temperature, metadata={"help": "Agents' sampling temperature."})
    engagement: bool = field(default=_SANDBOX.engagement, metadata={"help": "The observer also rates engagement."})

    def sandbox(self) -> SandboxSettings:
        return replace(_SANDBOX, grid_size=self.grid_size, rounds=self.rounds, max_peers=self.max_peers,
                       question_pool=None, seed_pairs_per_agent=self.seed_pairs_per_agent,
                       memory_threshold=self.memory_threshold, answer_tokens=self.answer_tokens,
                       reason_tokens=self.reason_tokens, temperature=self.temperature, engagement=self.engagement)


QUICK = StableAlignmentSettings()
PAPER_PROFILE = StableAlignmentSettings(
    max_prompts=None, grid_size=PAPER.grid_size, rounds=PAPER.rounds, max_peers=PAPER.max_peers,
    seed_pairs_per_agent=PAPER.seed_pairs_per_agent, answer_tokens=PAPER.answer_tokens,
    reason_tokens=PAPER.reason_tokens, temperature=PAPER.temperature, engagement=PAPER.engagement)


@dataclass
class _InteractionRow:
    round: int
    agent: int
    prompt_id: str
    question: str
    draft: str
    memory_question: str | None
    memory_answer: str | None
    peers: list[int]
    mean_peer_rating: float | None
    revision: str
    observer_before: float | None
    observer_after: float | None


@dataclass
class _RatingRow:
    round: int
    agent: int
    rater: str
    rating: float | None
    distribution: dict[str, float]
    reason: str


def _rows(result: SandboxResult, prompt_ids: dict[str, str]) -> tuple[list[_InteractionRow], list[_RatingRow]]:
    interactions, ratings = [], []
    for it in result.interactions:
        hit = it.memory_hit
        interactions.append(_InteractionRow(
            it.round, it.agent, prompt_ids[it.question], it.question, it.draft, hit.question if hit else None,
            hit.answer if hit else None, [p.peer for p in it.peers], it.mean_peer_rating, it.revision,
            it.observer_before.value, it.observer_after.value))
        for peer in it.peers:
            ratings.append(_RatingRow(it.round, it.agent, f"peer:{peer.peer}", peer.rating.value,
                                      peer.rating.distribution or {}, peer.reason))
        for rater, rating in (("observer:before", it.observer_before), ("observer:after", it.observer_after),
                              ("engagement:before", it.engagement_before),
                              ("engagement:after", it.engagement_after)):
            if rating is not None:
                ratings.append(_RatingRow(it.round, it.agent, rater, rating.value, rating.distribution or {}, ""))
    return interactions, ratings


def _question_of(prompt: str, prompt_ids: dict[str, str]) -> str:
    """The question a group's prompt is about (self-critic and realignment prompts quote it)."""
    return max((q for q in prompt_ids if q in prompt), key=len)


def _interactions(ctx: StageContext, s: StableAlignmentSettings) -> StageOutcome:
    settings = s.sandbox()
    n_seed = settings.seed_pairs_per_agent * settings.n_agents
    limit = None if s.max_prompts is None else s.max_prompts + n_seed
    prompts = ctx.store.train_prompts(ctx.partition, limit=limit)
    questions = prompts[: s.max_prompts] if s.max_prompts is not None else prompts
    if not questions:
        raise LookupError(f"prompt set {ctx.partition!r} has no training prompts; materialize benchmark_prompts")
    seeds = [p.text for p in prompts[len(questions):]] if s.max_prompts is not None else []
    prompt_ids = {p.text.strip(): p.prompt_id for p in questions}
    progress = ctx.progress("society rounds", unit="steps")
    result = run_sandbox(ctx.llm, ctx.judge, [p.text for p in questions], settings, seed_questions=seeds or None,
                         progress=progress)
    interactions, ratings = _rows(result, prompt_ids)
    store = ctx.store
    columns = {"prompt_set": ctx.partition, "model_id": ctx.model_id}
    store.save_records("sa_interactions", interactions, **columns)
    store.save_records("sa_ratings", ratings, **columns)
    data = build_alignment_data(result.interactions)
    groups = [TrainingGroup(prompt_ids[_question_of(g.prompt, prompt_ids)], g.prompt, g.kind,
                            tuple(RatedResponse(r.text, r.rating) for r in g.responses)) for g in data.groups]
    store.save_training_groups(NAME, ctx.model_id, ctx.partition, groups)
    summary = result.summary()
    best = max(result.interactions, key=lambda i: (len(i.peers), i.memory_hit is not None))
    return StageOutcome(
        n_items=len(result.interactions),
        metadata={**{f"society/{k}": v for k, v in summary.items()},
                  **{f"data/{k}": v for k, v in data.summary().items()},
                  "observer": ctx.judge.model_id,
                  "sample_interaction": Markdown(best.render_markdown())},
        fallbacks={},
    )


METHOD = Method(
    name=NAME,
    title="Stable Alignment",
    description="A simulated society (SANDBOX) rates and revises the model's answers; a rating-margin contrastive "
    "loss trains on the rated groups (ICLR 2024).",
    reference="Liu et al., Training Socially Aligned Language Models on Simulated Social Interactions, ICLR 2024",
    settings=QUICK,
    profiles={"paper": PAPER_PROFILE},
    trainer="stable_alignment",
    objective=StableAlignmentObjective(),
    order=30,
    stages=(StageSpec("interactions", "The SANDBOX society: each agent drafts an answer (recalling similar past "
                      "questions), neighbours rate it 1-7 with reasons, the agent revises from the sorted feedback, "
                      "and an observer (the judge model) rates draft and revision; the three kinds of rated groups "
                      "are the training data.", _interactions, deps=("benchmark_prompts",),
                      settings=tuple(f.name for f in dataclasses.fields(StableAlignmentSettings)),
                      uses_judge=True),),
)

__all__ = [
    "METHOD", "StableAlignmentSettings",
    "DEFAULT_MIX", "KINDS", "PAPER", "REVISED_MARKER", "AlignmentData", "Interaction", "MemoryHit", "PeerFeedback",
    "Rating", "RatedGroup", "SandboxResult", "SandboxSettings", "build_alignment_data", "minilm_embedder",
    "run_sandbox",
]
