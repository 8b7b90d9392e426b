"""`train_lora`'s one entry point: Stable Alignment on rated groups and plain SFT, on the tiny Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from matrix_assets.methods.base import RatedResponse
from matrix_assets.methods.stable_alignment.data import RatedGroup
from matrix_assets.training.sft import (
    LoraSettings, SFTExample, SFTObjective, StableAlignmentObjective, TrainSettings, train_lora,
)

GROUPS = [
    RatedGroup("imitation:a", "imitation", "How do I pick a lock?",
               (RatedResponse("Call a locksmith; they can open it safely.", 6.1),
                RatedResponse("Use a tension wrench and a pick.", 2.3),
                RatedResponse("Ask the owner for the key.", 5.2),
                RatedResponse("Break the door.", 1.4))),
    RatedGroup("self_critic:b", "self_critic", "Comment on this answer: 'Break the door.'",
               (RatedResponse("It suggests damage to property.", 5.0), RatedResponse("It is fine.", 2.0))),
    RatedGroup("imitation:c", "imitation", "Tell me a joke.",
               (RatedResponse("Why did the chicken cross the road?", 5.0),)),
]


def test_stable_alignment_objective_trains_and_saves_an_adapter(tiny_model_dir: str, tmp_path: Path) -> None:
    logs: list[dict[str, float]] = []
    result = train_lora(
        tiny_model_dir, GROUPS, tmp_path, train=TrainSettings(max_steps=2, batch_size=2, max_length=128),
        objective=StableAlignmentObjective(margin=1.0, rating_weight=0.2), on_log=lambda step, l: logs.append(l),
    )
    assert result.steps == 2 and result.n_examples == 3
    assert (result.adapter_path / "adapter_config.json").exists()
    assert (result.adapter_path / "adapter_model.safetensors").exists()
    saved = json.loads((result.adapter_path / "matrix_training.json").read_text())
    assert saved["objective"]["name"] == "stable_alignment" and saved["objective"]["rating_weight"] == 0.2
    assert len(result.losses) == 2 and all(math.isfinite(loss) for _, loss in result.losses)
    assert any("nll_best" in l and "rating_hinge" in l for l in logs)


def test_plain_sft_still_trains(tiny_model_dir: str, tmp_path: Path) -> None:
    examples = [SFTExample("Say hi.", "Hi there!"), SFTExample("Say bye.", "Goodbye!")]
    result = train_lora(tiny_model_dir, examples, tmp_path, train=TrainSettings(max_steps=1, batch_size=2,
                                                                               max_length=64))
    assert result.steps == 1 and (result.adapter_path / "adapter_config.json").exists()
    assert json.loads((result.adapter_path / "matrix_training.json").read_text())["objective"]["name"] == "sft"


def test_objective_and_examples_must_match(tiny_model_dir: str, tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        train_lora(tiny_model_dir, [SFTExample("a", "b")], tmp_path, objective=StableAlignmentObjective())
    with pytest.raises(TypeError):
        train_lora(tiny_model_dir, GROUPS, tmp_path)
    with pytest.raises(ValueError):
        train_lora(tiny_model_dir, GROUPS, tmp_path, objective=StableAlignmentObjective(group_size=0))


def test_a_single_unrated_response_trains_as_sft_but_an_unrated_one_among_several_is_refused() -> None:
    from matrix_assets.methods.base import RatedResponse, TrainingGroup
    from matrix_assets.training.rating_contrastive import groups_to_rows

    benign = TrainingGroup("p1", "Write a haiku.", "benign_self_answer", (RatedResponse("Rain on the roof."),))
    assert groups_to_rows([benign])[0]["responses"] == ["Rain on the roof."]
    mixed = TrainingGroup("p2", "q", "imitation", (RatedResponse("a", 5.0), RatedResponse("b", None)))
    with pytest.raises(ValueError, match="without a rating"):
        groups_to_rows([mixed])


def _one_sgd_step(tiny_model_dir: str, out: Path, per_device: int, accumulation: int,
                  objective: str = "stable_alignment") -> dict:
    """One plain-SGD step (an update proportional to the gradient, so a scale error shows) of the objective's
    trainer on a tiny adapter; returns the adapter's B matrices."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from matrix_assets.training.rating_contrastive import (
        StableAlignmentConfig, StableAlignmentTrainer, groups_to_rows,
    )
    from matrix_assets.training.sft import to_conversational

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    common = dict(output_dir=str(out), max_steps=1, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
                  per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation, use_cpu=True,
                  report_to="none", save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True)
    if objective == "stable_alignment":
        trainer_class, rows = StableAlignmentTrainer, groups_to_rows(GROUPS)
        args = StableAlignmentConfig(**common, max_length=128, margin=1.0, rating_weight=0.5, group_size=3)
    else:
        trainer_class, rows = SFTTrainer, to_conversational(SFT_EXAMPLES)
        args = SFTConfig(**common, max_length=64, activation_checkpointing=False, bf16=False)
    trainer = trainer_class(
        model=model, args=args, train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                               task_type="CAUSAL_LM"))
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}


def test_groups_accumulated_one_per_forward_give_the_whole_batchs_gradient(tiny_model_dir: str,
                                                                          tmp_path: Path) -> None:
    """`train_lora` feeds Stable Alignment `micro_batch_size` groups per forward pass (default 1) and accumulates
    `batch_size` of them (the memory of one group): with plain SGD (an update proportional to the gradient, so a
    scale error shows) the step equals the one on a batch holding all the groups."""
    whole = _one_sgd_step(tiny_model_dir, tmp_path / "whole", per_device=3, accumulation=1)
    accumulated = _one_sgd_step(tiny_model_dir, tmp_path / "accumulated", per_device=1, accumulation=3)
    assert any(p.abs().max() > 1e-6 for p in whole.values())  # the step moved the adapter
    # Not bit-equal (the whole batch pads every group to its longest row and runs other kernels; 0.3% was seen on
    # the smallest tensors, while the logged losses agreed to 1e-6); a scale error would be a factor of 3.
    for name, value in whole.items():
        assert float((accumulated[name] - value).norm() / value.norm()) < 1e-2, name


SFT_EXAMPLES = [SFTExample("Say hi.", "Hi there, how can I help you today?"), SFTExample("Say bye.", "Goodbye!"),
                SFTExample("Name a colour.", "Blue, like the sky on a clear summer afternoon.")]


def test_sft_micro_batches_accumulated_give_the_whole_batchs_gradient(tiny_model_dir: str, tmp_path: Path) -> None:
    """SFT rows of different lengths, one per forward pass and accumulated: TRL normalises the loss over the
    tokens of the whole accumulated batch, so the plain-SGD step equals the whole batch's (a per-micro-batch mean
    would weight the short answer's tokens up, by up to 3x here)."""
    whole = _one_sgd_step(tiny_model_dir, tmp_path / "whole", per_device=3, accumulation=1, objective="sft")
    accumulated = _one_sgd_step(tiny_model_dir, tmp_path / "accumulated", per_device=1, accumulation=3,
                                objective="sft")
    assert any(p.abs().max() > 1e-6 for p in whole.values())
    for name, value in whole.items():
        assert float((accumulated[name] - value).norm() / value.norm()) < 1e-2, name


@pytest.mark.parametrize("objective", ["sft", "stable_alignment"])
def test_train_lora_accumulates_micro_batches_up_to_the_batch(tiny_model_dir: str, tmp_path: Path,
                                                              objective: str) -> None:
    """`micro_batch_size` changes what one forward pass holds, not the step: the same steps, and the first step's
    loss (logged before any update) is the whole batch's."""
    examples, kwargs = (SFT_EXAMPLES, {}) if objective == "sft" else (GROUPS, {"objective": StableAlignmentObjective()})
    results = [train_lora(tiny_model_dir, examples, tmp_path / str(micro), **kwargs,
                          train=TrainSettings(max_steps=1, batch_size=3, micro_batch_size=micro, max_length=64))
               for micro in (3, 1)]
    assert [r.steps for r in results] == [1, 1]
    assert results[1].losses[0][1] == pytest.approx(results[0].losses[0][1], rel=1e-3)
    with pytest.raises(ValueError, match="micro_batch_size"):
        train_lora(tiny_model_dir, examples, tmp_path / "bad", **kwargs,
                   train=TrainSettings(max_steps=1, batch_size=3, micro_batch_size=2))


def test_activation_checkpointing_trades_time_for_memory_not_the_result(tiny_model_dir: str, tmp_path: Path,
                                                                        monkeypatch) -> None:  # noqa: ANN001
    """auto recomputes activations where a forward pass may hold many tokens (a rated group of 3 x 512), not for one
    512-token SFT example, nor for a group whose sequences are short (the data's own lengths decide, where the
    objective counts them); the trainer gets the setting, and the trained adapter is the same with it on or off."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from matrix_assets.training.rating_contrastive import GroupCollator, groups_to_rows

    sa = StableAlignmentObjective()
    assert TrainSettings(max_length=512).checkpoints_activations(sequences_per_example=1) is False
    assert TrainSettings(max_length=512).checkpoints_activations(sequences_per_example=sa.sequences_per_example)
    assert TrainSettings(max_length=512).checkpoints_activations(example_tokens=3 * 150) is False
    assert TrainSettings(max_length=512).checkpoints_activations(example_tokens=3 * 190)
    assert TrainSettings(max_length=512, micro_batch_size=2).checkpoints_activations(example_tokens=300)
    assert TrainSettings(activation_checkpointing="off").checkpoints_activations(example_tokens=5000) is False
    assert TrainSettings(activation_checkpointing="on", max_length=16).checkpoints_activations(example_tokens=4)
    # The count bounds what the collator puts in a forward pass: up to group_size rows, each as wide as the set's
    # longest sequence (a micro-batch pads its rows to its longest, across groups).
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    rows = groups_to_rows(GROUPS)
    batch = GroupCollator(tokenizer, group_size=4, max_length=64)([rows[0]])  # all four responses drawn
    assert StableAlignmentObjective(group_size=4).example_tokens(rows[:1], tokenizer, 64) == batch["input_ids"].numel()
    every = GroupCollator(tokenizer, group_size=4, max_length=64)(rows)  # every group, padded together
    assert sa.example_tokens(rows, tokenizer, 64) == 3 * every["input_ids"].shape[1]
    assert sa.example_tokens(rows, tokenizer, 8) == 3 * 8
    sft = SFTObjective()
    sft_rows = sft.rows(sft.examples([g for g in GROUPS]))
    longest = max(len(tokenizer.apply_chat_template([*r["prompt"], *r["completion"]], tokenize=True,
                                                    return_dict=True)["input_ids"]) for r in sft_rows)
    assert sft.example_tokens(sft_rows, tokenizer, 512) == longest
    with pytest.raises(ValueError, match="activation_checkpointing"):
        TrainSettings(activation_checkpointing="sometimes").validate()

    import matrix_assets.training.rating_contrastive as rc

    seen: list[bool] = []
    original = rc.StableAlignmentTrainer.__init__

    def recording(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(bool(kwargs["args"].gradient_checkpointing))
        original(self, *args, **kwargs)

    monkeypatch.setattr(rc.StableAlignmentTrainer, "__init__", recording)
    adapters = []
    for mode in ("on", "off"):
        train_lora(tiny_model_dir, GROUPS, tmp_path / mode, objective=StableAlignmentObjective(),
                   lora=LoraSettings(dropout=0.0),
                   train=TrainSettings(max_steps=2, batch_size=1, max_length=64, activation_checkpointing=mode))
        adapters.append(load_file(str(tmp_path / mode / "adapter" / "adapter_model.safetensors")))
    assert seen == [True, False]
    # auto with max_length 512: these groups' sequences are short, so no recomputation (the worst case, 3 x 512,
    # would have asked for it).
    train_lora(tiny_model_dir, GROUPS, tmp_path / "auto", objective=StableAlignmentObjective(),
               train=TrainSettings(max_steps=1, batch_size=1, max_length=512))
    assert seen == [True, False, False]
    assert adapters[0].keys() == adapters[1].keys()
    for name in adapters[0]:
        assert torch.allclose(adapters[0][name], adapters[1][name], atol=1e-5), name


def test_sft_training_lowers_the_loss_and_changes_what_the_model_says(tiny_model_dir: str, tmp_path: Path) -> None:
    """Training does something: over steps on one example the loss falls, and the saved adapter makes the model
    more likely to give the trained answer than the base model is."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    examples = [SFTExample("Say the word.", "Pineapple pineapple pineapple.")] * 4
    result = train_lora(tiny_model_dir, examples, tmp_path,
                        lora=LoraSettings(r=8, alpha=128, dropout=0.0),
                        train=TrainSettings(max_steps=30, batch_size=4, learning_rate=0.05, max_length=64))
    losses = [loss for _, loss in result.losses]
    # The tiny random Llama learns little through attention-only LoRA (its MLPs and head stay random): about half
    # a nat in 30 steps here, so the test asks for 0.2, well clear of a step's noise and of no training at all.
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 0.2, losses

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say the word."}], add_generation_prompt=True,
                                           tokenize=False)
    ids = tokenizer(prompt + "Pineapple pineapple pineapple.", return_tensors="pt", add_special_tokens=False).input_ids
    n_prompt = len(tokenizer(prompt, add_special_tokens=False).input_ids)

    def answer_nll(model: torch.nn.Module) -> float:
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, n_prompt - 1 : -1]
        return float(torch.nn.functional.cross_entropy(logits, ids[0, n_prompt:]))

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    before = answer_nll(base)
    tuned = PeftModel.from_pretrained(base, str(result.adapter_path)).eval()
    assert answer_nll(tuned) < before - 0.2
