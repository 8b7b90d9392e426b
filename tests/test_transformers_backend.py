"""The in-process backend on a tiny real Llama: batching, padding, continuous batching, adapters."""

from matrix_assets.llm.base import GenerationParams
from matrix_assets.llm.transformers_backend import TransformersBackend

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "a much longer question about many different things at once"}],
    [{"role": "user", "content": "x y z"}],
]


def test_batched_generation_matches_one_at_a_time(tiny_model_dir: str) -> None:
    """Left padding must not change greedy outputs: batch 3 equals three calls of batch 1."""
    params = GenerationParams(max_new_tokens=10)
    batched = TransformersBackend(tiny_model_dir, batch_size=8).generate(CONVERSATIONS, params)
    single = TransformersBackend(tiny_model_dir, batch_size=1).generate(CONVERSATIONS, params)
    assert [c.text for c in batched] == [c.text for c in single]
    assert all(c.completion_tokens == 10 and c.prompt_tokens > 0 for c in batched)


def test_continuous_batching_gives_the_same_greedy_text(tiny_model_dir: str) -> None:
    params = GenerationParams(max_new_tokens=10)
    padded = TransformersBackend(tiny_model_dir, decoding="padded").generate(CONVERSATIONS, params)
    continuous = TransformersBackend(tiny_model_dir, decoding="continuous")
    out = continuous.generate(CONVERSATIONS, params)
    assert [c.text for c in out] == [c.text for c in padded]
    assert [c.completion_tokens for c in out] == [c.completion_tokens for c in padded]


def test_repetition_penalty_stays_on_the_padded_path(tiny_model_dir: str, monkeypatch) -> None:  # noqa: ANN001
    backend = TransformersBackend(tiny_model_dir, decoding="continuous")
    calls = []
    monkeypatch.setattr(backend, "generate_continuous", lambda *a, **k: calls.append(a) or [])
    out = backend.generate(CONVERSATIONS, GenerationParams(max_new_tokens=4, repetition_penalty=1.2))
    assert len(out) == 3 and not calls  # continuous batching would silently drop the penalty
