"""Verdicts are read from next-token distributions: the local backend, the cache, the fake and the helpers."""

import math

import pytest

from matrix_assets.llm.base import LogprobsUnavailable, candidate_variants, choice_probabilities
from matrix_assets.llm.fake import FakeBackend
from matrix_assets.store.db import Store
from matrix_assets.store.generation_cache import CachedBackend

QUESTION = [{"role": "user", "content": "Would this answer hurt anyone? Answer yes or no:"}]


def test_choice_probabilities_renormalise_and_missing_is_none() -> None:
    probs = choice_probabilities({"yes": math.log(0.2), "no": math.log(0.6)})
    assert probs == pytest.approx({"yes": 0.25, "no": 0.75})
    assert choice_probabilities({"yes": float("-inf"), "no": float("-inf")}) is None
    assert choice_probabilities({"yes": float("-inf"), "no": -3.0}) == {"yes": 0.0, "no": 1.0}
    assert {"yes", "Yes", " yes", " Yes", "YES", " YES"} == set(candidate_variants("yes"))


def test_local_backend_matches_a_manual_forward_pass(tiny_model_dir: str) -> None:
    import torch

    from matrix_assets.llm.transformers_backend import TransformersBackend

    backend = TransformersBackend(tiny_model_dir, batch_size=2, prepack_weights=False)
    conversations = [QUESTION, [{"role": "user", "content": "Rate it from 1 to 7."}],
                     [{"role": "user", "content": "A much longer question so that the batch needs left padding."}]]
    scores = backend.next_token_logprobs(conversations, ["yes", "no"], assistant_prefix="Answer:")
    for conversation, got in zip(conversations, scores):
        ids = torch.tensor([backend.encode(conversation, "Answer:")])
        with torch.inference_mode():
            logprobs = torch.log_softmax(backend.model(input_ids=ids).logits[0, -1].float(), dim=-1)
        for candidate in ("yes", "no"):
            expected = torch.logsumexp(logprobs[backend._candidate_token_ids(candidate)], dim=0).item()
            assert got[candidate] == pytest.approx(expected, abs=1e-4)
    # The prepacked (oneDNN) model gives the same distribution up to float rounding.
    packed = TransformersBackend(tiny_model_dir, batch_size=2)
    for a, b in zip(scores, packed.next_token_logprobs(conversations, ["yes", "no"], assistant_prefix="Answer:")):
        assert a["yes"] == pytest.approx(b["yes"], abs=1e-3) and a["no"] == pytest.approx(b["no"], abs=1e-3)


def test_cache_scores_once(tmp_path) -> None:  # noqa: ANN001
    fake = FakeBackend()
    cached = CachedBackend(fake, Store(f"sqlite:///{tmp_path / 's.db'}"), chunk_size=2)
    convs = [QUESTION, [{"role": "user", "content": "other"}], QUESTION]
    first = cached.next_token_logprobs(convs, ["yes", "no"])
    assert fake.score_calls == 2 and first[0] == first[2]
    again = CachedBackend(fake, cached.store).next_token_logprobs(convs, ["yes", "no"])
    assert again == first and fake.score_calls == 2
    # Another candidate set or prefix is another question.
    cached.next_token_logprobs(convs[:1], ["yes", "no"], assistant_prefix="Verdict:")
    assert fake.score_calls == 3


def test_backend_without_logprobs_says_so() -> None:
    with pytest.raises(LogprobsUnavailable):
        FakeBackend(logprobs=False).next_token_logprobs([QUESTION], ["yes", "no"])
