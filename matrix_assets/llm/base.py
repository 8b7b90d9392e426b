"""The one small interface every generation backend implements.

A backend turns a batch of chat conversations into completions. Batching is part of the interface
because the local backend gets most of its speed from batched `generate` and the remote backend from
concurrent requests; callers always hand over everything that is ready to generate at once.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TypedDict


class Message(TypedDict):
    role: str  # "system" | "user" | "assistant"
    content: str


Conversation = Sequence[Message]


@dataclass(frozen=True)
class GenerationParams:
    """Decoding parameters; part of the generation cache key."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy decoding
    top_p: float = 1.0
    seed: int = 0
    repetition_penalty: float = 1.0  # > 1 discourages the loops small models fall into
    stop: tuple[str, ...] = field(default_factory=tuple)
    # A JSON schema (as canonical JSON text) the reply must follow: `response_format` on a server, a grammar
    # (xgrammar) on the local backend. None: free text.
    json_schema: str | None = None

    def to_json(self) -> str:
        values = asdict(self)
        if values["json_schema"] is None:
            del values["json_schema"]  # free-text keys stay what they were before structured output existed
        return json.dumps(values, sort_keys=True)

    def replace(self, **changes: object) -> GenerationParams:
        values = asdict(self)
        values.update(changes)
        values["stop"] = tuple(values["stop"])
        return GenerationParams(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    logprobs: dict[str, float] | None = None  # a score job's answer (see `Job.candidates`); text is then empty


class BackendError(RuntimeError):
    """A backend could not produce completions (unreachable server, bad model, ...)."""


class PermanentBackendError(BackendError):
    """A failure that retrying cannot fix (an unknown model, a request the server rejects): fail at once."""


class LogprobsUnavailable(PermanentBackendError):
    """The backend cannot say how likely each next token is (a server that returns no log-probabilities)."""


@dataclass(frozen=True)
class Job:
    """One request of a live session (`ChatBackend.serve`); `id` is the caller's handle. A job with `candidates`
    is a score job, sent only to a backend that `serves_scores`: it generates nothing and is answered with the
    candidates' next-token log-probabilities in `Completion.logprobs` (as `next_token_logprobs` computes them)."""

    id: int
    conversation: Conversation
    params: GenerationParams
    candidates: tuple[str, ...] = ()
    assistant_prefix: str = ""


# take(limit) hands out up to `limit` queued jobs (None: all of them); [] means none is queued right now.
TakeJobs = Callable[[int | None], list[Job]]
# Called once per job with its completion; it may queue new jobs (a scene's next step) before returning.
OnCompletion = Callable[[Job, Completion], None]


class ChatBackend(ABC):
    """Batched chat completion.

    `model_id` must identify the weights that answer (base model plus adapter, or the served model
    name): it is part of the generation cache key, so two different models never share a cache entry.
    """

    model_id: str
    # Whether `serve` answers score jobs itself, in the same session as the generations (the local refill engine
    # runs a verdict's prompt in a pass the running rows take anyway); otherwise callers ask `next_token_logprobs`.
    serves_scores: bool = False

    @abstractmethod
    def generate(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Completion]:
        """Return one completion per conversation, in order."""

    def serve(self, take: TakeJobs, on_completion: OnCompletion) -> None:
        """Live session: generate jobs as they are queued until `take` has nothing left and nothing runs.

        Callers whose next requests depend on earlier answers (the scenes of the simulation) queue them from
        `on_completion`. This default works in waves: everything queued, one `generate` call per distinct
        `GenerationParams`. Backends that can add requests to a running batch (local refill decoding) or keep
        a fixed number of requests in flight (a remote server) override it so no job waits for a wave.
        """
        while jobs := take(None):
            groups: dict[GenerationParams, list[Job]] = {}
            for job in jobs:
                groups.setdefault(job.params, []).append(job)
            streaming = getattr(self, "generate_streaming", None)
            for params, group in groups.items():
                conversations = [j.conversation for j in group]
                if callable(streaming):  # hand each completion over as it arrives, so a later failure loses none
                    streaming(conversations, params, on_result=lambda i, c, group=group: on_completion(group[i], c))
                    continue
                for job, completion in zip(group, self.generate(conversations, params)):
                    on_completion(job, completion)

    def next_token_logprobs(
        self, conversations: Sequence[Conversation], candidates: Sequence[str], *, assistant_prefix: str = ""
    ) -> list[dict[str, float]]:
        """For each conversation, the log-probability that the assistant's reply (after `assistant_prefix`)
        starts with each candidate (e.g. "yes" / "no", or "1".."7"), with case and leading-space variants of a
        candidate counted together; `-inf` where the model gives it no mass the backend can see.

        This is how the pipeline reads a model's verdicts: from its next-token distribution, never by parsing
        free text, so a verdict cannot be lost to a format the model did not follow. Backends that cannot
        provide it raise `LogprobsUnavailable` with the reason."""
        raise LogprobsUnavailable(f"{type(self).__name__} cannot return next-token log-probabilities")

    def close(self) -> None:  # pragma: no cover - optional hook
        """Release resources (HTTP pools, model weights)."""


# Below this total probability on the candidates ("yes" + "no", or "1" + ... + "7"), the model is not answering the
# question asked (it starts a sentence, a refusal, another format), and renormalising would turn its 0.1% on "yes"
# and 0.05% on "no" into a confident 67% "yes". From half the mass on, the candidates together are likelier than
# every other reply together: the model is answering in the form it was asked for.
MIN_CANDIDATE_MASS = 0.5


def candidate_mass(logprobs: dict[str, float]) -> float:
    """Total next-token probability on the candidates (the sum of their probabilities; 0.0 when none has any)."""
    return float(sum(math.exp(v) for v in logprobs.values() if v != float("-inf") and v == v))


def choice_probabilities(logprobs: dict[str, float], min_mass: float = MIN_CANDIDATE_MASS) -> dict[str, float] | None:
    """The next-token distribution renormalised over the candidates only; None (the verdict is missing, never
    guessed) when the candidates' total probability is under `min_mass` (`MIN_CANDIDATE_MASS`), which includes
    when none has any. Every reader of a verdict goes through here, so every existing count of missing verdicts
    (the n of an evaluation's rate, a judge's `asked` vs `n`, a scene's fallbacks, a society's missing ratings)
    counts the low-mass ones too."""
    finite = {k: v for k, v in logprobs.items() if v != float("-inf") and v == v}
    if not finite or candidate_mass(finite) < min_mass:
        return None
    top = max(finite.values())
    weights = {k: math.exp(v - top) if k in finite else 0.0 for k, v in logprobs.items()}
    total = sum(weights.values())
    return {k: w / total for k, w in weights.items()}


def candidate_variants(candidate: str) -> list[str]:
    """Spellings of one candidate that count as the same verdict ("yes", "Yes", " yes", "YES", ...)."""
    forms = {candidate, candidate.lower(), candidate.capitalize(), candidate.upper()}
    return sorted(forms | {" " + f for f in forms})


def logprobs_cache_key(model_id: str, candidates: Sequence[str], assistant_prefix: str,
                       conversation: Conversation) -> str:
    """Cache key of one next-token distribution request (never collides with a generation's key)."""
    payload = json.dumps(
        {"model": model_id, "next_token_logprobs": list(candidates), "assistant_prefix": assistant_prefix,
         "messages": [dict(m) for m in conversation]},
        sort_keys=True, ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def cache_key(model_id: str, params: GenerationParams, conversation: Conversation) -> str:
    """Stable hash of (model identity, decoding parameters, messages)."""
    payload = json.dumps(
        {"model": model_id, "params": json.loads(params.to_json()), "messages": [dict(m) for m in conversation]},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
