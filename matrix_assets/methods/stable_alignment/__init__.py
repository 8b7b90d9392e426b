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
from typing import Literal

from matrix_assets.methods.stable_alignment.data import (
    DEFAULT_MIX, KINDS, REVISED_MARKER, AlignmentData, RatedGroup, build_alignment_data,
)
from matrix_assets.methods.stable_alignment.sandbox import (
    PAPER, Interaction, MemoryHit, PeerFeedback, Rating, SandboxResult, SandboxSettings, minilm_embedder,
    run_sandbox, sample_seed_pairs,
)

from matrix_assets.data.hh_harmless import seed_pairs as hh_seed_pairs  # noqa: E402
from matrix_assets.methods.base import (  # noqa: E402
    DEFAULT_MAX_PROMPTS, Markdown, Method, RatedResponse, StageContext, StageOutcome, StageSpec, TrainingGroup,
)
from matrix_assets.training.sft import StableAlignmentObjective  # noqa: E402

NAME = "stable_alignment"
_SANDBOX = SandboxSettings()


SeedSource = Literal["own_answers", "hh_rlhf"]


@dataclass(frozen=True)
class StableAlignmentSettings:
    """The quick profile (defaults) and `PAPER_PROFILE`, as in the method reference: a 3 x 3 world over 2 rounds
    for a 135M model on a CPU; at paper scale the released code's world (agi-templar/Stable-Alignment): 10 x 10
    agents over 50 rounds, up to 4 peers, every agent's memory seeded with 50 human HH-RLHF pairs, agents sampling
    at temperature 1.0, top-p 1.0, no penalty, 256 tokens, the observer rating engagement too.

    Remaining departures of the paper profile (the README lists the same): the questions are the partition's
    training prompts (the original asks HH-RLHF's red-team questions: the bundled `hh_rlhf` set); the seed pairs
    come from HH-RLHF's harmless-base test dialogues (`chosen`: first human turn, first assistant reply), the half
    not used for evaluation, where the original sampled them from its labelled HH-RLHF prior; the observer is the
    judge resource (the original: a stronger model, text-davinci-003 by default); every rating is read from the
    next-token distribution and a peer's reason is written after its rating; prompts are reworded; it trains with the
    shared training settings (`matrix_assets.profiles`: LoRA, 3 epochs), where the released checkpoint was a
    2-epoch full fine-tune after SFT on HH-RLHF.
    The quick profile also seeds memories with the model's own answers to the next training prompts (2 per agent),
    and samples at 0.8 with top-p 0.95 and a 1.1 repetition penalty, 96-token answers: a 135M model at 1.0 drifts
    into noise and loops without a penalty."""

    max_prompts: int | None = field(default=DEFAULT_MAX_PROMPTS, metadata={
        "help": "Questions the society is asked: the partition's first training prompts (the ones MATRIX uses).",
        "ge": 1})
    grid_size: int = field(default=_SANDBOX.grid_size, metadata={
        "help": "g: a g x g grid of agents (paper 10).", "ge": 2})
    rounds: int = field(default=_SANDBOX.rounds, metadata={"help": "Rounds of interactions (paper 50; >= 2).", "ge": 2})
    max_peers: int = field(default=_SANDBOX.max_peers, metadata={
        "help": "Neighbours rating each draft (<= 4).", "ge": 2, "le": 4})
    seed_source: SeedSource = field(default="own_answers", metadata={
        "help": "What agents remember at the start: hh_rlhf, human (question, answer) pairs from HH-RLHF "
        "harmless-base (paper); own_answers, the model's own answers to the training prompts after the first "
        "max_prompts (needs max_prompts), never trained on."})
    seed_pairs_per_agent: int = field(default=_SANDBOX.seed_pairs_per_agent, metadata={
        "help": "Memories each agent starts with (paper 50).", "ge": 0})
    memory_threshold: float = field(default=_SANDBOX.memory_threshold, metadata={
        "help": "Cosine distance under which a remembered question is shown with the draft prompt.",
        "gt": 0.0, "le": 2.0})
    answer_tokens: int = field(default=_SANDBOX.answer_tokens, metadata={"help": "Drafts and revisions.", "ge": 1})
    reason_tokens: int = field(default=_SANDBOX.reason_tokens, metadata={"help": "A peer's reason.", "ge": 1})
    temperature: float = field(default=_SANDBOX.temperature, metadata={
        "help": "Agents' sampling temperature (paper 1.0).", "ge": 0.0})
    top_p: float = field(default=_SANDBOX.top_p, metadata={
        "help": "Agents' nucleus sampling (paper 1.0).", "gt": 0.0, "le": 1.0})
    repetition_penalty: float = field(default=_SANDBOX.repetition_penalty, metadata={
        "help": "Agents' repetition penalty (1.0: none, the paper).", "gt": 0.0})
    engagement: bool = field(default=_SANDBOX.engagement, metadata={"help": "The observer also rates engagement."})

    def sandbox(self) -> SandboxSettings:
        return replace(_SANDBOX, grid_size=self.grid_size, rounds=self.rounds, max_peers=self.max_peers,
                       question_pool=None, seed_pairs_per_agent=self.seed_pairs_per_agent,
                       memory_threshold=self.memory_threshold, answer_tokens=self.answer_tokens,
                       reason_tokens=self.reason_tokens, temperature=self.temperature, top_p=self.top_p,
                       repetition_penalty=self.repetition_penalty, engagement=self.engagement)


QUICK = StableAlignmentSettings()
PAPER_PROFILE = StableAlignmentSettings(
    max_prompts=None, grid_size=PAPER.grid_size, rounds=PAPER.rounds, max_peers=PAPER.max_peers,
    seed_source="hh_rlhf", seed_pairs_per_agent=PAPER.seed_pairs_per_agent, answer_tokens=PAPER.answer_tokens,
    reason_tokens=PAPER.reason_tokens, temperature=PAPER.temperature, top_p=PAPER.top_p,
    repetition_penalty=PAPER.repetition_penalty, engagement=PAPER.engagement)


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
    own_seeds = s.seed_source == "own_answers" and s.max_prompts is not None
    limit = s.max_prompts + settings.seed_pairs_per_agent * settings.n_agents if own_seeds else s.max_prompts
    prompts = ctx.store.train_prompts(ctx.partition, limit=limit)
    questions = prompts[: s.max_prompts] if s.max_prompts is not None else prompts
    if not questions:
        raise LookupError(f"prompt set {ctx.partition!r} has no training prompts; materialize benchmark_prompts")
    # Own answers are asked of the prompts after the questions (never trained on); with every prompt asked there
    # are none, and memories start empty (counted as 0 seed pairs in the metadata).
    seeds = [p.text for p in prompts[len(questions):]] if own_seeds else []
    human = sample_seed_pairs(hh_seed_pairs(), settings) if s.seed_source == "hh_rlhf" else None
    prompt_ids = {p.text.strip(): p.prompt_id for p in questions}
    progress = ctx.progress("society rounds", unit="steps")
    result = run_sandbox(ctx.llm, ctx.judge, [p.text for p in questions], settings, seed_pairs=human,
                         seed_questions=seeds if human is None else None, progress=progress)
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
                  "seed_source": s.seed_source,
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
