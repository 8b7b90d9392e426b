"""Control: fine-tuning on the model's own initial answers, with no critique or revision. It shows what LoRA
training on the model's own words does by itself, so that an effect of the other methods is not mistaken for
one of fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass, replace

from matrix_assets.methods.base import (
    DEFAULT_MAX_PROMPTS,
    Method,
    StageContext,
    StageOutcome,
    StageSpec,
    single_response_groups,
)

NAME = "initial_sft"


@dataclass(frozen=True)
class InitialSftSettings:
    max_prompts: int | None = DEFAULT_MAX_PROMPTS


QUICK = InitialSftSettings()
PAPER = replace(QUICK, max_prompts=None)


def _responses(ctx: StageContext, s: InitialSftSettings) -> StageOutcome:
    rows = ctx.store.initial_responses(ctx.partition, ctx.model_id, limit=s.max_prompts)
    if not rows:
        raise LookupError(f"no initial responses for {ctx.partition!r}; materialize initial_responses first")
    groups = single_response_groups("initial_answer", [(r.prompt_id, r.prompt, r.response) for r in rows])
    ctx.store.save_training_groups(NAME, ctx.model_id, ctx.partition, groups)
    return StageOutcome(n_items=len(groups), metadata={"n_examples": len(groups)})


METHOD = Method(
    name=NAME,
    title="SFT on own answers (control)",
    description="Fine-tuning on the model's own initial answers: what LoRA training alone does.",
    reference="control",
    settings=QUICK,
    profiles={"paper": PAPER},
    control=True,
    order=40,
    stages=(StageSpec("responses", "The model's own initial answers as training data.", _responses,
                      deps=("initial_responses",), settings=("max_prompts",), loads_model=False),),
)
