"""The named profiles every entry point shares: `quick` (the defaults: minutes on a 2-core CPU with the bundled
135M model) and `paper` (the papers' settings: meant for a GPU or an OpenAI-compatible server). The CLI's
`--profile`, the Launchpad's defaults and the `*_paper` jobs all read them from here and from each method's
own settings; nothing else holds a default. `tests/test_profiles_pinned.py` pins every paper value to the paper
it comes from.

The paper profile's training is MATRIX's (its README: LoRA r 8, alpha 16, dropout 0.05, 3 epochs, lr 2e-5 cosine,
1024 tokens, 1 sequence x 8 accumulation steps per device) and its mix MATRIX's released data (6k helpful, 6k
harmful with revision, 6k simulation samples: `benign_ratio` 1 per answer to a training prompt). Departures:

- no warm-up (the reference's warmup ratio 0.03) and no weight decay setting: the trainer's defaults;
- every method trains with these settings, Stable Alignment included (its released checkpoint: 2 epochs, a full
  fine-tune after SFT on HH-RLHF), and gets the same benign mix, so that methods differ only in their data;
- the helpful part is the model's own answers to the benign set's training split (Vicuna-Bench: 40 prompts), so
  at paper scale it is capped there: name a larger helpfulness set as `benign_set` for equal parts;
- QLoRA (the paper's 4-bit base) is `quantization=4bit`, off by default (it needs a CUDA GPU and bitsandbytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from matrix_assets.evaluation.settings import JUDGE_VALIDATION_PAPER, EvaluationSettings, JudgeValidationSettings
from matrix_assets.evaluation.settings import PAPER as EVALUATION_PAPER
from matrix_assets.methods.base import SHARED_PROFILES
from matrix_assets.training.sft import LoraSettings, TrainSettings

PROFILES = ("quick", "paper")
_LORA = LoraSettings()
_TRAIN = TrainSettings()


@dataclass(frozen=True)
class TrainingSettings:
    """LoRA and optimiser settings of a checkpoint (the paper's adapter: r 8, alpha 16, dropout 0.05)."""

    lora_r: int = field(default=_LORA.r, metadata={"help": "LoRA rank (paper: 8).", "ge": 1})
    lora_alpha: int = field(default=_LORA.alpha, metadata={"help": "LoRA alpha (paper: 16).", "ge": 1})
    lora_dropout: float = field(default=_LORA.dropout, metadata={
        "help": "LoRA dropout (paper: 0.05).", "ge": 0.0, "lt": 1.0})
    epochs: float = field(default=_TRAIN.epochs, metadata={"help": "Epochs over the training set.", "gt": 0.0})
    max_steps: int = field(default=_TRAIN.max_steps, metadata={"help": "> 0 overrides epochs.", "ge": -1})
    learning_rate: float = field(default=_TRAIN.learning_rate, metadata={
        "help": "Peak learning rate (cosine).", "gt": 0.0})
    batch_size: int = field(default=_TRAIN.batch_size, metadata={
        "help": "Examples (or rated groups) per step.", "ge": 1})
    micro_batch_size: int = field(default=_TRAIN.micro_batch_size, metadata={
        "help": "Examples (or rated groups) per forward pass, accumulated up to batch_size: the same gradient, the "
        "activations of a micro-batch (a 4 x 512-token batch holds ~3 GB more on the CPU). Must divide batch_size; "
        "raise it on a GPU with memory to spare.", "ge": 1})
    max_length: int = field(default=_TRAIN.max_length, metadata={
        "help": "Tokens per example, prompt included.", "ge": 16})
    precision: str = field(default=_TRAIN.precision, metadata={
        "help": "auto (bf16 on a GPU that has it, fp32 on the CPU), fp32 or bf16."})
    quantization: str = field(default=_TRAIN.quantization, metadata={
        "help": "none, or 4bit: the paper's QLoRA (NF4 base weights; a CUDA GPU and bitsandbytes)."})
    activation_checkpointing: str = field(default=_TRAIN.activation_checkpointing, metadata={
        "help": "auto, on or off. auto recomputes activations in the backward pass where a forward pass of the "
        "training set holds more than 512 tokens (counted from its own sequences: a Stable Alignment group is "
        "group_size x its longest), and always under QLoRA. On the 2-core CPU, the main job's Stable Alignment set "
        "(3 x ~190 tokens a group, 15 steps): with it 167 s in the main job and 2.2 GB peak RSS in a fresh process, "
        "without it 100 s and 2.9 GB (same loss), and the main job's peak rose to 4.04 GB."})
    runner: str = field(default="in_process", metadata={
        "help": "in_process: train inside the Dagster step; pipes: in a child process started through Dagster "
        "Pipes (PipesSubprocessClient), so the orchestrator never holds the model."})
    launch_command: str = field(default="", metadata={
        "help": "With runner=pipes, what starts the training module (default: this Python). For several GPUs: "
        "'accelerate launch --num_processes 4'."})

    def lora(self) -> LoraSettings:
        return LoraSettings(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout)

    def train(self) -> TrainSettings:
        return TrainSettings(epochs=self.epochs, max_steps=self.max_steps, learning_rate=self.learning_rate,
                             batch_size=self.batch_size, micro_batch_size=self.micro_batch_size,
                             max_length=self.max_length, precision=self.precision,
                             quantization=self.quantization, activation_checkpointing=self.activation_checkpointing)


@dataclass(frozen=True)
class TrainingSetSettings:
    prompt_sets: tuple[str, ...] = field(default=("advbench",), metadata={
        "help": "Harmful prompt sets (partitions) whose method data is trained on."})
    benign_set: str = field(default="vicuna_bench", metadata={
        "help": "Benign prompts (training split) answered by the model itself and mixed in, so that fine-tuning "
        "does not teach the model to refuse everything."})
    benign_ratio: float = field(default=0.5, metadata={
        "help": "Benign examples per aligned answer to a training prompt (simulation samples earn none); paper 1.",
        "ge": 0.0})
    answer_tokens: int = field(default=SHARED_PROFILES["quick"].answer_tokens, metadata={
        "help": "Tokens of each benign self-answer.", "ge": 1})


_TRAINING = {
    # quick: the training module's defaults (TrainSettings), whose lr and epochs were chosen on a validation split.
    "quick": TrainingSettings(),
    "paper": TrainingSettings(epochs=3.0, learning_rate=2e-5, max_length=1024, batch_size=8),
}
_TRAINING_SET = {"quick": TrainingSetSettings(),
                 "paper": TrainingSetSettings(benign_ratio=1.0, answer_tokens=SHARED_PROFILES["paper"].answer_tokens)}
_EVALUATION = {"quick": EvaluationSettings(), "paper": EVALUATION_PAPER}
_JUDGE_VALIDATION = {"quick": JudgeValidationSettings(), "paper": JUDGE_VALIDATION_PAPER}


def _checked(profile: str) -> str:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    return profile


def training(profile: str) -> TrainingSettings:
    return _TRAINING[_checked(profile)]


def training_set(profile: str) -> TrainingSetSettings:
    return _TRAINING_SET[_checked(profile)]


def evaluation(profile: str) -> EvaluationSettings:
    return _EVALUATION[_checked(profile)]


def judge_validation(profile: str) -> JudgeValidationSettings:
    return _JUDGE_VALIDATION[_checked(profile)]
