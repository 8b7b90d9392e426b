"""Doing nothing twice, and the same answer twice: judge validation is content-addressed, and two fresh runs of the
same graph on one machine give the same evaluation table."""

from pathlib import Path

import dagster as dg
import pytest

from matrix_assets.defs.resources import FakeLLM, MLflowResource, StoreResource
from matrix_assets.methods import registry
from pipeline_helpers import all_assets, quick_data_config, simulate, stage_config, train_and_evaluate


def _resources(home: Path, tiny_model_dir: str) -> dict:
    return {
        "store": StoreResource(database_url=f"sqlite:///{home / 'matrix.db'}"),
        "llm": FakeLLM(tiny_model_path=tiny_model_dir),
        "judge": FakeLLM(),
        "mlflow_tracking": MLflowResource(tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
                                          artifact_root=str(home / "mlartifacts")),
    }


def _validate(resources: dict, instance: dg.DagsterInstance, sample: int) -> dict:
    result = dg.materialize(all_assets(), selection=["judge_validation"], resources=resources, instance=instance,
                            run_config=stage_config(judge_validation={"model_judge_sample": sample}))
    assert result.success
    return {k: v.value for k, v in result.asset_materializations_for_node("judge_validation")[0].metadata.items()}


@pytest.mark.timeout(300)
def test_judge_validation_scores_the_same_labels_and_judges_once(fake_resources: dict) -> None:
    instance = dg.DagsterInstance.ephemeral()
    db = fake_resources["store"].get_store()
    first = _validate(fake_resources, instance, 4)
    rows = db.count("judge_agreement")
    assert first["reused"] is False and rows > 0
    again = _validate(fake_resources, instance, 4)
    assert again["reused"] is True and again["validation_id"] == first["validation_id"]
    assert again["mlflow_run"] == first["mlflow_run"]  # links the run that scored them
    assert db.count("judge_agreement") == rows  # nothing scored or stored again
    assert again["default_judge_kappa_held_out"] == pytest.approx(first["default_judge_kappa_held_out"])
    other = _validate(fake_resources, instance, 6)  # another sample of the judge model: other figures
    assert other["reused"] is False and other["validation_id"] != first["validation_id"]


METHODS = ["matrix", "initial_sft"]
SMALL = {**{f"{m}__training_set": {"prompt_sets": ["safe_rlhf"]} for m in METHODS},
         **{f"{m}__checkpoint": {"max_steps": 2, "batch_size": 2} for m in METHODS},
         "evaluation_scores": {"max_harmful_per_set": 3, "max_safe_per_set": 3, "max_helpfulness_per_set": 3,
                               "methods": METHODS},
         "judge_validation": {"model_judge_sample": 4}}


def _table(home: Path, tiny_model_dir: str) -> list[tuple]:
    resources = _resources(home, tiny_model_dir)
    instance = dg.DagsterInstance.ephemeral()
    selection = [dg.AssetKey(k) for k in ("benchmark_prompts", "initial_responses")] + [
        dg.AssetKey([m, s.name]) for m in METHODS for s in registry()[m].stages]
    ops = quick_data_config(3, max_rounds=1)["ops"]
    config = {"ops": {op: c for op, c in ops.items() if op.split("__")[0] in ("initial_responses", *METHODS)}}
    assert simulate(resources, instance, selection=selection, run_config=config).success
    training = [dg.AssetKey([m, leaf]) for m in METHODS for leaf in ("training_set", "checkpoint")]
    assert train_and_evaluate(resources, instance, run_config=stage_config(**SMALL),
                              selection=[*training, dg.AssetKey("judge_validation"),
                                         dg.AssetKey("evaluation_scores")]).success
    db = resources["store"].get_store()
    metrics = db.query("SELECT model_label, metric, k, n, value, ci_low, ci_high FROM eval_metrics "
                       "ORDER BY model_label, metric")
    paired = db.query("SELECT model_label, metric, n, diff, diff_ci_low, diff_ci_high, mcnemar_p FROM eval_paired "
                      "ORDER BY model_label, metric")
    checkpoints = db.query("SELECT method, checkpoint_id FROM checkpoints ORDER BY method")
    return [tuple(r.values()) for r in metrics + paired + checkpoints]


@pytest.mark.timeout(600)
def test_two_fresh_runs_give_the_same_table(tmp_path: Path, tiny_model_dir: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    tables = []
    for name in ("first", "second"):
        home = tmp_path / name
        monkeypatch.setenv("MATRIX_HOME", str(home))  # checkpoints, datasets and reports of this run
        tables.append(_table(home, tiny_model_dir))
    assert tables[0] and tables[0] == tables[1]
