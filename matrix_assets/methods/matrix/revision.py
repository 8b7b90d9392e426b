"""Critique from the scene, revision in its light, and the model's own choice among sampled revisions.

- The critique sees the question, the initial answer and the transcript (who noticed what, who reacted how,
  whether the plan was stopped) and names who was harmed.
- The revision sees the question, the initial answer and the critique, and asks for an answer that is helpful
  where it can be and harmless where it must be; it is never forced into a refusal and never replaced by fixed
  text. An empty revision leaves the prompt out of the training data (counted).
- With `full_critique` the revision sees the whole critique (the reference code passes the whole consequence);
  without it only its first two sentences, because a small model drifts on long context.
- With `harm_summary` the initial answer is first condensed into one sentence that says whether it is harmful,
  and the revision prompt shows that sentence in place of the answer (as the reference code does: the harmful
  details of r0 never reach the revision prompt).
- Self-selection (beyond the paper): with `candidates` k > 1, k revisions are sampled; the model scores each
  against its own scene from its next-token distribution ("Would this answer hurt anyone in the scene? Answer
  yes or no:", P(yes) renormalised over yes/no: no text parsing, no keyword list); the one it judges least
  harmful is kept, and a prompt whose best candidate it still judges harmful (P(yes) > `harm_threshold`) is
  left out of the training data. k = 1 is the paper: one revision, no scoring, nothing left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from matrix_assets.llm.base import (
    ChatBackend, Conversation, GenerationParams, LogprobsUnavailable, choice_probabilities,
)
from matrix_assets.methods.matrix import parsing
from matrix_assets.methods.matrix.engine import YES_NO
from matrix_assets.methods.matrix.scene import Critique, RevisionCandidate, Transcript
from matrix_assets.methods.text import MIN_ANSWER_CHARS, clean_answer
from matrix_assets.templates import system_and_user, user_message



@dataclass(frozen=True)
class RevisionInput:
    prompt_id: str
    question: str
    answer: str  # the initial response r0
    critique: str
    harmed: Sequence[str] = ()
    consequence: str = ""  # what the scene showed, for the model's own verdict on a candidate


@dataclass(frozen=True)
class RevisionSettings:
    critique_tokens: int = 160
    revision_tokens: int = 160
    candidates: int = 1
    candidate_temperature: float = 0.7
    harm_threshold: float = 0.5
    full_critique: bool = False
    harm_summary: bool = False
    summary_tokens: int = 96  # one sentence (the reference asks for at most 50 words)
    temperature: float = 0.0  # critique, summary and a single revision; 0: greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.15

    def __post_init__(self) -> None:
        if self.candidates < 1:
            raise ValueError(f"revision candidates must be >= 1, got {self.candidates}")
        if not 0.0 < self.harm_threshold <= 1.0:
            raise ValueError(f"harm_threshold must be in (0, 1], got {self.harm_threshold}")
        if self.temperature < 0.0 or not 0.0 < self.top_p <= 1.0 or self.repetition_penalty <= 0.0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1 and repetition_penalty > 0")

    def params(self, max_new_tokens: int) -> GenerationParams:
        return GenerationParams(max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                                repetition_penalty=self.repetition_penalty)


@dataclass
class RevisionResult:
    prompt_id: str
    candidates: list[RevisionCandidate]
    chosen: str | None  # the text trained on; None when the prompt is left out
    excluded: str | None  # why it is left out: "empty_revision" | "self_judged_harmful"
    summary: str | None = None  # the one-sentence harm summary of r0 the revision saw (with `harm_summary`)


def critique_scenes(llm: ChatBackend, scenes: Sequence[Transcript], s: RevisionSettings) -> list[Critique]:
    params = s.params(s.critique_tokens)
    conversations = [
        user_message("matrix/critique", question=t.question, answer=t.answer[:1200], transcript=t.render_text(),
                     outcome=t.outcome)
        for t in scenes
    ]
    replies = [c.text for c in llm.generate(conversations, params)] if conversations else []
    result = []
    for scene, reply in zip(scenes, replies):
        names = [r.name for r in scene.roles]
        body = parsing.without_label_lines(reply, ("HARMED",))
        harmed_line = parsing.labelled_line(reply, "HARMED")
        harmed = parsing.mentioned_names(harmed_line, names) if harmed_line else parsing.mentioned_names(body, names)
        used_fallback = not parsing.sentences(body, 1)  # empty, or no real sentence in it
        if used_fallback:
            # The scene's own record stands in for an unusable critique; it reaches the revision prompt only.
            body = f"{scene.outcome} {scene.consequence}".strip()
        result.append(Critique(scene.prompt_id, body, harmed, used_fallback))
    return result


def _short(critique: str, harmed: Sequence[str]) -> str:
    """The critique's first two sentences (small models drift on long context), plus who was harmed."""
    return _with_harmed(" ".join(parsing.sentences(critique, 2)) or critique[:300], harmed)


def _with_harmed(text: str, harmed: Sequence[str]) -> str:
    return f"{text} People harmed: {', '.join(harmed)}." if harmed else text


def harm_summaries(llm: ChatBackend, items: Sequence[RevisionInput], s: RevisionSettings) -> list[str | None]:
    """One sentence per initial answer that says what it gives and whether it is harmful; None where the reply
    has no sentence in it (the revision then sees the answer itself)."""
    conversations = [user_message("matrix/harm_summary", question=i.question, answer=i.answer[:1200]) for i in items]
    replies = llm.generate(conversations, s.params(s.summary_tokens)) if conversations else []
    return [parsing.first_sentence(r.text, max_chars=400) for r in replies]


def revision_conversations(llm: ChatBackend, items: Sequence[RevisionInput], s: RevisionSettings
                           ) -> tuple[list[Conversation], list[str | None]]:
    """The revision prompt of every item, and the harm summary each one shows (None: none asked, or unusable)."""
    summaries = harm_summaries(llm, items, s) if s.harm_summary else [None] * len(items)
    critiques = [_with_harmed(i.critique, i.harmed) if s.full_critique else _short(i.critique, i.harmed)
                 for i in items]
    conversations = [system_and_user("matrix/revision", i.question, answer=i.answer[:1200], summary=summary,
                                     critique=critique) for i, summary, critique in zip(items, summaries, critiques)]
    return conversations, summaries


def revise(llm: ChatBackend, items: Sequence[RevisionInput], s: RevisionSettings) -> list[RevisionResult]:
    """Revisions for every item: one revision (k = 1), or k sampled ones and the model's choice."""
    if not items:
        return []
    conversations, summaries = revision_conversations(llm, items, s)
    if s.candidates == 1:
        texts = [[clean_answer(c.text)] for c in llm.generate(conversations, s.params(s.revision_tokens))]
    else:
        texts = [[] for _ in items]
        for index in range(s.candidates):  # one seed per candidate: k distinct cache entries per prompt
            params = GenerationParams(max_new_tokens=s.revision_tokens, temperature=s.candidate_temperature,
                                      top_p=s.top_p, seed=index, repetition_penalty=s.repetition_penalty)
            for row, completion in enumerate(llm.generate(conversations, params)):
                texts[row].append(clean_answer(completion.text))
    results = [RevisionResult(i.prompt_id, [RevisionCandidate(i.prompt_id, n, t) for n, t in enumerate(ts)],
                              None, None, summary) for i, ts, summary in zip(items, texts, summaries)]
    if s.candidates > 1:
        _score_candidates(llm, items, results)
    for result in results:
        usable = [c for c in result.candidates if len(c.text) >= MIN_ANSWER_CHARS]
        if not usable:
            result.excluded = "empty_revision"
            continue
        # A candidate without a verdict ranks after every scored one: a missing verdict is never read as harmless.
        best = min(usable, key=lambda c: (c.p_harm is None, c.p_harm or 0.0, c.candidate_index))
        best.selected = True
        if best.p_harm is not None and best.p_harm > s.harm_threshold:
            result.excluded = "self_judged_harmful"
            continue
        result.chosen = best.text
    return results


def _score_candidates(llm: ChatBackend, items: Sequence[RevisionInput], results: list[RevisionResult]) -> None:
    conversations, owners = [], []
    for item, result in zip(items, results):
        for candidate in result.candidates:
            if len(candidate.text) >= MIN_ANSWER_CHARS:
                conversations.append(user_message(
                    "matrix/revision_verdict", question=item.question,
                    consequence=(item.consequence or _short(item.critique, item.harmed))[:800],
                    candidate=candidate.text[:1200]))
                owners.append(candidate)
    if not conversations:
        return
    try:
        scores = llm.next_token_logprobs(conversations, YES_NO)
    except LogprobsUnavailable as exc:
        raise LogprobsUnavailable(
            f"self-selection among {len(results[0].candidates)} revision candidates reads the model's own verdict "
            f"from its next-token distribution, and this backend cannot give it ({exc}); use "
            "revision_candidates: 1 (the paper's single revision) with this backend"
        ) from exc
    for candidate, score in zip(owners, scores):
        probs = choice_probabilities(score)
        candidate.p_harm = None if probs is None else probs["yes"]
