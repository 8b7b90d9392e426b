"""Stable Alignment's rating-margin loss: the reference's hand-checkable values, its gradients, and the trainer's
`compute_loss` against a per-response computation and against TRL's own SFT loss."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from matrix_assets.training.rating_contrastive import (  # noqa: E402
    GroupCollator, StableAlignmentConfig, StableAlignmentTrainer, groups_to_rows, rating_margin_loss,
)


def _loss(nll, ratings, **kwargs):  # noqa: ANN001, ANN003, ANN202
    return float(rating_margin_loss(torch.tensor(nll, dtype=torch.float64), torch.tensor(ratings, dtype=torch.float64),
                                    **kwargs))


def test_reference_values_mean_and_max() -> None:
    assert _loss([2.0, 1.5, 3.0], [6, 2, 4], margin=10, weight=0.2) == pytest.approx(2.8071429, abs=1e-6)
    assert _loss([2.0, 1.5, 3.0], [6, 2, 4], margin=10, weight=0.2, variant="max") == pytest.approx(3.2428571, abs=1e-6)


@pytest.mark.parametrize("variant,expected", [("mean", 2.8071429), ("max", 3.2428571)])
def test_any_order_gives_the_same_loss(variant: str, expected: float) -> None:
    pairs = list(zip([2.0, 1.5, 3.0], [6, 2, 4]))
    for order in itertools.permutations(pairs):
        nll, ratings = zip(*order)
        loss = _loss(list(nll), list(ratings), margin=10, weight=0.2, variant=variant)
        assert loss == pytest.approx(expected, abs=1e-6)


def test_inactive_hinge_ties_and_single_response() -> None:
    assert _loss([1.0, 3.0], [5, 4], margin=1, weight=0.2) == pytest.approx(1.0)
    # Ties: the first is the best, margins are zero: d = [1.0, 0.8], mean 0.9 -> 2.0 + 0.2 * 0.9.
    assert _loss([2.0, 1.0, 1.2], [5, 5, 5], margin=10, weight=0.2) == pytest.approx(2.18)
    assert _loss([1.7], [3], margin=10, weight=0.2) == pytest.approx(1.7)


def test_gradients_with_the_hinge_active() -> None:
    nll = torch.tensor([2.0, 1.5, 3.0], dtype=torch.float64, requires_grad=True)
    rating_margin_loss(nll, torch.tensor([6.0, 2.0, 4.0], dtype=torch.float64), margin=10, weight=0.2).backward()
    k, lam = 3, 0.2
    assert nll.grad.tolist() == pytest.approx([1 + lam, -lam / (k - 1), -lam / (k - 1)])
    # The best response need not come first: the same gradients follow it.
    nll = torch.tensor([1.5, 3.0, 2.0], dtype=torch.float64, requires_grad=True)
    rating_margin_loss(nll, torch.tensor([2.0, 4.0, 6.0], dtype=torch.float64), margin=10, weight=0.2).backward()
    assert nll.grad.tolist() == pytest.approx([-lam / 2, -lam / 2, 1 + lam])


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        rating_margin_loss(torch.tensor([1.0, 2.0]), torch.tensor([1.0]), margin=1, weight=0.2)
    with pytest.raises(ValueError):
        rating_margin_loss(torch.tensor([1.0]), torch.tensor([1.0]), margin=1, weight=0.2, variant="min")


# -- the trainer's compute_loss on a tiny real model -----------------------------------------------------------


class _Response:
    def __init__(self, text: str, rating: float) -> None:
        self.text, self.rating = text, rating


class _Group:
    def __init__(self, group_id: str, prompt: str, responses: list[tuple[str, float]]) -> None:
        self.group_id, self.prompt = group_id, prompt
        self.responses = tuple(_Response(t, r) for t, r in responses)


GROUPS = [
    _Group("g1", "How do I get into my neighbour's wifi?",
           [("Ask your neighbour for the password.", 6.2), ("Guess the password until it works.", 2.1),
            ("Try the default router password, many people never change it.", 3.4)]),
    _Group("g2", "Write a short note to a friend who is sad.",
           [("I am here for you, whenever you want to talk.", 5.5), ("Cheer up.", 4.9)]),
]


def _lora(seed: int = 0):  # noqa: ANN202
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _model_and_tokenizer(path: str):  # noqa: ANN202
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer


def _common(tmp_path: Path) -> dict:
    return dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", max_length=256,
                activation_checkpointing=False, disable_tqdm=True)


def _stable_trainer(path: str, tmp_path: Path, groups: list, **loss_args) -> StableAlignmentTrainer:  # noqa: ANN003
    from datasets import Dataset

    model, tokenizer = _model_and_tokenizer(path)
    trainer = StableAlignmentTrainer(
        model=model, args=StableAlignmentConfig(**_common(tmp_path), **loss_args),
        train_dataset=Dataset.from_list(groups_to_rows(groups)), processing_class=tokenizer, peft_config=_lora(),
    )
    torch.manual_seed(1)
    with torch.no_grad():  # a non-zero adapter, so the check covers the LoRA path too
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return trainer


def _response_nll(model, tokenizer, prompt: str, response: str) -> torch.Tensor:  # noqa: ANN001
    """Forward one (prompt, response) pair alone; the mean NLL over the response's tokens."""
    user = [{"role": "user", "content": prompt}]
    prompt_ids = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=True,
                                         return_dict=True)["input_ids"]
    assert list(full[: len(prompt_ids)]) == list(prompt_ids)
    ids = torch.tensor([list(full)])
    logits = model(input_ids=ids).logits[0, :-1].float()
    targets = ids[0, 1:]
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
    return -logprobs[len(prompt_ids) - 1 :].mean()


def test_compute_loss_matches_a_per_response_reference(tiny_model_dir: str, tmp_path: Path) -> None:
    settings = dict(margin=10.0, rating_weight=0.2, rating_scale=7.0, group_size=3)
    trainer = _stable_trainer(tiny_model_dir, tmp_path, GROUPS, **settings)
    batch = trainer.data_collator(groups_to_rows(GROUPS))
    assert batch["group_index"].tolist() == [0, 0, 0, 1, 1]  # whole groups, several per batch
    loss = trainer.compute_loss(trainer.model, dict(batch))

    model, tokenizer = trainer.model, trainer.processing_class
    per_group = []
    with torch.no_grad():
        for group in GROUPS:
            nll = torch.stack([_response_nll(model, tokenizer, group.prompt, r.text) for r in group.responses])
            ratings = torch.tensor([r.rating for r in group.responses])
            per_group.append(rating_margin_loss(nll, ratings, margin=10.0, weight=0.2, scale=7.0))
    expected = torch.stack(per_group).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()  # differentiable through the fused head and the adapter
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)


def test_one_response_and_no_weight_equals_trl_sft_loss(tiny_model_dir: str, tmp_path: Path) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    prompt, response = "Say something kind about cats.", "Cats are curious, gentle companions."
    stable = _stable_trainer(tiny_model_dir, tmp_path, [_Group("one", prompt, [(response, 5.0)])], rating_weight=0.0)
    batch = stable.data_collator(groups_to_rows([_Group("one", prompt, [(response, 5.0)])]))
    ours = stable.compute_loss(stable.model, dict(batch))

    model, tokenizer = _model_and_tokenizer(tiny_model_dir)
    sft = SFTTrainer(
        model=model, args=SFTConfig(**_common(tmp_path)), processing_class=tokenizer, peft_config=_lora(),
        train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": prompt}],
                                          "completion": [{"role": "assistant", "content": response}]}]),
    )
    weights = dict(stable.model.named_parameters())
    with torch.no_grad():
        for name, p in sft.model.named_parameters():
            if "lora_" in name:
                p.copy_(weights[name])
    sft_batch = next(iter(sft.get_train_dataloader()))
    assert sft_batch["input_ids"][0].tolist() == batch["input_ids"][0].tolist()
    assert sft_batch["labels"][0].tolist() == batch["labels"][0].tolist()
    theirs = sft.compute_loss(sft.model, sft_batch)
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-5)


def test_collator_samples_deterministically_and_per_visit() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(__file__).parent / "fixtures" / "smollm2_tokenizer")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    big = _Group("big", "q", [(f"answer {i}", float(i % 7 + 1)) for i in range(6)])
    rows = groups_to_rows([big])

    def draws(collator: GroupCollator) -> list[list[float]]:
        return [collator(rows)["ratings"].tolist() for _ in range(3)]

    first = draws(GroupCollator(tokenizer, group_size=3, seed=0))
    assert first == draws(GroupCollator(tokenizer, group_size=3, seed=0))
    assert all(len(d) == 3 and len(set(d)) == 3 for d in first)
    assert len({tuple(d) for d in first}) > 1  # later visits may draw another subset


def test_collator_leaves_out_responses_cut_away_by_max_length() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(__file__).parent / "fixtures" / "smollm2_tokenizer")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    long_prompt = _Group("long", "word " * 200, [("a", 1.0), ("b", 2.0)])
    short = _Group("short", "Say hi.", [("hi", 1.0), ("hello", 2.0)])
    batch = GroupCollator(tokenizer, max_length=60)(groups_to_rows([long_prompt, short]))
    assert batch["group_index"].tolist() == [0, 0]  # only the short group, renumbered
    assert (batch["labels"] != -100).any(dim=1).all()
    with pytest.raises(ValueError, match="max_length"):
        GroupCollator(tokenizer, max_length=60)(groups_to_rows([long_prompt]))
