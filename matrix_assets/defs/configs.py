"""Run configuration of the assets, as shown in the Dagster Launchpad.

The defaults of every Config class are the quick profile of the settings dataclasses they are built from
(`config_class`), so that a plain "Materialize" in the UI does what `matrix-assets run` does, and the `paper`
jobs carry the paper profile as their run config (`profile_run_config`). No default is written twice.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal

import dagster as dg
from pydantic import Field, create_model

from matrix_assets import profiles
from matrix_assets.methods import registry
from matrix_assets.methods.base import SHARED_PROFILES


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[_/]", name))


def _config_type(hint: Any) -> Any:
    """Dataclass field types as the Launchpad can edit them (tuples become lists)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return typing.Optional[_config_type(next(a for a in args if a is not type(None)))]  # noqa: UP007
    if origin is tuple:
        return list[args[0]]
    return hint


# Bounds a settings field may declare in its metadata, beside "help"; the Launchpad and the CLI refuse values
# outside them when the step starts, before it computes anything.
BOUNDS = ("ge", "gt", "le", "lt")


def config_class(name: str, settings: Any, fields: typing.Iterable[str] | None = None, doc: str = "",
                 **extra: Any) -> type[dg.Config]:
    """A `dg.Config` whose fields are `fields` of the settings dataclass instance `settings`, with its values as
    defaults, each field's `metadata["help"]` as the Launchpad description and its `ge`/`gt`/`le`/`lt` as
    bounds; `extra` adds hand-written ones."""
    hints = typing.get_type_hints(type(settings))
    declared = {f.name: f for f in dataclasses.fields(settings)}
    chosen = list(fields) if fields is not None else [n for n, f in declared.items() if f.init]
    definitions: dict[str, Any] = {}
    for field_name in chosen:
        value = getattr(settings, field_name)
        default = list(value) if isinstance(value, tuple) else value
        metadata = declared[field_name].metadata
        bounds = {key: metadata[key] for key in BOUNDS if key in metadata}
        definitions[field_name] = (_config_type(hints[field_name]),
                                   Field(default=default, description=metadata.get("help"), **bounds))
    definitions.update(extra)
    model = create_model(name, __base__=dg.Config, __doc__=doc or None, **definitions)
    return typing.cast(type[dg.Config], model)


def settings_from(config: dg.Config, settings: Any) -> Any:
    """The settings dataclass instance with the config's values (lists back into tuples where declared)."""
    values = {}
    for f in dataclasses.fields(settings):
        if f.name in type(config).model_fields:
            value = getattr(config, f.name)
            values[f.name] = tuple(value) if isinstance(getattr(settings, f.name), tuple) else value
    return dataclasses.replace(settings, **values)


class PromptSetConfig(dg.Config):
    source: str | None = Field(default=None, description="Prompt file path; default: the bundled set or the "
                               "drop-folder file named like the partition.")
    role: str | None = Field(default=None, description="harmful | safe | helpfulness (default: the bundled "
                             "set's role, else harmful). Only harmful sets are trained on.")
    prompt_column: str | None = Field(default=None, description="Column/key holding the prompt (auto-detected).")
    category_column: str | None = Field(default=None, description="Column/key holding a category, if any.")
    train_fraction: float | None = Field(default=None, ge=0.0, le=1.0,
                                         description="Share of prompts in the training split (default: the "
                                         "set's own, 0.5 for harmful sets, 0 for evaluation-only sets).")
    expected_sha256: str | None = Field(default=None, description="Set by the sensor: the dropped file's "
                                        "digest, so the snapshot kept for this partition is the file it saw.")


class SetRoleConfig(dg.Config):
    name: str = Field(description="The prompt set (its partition name).")
    role: Literal["harmful", "safe", "helpfulness"] = Field(description="Its new role.")
    drop_training_data: bool = Field(default=False, description="Delete the training data already made from it "
                                     "(initial answers, scenes, critiques, interactions, training groups); without "
                                     "it a set that has some keeps its role.")


InitialResponsesConfig = config_class(
    "InitialResponsesConfig", SHARED_PROFILES["quick"], doc="The model's direct answers to the training prompts.")

TrainingConfig = config_class("TrainingConfig", profiles.training("quick"), doc="LoRA and optimiser settings.")

EvaluationConfig = config_class("EvaluationConfig", profiles.evaluation("quick"),
                                doc="Which held-out prompts, how many, judged how.")

JudgeValidationConfig = config_class("JudgeValidationConfig", profiles.judge_validation("quick"),
                                     doc="How much of the human-labelled data the judge model is scored on.")

TrainingSetConfig = config_class("TrainingSetConfig", profiles.training_set("quick"),
                                 doc="Which prompt sets a method trains on, and the benign mix.")


def stage_config(method_name: str, stage_name: str) -> type[dg.Config]:
    method = registry()[method_name]
    stage = next(s for s in method.stages if s.name == stage_name)
    return config_class(f"{_camel(method_name)}{_camel(stage_name)}Config", method.settings, stage.settings,
                        doc=stage.description)


def profile_run_config(profile: str, *, partitioned: bool) -> dict[str, Any]:
    """The op config of every asset of a job under a named profile (`quick` is the Config defaults). A method that
    defines no such profile (a plugin with only its defaults) runs its defaults there."""
    ops: dict[str, Any] = {}
    if partitioned:
        ops["initial_responses"] = {"config": dataclasses.asdict(SHARED_PROFILES[profile])}
        for method in registry().values():
            if profile != "quick" and profile not in method.profiles:
                continue
            settings = dataclasses.asdict(method.profile(profile))
            for stage in method.stages:
                ops[f"{method.name}__{stage.name}"] = {"config": {k: _plain(settings[k]) for k in stage.settings}}
    else:
        training = {k: _plain(v) for k, v in dataclasses.asdict(profiles.training(profile)).items()}
        training_set = {k: _plain(v) for k, v in dataclasses.asdict(profiles.training_set(profile)).items()}
        for method in registry():
            ops[f"{method}__training_set"] = {"config": training_set}
            ops[f"{method}__checkpoint"] = {"config": training}
        ops["evaluation_scores"] = {"config": {k: _plain(v) for k, v in
                                               dataclasses.asdict(profiles.evaluation(profile)).items()}}
        ops["judge_validation"] = {"config": {k: _plain(v) for k, v in
                                              dataclasses.asdict(profiles.judge_validation(profile)).items()}}
    return {"ops": ops}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def launchpad_configs() -> dict[str, type[dg.Config]]:
    """Every asset's generated config class by asset key (a method's stage: `METHOD/STAGE`; the checkpoint and
    training-set configs are the same for every method)."""
    configs: dict[str, type[dg.Config]] = {"initial_responses": InitialResponsesConfig}
    for method in registry().values():
        for stage in method.stages:
            configs[f"{method.name}/{stage.name}"] = stage_config(method.name, stage.name)
    configs.update({"METHOD/training_set": TrainingSetConfig, "METHOD/checkpoint": TrainingConfig,
                    "judge_validation": JudgeValidationConfig, "evaluation_scores": EvaluationConfig})
    return configs


def _shown(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "—"
    return str(value).replace("|", "\\|")


def _range(bounds: dict[str, Any]) -> str:
    """[0, 1], (0, 1], >= 1, > 0 ..."""
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = (bounds["le"], "]") if "le" in bounds else (bounds["lt"], ")") if "lt" in bounds else None
    if low and high:
        return f"{low[0]}{low[1]}, {high[0]}{high[1]}"
    if low:
        return f"{'≥' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f"{'≤' if high[1] == ']' else '<'} {high[0]}"
    return ""


README_BEGIN = "<!-- settings reference: generated by `matrix-assets settings --readme README.md`, do not edit -->"
README_END = "<!-- end of the settings reference -->"


def with_settings_reference(readme: str) -> str:
    """The README with its settings block (between README_BEGIN and README_END) regenerated."""
    begin, end = readme.index(README_BEGIN), readme.index(README_END)
    return readme[:begin] + README_BEGIN + "\n\n" + settings_reference() + "\n" + readme[end:]


def settings_reference() -> str:
    """The Launchpad's settings as a Markdown table per asset: each field's quick default (the Config default),
    its paper value, its range and its description. The README embeds it; a test keeps the two equal."""
    paper_ops = {**profile_run_config("paper", partitioned=True)["ops"],
                 **profile_run_config("paper", partitioned=False)["ops"]}
    lines = []
    for asset, config in launchpad_configs().items():
        op = asset.replace("/", "__").replace("METHOD__", f"{next(iter(registry()))}__")
        paper = paper_ops.get(op, {}).get("config", {})
        lines += ["", f"**`{asset}`**", "", "| setting | quick | paper | range | what it does |", "|---|---|---|---|---|"]
        for name, info in config.model_fields.items():
            bounds = {b: getattr(m, b) for m in info.metadata for b in BOUNDS if hasattr(m, b)}
            description = _shown(info.description or "")
            lines.append(f"| `{name}` | {_shown(info.default)} | {_shown(paper.get(name, info.default))} | "
                         f"{_range(bounds)} | {description} |")
    return "\n".join(lines[1:]) + "\n"
