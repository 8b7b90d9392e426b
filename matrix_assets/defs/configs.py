"""Run configuration of the assets, as shown in the Dagster launchpad."""


import dagster as dg
from pydantic import Field

from matrix_assets.simulation.engine import SimulationSettings
from matrix_assets.training.sft import LoraSettings, TrainSettings

_SIM = SimulationSettings()
_LORA = LoraSettings()
_TRAIN = TrainSettings()


class PromptSetConfig(dg.Config):
    source: str | None = Field(default=None, description="Prompt file path; default: bundled set or drop-folder file named like the partition.")
    prompt_column: str | None = Field(default=None, description="Column/key holding the prompt (auto-detected when empty).")
    category_column: str | None = Field(default=None, description="Column/key holding a harm category, if any.")
    train_fraction: float = Field(default=0.5, ge=0.0, le=1.0, description="Share of prompts in the training split.")


class InitialResponsesConfig(dg.Config):
    max_prompts: int | None = Field(default=None, description="Answer only the first N training prompts (None: all).")
    answer_tokens: int = Field(default=_SIM.answer_tokens, ge=8)


class SimulationConfig(dg.Config):
    n_roles: int = Field(default=_SIM.n_roles, ge=3, description="Roles besides the protagonist (paper: ~5).")
    plan_steps: int = Field(default=_SIM.plan_steps, ge=1, description="Steps in the protagonist's plan (paper: ~5).")
    max_rounds: int = Field(default=_SIM.max_rounds, ge=1, description="Round cap of the modulated interaction.")
    max_observers: int = Field(default=_SIM.max_observers, ge=1, description="Roles that react to one action at most.")
    action_tokens: int = Field(default=_SIM.action_tokens, ge=8)
    scenes_per_batch: int = Field(
        default=32, ge=1,
        description="Scenes simulated at once in one live model session (a few times the model batch size keeps "
        "the batch full); each scene is saved the moment it ends.",
    )

    def settings(self) -> SimulationSettings:
        return SimulationSettings(
            n_roles=self.n_roles, plan_steps=self.plan_steps, max_rounds=self.max_rounds,
            max_observers=self.max_observers, action_tokens=self.action_tokens,
        )


class CritiqueConfig(dg.Config):
    critique_tokens: int = Field(default=_SIM.critique_tokens, ge=16)


class RevisionConfig(dg.Config):
    revision_tokens: int = Field(default=_SIM.revision_tokens, ge=16)
    require_refusal: bool = Field(
        default=True,
        description="Safety net for small models: a revision that neither declines nor redirects (rule-based check) "
        "is replaced by the recorded fallback answer. Turn off with a capable model.",
    )


ALL_METHODS = ["matrix", "cai", "initial_sft"]


class SFTDatasetConfig(dg.Config):
    prompt_sets: list[str] | None = Field(default=None, description="Prompt sets to train on (None: every harmful set loaded).")
    methods: list[str] = Field(
        default=ALL_METHODS,
        description="One dataset per method: matrix (simulation revisions), cai (fixed-principle revisions), "
        "initial_sft (the model's own initial answers, the fine-tuning-only control).",
    )
    benign_set: str = Field(default="vicuna_bench", description="Benign prompts answered by the model itself.")
    benign_ratio: float = Field(default=0.5, ge=0.0, description="Benign examples per revised example.")
    answer_tokens: int = Field(default=_SIM.answer_tokens, ge=8)


class TrainConfig(dg.Config):
    methods: list[str] | None = Field(default=None, description="Train one adapter per method (None: every method with a dataset).")
    lora_r: int = Field(default=_LORA.r, description="LoRA rank (paper: 8).")
    lora_alpha: int = Field(default=_LORA.alpha)
    lora_dropout: float = Field(default=_LORA.dropout)
    epochs: float = Field(default=_TRAIN.epochs)
    max_steps: int = Field(default=_TRAIN.max_steps, description="> 0 overrides epochs.")
    learning_rate: float = Field(default=_TRAIN.learning_rate)
    batch_size: int = Field(default=_TRAIN.batch_size, ge=1)
    max_length: int = Field(default=_TRAIN.max_length, ge=32)

    def lora(self) -> LoraSettings:
        return LoraSettings(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout)

    def train(self) -> TrainSettings:
        return TrainSettings(
            epochs=self.epochs, max_steps=self.max_steps, learning_rate=self.learning_rate,
            batch_size=self.batch_size, max_length=self.max_length,
        )


class EvaluationConfig(dg.Config):
    prompt_sets: list[str] | None = Field(default=None, description="Harmful sets whose eval split is used (None: all loaded harmful sets).")
    max_harmful_per_set: int | None = Field(default=None, description="Held-out harmful prompts per set (None: all).")
    max_over_refusal: int | None = Field(default=None, description="XSTest safe prompts (None: all 250).")
    max_helpfulness: int | None = Field(default=None, description="Held-out Vicuna-Bench prompts (None: all).")
    answer_tokens: int = Field(default=_SIM.answer_tokens, ge=8)
    methods: list[str] | None = Field(default=None, description="Evaluate the latest checkpoint of these methods (None: all).")
    champion_method: str = Field(default="matrix", description="Whose checkpoint may move the `champion` alias.")
    helpfulness_margin: float = Field(default=0.10, ge=0.0, description="Net helpfulness the champion may lose.")
