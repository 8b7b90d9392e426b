"""Many multi-step conversations ("scripts") driven together on one live backend session.

A script is a generator that yields what it needs next, a list of requests answered together and in order,
and is sent the answers: `answers = yield [Generate(...), Score(...)]`. A `Generate` is answered with the
completion's text; a `Score` with the next-token log-probabilities of its candidates (see
`ChatBackend.next_token_logprobs`), or None when the backend cannot give them (the script then falls back,
and says so in its own records). A script reads its verdict with `choice_probabilities`, which calls it missing
when the candidates hold under `MIN_CANDIDATE_MASS` of the distribution; `drive` counts those answers too.

`drive` queues a script's next generations the moment its previous answers arrive, so no script waits for the
others: with refill decoding the local batch stays full, and a remote server always has work in flight. A backend
that `serves_scores` (local refill decoding) gets Score requests as score jobs in the same queue: a verdict's prompt
then runs in a forward pass the running rows take anyway. Other backends' Score requests are answered in batches
(`next_token_logprobs`) whenever the backend asks for more work, so they never stall the session.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

from matrix_assets.llm.base import (
    MIN_CANDIDATE_MASS,
    ChatBackend,
    Completion,
    Conversation,
    GenerationParams,
    Job,
    LogprobsUnavailable,
    candidate_mass,
)


@dataclass(frozen=True)
class Generate:
    conversation: Conversation
    params: GenerationParams


@dataclass(frozen=True)
class Score:
    conversation: Conversation
    candidates: tuple[str, ...]
    assistant_prefix: str = ""

    def __post_init__(self) -> None:
        if not self.candidates:
            raise ValueError("a Score needs at least one candidate")


Request = Generate | Score
# A score job generates nothing; its params only travel with it (a cache key of a score names its candidates).
SCORE_PARAMS = GenerationParams(max_new_tokens=1)
Answer = str | dict[str, float] | None
Script = Generator[list[Request], list[Answer], None]


@dataclass
class DriveStats:
    scores_unavailable: int = 0  # Score requests answered with None because the backend has no log-probabilities
    # Score requests answered with a distribution whose candidates hold under MIN_CANDIDATE_MASS: the model was not
    # answering in the asked form, so `choice_probabilities` reads no verdict from it (the script's fallback counts).
    scores_low_mass: int = 0


def drive(
    llm: ChatBackend, scripts: Sequence[Script], on_script_done: Callable[[int], None] | None = None
) -> DriveStats:
    """Run the scripts to completion on `llm.serve`; `on_script_done(index)` is called as each one ends."""
    stats = DriveStats()
    queue: deque[Job] = deque()
    scores: list[tuple[int, int, Score]] = []  # (script, position in its ask, request)
    owners: dict[int, tuple[int, int]] = {}  # job id -> (script, position of the answer in its ask)
    answers: dict[int, list[Answer]] = {}
    missing: dict[int, int] = {}  # script -> answers still awaited
    job_ids = itertools.count()
    logprobs_available = True
    scores_in_session = llm.serves_scores

    def advance(index: int, sent: list[Answer] | None) -> None:
        while True:
            try:
                ask = next(scripts[index]) if sent is None else scripts[index].send(sent)
            except StopIteration:
                if on_script_done is not None:
                    on_script_done(index)
                return
            if ask:
                break
            sent = []  # an empty ask (nobody to react) is answered at once
        answers[index] = [None] * len(ask)
        missing[index] = len(ask)
        for position, request in enumerate(ask):
            if isinstance(request, Score) and scores_in_session:
                job = Job(next(job_ids), request.conversation, SCORE_PARAMS, request.candidates,
                          request.assistant_prefix)
            elif isinstance(request, Score):
                scores.append((index, position, request))
                continue
            else:
                job = Job(next(job_ids), request.conversation, request.params)
            owners[job.id] = (index, position)
            queue.append(job)

    def answer(index: int, position: int, value: Answer) -> None:
        answers[index][position] = value
        missing[index] -= 1
        if missing[index] == 0:
            del missing[index]
            advance(index, answers.pop(index))

    def flush_scores() -> None:
        nonlocal logprobs_available
        while scores:
            batch = scores[:]
            scores.clear()
            groups: dict[tuple[tuple[str, ...], str], list[tuple[int, int, Score]]] = {}
            for item in batch:
                groups.setdefault((item[2].candidates, item[2].assistant_prefix), []).append(item)
            for (candidates, prefix), items in groups.items():
                results: list[dict[str, float] | None] = [None] * len(items)
                if logprobs_available:
                    try:
                        results = list(llm.next_token_logprobs([r.conversation for _, _, r in items], candidates,
                                                               assistant_prefix=prefix))
                    except LogprobsUnavailable:
                        logprobs_available = False
                if not logprobs_available:
                    stats.scores_unavailable += len(items)
                stats.scores_low_mass += sum(1 for result in results
                                             if result is not None and candidate_mass(result) < MIN_CANDIDATE_MASS)
                for (index, position, _), result in zip(items, results):
                    answer(index, position, result)

    def take(limit: int | None) -> list[Job]:
        flush_scores()
        n = len(queue) if limit is None else min(limit, len(queue))
        return [queue.popleft() for _ in range(n)]

    def on_completion(job: Job, completion: Completion) -> None:
        index, position = owners.pop(job.id)
        if job.candidates:
            if completion.logprobs is None:
                stats.scores_unavailable += 1
            elif candidate_mass(completion.logprobs) < MIN_CANDIDATE_MASS:
                stats.scores_low_mass += 1
            answer(index, position, completion.logprobs)
        else:
            answer(index, position, completion.text)

    for index in range(len(scripts)):
        advance(index, None)
    while True:
        flush_scores()
        if not queue:
            break
        llm.serve(take, on_completion)
    if missing:  # a backend that returned without answering everything
        raise RuntimeError(f"{len(missing)} script(s) left waiting for answers")
    return stats
