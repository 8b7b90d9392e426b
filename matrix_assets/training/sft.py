"""LoRA fine-tuning, with TRL owning the loop: plain SFT on (prompt, answer) pairs, or Stable Alignment on rated
question groups (`matrix_assets.training.rating_contrastive`). Both share the model loading, the LoRA setup, the
logging callback and the adapter saving here; only the dataset, the config class and the trainer differ.

Our code only prepares the dataset (conversational prompt / completion pairs, so the loss covers the
answer, not the question) and the configuration, and reads the metrics back. Two CPU traps are avoided
on purpose: TRL's SFTConfig defaults to bf16 and gradient checkpointing, which on CPUs without
AVX-512/AMX made a step ~10x slower than fp32 without checkpointing. On a GPU, `precision="auto"` trains in
bf16 (TRL's default there) and `quantization="4bit"` is the paper's QLoRA: an NF4 base under the LoRA adapter,
with gradient checkpointing, through bitsandbytes. Under `accelerate launch` every process trains its shard and
only the main process writes the adapter.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from matrix_assets.records import RatedGroup, TrainingGroup

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str


@dataclass(frozen=True)
class LoraSettings:
    """The paper's adapter: r=8, alpha=16, dropout 0.05 on the attention projections."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def validate(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoRA rank must be positive, got r={self.r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be positive, got alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class TrainSettings:
    """The quick profile's training (`profiles.training("quick")` is these defaults; the paper profile changes
    them). Paper: 3 epochs, cosine schedule, max length 1024, lr 2e-5 (for 7B-30B models). A 135M model with a
    few hundred examples barely moves at 2e-5: 2e-3 for 3 epochs had the lowest validation NLL of the methods'
    targets (benchmarks/tune_on_validation.py, figures in the README), never chosen on the reported evaluation.
    With the Stable Alignment objective, `batch_size` counts question groups (each up to `group_size` sequences).
    A forward pass holds `micro_batch_size` of them and their gradients are accumulated up to `batch_size`: the
    step's gradient is the whole batch's (the loss is normalised over the accumulated batch), its activations are a
    micro-batch's."""

    epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    learning_rate: float = 2e-3
    lr_scheduler: str = "cosine"
    batch_size: int = 4
    micro_batch_size: int = 1
    gradient_accumulation: int = 1
    max_length: int = 512
    seed: int = 0
    precision: str = "auto"  # auto: bf16 on a GPU that has it, fp32 on the CPU; or fp32 | bf16
    quantization: str = "none"  # none | 4bit (QLoRA: NF4 base weights, needs a CUDA GPU and bitsandbytes)
    # Recompute each layer's activations in the backward pass instead of holding them: auto turns it on where a
    # forward pass may hold more than AUTO_CHECKPOINTING_TOKENS tokens, and always under QLoRA (what it costs and
    # saves: the help of `profiles.TrainingSettings.activation_checkpointing`).
    activation_checkpointing: str = "auto"  # auto | on | off

    def validate(self) -> None:
        if self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size must divide batch_size ({self.batch_size}), got {self.micro_batch_size}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {self.quantization!r}")
        if self.activation_checkpointing not in CHECKPOINTING:
            raise ValueError(f"activation_checkpointing must be one of {', '.join(CHECKPOINTING)}, "
                             f"not {self.activation_checkpointing!r}")

    def checkpoints_activations(self, example_tokens: int | None = None, sequences_per_example: int = 1) -> bool:
        """Whether training recomputes activations (see `activation_checkpointing`). A forward pass holds
        `micro_batch_size` examples of at most `example_tokens` tokens each (padding included: a rated group's
        sequences are padded to its longest); unknown, an example is taken to be `sequences_per_example` sequences
        of `max_length` tokens."""
        if self.quantization == "4bit" or self.activation_checkpointing == "on":
            return True
        per_example = sequences_per_example * self.max_length if example_tokens is None else example_tokens
        return self.activation_checkpointing == "auto" and self.micro_batch_size * per_example > AUTO_CHECKPOINTING_TOKENS


PRECISIONS = ("auto", "fp32", "bf16")
QUANTIZATIONS = ("none", "4bit")
CHECKPOINTING = ("auto", "on", "off")
# Tokens a forward pass may hold before `activation_checkpointing="auto"` recomputes activations: an SFT example of
# 512 tokens trains without it; the main job's Stable Alignment groups (3 x ~190 tokens) with it, since without it
# their step peaked at 3.9 GB RSS in the main job's process (what it costs and saves: the profile's help).
AUTO_CHECKPOINTING_TOKENS = 512


def use_bf16(precision: str, cuda_available: bool, bf16_supported: bool) -> bool:
    """bf16 where it is fast (a GPU with bf16 units); asking for it explicitly is honoured anywhere."""
    if precision == "auto":
        return cuda_available and bf16_supported
    return precision == "bf16"


def load_training_model(base_model_path: str, train: TrainSettings) -> tuple[object, bool]:
    """The base model for LoRA training and whether the trainer runs in bf16. `quantization="4bit"` loads it as
    QLoRA does (NF4, double quantization, bf16 compute) and fails clearly where that cannot run."""
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    bf16 = use_bf16(train.precision, cuda, cuda and torch.cuda.is_bf16_supported())
    if train.quantization == "none":
        return AutoModelForCausalLM.from_pretrained(
            base_model_path, dtype=torch.bfloat16 if bf16 else torch.float32), bf16
    import importlib.util

    if not cuda:
        raise ValueError("quantization='4bit' (QLoRA) needs a CUDA GPU; torch sees none")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("quantization='4bit' (QLoRA) needs bitsandbytes: pip install 'matrix-assets[gpu]'")
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(base_model_path, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16), dtype=torch.bfloat16)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True), True


class Objective(Protocol):
    """A training loss as a method names it (`Method.objective`): which examples it trains on, how they become the
    trainer's dataset, and the trainer (TRL's shape: one config class and one trainer class per loss). `train_lora`,
    the checkpoint asset and the Pipes child call these and know no objective by name, so a method that brings a
    new loss brings it in its own folder (see tests/fixtures/plugin_methods). An objective whose example puts several
    sequences in one forward pass says how many as `sequences_per_example` (optional, 1 when absent); one that can
    count its examples' tokens says so with `example_tokens(rows, tokenizer, max_length)` (optional: the most tokens
    one example puts in a forward pass, which decides activation checkpointing; without it, the worst case)."""

    name: str

    def validate(self) -> None:
        """Raise ValueError on settings the loss cannot train with."""

    def examples(self, groups: Sequence[TrainingGroup]) -> list[Any]:
        """A stored training set's groups as the examples this loss trains on."""

    def decode(self, items: Sequence[dict[str, Any]]) -> list[Any]:
        """Examples written to a request file (`dataclasses.asdict`) as objects again."""

    def rows(self, examples: Sequence[Any]) -> list[dict[str, Any]]:
        """The trainer's dataset rows; TypeError when the examples are not the kind this loss trains on."""

    def trainer(self, *, model: Any, args: dict[str, Any], train_dataset: Any, tokenizer: Any, peft_config: Any,
                callbacks: list[Any]) -> Any:
        """The trainer, its config built from the shared `args` (output dir, schedule, batch, precision) and the
        loss's own fields."""


@dataclass(frozen=True)
class SFTObjective:
    """Plain supervised fine-tuning: mean token NLL of the answers (TRL's SFTTrainer as is). Trains on every
    response of every group as a (prompt, response) pair."""

    name: Literal["sft"] = "sft"

    def validate(self) -> None:
        pass

    def examples(self, groups: Sequence[TrainingGroup]) -> list[SFTExample]:
        return [SFTExample(g.prompt, r.text) for g in groups for r in g.responses]

    def decode(self, items: Sequence[dict[str, Any]]) -> list[SFTExample]:
        return [SFTExample(**item) for item in items]

    def rows(self, examples: Sequence[Any]) -> list[dict[str, Any]]:
        if not all(isinstance(e, SFTExample) for e in examples):
            raise TypeError("the SFT objective trains on SFTExample pairs")
        return to_conversational(examples)

    def example_tokens(self, rows: Sequence[dict[str, Any]], tokenizer: Any, max_length: int) -> int:
        """The longest (prompt, answer) sequence, as the trainer tokenizes it."""
        from matrix_assets.training.rating_contrastive import tokenize_prompt_completion

        return max(len(tokenize_prompt_completion(tokenizer, row["prompt"][0]["content"],
                                                  row["completion"][0]["content"], max_length)[0]) for row in rows)

    def trainer(self, *, model: Any, args: dict[str, Any], train_dataset: Any, tokenizer: Any, peft_config: Any,
                callbacks: list[Any]) -> Any:
        from trl import SFTConfig, SFTTrainer

        return SFTTrainer(model=model, args=SFTConfig(**args), train_dataset=train_dataset,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)


@dataclass(frozen=True)
class StableAlignmentObjective:
    """Stable Alignment's rating-margin contrastive loss on rated question groups (Liu et al., ICLR 2024; see
    `rating_contrastive`). Defaults are the released checkpoint's: M = 1, lambda = 0.2, S = 7, k = 3, mean pooling."""

    margin: float = 1.0
    rating_weight: float = 0.2
    rating_scale: float = 7.0
    group_size: int = 3
    loss_variant: Literal["mean", "max"] = "mean"
    name: Literal["stable_alignment"] = "stable_alignment"

    @property
    def sequences_per_example(self) -> int:
        """A group puts up to `group_size` responses in one forward pass (what activation checkpointing weighs)."""
        return self.group_size

    def validate(self) -> None:
        check_rating_loss(self)

    def example_tokens(self, rows: Sequence[dict[str, Any]], tokenizer: Any, max_length: int) -> int:
        """What a group may put in one forward pass, at most: up to `group_size` sequences, each padded to the
        longest of the set (the collator pads a micro-batch's rows to its longest, across its groups)."""
        from matrix_assets.training.rating_contrastive import tokenize_prompt_completion

        longest = max(len(tokenize_prompt_completion(tokenizer, row["prompt"], response, max_length)[0])
                      for row in rows for response in row["responses"])
        return min(max(len(row["responses"]) for row in rows), self.group_size) * longest

    def examples(self, groups: Sequence[TrainingGroup]) -> list[TrainingGroup]:
        return list(groups)

    def decode(self, items: Sequence[dict[str, Any]]) -> list[TrainingGroup]:
        from matrix_assets.records import RatedResponse
        from matrix_assets.records import TrainingGroup as Group

        return [Group(**{**item, "responses": tuple(RatedResponse(**r) for r in item["responses"])})
                for item in items]

    def rows(self, examples: Sequence[Any]) -> list[dict[str, Any]]:
        if not all(hasattr(e, "responses") for e in examples):
            raise TypeError("the Stable Alignment objective trains on rated groups (RatedGroup), not SFT examples")
        from matrix_assets.training.rating_contrastive import groups_to_rows

        rows = groups_to_rows(examples)
        if not rows:
            raise ValueError("no training groups: every rated group was excluded")
        return rows

    def trainer(self, *, model: Any, args: dict[str, Any], train_dataset: Any, tokenizer: Any, peft_config: Any,
                callbacks: list[Any]) -> Any:
        from matrix_assets.training.rating_contrastive import StableAlignmentConfig, StableAlignmentTrainer

        loss = {k: v for k, v in asdict(self).items() if k != "name"}
        return StableAlignmentTrainer(model=model, args=StableAlignmentConfig(**args, **loss),
                                      train_dataset=train_dataset, processing_class=tokenizer,
                                      peft_config=peft_config, callbacks=callbacks)


def check_rating_loss(settings: Any) -> None:
    """The rating-contrastive loss's settings, wherever they are held (this objective, the trainer's config)."""
    if settings.group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {settings.group_size}")
    if settings.rating_scale <= 0:
        raise ValueError(f"rating_scale must be positive, got {settings.rating_scale}")
    if settings.rating_weight < 0:
        raise ValueError(f"rating_weight must be >= 0, got {settings.rating_weight}")
    if settings.loss_variant not in ("mean", "max"):
        raise ValueError(f"loss_variant must be 'mean' or 'max', got {settings.loss_variant!r}")


@dataclass
class TrainResult:
    adapter_path: Path
    n_examples: int  # SFT examples, or question groups for Stable Alignment
    steps: int
    seconds: float
    losses: list[tuple[int, float]] = field(default_factory=list)
    train_loss: float | None = None


LogCallback = Callable[[int, dict[str, float]], None]


def to_conversational(examples: Sequence[SFTExample]) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": e.prompt}],
            "completion": [{"role": "assistant", "content": e.response}],
        }
        for e in examples
    ]


def train_lora(
    base_model_path: str,
    examples: Sequence[SFTExample] | Sequence[RatedGroup],
    output_dir: str | Path,
    *,
    lora: LoraSettings = LoraSettings(),
    train: TrainSettings = TrainSettings(),
    on_log: LogCallback | None = None,
    objective: Objective = SFTObjective(),
) -> TrainResult:
    """Train a LoRA adapter on top of `base_model_path` and save it (adapter only) into `output_dir`.

    `objective=SFTObjective()` (default) trains on `SFTExample`s; `objective=StableAlignmentObjective(...)` trains
    on rated question groups (`RatedGroup`s from `methods.stable_alignment.data`); a method's own objective on
    whatever its `examples()` returns."""
    lora.validate()
    train.validate()
    objective.validate()
    if not examples:
        raise ValueError("no training examples: materialize a method's training_set for at least one prompt set first")
    rows = objective.rows(examples)
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model, bf16 = load_training_model(base_model_path, train)

    losses: list[tuple[int, float]] = []

    class _Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - HF signature
            logs = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            if "loss" in logs:
                losses.append((state.global_step, logs["loss"]))
            if on_log:
                on_log(state.global_step, logs)

    common = dict(
        output_dir=str(output_dir / "trainer"),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        per_device_train_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.batch_size // train.micro_batch_size * train.gradient_accumulation,
        max_length=train.max_length,
        seed=train.seed,
        bf16=bf16,
        fp16=False,
        # TRL defaults to checkpointing everywhere; here only where a forward pass holds many tokens (and QLoRA).
        activation_checkpointing=train.checkpoints_activations(
            objective.example_tokens(rows, tokenizer, train.max_length) if hasattr(objective, "example_tokens") else None,
            getattr(objective, "sequences_per_example", 1)),
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    trainer = objective.trainer(model=model, args=common, train_dataset=Dataset.from_list(rows),
                                tokenizer=tokenizer, peft_config=peft_config, callbacks=[_Recorder()])
    began = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - began
    adapter_dir = output_dir / "adapter"
    if trainer.is_world_process_zero():  # one writer under `accelerate launch`
        trainer.model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        (adapter_dir / "matrix_training.json").write_text(
            json.dumps({"base_model": base_model_path, "lora": asdict(lora), "train": asdict(train),
                        "objective": asdict(objective), "n_examples": len(rows)}, indent=2)
        )
    return TrainResult(
        adapter_path=adapter_dir,
        n_examples=len(rows),
        steps=int(trainer.state.global_step),
        seconds=seconds,
        losses=losses,
        train_loss=float(output.training_loss) if output.training_loss is not None else None,
    )
