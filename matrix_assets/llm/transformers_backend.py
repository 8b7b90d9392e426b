"""In-process generation with transformers: the embedded default backend.

Batches are padded on the left (decoder-only models continue from the right edge) and the caller's
batch is split into chunks of `batch_size` after sorting by prompt length, so little compute is spent
on padding. A LoRA adapter folder can be stacked on the base model; it becomes part of `model_id` so
the cache never mixes base and tuned answers.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matrix_assets.llm.base import BackendError, ChatBackend, Completion, Conversation, GenerationParams
from matrix_assets.llm.models import resolve_model_path

logger = logging.getLogger(__name__)


def adapter_fingerprint(adapter_path: str | Path) -> str:
    """Content hash of an adapter folder's weights and config (identity for the cache)."""
    digest = hashlib.sha256()
    folder = Path(adapter_path)
    for name in sorted(p.name for p in folder.iterdir() if p.suffix in {".safetensors", ".json", ".bin"}):
        digest.update(name.encode())
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:16]


class TransformersBackend(ChatBackend):
    def __init__(
        self,
        model: str,
        *,
        adapter_path: str | None = None,
        batch_size: int = 8,
        max_input_tokens: int = 1536,
        torch_threads: int | None = None,
        decoding: str = "padded",
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if torch_threads:
            torch.set_num_threads(torch_threads)
        if decoding not in {"padded", "continuous"}:
            raise ValueError(f"decoding must be 'padded' or 'continuous', not {decoding!r}")
        self.decoding = decoding
        self.model_name = model
        self.batch_size = max(1, batch_size)
        self.max_input_tokens = max_input_tokens
        path = resolve_model_path(model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        except OSError as exc:
            raise BackendError(f"cannot load model {model!r} from {path!r} offline: {exc}") from exc
        self.model_id = model
        if adapter_path:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, adapter_path)
            self.model_id = f"{model}+lora:{adapter_fingerprint(adapter_path)}"
        self.model.eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._lock = threading.Lock()  # one generate at a time per loaded model

    def encode(self, conversation: Conversation) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            [dict(m) for m in conversation], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids)
        # Keep the end of an over-long prompt: the instruction and the generation prompt live there.
        return ids[-self.max_input_tokens :]

    def generate(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Completion]:
        encoded = [self.encode(c) for c in conversations]
        # Continuous batching drops logits processors it does not support (the repetition penalty among them),
        # which would store text under a cache key that promises the penalty: such calls stay padded.
        if self.decoding == "continuous" and params.repetition_penalty == 1.0:
            return self.generate_continuous(encoded, params)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        results: list[Completion | None] = [None] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            for i, completion in zip(idx, self.generate_encoded([encoded[i] for i in idx], params)):
                results[i] = completion
        return [r for r in results if r is not None]

    def generate_encoded(self, batch: Sequence[list[int]], params: GenerationParams) -> list[Completion]:
        """One padded `model.generate` call over already tokenized prompts (also used by the benchmark)."""
        import torch

        pad_id = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids) :] = 1
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "pad_token_id": pad_id,
            "do_sample": params.temperature > 0,
        }
        if params.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = params.repetition_penalty
        if params.temperature > 0:
            kwargs.update(temperature=params.temperature, top_p=params.top_p)
            torch.manual_seed(params.seed)
        with self._lock, torch.inference_mode():
            output = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        completions = []
        eos = self.tokenizer.eos_token_id
        for row in range(len(batch)):
            new = output[row, width:].tolist()
            n_tokens = len(new)
            for pos, tok in enumerate(new):
                if tok == eos or tok == pad_id:
                    n_tokens = pos
                    break
            text = self.tokenizer.decode(new[:n_tokens], skip_special_tokens=True)
            for stop in params.stop:
                if stop and stop in text:
                    text = text.split(stop, 1)[0]
            completions.append(Completion(text.strip(), len(batch[row]), n_tokens))
        return completions

    def generate_continuous(self, batch: Sequence[list[int]], params: GenerationParams) -> list[Completion]:
        """transformers' continuous batching (paged KV cache): a finished row frees its slot for the next
        request at once, so no compute is spent on rows that already ended, unlike padded `generate`."""
        import torch
        from transformers import GenerationConfig

        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=params.temperature > 0,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if params.temperature > 0:
            config.temperature, config.top_p = params.temperature, params.top_p
            torch.manual_seed(params.seed)
        with self._lock, torch.inference_mode():
            results = self.model.generate_batch(inputs=[list(ids) for ids in batch], generation_config=config,
                                                warmup=False)
        outputs = list(results.values())
        if len(outputs) != len(batch) or any(r.error is not None for r in outputs):
            errors = [str(r.error) for r in outputs if r.error is not None]
            raise BackendError(f"continuous batching returned {len(outputs)}/{len(batch)} results {errors[:3]}")
        completions = []
        for ids, result in zip(batch, outputs):
            tokens = [t for t in result.generated_tokens if t not in (self.tokenizer.eos_token_id,)]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            for stop in params.stop:
                if stop and stop in text:
                    text = text.split(stop, 1)[0]
            completions.append(Completion(text.strip(), len(ids), len(tokens)))
        return completions

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
