"""The generation cache: every model call of the pipeline goes through here.

Entries are keyed by hash(model identity, decoding parameters, messages) and stored in the
`generations` table. A re-run, a resumed run or a backfill pays only for what is missing. A backend that
reports each completion as it finishes (`generate_streaming(..., on_result=...)`: the remote backend and
the local one's default refill decoding) gets all misses in one call and has every completion committed
on arrival, so a crash, a killed process or a model server that fails loses nothing already answered.
Other backends get the misses chunk by chunk, each chunk committed as soon as it is done, so a failure
costs at most the chunk in flight.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from matrix_assets.llm.base import (
    ChatBackend, Completion, Conversation, GenerationParams, Job, OnCompletion, TakeJobs, cache_key,
    logprobs_cache_key,
)
from matrix_assets.store.db import Store, utcnow


@dataclass
class CacheStats:
    requested: int = 0  # conversations asked for
    hits: int = 0  # answered from the cache
    generated: int = 0  # sent to the backend
    completion_tokens: int = 0  # generated tokens (misses only)
    seconds: float = 0.0  # wall time spent in the backend

    def as_metadata(self) -> dict[str, float | int]:
        return {
            "llm_requests": self.requested,
            "llm_cache_hits": self.hits,
            "llm_calls_made": self.generated,
            "llm_generated_tokens": self.completion_tokens,
            "llm_seconds": round(self.seconds, 2),
            "llm_tokens_per_second": round(self.completion_tokens / self.seconds, 2) if self.seconds else 0.0,
        }


ProgressCallback = Callable[[int, int], None]  # (done, total) over cache misses


def _cached_completion(row: dict, score: bool = False) -> Completion:
    if score:  # a stored verdict distribution (see `next_token_logprobs`)
        return Completion("", row["prompt_tokens"], 0, cached=True, logprobs=json.loads(row["completion"]))
    return Completion(row["completion"], row["prompt_tokens"], row["completion_tokens"], cached=True)


def _score_params_json(candidates: Sequence[str], assistant_prefix: str) -> str:
    return json.dumps({"next_token_logprobs": list(candidates), "assistant_prefix": assistant_prefix}, sort_keys=True)


def _job_key(model_id: str, job: Job) -> str:
    if job.candidates:
        return logprobs_cache_key(model_id, job.candidates, job.assistant_prefix, job.conversation)
    return cache_key(model_id, job.params, job.conversation)


class CachedBackend(ChatBackend):
    def __init__(
        self, backend: ChatBackend, store: Store, *, chunk_size: int = 8, progress: ProgressCallback | None = None
    ) -> None:
        self.backend = backend
        self.store = store
        self.chunk_size = max(1, chunk_size)
        self.progress = progress  # default progress callback of every generate call
        self.model_id = backend.model_id
        self.stats = CacheStats()

    def generate(
        self,
        conversations: Sequence[Conversation],
        params: GenerationParams,
        *,
        progress: ProgressCallback | None = None,
    ) -> list[Completion]:
        progress = progress or self.progress
        keys = [cache_key(self.model_id, params, conv) for conv in conversations]
        found, pending = self._lookup(keys, conversations)
        results: dict[str, Completion] = {k: _cached_completion(r) for k, r in found.items()}
        # Longest prompts first keeps batches of similar length together (less padding) and makes the
        # slowest chunk the first one, so progress estimates only get better.
        pending.sort(key=lambda kv: -sum(len(m["content"]) for m in kv[1]))
        if progress and pending:
            progress(0, len(pending))
        streaming = getattr(self.backend, "generate_streaming", None)
        if callable(streaming) and pending:
            # Every completion is committed as it arrives, so chunks would add no safety: the backend gets all
            # the misses at once and keeps its batch (local) or its request slots (remote) full.
            self._generate_streaming(streaming, pending, params, results, progress)
            return [results[k] for k in keys]
        done = 0
        for start in range(0, len(pending), self.chunk_size):
            chunk = pending[start : start + self.chunk_size]
            began = time.perf_counter()
            completions = self.backend.generate([conv for _, conv in chunk], params)
            elapsed = time.perf_counter() - began
            self._persist(chunk, completions, params, elapsed)
            for (key, _), completion in zip(chunk, completions):
                results[key] = completion
            self.stats.generated += len(chunk)
            self.stats.completion_tokens += sum(c.completion_tokens for c in completions)
            self.stats.seconds += elapsed
            done += len(chunk)
            if progress:
                progress(done, len(pending))
        return [results[k] for k in keys]

    def next_token_logprobs(
        self, conversations: Sequence[Conversation], candidates: Sequence[str], *, assistant_prefix: str = ""
    ) -> list[dict[str, float]]:
        """Verdict distributions through the cache, like generations: a re-run asks the model for none it has
        answered, and each chunk is committed as soon as it is scored."""
        keys = [logprobs_cache_key(self.model_id, candidates, assistant_prefix, c) for c in conversations]
        found, pending = self._lookup(keys, conversations)
        results = {k: json.loads(r["completion"]) for k, r in found.items()}
        params_json = _score_params_json(candidates, assistant_prefix)
        if self.progress and pending:
            self.progress(0, len(pending))
        for start in range(0, len(pending), self.chunk_size):
            chunk = pending[start : start + self.chunk_size]
            began = time.perf_counter()
            scores = self.backend.next_token_logprobs([conv for _, conv in chunk], candidates,
                                                      assistant_prefix=assistant_prefix)
            elapsed = time.perf_counter() - began
            self.store.save_generations([
                self._row(key, conv, params_json, json.dumps(score, sort_keys=True), 0, 0, elapsed / len(chunk))
                for (key, conv), score in zip(chunk, scores)
            ])
            for (key, _), score in zip(chunk, scores):
                results[key] = score
            self.stats.generated += len(chunk)
            self.stats.seconds += elapsed
            if self.progress:
                self.progress(min(start + len(chunk), len(pending)), len(pending))
        return [dict(results[k]) for k in keys]

    @property
    def serves_scores(self) -> bool:  # type: ignore[override]
        return self.backend.serves_scores

    def serve(self, take: TakeJobs, on_completion: OnCompletion) -> None:
        """A live session through the cache: a hit is answered at once (its caller may queue the next job right
        away), misses go to the backend's own live session and each is committed the moment it finishes, and
        identical requests in flight are generated once. Score jobs' verdicts are kept under the keys
        `next_token_logprobs` uses."""
        waiting: dict[str, list[Job]] = {}  # cache key of a miss in flight -> the jobs that want its answer
        key_of: dict[int, str] = {}

        def take_misses(limit: int | None) -> list[Job]:
            misses: list[Job] = []
            while limit is None or len(misses) < limit:
                jobs = take(None if limit is None else limit - len(misses))
                if not jobs:
                    break
                keys = [_job_key(self.model_id, job) for job in jobs]
                found = self.store.get_generations([k for k in keys if k not in waiting])
                self.stats.requested += len(jobs)
                for job, key in zip(jobs, keys):
                    if key in waiting:
                        waiting[key].append(job)
                    elif key in found:
                        self.stats.hits += 1
                        on_completion(job, _cached_completion(found[key], score=bool(job.candidates)))
                    else:
                        waiting[key], key_of[job.id] = [job], key
                        misses.append(job)
            return misses

        def finished(job: Job, completion: Completion) -> None:
            key = key_of.pop(job.id)
            if not job.candidates:
                commit(key, job.conversation, job.params, completion)
            elif completion.logprobs is not None:  # a missing distribution is not stored: a re-run asks again
                commit(key, job.conversation, job.params, completion,
                       _score_params_json(job.candidates, job.assistant_prefix))
            for waiter in waiting.pop(key):
                on_completion(waiter, completion)

        with self._committing() as commit:
            self.backend.serve(take_misses, finished)

    def _generate_streaming(
        self,
        streaming: Callable[..., list[Completion]],
        pending: Sequence[tuple[str, Conversation]],
        params: GenerationParams,
        results: dict[str, Completion],
        progress: ProgressCallback | None,
    ) -> None:
        """Generate with a backend that reports each completion as it finishes, committing every completion at
        once: when a later request fails for good, or the process dies, the finished ones are already in the
        cache and a re-run does not ask for them again."""
        done = 0

        def on_result(index: int, completion: Completion) -> None:
            nonlocal done
            commit(*pending[index], params, completion)
            results[pending[index][0]] = completion
            done += 1
            if progress:
                progress(done, len(pending))

        with self._committing() as commit:
            streaming([conv for _, conv in pending], params, on_result=on_result)

    @contextmanager
    def _committing(self) -> Iterator[Callable[..., None]]:
        """`commit(key, conversation, params, completion, score_params_json=None)` stores one completion (or, with
        `score_params_json`, one verdict distribution) the moment a backend delivers it. Each row gets the wall
        time since the previous one, so the rows add up to the call's time, which goes into the stats even when
        the call fails half-way."""
        began = last = time.perf_counter()

        def commit(key: str, conversation: Conversation, params: GenerationParams, completion: Completion,
                   score_params_json: str | None = None) -> None:
            nonlocal last
            now = time.perf_counter()
            if score_params_json is not None:
                self.store.save_generations([self._row(key, conversation, score_params_json,
                                                       json.dumps(completion.logprobs, sort_keys=True),
                                                       completion.prompt_tokens, 0, now - last)])
            else:
                self._persist([(key, conversation)], [completion], params, now - last)
            last = now
            self.stats.generated += 1
            self.stats.completion_tokens += completion.completion_tokens

        try:
            yield commit
        finally:
            self.stats.seconds += time.perf_counter() - began

    def _lookup(self, keys: Sequence[str], conversations: Sequence[Conversation]
                ) -> tuple[dict[str, dict], list[tuple[str, Conversation]]]:
        """Stored rows by key, and the (key, conversation) pairs still to ask the model for: identical
        conversations in one request are asked once."""
        found = self.store.get_generations(list(keys))
        self.stats.requested += len(conversations)
        self.stats.hits += sum(1 for k in keys if k in found)
        missing: dict[str, Conversation] = {}
        for key, conv in zip(keys, conversations):
            if key not in found:
                missing.setdefault(key, conv)
        return found, list(missing.items())

    def _persist(
        self,
        chunk: Sequence[tuple[str, Conversation]],
        completions: Sequence[Completion],
        params: GenerationParams,
        elapsed: float,
    ) -> None:
        share = elapsed / max(1, len(chunk))  # rows of one batched call share its time
        self.store.save_generations([
            self._row(key, conv, params.to_json(), completion.text, completion.prompt_tokens,
                      completion.completion_tokens, share)
            for (key, conv), completion in zip(chunk, completions)
        ])

    def _row(self, key: str, conversation: Conversation, params_json: str, completion: str, prompt_tokens: int,
             completion_tokens: int, seconds: float) -> dict:
        return {
            "cache_key": key, "model_id": self.model_id, "params_json": params_json,
            "messages_json": json.dumps([dict(m) for m in conversation], ensure_ascii=False),
            "completion": completion, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "seconds": seconds, "created_at": utcnow(),
        }

    def close(self) -> None:
        self.backend.close()
