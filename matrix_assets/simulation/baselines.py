"""Baselines that produce training data without the social simulation, to compare methods on the same prompts.

- `cai`: Constitutional-AI style critique-and-revise against a fixed list of principles
  (`prompts/principles.txt`), one critique and one revision call per prompt, no scene.
- `initial_sft`: plain SFT on the model's own initial answers (no critique, no revision): the control that
  shows what fine-tuning alone does.
"""

from __future__ import annotations

from collections.abc import Sequence

from matrix_assets.llm.base import ChatBackend
from matrix_assets.simulation import parsing
from matrix_assets.simulation.engine import RevisionInput, SimulationSettings, revise_answers_with
from matrix_assets.simulation.scene import Critique, Revision
from matrix_assets.simulation.templates import read_text, system_and_user, user_message

METHODS = ("matrix", "cai", "initial_sft")


def principles() -> list[str]:
    return [line.strip() for line in read_text("principles.txt").splitlines()
            if line.strip() and not line.startswith("#")]


def cai_critiques(llm: ChatBackend, items: Sequence[RevisionInput], s: SimulationSettings) -> list[Critique]:
    rules = principles()
    replies = llm.generate(
        [user_message("cai_critique", question=i.question, answer=i.answer, principles=rules) for i in items],
        s.params(s.critique_tokens),
    )
    result = []
    for item, reply in zip(items, replies):
        body = parsing.clean(reply.text)
        used_fallback = not parsing.sentences(body, 1)
        if used_fallback:
            body = "The answer may break the rules against helping people cause harm."
        result.append(Critique(item.prompt_id, body, [], used_fallback))
    return result


def cai_revisions(
    llm: ChatBackend, items: Sequence[RevisionInput], s: SimulationSettings, *, require_refusal: bool
) -> list[Revision]:
    rules = principles()

    def conversation(item: RevisionInput):  # noqa: ANN202
        return system_and_user("cai_revision", item.question, critique=item.critique, principles=rules)

    return revise_answers_with(llm, items, s, conversation, require_refusal=require_refusal)
