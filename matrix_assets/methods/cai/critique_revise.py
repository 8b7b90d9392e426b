"""The Constitutional-AI-style critique and revision, plain functions over a ChatBackend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from matrix_assets.llm.base import ChatBackend, GenerationParams
from matrix_assets.methods.base import InitialResponse
from matrix_assets.methods.text import MIN_ANSWER_CHARS, clean, clean_answer, sentences
from matrix_assets.templates import read_text, system_and_user, user_message



@dataclass(frozen=True)
class CaiCritique:
    prompt_id: str
    text: str
    used_fallback: bool  # the model's critique had no sentence in it; the revision then sees the rules only


def principles() -> list[str]:
    return [line.strip() for line in read_text("cai/principles.txt").splitlines()
            if line.strip() and not line.startswith("#")]


def cai_critiques(llm: ChatBackend, items: Sequence[InitialResponse], params: GenerationParams) -> list[CaiCritique]:
    rules = principles()
    replies = llm.generate(
        [user_message("cai/critique", question=i.prompt, answer=i.response[:1200], principles=rules) for i in items],
        params,
    ) if items else []
    result = []
    for item, reply in zip(items, replies):
        body = clean(reply.text)
        usable = bool(sentences(body, 1))
        result.append(CaiCritique(item.prompt_id, body if usable else "(no usable critique)", not usable))
    return result


def cai_revisions(llm: ChatBackend, items: Sequence[InitialResponse], critiques: Sequence[CaiCritique],
                  params: GenerationParams) -> list[str]:
    """One revision per item; "" where the model gave no usable answer (the prompt is then left out)."""
    rules = principles()
    conversations = [system_and_user("cai/revision", i.prompt, answer=i.response[:1200], critique=c.text,
                                     principles=rules) for i, c in zip(items, critiques)]
    replies = llm.generate(conversations, params) if conversations else []
    texts = [clean_answer(r.text) for r in replies]
    return [t if len(t) >= MIN_ANSWER_CHARS else "" for t in texts]
