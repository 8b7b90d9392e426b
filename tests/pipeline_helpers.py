"""The project's assets as tests materialize them (with fake or real resources swapped in)."""

from __future__ import annotations

from typing import Any

import dagster as dg

from matrix_assets.defs.jobs import PER_PROMPT_SET, TRAIN_AND_EVALUATE


def all_assets() -> list[Any]:
    from matrix_assets.definitions import defs

    d = defs()
    return [*d.assets, *(d.asset_checks or [])]


def stage_config(**per_op: dict) -> dict:
    """Run config from {op name: config}, e.g. stage_config(matrix__scenes={"n_roles": 3})."""
    return {"ops": {op: {"config": config} for op, config in per_op.items()}}


def quick_data_config(max_prompts: int = 4, **scenes: Any) -> dict:
    """The per-prompt-set stages of every method limited to `max_prompts` prompts (small scenes by default)."""
    from matrix_assets.methods import registry

    ops: dict[str, dict] = {"initial_responses": {"max_prompts": max_prompts}}
    for method in registry().values():
        for stage in method.stages:
            if "max_prompts" in stage.settings:
                ops[f"{method.name}__{stage.name}"] = {"max_prompts": max_prompts}
    ops["matrix__scenes"].update({"n_roles": 3, "max_rounds": 2, **scenes})
    return stage_config(**ops)


def simulate(resources: dict, instance: dg.DagsterInstance, partition: str = "safe_rlhf",
             run_config: dict | None = None, selection: Any = None, **kwargs: Any) -> dg.ExecuteInProcessResult:
    if partition not in instance.get_dynamic_partitions("prompt_sets"):
        instance.add_dynamic_partitions("prompt_sets", [partition])
    return dg.materialize(all_assets(), selection=selection or PER_PROMPT_SET, partition_key=partition,
                          resources=resources, instance=instance,
                          run_config=run_config if run_config is not None else quick_data_config(), **kwargs)


def train_and_evaluate(resources: dict, instance: dg.DagsterInstance, run_config: dict | None = None,
                       selection: Any = None, **kwargs: Any) -> dg.ExecuteInProcessResult:
    return dg.materialize(all_assets(), selection=selection or TRAIN_AND_EVALUATE, resources=resources,
                          instance=instance, run_config=run_config or {}, **kwargs)


class StubStageContext:
    """The smallest StageContext for running one method stage outside Dagster: a real store, fake models, partition
    "s", model id "m", no logging or progress."""

    def __init__(self, store: Any, llm: Any, judge: Any = None) -> None:
        self.partition, self.llm, self.store = "s", llm, store
        self.judge = llm if judge is None else judge

    @property
    def model_id(self) -> str:
        return "m"

    def log(self, message: str) -> None:
        pass

    def progress(self, what: str, unit: str = "generations"):  # noqa: ANN201
        return lambda done, total: None
