"""Control: every harmful training prompt answered by one fixed refusal sentence (`prompts/refusal.j2`), with the
same benign mix as the methods. It is the only entry allowed to train on fixed text, and it is here to show
what a template alone does to refusal and over-refusal rates, beside what the methods learn from the model's
own words."""

from __future__ import annotations

from dataclasses import replace

from matrix_assets.methods.base import (
    Method,
    PromptLimitSettings,
    StageContext,
    StageOutcome,
    StageSpec,
    save_single_responses,
)
from matrix_assets.templates import render

NAME = "refusal_template"
QUICK = PromptLimitSettings()
PAPER = replace(QUICK, max_prompts=None)


def fixed_refusal() -> str:
    return render("refusal_template/refusal")


def _responses(ctx: StageContext, s: PromptLimitSettings) -> StageOutcome:
    prompts = ctx.store.train_prompts(ctx.partition, limit=s.max_prompts)
    if not prompts:
        raise LookupError(f"prompt set {ctx.partition!r} has no training prompts; materialize benchmark_prompts")
    text = fixed_refusal()
    return save_single_responses(ctx, NAME, "fixed_refusal", [(p.prompt_id, p.text, text) for p in prompts],
                                 fixed_text=text)


METHOD = Method(
    name=NAME,
    title="Fixed refusal (control)",
    description="Control: one fixed refusal sentence for every harmful training prompt, same benign mix.",
    reference="control",
    settings=QUICK,
    profiles={"paper": PAPER},
    control=True,
    order=50,
    stages=(StageSpec("responses", "The one fixed refusal for every training prompt (a named control).",
                      _responses, deps=("benchmark_prompts",), settings=("max_prompts",), loads_model=False),),
)
