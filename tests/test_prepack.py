"""oneDNN-prepacked linear layers: same answers as nn.Linear, and a safe fallback where they cannot be used."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from matrix_assets.llm import prepack
from matrix_assets.llm.base import GenerationParams
from matrix_assets.llm.prepack import PrepackedLinear, prepack_linear_layers
from matrix_assets.llm.transformers_backend import TransformersBackend

CONVERSATIONS = [[{"role": "user", "content": f"question {i} " + "word " * (i * 3)}] for i in range(5)]


def _linears(model: torch.nn.Module) -> tuple[int, int]:
    plain = sum(type(m) is torch.nn.Linear for m in model.modules())
    return plain, sum(isinstance(m, PrepackedLinear) for m in model.modules())


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_prepacked_model_gives_the_logits_and_text_of_the_plain_one(tiny_model_dir: str) -> None:
    packed = TransformersBackend(tiny_model_dir, batch_size=2)
    plain = TransformersBackend(tiny_model_dir, batch_size=2, prepack_weights=False)
    assert _linears(packed.model) == (0, packed.prepacked_layers) and packed.prepacked_layers > 0
    assert _linears(plain.model)[1] == 0 and plain.prepacked_layers == 0

    ids = torch.tensor([packed.encode(c)[-8:] for c in CONVERSATIONS])
    with torch.no_grad():
        assert torch.allclose(packed.model(input_ids=ids).logits, plain.model(input_ids=ids).logits, atol=1e-4)
    params = GenerationParams(max_new_tokens=8)
    assert [c.text for c in packed.generate(CONVERSATIONS, params)] == [
        c.text for c in plain.generate(CONVERSATIONS, params)
    ]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_a_lora_adapter_is_merged_then_packed_with_the_same_answers(tmp_path: Path, tiny_model_dir: str) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    adapter = str(tmp_path / "adapter")
    packed = TransformersBackend(tiny_model_dir, adapter_path=adapter, batch_size=2)
    unmerged = TransformersBackend(tiny_model_dir, adapter_path=adapter, batch_size=2, prepack_weights=False)
    assert isinstance(unmerged.model, PeftModel) and not isinstance(packed.model, PeftModel)
    assert packed.prepacked_layers > 0
    params = GenerationParams(max_new_tokens=8)
    tuned = [c.text for c in packed.generate(CONVERSATIONS, params)]
    assert tuned == [c.text for c in unmerged.generate(CONVERSATIONS, params)]
    base = TransformersBackend(tiny_model_dir, batch_size=2)
    assert tuned != [c.text for c in base.generate(CONVERSATIONS, params)]  # the adapter was not dropped


def test_a_kernel_that_fails_or_disagrees_leaves_nn_linear_in_place(
    tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain = _linears(model)[0]

    class Unavailable(PrepackedLinear):
        def __init__(self, linear: torch.nn.Linear, batch_size_hint: int) -> None:
            raise RuntimeError("no kernel for this build")

    monkeypatch.setattr(prepack, "PrepackedLinear", Unavailable)
    monkeypatch.setattr(prepack, "prepack_supported", lambda model: True)
    assert prepack_linear_layers(model) == 0 and _linears(model) == (plain, 0)

    class Wrong(PrepackedLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + 1.0

    monkeypatch.setattr(prepack, "PrepackedLinear", Wrong)
    assert prepack_linear_layers(model) == 0 and _linears(model) == (plain, 0)


def test_models_off_the_cpu_or_without_onednn_are_not_packed(
    tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    backend = TransformersBackend(tiny_model_dir)
    assert backend.prepacked_layers == 0 and _linears(backend.model)[1] == 0
    assert backend.generate(CONVERSATIONS[:1], GenerationParams(max_new_tokens=4))[0].completion_tokens > 0
    monkeypatch.undo()
    meta = torch.nn.Linear(4, 4, device="meta")
    assert not prepack.prepack_supported(torch.nn.Sequential(meta))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("kind", ["lora_on_tied_output_layer", "lora_on_embeddings", "prompt_tuning"])
def test_adapters_that_cannot_merge_cleanly_stay_unmerged_and_unpacked(
    tmp_path: Path, tiny_model_dir: str, kind: str
) -> None:
    """Merging LoRA into the output layer would also change the input embeddings tied to it; other adapter types
    have no merge at all. Such adapters keep PEFT's own forward, with the answers they had before packing."""
    from peft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = {
        "lora_on_tied_output_layer": LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False),
        "lora_on_embeddings": LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights=False),
        "prompt_tuning": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    }[kind]
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config).save_pretrained(tmp_path / "a")
    backend = TransformersBackend(tiny_model_dir, adapter_path=str(tmp_path / "a"), batch_size=2)
    assert isinstance(backend.model, PeftModel) and backend.prepacked_layers == 0
    assert _linears(backend.model)[1] == 0
    params = GenerationParams(max_new_tokens=8)
    plain = TransformersBackend(tiny_model_dir, adapter_path=str(tmp_path / "a"), batch_size=2, prepack_weights=False)
    assert [c.text for c in backend.generate(CONVERSATIONS, params)] == [
        c.text for c in plain.generate(CONVERSATIONS, params)
    ]


def test_one_disagreeing_shape_keeps_only_its_layers_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.Linear(8, 16))

    class WrongForWideOutputs(PrepackedLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + (1.0 if self.out_features == 16 else 0.0)

    monkeypatch.setattr(prepack, "PrepackedLinear", WrongForWideOutputs)
    monkeypatch.setattr(prepack, "prepack_supported", lambda model: True)
    assert prepack_linear_layers(model) == 1
    assert [type(m).__name__ for m in model] == ["Linear", "ReLU", "WrongForWideOutputs", "Linear"]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_a_linear_shared_by_two_parents_is_packed_once_and_stays_shared() -> None:
    shared = torch.nn.Linear(8, 8)
    model = torch.nn.Sequential(torch.nn.Sequential(shared), torch.nn.Sequential(shared), torch.nn.Linear(8, 4))
    probe = torch.randn(2, 8)
    with torch.no_grad():
        expected = model(probe)
    assert prepack_linear_layers(model) == 2
    assert model[0][0] is model[1][0] and isinstance(model[0][0], PrepackedLinear)
    with torch.no_grad():
        assert torch.allclose(model(probe), expected, atol=1e-5)


def test_lora_merge_check_counts_a_linear_shared_by_two_layers(tiny_model_dir: str) -> None:
    """PEFT wraps a shared linear in one place only; merging into its weight would change the other place too."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from matrix_assets.llm.transformers_backend import _lora_merges_cleanly

    def lora(share_q_proj: bool):  # noqa: ANN202
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        if share_q_proj:
            model.model.layers[1].self_attn.q_proj = model.model.layers[0].self_attn.q_proj
        return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))

    assert _lora_merges_cleanly(lora(share_q_proj=False))  # the common case (tied embeddings, q/v LoRA) merges
    assert not _lora_merges_cleanly(lora(share_q_proj=True))
