"""The generation cache: hits cost no backend call, misses are persisted chunk by chunk."""

from __future__ import annotations

from pathlib import Path

import pytest

from matrix_assets.llm.base import GenerationParams, cache_key
from matrix_assets.store.generation_cache import CachedBackend
from matrix_assets.llm.fake import FakeBackend
from matrix_assets.store.db import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path}/t.db")


def _conv(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _convs(n: int) -> list[list[dict[str, str]]]:
    # different lengths, so that the longest-first ordering actually reorders them
    return [_conv(f"question {i} " + "x" * (i * 7 % 13)) for i in range(n)]


PARAMS = GenerationParams(max_new_tokens=32)


def test_second_identical_request_is_served_from_the_cache(store: Store) -> None:
    backend = FakeBackend()
    cached = CachedBackend(backend, store, chunk_size=3)
    convs = _convs(5)
    first = cached.generate(convs, PARAMS)
    assert backend.calls == 5
    assert all(not c.cached for c in first)
    assert store.count("generations") == 5

    second = cached.generate(convs, PARAMS)
    assert backend.calls == 5  # no new backend call
    assert [c.text for c in second] == [c.text for c in first]
    assert all(c.cached for c in second)
    assert [(c.prompt_tokens, c.completion_tokens) for c in second] == [
        (c.prompt_tokens, c.completion_tokens) for c in first
    ]
    assert cached.stats.requested == 10 and cached.stats.hits == 5 and cached.stats.generated == 5

    # a fresh CachedBackend over the same database (a new process) also hits
    other_backend = FakeBackend()
    third = CachedBackend(other_backend, store).generate(list(reversed(convs)), PARAMS)
    assert other_backend.calls == 0
    assert [c.text for c in third] == [c.text for c in reversed(first)]


def test_results_keep_request_order(store: Store) -> None:
    convs = _convs(7)
    got = CachedBackend(FakeBackend(), store, chunk_size=2).generate(convs, PARAMS)
    direct = FakeBackend().generate(convs, PARAMS)
    assert [c.text for c in got] == [c.text for c in direct]


def test_partial_hit_only_generates_the_missing(store: Store) -> None:
    backend = FakeBackend()
    cached = CachedBackend(backend, store)
    cached.generate(_convs(3), PARAMS)
    result = cached.generate(_convs(5), PARAMS)
    assert backend.calls == 5
    assert [c.cached for c in result] == [True, True, True, False, False]


@pytest.mark.parametrize(
    "change",
    [
        {"params": PARAMS.replace(temperature=0.7)},
        {"params": PARAMS.replace(max_new_tokens=33)},
        {"params": PARAMS.replace(seed=1)},
        {"params": PARAMS.replace(stop=["\n"])},
        {"model_id": "another-model"},
    ],
)
def test_different_params_or_model_miss(store: Store, change: dict) -> None:
    convs = _convs(3)
    CachedBackend(FakeBackend(), store).generate(convs, PARAMS)
    backend = FakeBackend(change.get("model_id", "fake-llm"))
    result = CachedBackend(backend, store).generate(convs, change.get("params", PARAMS))
    assert backend.calls == 3
    assert not any(c.cached for c in result)
    assert store.count("generations") == 6


def test_duplicates_in_one_request_are_generated_once(store: Store) -> None:
    backend = FakeBackend()
    cached = CachedBackend(backend, store, chunk_size=2)
    a, b = _conv("same question"), _conv("other question")
    result = cached.generate([a, b, a, a, b], PARAMS)
    assert backend.calls == 2
    assert len(result) == 5
    assert result[0].text == result[2].text == result[3].text
    assert result[1].text == result[4].text
    assert store.count("generations") == 2
    assert cached.stats.generated == 2


def test_failure_mid_way_keeps_finished_chunks(store: Store) -> None:
    convs = _convs(8)
    failing = FakeBackend(fail_after=5)
    with pytest.raises(RuntimeError, match="failing"):
        CachedBackend(failing, store, chunk_size=2).generate(convs, PARAMS)
    # chunks 1 and 2 (4 conversations) were committed; chunk 3 died half-way and is lost
    assert store.count("generations") == 4

    healthy = FakeBackend()
    result = CachedBackend(healthy, store, chunk_size=2).generate(convs, PARAMS)
    assert healthy.calls == 4  # only the missing ones
    assert sum(c.cached for c in result) == 4
    assert [c.text for c in result] == [c.text for c in FakeBackend().generate(convs, PARAMS)]
    assert store.count("generations") == 8


def test_empty_request(store: Store) -> None:
    backend = FakeBackend()
    calls: list[tuple[int, int]] = []
    assert CachedBackend(backend, store).generate([], PARAMS, progress=lambda d, t: calls.append((d, t))) == []
    assert backend.batches == 0 and calls == []


def test_progress_reports_over_the_misses(store: Store) -> None:
    cached = CachedBackend(FakeBackend(), store, chunk_size=3)
    cached.generate(_convs(2), PARAMS)  # two of the seven are hits
    seen: list[tuple[int, int]] = []
    cached.generate(_convs(7), PARAMS, progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 5)
    assert [d for d, _ in seen] == [0, 3, 5]
    assert all(t == 5 for _, t in seen)

    # everything cached: nothing to report
    seen.clear()
    cached.generate(_convs(7), PARAMS, progress=lambda done, total: seen.append((done, total)))
    assert seen == []


def test_persisted_rows_describe_the_call(store: Store) -> None:
    conv = _conv("what is persisted?")
    (completion,) = CachedBackend(FakeBackend("model-x"), store).generate([conv], PARAMS)
    (row,) = store.query("SELECT * FROM generations")
    assert row["cache_key"] == cache_key("model-x", PARAMS, conv)
    assert row["model_id"] == "model-x"
    assert row["params_json"] == PARAMS.to_json()
    assert row["completion"] == completion.text
    assert row["completion_tokens"] == completion.completion_tokens
    assert '"what is persisted?"' in row["messages_json"]


def test_cache_key_changes_with_every_part() -> None:
    conv = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello"}]
    base = cache_key("m", PARAMS, conv)
    assert base == cache_key("m", GenerationParams(max_new_tokens=32), [dict(m) for m in conv])  # stable
    variants = [
        cache_key("m2", PARAMS, conv),
        cache_key("m", PARAMS.replace(temperature=0.5), conv),
        cache_key("m", PARAMS.replace(top_p=0.9), conv),
        cache_key("m", PARAMS.replace(seed=3), conv),
        cache_key("m", PARAMS.replace(repetition_penalty=1.1), conv),
        cache_key("m", PARAMS.replace(stop=("END",)), conv),
        cache_key("m", PARAMS, [conv[0], {"role": "user", "content": "hello!"}]),
        cache_key("m", PARAMS, [conv[0], {"role": "assistant", "content": "hello"}]),
        cache_key("m", PARAMS, [conv[1], conv[0]]),
        cache_key("m", PARAMS, conv[1:]),
    ]
    assert base not in variants
    assert len(set(variants)) == len(variants)


class OneByOne(FakeBackend):
    """A live backend answering one job at a time; it can die after `fail_after` generations."""

    def serve(self, take, on_completion) -> None:  # noqa: ANN001
        while jobs := take(1):
            on_completion(jobs[0], self.generate([jobs[0].conversation], jobs[0].params)[0])


def _session(cached: CachedBackend, requests: list) -> tuple[dict[int, str], list[int]]:  # noqa: ANN001
    """Serve `requests` (job id -> conversation); a completion of job i < 100 queues a follow-up job i + 100."""
    from matrix_assets.llm.base import Job

    queue = [Job(i, conv, PARAMS) for i, conv in enumerate(requests)]
    answers: dict[int, str] = {}
    order: list[int] = []

    def take(limit: int | None) -> list[Job]:
        n = len(queue) if limit is None else min(limit, len(queue))
        return [queue.pop(0) for _ in range(n)]

    def on_completion(job: Job, completion) -> None:  # noqa: ANN001
        answers[job.id] = completion.text
        order.append(job.id)
        if job.id < 100:
            queue.append(Job(job.id + 100, _conv(f"follow-up to {completion.text}"), PARAMS))

    cached.serve(take, on_completion)
    return answers, order


def test_live_session_answers_hits_at_once_and_generates_duplicates_once(store: Store) -> None:
    convs = _convs(4)
    warm = FakeBackend()
    CachedBackend(warm, store).generate(convs[:2], PARAMS)  # two of the four are cached
    backend = FakeBackend()  # the default live session: waves of everything queued
    cached = CachedBackend(backend, store)
    answers, order = _session(cached, convs + [convs[3]])  # job 4 repeats job 3
    assert set(answers) == {0, 1, 2, 3, 4, 100, 101, 102, 103, 104}
    assert answers[4] == answers[3] and answers[104] == answers[103]
    # jobs 0 and 1 were hits: answered (and their follow-ups queued) before any generation
    assert order[:2] == [0, 1]
    # generated: conversations 2 and 3 once each, and the follow-ups of 0..3 (104 asks what 103 asked, while
    # 103 is in flight: it waits for that answer)
    assert backend.calls == 2 + 4 and backend.batches == 2
    assert cached.stats.requested == 10 and cached.stats.hits == 2 and cached.stats.generated == 6
    assert store.count("generations") == 2 + 6


def test_live_session_commits_each_completion_before_a_crash(store: Store) -> None:
    with pytest.raises(RuntimeError, match="failing after 3"):
        _session(CachedBackend(OneByOne(fail_after=3), store), _convs(4))
    assert store.count("generations") == 3
    healthy = OneByOne()
    answers, _ = _session(CachedBackend(healthy, store), _convs(4))
    assert len(answers) == 8 and healthy.calls == 8 - 3  # the re-run pays only for what was lost
