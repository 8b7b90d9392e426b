"""A deterministic fake backend for fast unit tests.

It recognises which prompt template produced a conversation (by the template's fixed wording) and
answers in that template's format, with content derived from a hash of the conversation, so results are
stable across runs and different inputs give different outputs. `garbage=True` answers every call with
text no parser accepts, to exercise the fallbacks. `calls` counts conversations actually generated.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

from matrix_assets.llm.base import ChatBackend, Completion, Conversation, GenerationParams, LogprobsUnavailable

_NAMES = ["Maria", "Officer Lee", "Tom", "Dr. Okafor", "Priya", "Mr. Brandt", "Aiko"]


def _h(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def _has(*phrases: str) -> Callable[[str], bool]:
    return lambda prompt: any(phrase in prompt for phrase in phrases)


def _named(prompt: str, k: int) -> str:
    return ", ".join([n for n in _NAMES if n in prompt][:k])


def _affected(h: int) -> str:
    picked = [_NAMES[(h + i) % len(_NAMES)] for i in range(4)]
    return "\n".join(f"{n} - affected person {i} - going about their day" for i, n in enumerate(picked))


# Which template wrote the prompt (its fixed wording) -> the reply, from the prompt and its hash. First match wins.
_REPLIES: tuple[tuple[Callable[[str], bool], Callable[[str, int], str]], ...] = (
    (_has("say what this person wants to achieve"), lambda p, h: "The person wants to get what they asked for quickly."),
    (_has("Turn the answer into a plan"),
     lambda p, h: "\n".join(f"{i}. Step {i} of the plan ({h % 97 + i})." for i in range(1, 4))),
    (_has("Who else would be affected", "people who would be affected"), lambda p, h: _affected(h)),
    (_has("important things involved"), lambda p, h: "Savings account - holds $5,000\nLaptop - unlocked"),
    (_has("the main character does this step"), lambda p, h: f"I carry out the step ({h % 1000})."),
    (_has("You are the narrator"), lambda p, h: f"FEASIBLE: yes\nSEEN BY: {_named(p, 2)}\n"
                                                f"WHAT THEY NOTICE: Something suspicious happens ({h % 100})."),
    (_has("notices this:"),
     lambda p, h: "I call the police and report it." if h % 3 == 0 else f"I keep watching ({h % 100})."),
    (_has("Summarize the whole story"), lambda p, h: f"Things happened in the scene ({h % 100}). People noticed."
                                                     f"\nSTOPPED: {'yes' if h % 4 == 0 else 'no'}"),
    (_has("who was hurt or put at risk"),
     lambda p, h: f"The answer put people at risk ({h % 100}).\nHARMED: {_named(p, 1) or 'nobody'}"),
    (_has("Reply to the request safely"),
     lambda p, h: f"I can't help with that, but here is a safe alternative ({h % 1000})."),
    (lambda p: "SCORE" in p and "harmless" in p.lower(), lambda p, h: f"SCORE: {h % 10 + 1}"),
    (_has("Which answer is more helpful"), lambda p, h: ["A", "B", "tie"][h % 3]),
)


def _answer(prompt: str) -> str:
    h = _h(prompt)
    for matches, reply in _REPLIES:
        if matches(prompt):
            return reply(prompt, h)
    return f"Here is an answer ({h % 10000})."


def _score(prompt: str, candidates: Sequence[str]) -> dict[str, float]:
    """Verdicts shaped like a cooperative model's: actions are feasible, a revision is judged mostly harmless,
    anything else gets a deterministic hash-based distribution."""
    if set(candidates) == {"yes", "no"} and ("really be done" in prompt or "Would this answer hurt" in prompt):
        p_yes = 0.8 if "really be done" in prompt else 0.3
        return {"yes": math.log(p_yes), "no": math.log(1 - p_yes)}
    weights = {c: 1.0 + _h(prompt + "\x1f" + c) % 100 for c in candidates}
    total = sum(weights.values())
    return {c: math.log(w / total) for c, w in weights.items()}


class FakeBackend(ChatBackend):
    def __init__(
        self,
        model_id: str = "fake-llm",
        *,
        garbage: bool = False,
        responder: Callable[[str], str] | None = None,
        fail_after: int | None = None,
        scorer: Callable[[str, Sequence[str]], dict[str, float]] | None = None,
        logprobs: bool = True,
    ) -> None:
        self.model_id = model_id
        self.garbage = garbage
        self.responder = responder
        self.fail_after = fail_after  # raise after this many generated conversations (crash tests)
        self.scorer = scorer  # (prompt, candidates) -> log-probabilities: a model with a known preference
        self.logprobs = logprobs  # False: behaves like a server that returns no log-probabilities
        self.calls = 0
        self.score_calls = 0
        self.batches = 0

    def generate(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Completion]:
        self.batches += 1
        out = []
        for conv in conversations:
            if self.fail_after is not None and self.calls >= self.fail_after:
                raise RuntimeError(f"fake backend failing after {self.fail_after} calls")
            self.calls += 1
            prompt = "\n".join(m["content"] for m in conv)
            if self.garbage:
                text = "~~~ ??? ~~~"
            elif self.responder:
                text = self.responder(prompt)
            else:
                text = _answer(prompt)
            out.append(Completion(text, len(prompt.split()), len(text.split())))
        return out

    def next_token_logprobs(
        self, conversations: Sequence[Conversation], candidates: Sequence[str], *, assistant_prefix: str = ""
    ) -> list[dict[str, float]]:
        """Deterministic log-probabilities from a hash of (prompt, candidate), or the `scorer`'s."""
        if not self.logprobs:
            raise LogprobsUnavailable("fake backend configured without log-probabilities")
        out = []
        for conv in conversations:
            self.score_calls += 1
            prompt = "\n".join(m["content"] for m in conv) + assistant_prefix
            if self.scorer is not None:
                out.append(dict(self.scorer(prompt, candidates)))
                continue
            out.append(_score(prompt, candidates))
        return out
