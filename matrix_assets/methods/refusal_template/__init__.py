"""Control: every harmful training prompt answered by one fixed refusal sentence (`prompts/refusal.j2`), with the
same benign mix as the methods. It is the only entry allowed to train on fixed text, and it is here to show
what a template alone does to refusal and over-refusal rates, beside what the methods learn from the model's
own words."""

from __future__ import annotations

from matrix_assets.methods.base import (
    PromptLimitSettings,
    StageContext,
    StageOutcome,
    StageSpec,
    control_method,
    save_single_responses,
)
from matrix_assets.templates import render

NAME = "refusal_template"


def fixed_refusal() -> str:
    return render("refusal_template/refusal")


def _responses(ctx: StageContext, s: PromptLimitSettings) -> StageOutcome:
    prompts = ctx.store.train_prompts(ctx.partition, limit=s.max_prompts)
    if not prompts:
        raise LookupError(f"prompt set {ctx.partition!r} has no training prompts; materialize benchmark_prompts")
    text = fixed_refusal()
    return save_single_responses(ctx, NAME, "fixed_refusal", [(p.prompt_id, p.text, text) for p in prompts],
                                 fixed_text=text)


METHOD = control_method(
    NAME, "Fixed refusal (control)",
    "Control: one fixed refusal sentence for every harmful training prompt, same benign mix.", order=50,
    stage=StageSpec("responses", "The one fixed refusal for every training prompt (a named control).", _responses,
                    deps=("benchmark_prompts",), settings=("max_prompts",), loads_model=False),
)
