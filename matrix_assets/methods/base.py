"""What an alignment method is, in plain Python: its settings, its data stages and its trainer.

The pipeline derives everything else from a method's `Method` entry: one Dagster asset per data stage
(partitioned by prompt set), a training-set and a checkpoint asset, the CLI's `--methods` choices, the MLflow
tags and the evaluation's columns. A stage is a function over a `StageContext`: the model behind the
generation cache, the judge, and the store, seen only through the small `MethodStore` protocol below, so no
method imports Dagster or the store.

Every method ends in the same shape, `TrainingGroup`s: one prompt with one or more model-written responses,
each with an optional rating. SFT methods write groups of one response; a rating-contrastive method (Stable
Alignment) writes several rated responses per prompt. A prompt a method leaves out of its training data is a
group with an `excluded` reason, so what was left out is counted, never silently replaced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from matrix_assets.llm.base import ChatBackend, GenerationParams
from matrix_assets.records import RatedResponse, TrainingGroup  # noqa: F401 - part of a method's interface
from matrix_assets.templates import user_message
from matrix_assets.training.sft import Objective, SFTObjective

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class PromptRecord:
    prompt_id: str
    text: str
    category: str | None = None


@dataclass(frozen=True)
class InitialResponse:
    prompt_id: str
    prompt: str
    response: str
    category: str | None = None


@dataclass
class StageOutcome:
    """What a stage reports back: counts and samples for the asset's metadata (Markdown values are `Markdown`,
    a list of dicts is shown as a table),
    and the fallbacks it used, by name (`fallback/NAME` in the metadata), with how many items it processed."""

    n_items: int
    metadata: dict[str, Any] = field(default_factory=dict)
    fallbacks: Mapping[str, int] = field(default_factory=dict)
    items_with_fallback: Mapping[str, int] = field(default_factory=dict)  # family -> items relying on it


class Markdown(str):
    """A metadata value the UI should render as Markdown."""


class MethodStore(Protocol):
    """The store as a method's stages see it (implemented by `matrix_assets.store.db.Store`)."""

    def train_prompts(self, prompt_set: str, limit: int | None = None) -> list[PromptRecord]: ...

    def initial_responses(self, prompt_set: str, model_id: str, limit: int | None = None
                          ) -> list[InitialResponse]: ...

    def save_training_groups(self, method: str, model_id: str, groups: Sequence[TrainingGroup]) -> None: ...

    def save_records(self, table: str, records: Sequence[Any], **columns: Any) -> None: ...

    def load_records(self, table: str, record_type: type, **filters: Any) -> list[Any]: ...

    def prompt_ids(self, prompt_set: str) -> list[str]: ...


class StageContext(Protocol):
    partition: str  # the prompt set
    llm: ChatBackend  # the pipeline's model, behind the generation cache
    judge: ChatBackend  # the evaluation's judge model (Stable Alignment's observer), behind the cache
    store: MethodStore

    @property
    def model_id(self) -> str: ...

    def log(self, message: str) -> None: ...

    def progress(self, what: str, unit: str = "generations") -> ProgressCallback: ...


@dataclass(frozen=True)
class CheckVerdict:
    """What a stage check says about one materialization: passed or not, and why (metadata shown in the UI)."""

    passed: bool
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageCheck:
    """A check a method runs on what one of its stages produced (a Dagster asset check on that stage's asset,
    partitioned like it). `blocking` stops downstream assets of the run when it fails; otherwise it warns."""

    name: str
    description: str
    evaluate: Callable[[StageOutcome], CheckVerdict]
    blocking: bool = False


@dataclass(frozen=True)
class StageSpec:
    """A per-prompt-set data asset of a method (asset key `METHOD/NAME`)."""

    name: str
    description: str
    run: Callable[[StageContext, Any], StageOutcome]  # (context, the method's settings) -> outcome
    deps: tuple[str, ...] = ()  # upstream asset keys, e.g. "initial_responses", "matrix/scenes"
    settings: tuple[str, ...] = ()  # the fields of the method's settings this stage's Launchpad config shows
    uses_judge: bool = False
    loads_model: bool = True
    checks: tuple[StageCheck, ...] = ()


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    description: str
    reference: str  # the paper (or "control")
    settings: Any  # the quick profile: a frozen dataclass instance, its defaults the one source of truth
    stages: tuple[StageSpec, ...]
    control: bool = False  # a named control, not a method: the only kind allowed to train on fixed text
    profiles: Mapping[str, Any] = field(default_factory=dict)  # "paper" (and others) -> settings instance
    order: int = 100  # position in tables and listings
    objective: Objective = SFTObjective()  # the loss its checkpoint trains with (a frozen dataclass)

    @property
    def trainer(self) -> str:
        """The loss's name, as tables, MLflow params and dataset fingerprints show it."""
        return self.objective.name

    def profile(self, name: str) -> Any:
        if name == "quick":
            return self.settings
        if name not in self.profiles:
            raise ValueError(f"method {self.name!r} has no profile {name!r}; choose from quick, "
                             f"{', '.join(self.profiles)}")
        return self.profiles[name]

    def stage_settings(self, stage: StageSpec, profile: str = "quick") -> dict[str, Any]:
        values = dataclasses.asdict(self.profile(profile))
        return {name: values[name] for name in stage.settings}


# -- shared by the methods ---------------------------------------------------------------------------


def answer_directly(llm: ChatBackend, questions: Sequence[str], max_new_tokens: int) -> list[str]:
    """r0: the model's plain answer, with nothing but the question in the prompt (greedy, no repetition
    penalty: the model's own behaviour). Also how the evaluation and the benign mix ask."""
    if not questions:
        return []
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0)
    return [c.text for c in llm.generate([user_message("initial_response", question=q) for q in questions], params)]


def single_response_groups(kind: str, rows: Sequence[tuple[str, str, str]]) -> list[TrainingGroup]:
    """(prompt_id, prompt, response) rows as SFT groups of one response each."""
    return [TrainingGroup(pid, prompt, kind, (RatedResponse(text),)) for pid, prompt, text in rows]


def initial_responses(ctx: StageContext, limit: int | None) -> list[InitialResponse]:
    """The model's direct answers to the partition's training prompts, which a method's first stage starts from."""
    rows = ctx.store.initial_responses(ctx.partition, ctx.model_id, limit=limit)
    if not rows:
        raise LookupError(f"no initial responses for {ctx.partition!r} with model {ctx.model_id!r}; "
                          "materialize initial_responses first")
    return rows


def save_single_responses(ctx: StageContext, method: str, kind: str, rows: Sequence[tuple[str, str, str]],
                          **metadata: Any) -> StageOutcome:
    """Store (prompt_id, prompt, response) rows as a method's training groups of one response each."""
    groups = single_response_groups(kind, rows)
    ctx.store.save_training_groups(method, ctx.model_id, ctx.partition, groups)
    return StageOutcome(n_items=len(groups), metadata={"n_examples": len(groups), **metadata})


@dataclass
class CritiqueRecord:
    """A critique as the `critiques` table keeps it (MATRIX names the harmed parties; CAI names none)."""

    prompt_id: str
    text: str
    harmed_parties: list[str]
    used_fallback: bool


# Training prompts per prompt set in the quick run (the paper profile uses them all). 9: Stable Alignment's 3 x 3
# society then meets each of its questions again in round 2, so an agent's memory can shape its next draft.
DEFAULT_MAX_PROMPTS = 9


@dataclass(frozen=True)
class PromptLimitSettings:
    """Settings of a method whose one knob is how many training prompts of a set it uses."""

    max_prompts: int | None = field(default=DEFAULT_MAX_PROMPTS, metadata={
        "help": "Training prompts per prompt set (None: all).", "ge": 1})


@dataclass(frozen=True)
class SharedSettings:
    """Settings of the stages every method shares (the model's direct answers)."""

    max_prompts: int | None = field(default=DEFAULT_MAX_PROMPTS, metadata={
        "help": "Training prompts per prompt set answered directly (None: all).", "ge": 1})
    answer_tokens: int = field(default=128, metadata={
        "help": "Tokens of each direct answer r0 (quick 128, paper 256).", "ge": 1})


SHARED_PROFILES: Mapping[str, SharedSettings] = {
    "quick": SharedSettings(),
    "paper": SharedSettings(max_prompts=None, answer_tokens=256),
}


def control_method(name: str, title: str, description: str, order: int, stage: StageSpec) -> Method:
    """A named control (the only kind allowed to train on fixed text): one data stage whose one setting is how
    many training prompts of a set it uses (all of them in the paper profile)."""
    quick = PromptLimitSettings()
    return Method(name=name, title=title, description=description, reference="control", settings=quick,
                  profiles={"paper": dataclasses.replace(quick, max_prompts=None)}, control=True, order=order,
                  stages=(stage,))
