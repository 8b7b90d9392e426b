"""Constitutional-AI-style critique and revision (Bai et al., 2022): the model critiques its own answer against a
fixed list of principles (`prompts/principles.txt`) and revises it; no simulation. The comparison method that
shows what a social scene adds over fixed rules, on the same prompts."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from matrix_assets.llm.base import GenerationParams
from matrix_assets.methods.base import (
    DEFAULT_MAX_PROMPTS,
    CritiqueRecord,
    Method,
    RatedResponse,
    StageContext,
    StageOutcome,
    StageSpec,
    TrainingGroup,
    initial_responses,
)
from matrix_assets.methods.cai.critique_revise import cai_critiques, cai_revisions

NAME = "cai"


@dataclass(frozen=True)
class CaiSettings:
    """One critique and one revision per prompt (k = 1, as MATRIX in both profiles), decoded as MATRIX decodes them
    in the same profile (quick: greedy with a 1.15 repetition penalty; paper: temperature 0.2, top-p 1.0, no
    penalty, 512 tokens), so that the two differ only in where the critique comes from: a scene or fixed rules."""

    max_prompts: int | None = field(default=DEFAULT_MAX_PROMPTS, metadata={
        "help": "Training prompts per prompt set critiqued and revised (None: all).", "ge": 1})
    critique_tokens: int = field(default=160, metadata={
        "help": "Tokens of the critique against the principles (paper 512).", "ge": 1})
    revision_tokens: int = field(default=160, metadata={
        "help": "Tokens of the revision (paper 512).", "ge": 1})
    temperature: float = field(default=0.0, metadata={
        "help": "Sampling temperature (0: greedy; paper 0.2).", "ge": 0.0})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (paper 1.0).", "gt": 0.0, "le": 1.0})
    repetition_penalty: float = field(default=1.15, metadata={
        "help": "1.0: none (paper). A 135M model loops without it.", "gt": 0.0})

    def params(self, max_new_tokens: int) -> GenerationParams:
        return GenerationParams(max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                                repetition_penalty=self.repetition_penalty)


QUICK = CaiSettings()
PAPER = replace(QUICK, max_prompts=None, critique_tokens=512, revision_tokens=512, temperature=0.2, top_p=1.0,
                repetition_penalty=1.0)


def _revisions(ctx: StageContext, s: CaiSettings) -> StageOutcome:
    rows = initial_responses(ctx, s.max_prompts)
    critiques = cai_critiques(ctx.llm, rows, s.params(s.critique_tokens))
    revisions = cai_revisions(ctx.llm, rows, critiques, s.params(s.revision_tokens))
    ctx.store.save_records("critiques", [CritiqueRecord(c.prompt_id, c.text, [], c.used_fallback) for c in critiques],
                           method=NAME, model_id=ctx.model_id)
    groups = [TrainingGroup(r.prompt_id, r.prompt, "cai_revision", (RatedResponse(text),) if text else (),
                            None if text else "empty_revision") for r, text in zip(rows, revisions)]
    ctx.store.save_training_groups(NAME, ctx.model_id, ctx.partition, groups)
    sample = [{"prompt": r.prompt, "critique": c.text, "revised": t or "(left out: empty revision)"}
              for r, c, t in list(zip(rows, critiques, revisions))[:3]]
    return StageOutcome(
        n_items=len(rows),
        metadata={"n_revisions": len(rows), "trained_on": sum(1 for t in revisions if t),
                  "excluded/empty_revision": sum(1 for t in revisions if not t), "sample": sample},
        fallbacks={"critique_unusable": sum(1 for c in critiques if c.used_fallback)},
    )


METHOD = Method(
    name=NAME,
    title="Constitutional AI",
    description="Critique-and-revise against fixed principles, no simulation (the baseline MATRIX compares with).",
    reference="Bai et al., Constitutional AI: Harmlessness from AI Feedback, 2022",
    settings=QUICK,
    profiles={"paper": PAPER},
    order=20,
    stages=(
        StageSpec("revisions", "Critique of each initial answer against fixed principles, and the revision.",
                  _revisions, deps=("initial_responses",),
                  settings=("max_prompts", "critique_tokens", "revision_tokens", "temperature", "top_p",
                            "repetition_penalty")),
    ),
)
