"""Control: fine-tuning on the model's own initial answers, with no critique or revision. It shows what LoRA
training on the model's own words does by itself, so that an effect of the other methods is not mistaken for
one of fine-tuning."""

from __future__ import annotations

from dataclasses import replace

from matrix_assets.methods.base import (
    Method,
    PromptLimitSettings,
    StageContext,
    StageOutcome,
    StageSpec,
    initial_responses,
    save_single_responses,
)

NAME = "initial_sft"
QUICK = PromptLimitSettings()
PAPER = replace(QUICK, max_prompts=None)


def _responses(ctx: StageContext, s: PromptLimitSettings) -> StageOutcome:
    rows = initial_responses(ctx, s.max_prompts)
    return save_single_responses(ctx, NAME, "initial_answer", [(r.prompt_id, r.prompt, r.response) for r in rows])


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
