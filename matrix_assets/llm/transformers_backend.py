"""In-process generation with transformers: the embedded default backend.

On a CUDA GPU (`device="auto"` finds one) the model loads in bf16 with SDPA attention and decodes padded batches
on a static KV cache that transformers compiles with CUDA graphs. On the CPU, by default,
the batch is decoded by `llm/refill.py`: rows are admitted shortest prompt first, a row
leaves as soon as it ends and the next queued prompt takes its slot, so no step is spent on rows that
already stopped. `decoding="padded"` splits the caller's batch into length-sorted chunks of
`batch_size`, left-padded, one `model.generate` each (the benchmark's raw reference). On CPU the linear
layers run on oneDNN-prepacked weights (`llm/prepack.py`). A LoRA adapter folder can be stacked on the
base model; it becomes part of `model_id` so the cache never mixes base and tuned answers.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matrix_assets.llm.base import (
    BackendError, ChatBackend, Completion, Conversation, GenerationParams, Job, OnCompletion, PermanentBackendError,
    TakeJobs, candidate_variants,
)
from matrix_assets.llm.memory import release_memory
from matrix_assets.llm.models import resolve_model_path

logger = logging.getLogger(__name__)

# refill: our decoding loop, finished rows leave and queued prompts join (default on CPU; `llm/refill.py`);
# padded: one `model.generate` per length-sorted chunk; static: the same with a static KV cache, which
# transformers compiles (CUDA graphs) on a GPU so a decode step is not bound by kernel launches (default on a
# GPU); continuous: transformers' `generate_batch`.
DECODINGS = {"refill", "padded", "static", "continuous"}


def resolve_device(device: str = "auto") -> str:
    """`auto` is the first CUDA device when torch sees one, else the CPU; an explicit CUDA device that torch
    cannot see is an error (not a silent CPU run)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA device "
                           f"(built with CUDA {torch.version.cuda}); use device='cpu' or 'auto'")
    return device


def model_dtype(device: str) -> Any:
    """float32 on the CPU (bf16 matmuls are slow without AMX); bf16 on a GPU that has it, else fp16."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def adapter_fingerprint(adapter_path: str | Path) -> str:
    """Content hash of an adapter folder's weights and config (identity for the cache)."""
    digest = hashlib.sha256()
    folder = Path(adapter_path)
    for name in sorted(p.name for p in folder.iterdir() if p.suffix in {".safetensors", ".json", ".bin"}):
        digest.update(name.encode())
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:16]


def _lora_merges_cleanly(model: Any) -> bool:
    """PEFT's merge gives the same model only for LoRA on plain linears whose weights nothing else shares: other
    adapter types have no merge, and merging into a weight tied to another module (an output layer tied to the
    input embeddings) would change that module too."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not hasattr(model, "merge_and_unload") or any(
        getattr(config, "modules_to_save", None) for config in model.peft_config.values()
    ):
        return False
    merged_into: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            if not isinstance(module, LoraLinear) or type(module.get_base_layer()) is not torch.nn.Linear:
                return False
            merged_into.add(id(module.get_base_layer().weight))
    owners: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):  # a module under two parents counts twice
        for parameter in module.parameters(recurse=False):
            owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    return all(owners.get(weight, 0) <= 1 for weight in merged_into)


class TransformersBackend(ChatBackend):
    def __init__(
        self,
        model: str,
        *,
        adapter_path: str | None = None,
        batch_size: int = 8,
        batch_tokens: int | None = None,
        gpu_batch_size: int = 256,
        device: str = "auto",
        max_input_tokens: int = 1536,
        torch_threads: int | None = None,
        decoding: str = "refill",
        prefix_cache_tokens: int = 4096,
        prepack_weights: bool = True,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if torch_threads:
            torch.set_num_threads(torch_threads)
        if decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {sorted(DECODINGS)}, not {decoding!r}")
        self.model_name = model
        self.device = resolve_device(device)
        on_gpu = self.device != "cpu"
        self.batch_size = max(1, gpu_batch_size if on_gpu else batch_size)
        self.batch_tokens = None if on_gpu else batch_tokens
        self.max_input_tokens = max_input_tokens
        path = resolve_model_path(model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(
                path, dtype=model_dtype(self.device), attn_implementation="sdpa").to(self.device)
        except OSError as exc:
            raise BackendError(f"cannot load model {model!r} from {path!r} offline: {exc}") from exc
        self.model_id = model
        if adapter_path:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, adapter_path)
            self.model_id = f"{model}+lora:{adapter_fingerprint(adapter_path)}"
        self.model.eval()
        self.prepacked_layers = self._prepack(adapter_path is not None) if prepack_weights and not on_gpu else 0
        self.decoding = decoding
        from matrix_assets.llm.refill import DecodeStats, PrefixCache, supports_refill, use_joined_passes

        if decoding == "refill" and on_gpu:
            # Refill decoding steps row by row from Python: on a GPU every step would wait on kernel launches.
            logger.info("model %s on %s: static-cache decoding (compiled by transformers)", model, self.device)
            self.decoding = "static"
        elif decoding == "refill" and not supports_refill(self.model):
            logger.info("model %s: sliding-window or non-attention layers, or a prompt-learning adapter: "
                        "padded decoding", model)
            self.decoding = "padded"
        # Prompts that join a running batch share the running rows' next decode step (one pass instead of two).
        self.joined_passes = self.decoding == "refill" and use_joined_passes(self.model)
        # Refill decoding reuses the KV of prompt prefixes it has seen (0 turns it off); valid for this
        # backend's lifetime because its weights (base + adapter) never change.
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        self.decode_stats = DecodeStats()  # refill decoding's prefill and decode time (verdict passes included)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._lock = threading.RLock()  # one model call at a time; re-entrant: a live session scores verdicts from inside `take`
        self._grammar_compiler: Any = None
        self._grammars: dict[str, Any] = {}
        # Loading, merging an adapter and prepacking leave temporary copies freed (a checkpoint's load peaks ~0.5 GB
        # above what it keeps): hand back what the C library kept of them before answering starts.
        release_memory()

    def _prepack(self, has_adapter: bool) -> int:
        """On CPU, compute the linear layers with oneDNN on weights packed once (`llm/prepack.py`): about 2x
        faster decode steps at batch 8 on this project's CPUs. Returns how many layers were packed."""
        from matrix_assets.llm.prepack import prepack_linear_layers, prepack_supported

        if not prepack_supported(self.model):
            return 0
        if has_adapter:
            if not _lora_merges_cleanly(self.model):
                logger.info("adapter of %s cannot be merged without changing its answers: linears not prepacked",
                            self.model_id)
                return 0
            # A LoRA layer wraps its base linear; folding the adapter into the weights (PEFT's merge) leaves
            # plain linears to pack and drops the adapter's per-step matmuls.
            self.model = self.model.merge_and_unload()
        packed = prepack_linear_layers(self.model, batch_size_hint=self.batch_size)
        logger.info("model %s: %d linear layers prepacked for oneDNN", self.model_id, packed)
        return packed

    def encode(self, conversation: Conversation, assistant_prefix: str = "") -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            [dict(m) for m in conversation], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids)
        if assistant_prefix:
            ids += self.tokenizer.encode(assistant_prefix, add_special_tokens=False)
        # Keep the end of an over-long prompt: the instruction and the generation prompt live there.
        return ids[-self.max_input_tokens :]

    def generate(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Completion]:
        return self.generate_streaming(conversations, params)

    def next_token_logprobs(
        self, conversations: Sequence[Conversation], candidates: Sequence[str], *, assistant_prefix: str = ""
    ) -> list[dict[str, float]]:
        """One forward pass per prompt (batched, left-padded, only the last position's logits kept): the
        log-probability of each candidate's first token, its spelling variants summed (`candidate_variants`)."""
        import torch

        encoded = [self.encode(c, assistant_prefix) for c in conversations]
        results: list[dict[str, float]] = [{} for _ in encoded]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            with self._lock, torch.inference_mode():
                logits = self._last_logits([encoded[i] for i in rows])
            for row, index in enumerate(rows):
                results[index] = self._candidate_logprobs(logits[row], candidates)
        return results

    @property
    def serves_scores(self) -> bool:  # type: ignore[override]
        return self.decoding == "refill"

    def _candidate_logprobs(self, logits: Any, candidates: Sequence[str]) -> dict[str, float]:
        """Each candidate's log-probability as the next token, its spellings' first tokens summed."""
        import torch

        logprobs = torch.log_softmax(logits.float(), dim=-1)
        return {candidate: float(torch.logsumexp(logprobs[ids], dim=0)) if (ids := self._candidate_token_ids(candidate))
                else float("-inf") for candidate in candidates}

    def _last_logits(self, prompts: list[list[int]]) -> Any:
        """The next-token logits after each prompt. With refill decoding the prompts go through its prefill, so a
        verdict prompt that starts like an earlier prompt of the session only runs its new tokens (and is kept
        for the prompts after it); otherwise one left-padded forward pass."""
        from matrix_assets.llm.refill import TokenJob, left_padded, prefill

        if self.decoding == "refill" and self.prefix_cache is not None:
            jobs = [TokenJob(i, ids, GenerationParams(max_new_tokens=1)) for i, ids in enumerate(prompts)]
            return prefill(self.model, jobs, self.tokenizer.pad_token_id, self.prefix_cache, self.decode_stats).logits
        input_ids, attention = left_padded(prompts, self.tokenizer.pad_token_id)
        # Left padding shifts every row: positions count real tokens only, as in generation.
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        return self.model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                          position_ids=positions.to(self.device), logits_to_keep=1).logits[:, -1, :]

    def _candidate_token_ids(self, candidate: str) -> list[int]:
        """First tokens of a candidate's spellings; a spelling that is not one token by itself is still read
        from its first token only when that token is not the bare leading space."""
        ids: set[int] = set()
        for variant in candidate_variants(candidate):
            tokens = self.tokenizer.encode(variant, add_special_tokens=False)
            if tokens and self.tokenizer.decode(tokens[:1]).strip():
                ids.add(tokens[0])
        return sorted(ids)

    def generate_streaming(
        self, conversations: Sequence[Conversation], params: GenerationParams,
        on_result: Callable[[int, Completion], None] | None = None,
    ) -> list[Completion]:
        """Like `generate`, and call `on_result(index, completion)` as soon as each completion is known: row by
        row with refill decoding, chunk by chunk with padded decoding (the generation cache commits each one)."""
        encoded = [self.encode(c) for c in conversations]
        results: list[Completion | None] = [None] * len(encoded)

        def deliver(index: int, completion: Completion) -> None:
            results[index] = completion
            if on_result is not None:
                on_result(index, completion)

        # Continuous batching drops logits processors it does not support (the repetition penalty among them),
        # which would store text under a cache key that promises the penalty: such calls stay padded.
        if self.decoding == "continuous" and params.repetition_penalty == 1.0 and not params.json_schema:
            for index, completion in enumerate(self.generate_continuous(encoded, params)):
                deliver(index, completion)
        elif self.decoding == "refill" and not params.json_schema:
            self.generate_refill(encoded, params, on_result=deliver)
        else:
            order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                for i, completion in zip(idx, self.generate_encoded([encoded[i] for i in idx], params)):
                    deliver(i, completion)
        return [r for r in results if r is not None]

    def serve(self, take: TakeJobs, on_completion: OnCompletion) -> None:
        """Live refill decoding: a queued job joins the running batch as soon as a row ends (no waves)."""
        if self.decoding != "refill":
            return super().serve(take, on_completion)
        import torch

        from matrix_assets.llm.refill import TokenJob, decode_live

        jobs: dict[int, Job] = {}

        def take_tokenized(limit: int) -> list[TokenJob]:
            while True:
                taken = take(limit)
                free = [job for job in taken if not job.params.json_schema]
                # Grammar-constrained requests decode apart (padded, with the grammar's logits processor); their
                # answers may queue more jobs, so an all-structured take is followed by another.
                self._generate_structured([job for job in taken if job.params.json_schema], on_completion)
                if free or not taken:
                    break
            jobs.update((job.id, job) for job in free)
            return [TokenJob(job.id, self.encode(job.conversation, job.assistant_prefix), job.params,
                             wants_logits=bool(job.candidates)) for job in free]

        def done(job: TokenJob, tokens: list[int]) -> None:
            on_completion(jobs.pop(job.id), self._completion(job.prompt, tokens, job.params))

        def scored(token_job: TokenJob, logits: Any) -> None:
            job = jobs.pop(token_job.id)
            on_completion(job, Completion("", len(token_job.prompt), 0,
                                          logprobs=self._candidate_logprobs(logits, job.candidates)))

        with self._lock, torch.inference_mode():
            decode_live(self.model, take_tokenized, done, batch_size=self.batch_size,
                        eos_token_ids=self.eos_token_ids(), pad_token_id=self.tokenizer.pad_token_id,
                        prefix_cache=self.prefix_cache, stats=self.decode_stats, on_logits=scored)

    def _generate_structured(self, structured: Sequence[Job], on_completion: OnCompletion) -> None:
        groups: dict[GenerationParams, list[Job]] = {}
        for job in structured:
            groups.setdefault(job.params, []).append(job)
        for params, group in groups.items():  # a schema sends generate_streaming down the padded path
            self.generate_streaming([j.conversation for j in group], params,
                                    on_result=lambda i, c, group=group: on_completion(group[i], c))

    def _grammar_processor(self, json_schema: str) -> Any:
        """xgrammar's logits processor for a JSON schema (the library vLLM uses): at every step only tokens that
        keep the reply valid JSON of that schema are allowed. Compiled grammars are kept per schema."""
        try:
            import xgrammar
            from xgrammar.contrib.hf import LogitsProcessor
        except ImportError as exc:
            raise PermanentBackendError("structured output on the local backend needs xgrammar: "
                                        "pip install 'matrix-assets[structured]'") from exc
        if self._grammar_compiler is None:
            info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.model.config.vocab_size)
            self._grammar_compiler = xgrammar.GrammarCompiler(info)
        if json_schema not in self._grammars:
            # Compact JSON: with free whitespace a weak model can spend its whole budget on blanks between tokens.
            self._grammars[json_schema] = self._grammar_compiler.compile_json_schema(json_schema, any_whitespace=False)
        return LogitsProcessor(self._grammars[json_schema])

    def generate_encoded(self, batch: Sequence[list[int]], params: GenerationParams) -> list[Completion]:
        """One padded `model.generate` call over already tokenized prompts (also used by the benchmark)."""
        import torch

        from matrix_assets.llm.refill import left_padded

        pad_id = self.tokenizer.pad_token_id
        input_ids, attention = left_padded(batch, pad_id)
        width = input_ids.shape[1]
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
        if self.decoding == "static":
            kwargs["cache_implementation"] = "static"
        if params.json_schema:
            kwargs["logits_processor"] = [self._grammar_processor(params.json_schema)]
        with self._lock, torch.inference_mode():
            output = self.model.generate(input_ids=input_ids.to(self.device),
                                         attention_mask=attention.to(self.device), **kwargs)
        completions = []
        ends = self.eos_token_ids() | {pad_id}
        for row in range(len(batch)):
            new = output[row, width:].tolist()
            n_tokens = len(new)
            for pos, tok in enumerate(new):
                if tok in ends:
                    n_tokens = pos
                    break
            completions.append(self._completion(batch[row], new[:n_tokens], params))
        return completions

    def eos_token_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
        return {i for i in ids if i is not None}

    def generate_refill(
        self, batch: Sequence[list[int]], params: GenerationParams,
        on_result: Callable[[int, Completion], None] | None = None,
    ) -> list[Completion]:
        """Rows leave the batch when they end and queued prompts take their slots (see `llm/refill.py`)."""
        import torch

        from matrix_assets.llm.refill import generate_with_refill

        results: list[Completion | None] = [None] * len(batch)

        def row_done(index: int, tokens: list[int]) -> None:
            results[index] = self._completion(batch[index], tokens, params)
            if on_result is not None:
                on_result(index, results[index])

        with self._lock, torch.inference_mode():
            generate_with_refill(
                self.model, batch, params, batch_size=self.rows_for(batch, params), eos_token_ids=self.eos_token_ids(),
                pad_token_id=self.tokenizer.pad_token_id, on_row_done=row_done, prefix_cache=self.prefix_cache,
                stats=self.decode_stats,
            )
        return [r for r in results if r is not None]

    def rows_for(self, batch: Sequence[list[int]], params: GenerationParams) -> int:
        """Rows decoded at once for a known list of prompts: `batch_size`, raised (CPU) while the rows' tokens, a
        prompt's mean length plus `max_new_tokens` each, fit `batch_tokens`. Short prompts then run in wider
        batches, where the CPU gains from them, and long ones keep `batch_size`, where it does not
        (`benchmarks/results/batch_sizes.md`); the text does not depend on it."""
        if not self.batch_tokens or not batch:
            return self.batch_size
        per_row = sum(len(p) for p in batch) / len(batch) + params.max_new_tokens
        return max(self.batch_size, min(len(batch), int(self.batch_tokens // per_row)))

    def _completion(self, prompt: list[int], tokens: list[int], params: GenerationParams) -> Completion:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in params.stop:
            if stop and stop in text:
                text = text.split(stop, 1)[0]
        return Completion(text.strip(), len(prompt), len(tokens))

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
                                                continuous_batching_config=self._paged_cache(batch, params),
                                                warmup=False)
        outputs = list(results.values())
        if len(outputs) != len(batch) or any(r.error is not None for r in outputs):
            errors = [str(r.error) for r in outputs if r.error is not None]
            raise BackendError(f"continuous batching returned {len(outputs)}/{len(batch)} results {errors[:3]}")
        eos = self.eos_token_ids()
        return [self._completion(ids, [t for t in result.generated_tokens if t not in eos], params)
                for ids, result in zip(batch, outputs)]

    def _paged_cache(self, batch: Sequence[list[int]], params: GenerationParams) -> Any:
        """A paged KV cache for `batch_size` concurrent rows of this batch's longest request. Left to itself,
        transformers sizes the cache to 90% of the free memory of the device, which on the CPU is the machine's
        RAM (13 GB of 24 here, for a few hundred tokens)."""
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        page = 256
        rows = min(len(batch), self.batch_size)
        pages_per_row = -(-(max(len(ids) for ids in batch) + params.max_new_tokens) // page)
        return ContinuousBatchingConfig(page_size=page, num_blocks=rows * pages_per_row + 1,
                                        max_requests_per_batch=rows)

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
