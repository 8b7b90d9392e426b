"""A method is one folder: a sixth method kept outside the package (tests/fixtures/plugin_methods/weighted_self_sft,
with its own stage, its own loss and its own check) is picked up from `MATRIX_METHOD_PACKAGES` alone, and the whole
graph treats it like the built-in ones: its assets and check, the CLI's choices, training with its loss in process
and through Dagster Pipes, MLflow registration and the evaluation's columns. It runs in a fresh process, as a user
who sets the variable before starting Dagster would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PLUGINS = Path(__file__).parent / "fixtures" / "plugin_methods"

SCRIPT = r'''
import json, sys
from pathlib import Path

import dagster as dg

from matrix_assets.cli import parser
from matrix_assets.defs.resources import FakeLLM, MLflowResource, StoreResource
from matrix_assets.methods import registry
from pipeline_helpers import all_assets, simulate, stage_config, train_and_evaluate

home, tiny, runner = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
resources = {"store": StoreResource(database_url=f"sqlite:///{home / 'matrix.db'}"),
             "llm": FakeLLM(tiny_model_path=tiny), "judge": FakeLLM(),
             "mlflow_tracking": MLflowResource(tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
                                               artifact_root=str(home / "mlartifacts"))}
name = "weighted_self_sft"
definitions = [a for a in all_assets() if isinstance(a, dg.AssetsDefinition)]
keys = {k.to_user_string() for a in definitions for k in a.keys}
checks = {f"{k.asset_key.to_user_string()}:{k.name}" for a in definitions for k in a.check_keys}
evaluation = next(a for a in definitions if dg.AssetKey("evaluation_scores") in a.keys)
upstream = {k.to_user_string() for deps in evaluation.asset_deps.values() for k in deps}
cli_methods = parser().parse_args(["run", "--methods", name]).methods

instance = dg.DagsterInstance.ephemeral()
selection = dg.AssetSelection.groups("prompts") | dg.AssetSelection.keys(dg.AssetKey([name, "answers"]))
simulated = simulate(resources, instance, partition="advbench", selection=selection,
                     run_config=stage_config(initial_responses={"max_prompts": 4}, **{f"{name}__answers": {"max_prompts": 4}}))
evaluated = runner == "in_process"  # the evaluation does not depend on how the adapter was trained
trained = train_and_evaluate(resources, instance, selection=[
    dg.AssetKey([name, "training_set"]), dg.AssetKey([name, "checkpoint"]),
    *([dg.AssetKey("judge_validation"), dg.AssetKey("evaluation_scores")] if evaluated else [])],
    run_config=stage_config(**{
        f"{name}__training_set": {"prompt_sets": ["advbench"]},
        f"{name}__checkpoint": {"max_steps": 2, "batch_size": 2, "runner": runner},
        **({"evaluation_scores": {"methods": [name], "max_harmful_per_set": 2, "max_safe_per_set": 2,
                                  "max_helpfulness_per_set": 2},
            "judge_validation": {"model_judge_sample": 0}} if evaluated else {})}))
from weighted_self_sft.objective import COMPUTE_LOSS_CALLS

db = resources["store"].get_store()
checkpoint = db.query("SELECT * FROM checkpoints WHERE method = :m", m=name)[0]
saved = json.loads((Path(checkpoint["adapter_path"]) / "matrix_training.json").read_text())
print(json.dumps({
    "methods": list(registry()), "keys": sorted(keys), "checks": sorted(checks), "evaluation_upstream": sorted(upstream),
    "cli_methods": cli_methods, "simulated": simulated.success, "trained": trained.success,
    "check_evaluations": [(c.check_name, c.passed) for c in simulated.get_asset_check_evaluations()],
    "objective": saved["objective"], "compute_loss_calls": COMPUTE_LOSS_CALLS[0],
    "eval_models": sorted({r["model_label"] for r in db.query("SELECT model_label FROM eval_metrics")}),
    "registered": checkpoint["model_version"],
}))
'''


@pytest.mark.timeout(600)
@pytest.mark.parametrize("runner", ["in_process", "pipes"])
def test_a_method_in_its_own_folder_joins_the_whole_graph(tmp_path: Path, tiny_model_dir: str, runner: str) -> None:
    env = {**os.environ, "MATRIX_METHOD_PACKAGES": "weighted_self_sft", "MATRIX_HOME": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(PLUGINS), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), tiny_model_dir, runner], env=env,
                          capture_output=True, text=True, timeout=580, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    name = "weighted_self_sft"
    assert seen["methods"][-1] == name and len(seen["methods"]) == 6
    assert {f"{name}/answers", f"{name}/training_set", f"{name}/checkpoint"} <= set(seen["keys"])
    assert f"{name}/answers:every_answer_kept" in seen["checks"]
    assert f"{name}/checkpoint" in seen["evaluation_upstream"] and seen["cli_methods"] == [name]
    assert seen["simulated"] and seen["trained"]
    assert ("every_answer_kept", True) in [tuple(c) for c in seen["check_evaluations"]]
    # Its own loss trained the checkpoint: the objective the adapter records, and (in process) its trainer's calls.
    assert seen["objective"] == {"weight": 0.5, "name": "weighted_sft"}
    assert seen["compute_loss_calls"] > 0 if runner == "in_process" else seen["compute_loss_calls"] == 0
    assert seen["eval_models"] == (["base", name] if runner == "in_process" else []) and seen["registered"]


def test_a_package_named_without_a_method_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from matrix_assets.methods import registry

    monkeypatch.setenv("MATRIX_METHOD_PACKAGES", "json")
    registry.cache_clear()
    try:
        with pytest.raises(ValueError, match="json defines no METHOD"):
            registry()
    finally:
        monkeypatch.delenv("MATRIX_METHOD_PACKAGES")
        registry.cache_clear()
    assert "weighted_self_sft" not in registry()
