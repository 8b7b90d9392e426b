"""Control: fine-tuning on the model's own initial answers, with no critique or revision. It shows what LoRA
training on the model's own words does by itself, so that an effect of the other methods is not mistaken for
one of fine-tuning."""

from __future__ import annotations

from matrix_assets.methods.base import (
    PromptLimitSettings,
    StageContext,
    StageOutcome,
    StageSpec,
    control_method,
    initial_responses,
    save_single_responses,
)

NAME = "initial_sft"


def _responses(ctx: StageContext, s: PromptLimitSettings) -> StageOutcome:
    rows = initial_responses(ctx, s.max_prompts)
    return save_single_responses(ctx, NAME, "initial_answer", [(r.prompt_id, r.prompt, r.response) for r in rows])


METHOD = control_method(
    NAME, "SFT on own answers (control)",
    "Fine-tuning on the model's own initial answers: what LoRA training alone does.", order=40,
    stage=StageSpec("responses", "The model's own initial answers as training data.", _responses,
                    deps=("initial_responses",), settings=("max_prompts",), loads_model=False),
)
