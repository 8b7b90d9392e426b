"""LoRA training in its own process, started by the checkpoint asset through Dagster Pipes, so the orchestrator
never holds the model. `python -m matrix_assets.training.pipes_entry` under `PipesSubprocessClient`, or
`accelerate launch -m matrix_assets.training.pipes_entry` for several GPUs; the same module runs under Dagster's
Kubernetes or other Pipes clients, given the request file on shared storage.

The asset writes a request (base model, examples, settings) as JSON, passes its path as `--request`, and
reads `train_result.json` from the output folder when the process has ended; losses stream back as Pipes log
lines while it runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matrix_assets.records import TrainingGroup
from matrix_assets.training.sft import LoraSettings, Objective, SFTExample, TrainResult, TrainSettings, train_lora

RESULT_FILE = "train_result.json"


def write_request(path: Path, base_model_path: str, examples: Sequence[SFTExample] | Sequence[TrainingGroup],
                  output_dir: Path, lora: LoraSettings, train: TrainSettings, objective: Objective) -> None:
    """The objective travels as its class's import path and its fields (a frozen dataclass), so the child rebuilds
    any method's loss, a plugin's included, without knowing it by name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = type(objective)
    path.write_text(json.dumps({
        "base_model_path": base_model_path, "output_dir": str(output_dir),
        "lora": dataclasses.asdict(lora), "train": dataclasses.asdict(train),
        "objective": {"class": f"{kind.__module__}:{kind.__qualname__}", "fields": dataclasses.asdict(objective)},
        "examples": [dataclasses.asdict(e) for e in examples],
    }), encoding="utf-8")


def read_request(path: Path) -> dict[str, Any]:
    """The keyword arguments of `train_lora`, rebuilt from a request file."""
    data = json.loads(path.read_text(encoding="utf-8"))
    module, _, name = data["objective"]["class"].partition(":")
    objective: Objective = getattr(importlib.import_module(module), name)(**data["objective"]["fields"])
    lora_fields = {**data["lora"], "target_modules": tuple(data["lora"]["target_modules"])}
    return {"base_model_path": data["base_model_path"], "examples": objective.decode(data["examples"]),
            "output_dir": Path(data["output_dir"]), "lora": LoraSettings(**lora_fields),
            "train": TrainSettings(**data["train"]), "objective": objective}


def write_result(output_dir: Path, result: TrainResult) -> Path:
    path = output_dir / RESULT_FILE
    path.write_text(json.dumps({**dataclasses.asdict(result), "adapter_path": str(result.adapter_path)}),
                    encoding="utf-8")
    return path


def read_result(output_dir: Path) -> TrainResult:
    data = json.loads((output_dir / RESULT_FILE).read_text(encoding="utf-8"))
    return TrainResult(adapter_path=Path(data["adapter_path"]), n_examples=data["n_examples"], steps=data["steps"],
                       seconds=data["seconds"], losses=[(int(s), float(v)) for s, v in data["losses"]],
                       train_loss=data["train_loss"])


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Train a LoRA adapter from a request file (see module docstring).")
    parser.add_argument("--request", type=Path, required=True, help="the request JSON written by the asset")
    request = read_request(parser.parse_args(argv).request)
    if int(os.environ.get("RANK", "0")) != 0:
        # Under `accelerate launch` only the main process talks to Dagster: one Pipes session, one result file.
        train_lora(**request)
        return
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        def on_log(step: int, logs: dict[str, float]) -> None:
            if "loss" in logs:
                pipes.log.info(f"step {step}: loss {logs['loss']:.4f}")

        result = train_lora(**request, on_log=on_log)
        write_result(request["output_dir"], result)
        pipes.log.info(f"trained {result.steps} steps in {result.seconds:.0f} s; adapter in {result.adapter_path}")


if __name__ == "__main__":
    main()
