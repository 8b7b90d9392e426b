"""The whole asset graph with the deterministic fake LLM (and a tiny real Llama for LoRA training)."""

import json
from pathlib import Path

import dagster as dg
import pytest

from matrix_assets.defs.asset_checks import train_eval_disjoint, transcripts_well_formed, tuned_not_worse_than_base
from matrix_assets.defs.assets.evaluation import evaluation_scores
from matrix_assets.defs.assets.prompts import benchmark_prompts
from matrix_assets.defs.assets.simulation import critiques, initial_responses, revised_answers, scene_transcripts
from matrix_assets.defs.assets.training import finetuned_checkpoint, sft_dataset
from matrix_assets.defs.resources import FakeLLM

PER_PROMPT = [benchmark_prompts, initial_responses, scene_transcripts, critiques, revised_answers]
SIM_CONFIG = {"ops": {"initial_responses": {"config": {"max_prompts": 4}},
                      "scene_transcripts": {"config": {"n_roles": 4, "max_rounds": 2}}}}


def _simulate(resources: dict, instance: dg.DagsterInstance, partition: str = "safe_rlhf") -> dg.ExecuteInProcessResult:
    if partition not in instance.get_dynamic_partitions("prompt_sets"):
        instance.add_dynamic_partitions("prompt_sets", [partition])
    return dg.materialize(
        [*PER_PROMPT, transcripts_well_formed], partition_key=partition, resources=resources,
        instance=instance, run_config=SIM_CONFIG,
    )


def test_per_prompt_stages_store_rows_and_rerun_is_free(fake_resources: dict) -> None:
    instance = dg.DagsterInstance.ephemeral()
    fake = FakeLLM(tiny_model_path=fake_resources["llm"].tiny_model_path).backend()
    calls_before = fake.calls
    result = _simulate(fake_resources, instance)
    assert result.success
    first_calls = fake.calls - calls_before
    assert first_calls > 0

    db = fake_resources["store"].get_store()
    assert db.count("initial_responses") == 4
    assert db.count("transcripts") == 4
    assert db.count("critiques") == 4
    assert db.count("revisions") == 4
    for row in db.query("SELECT roles_json FROM transcripts"):
        assert len(json.loads(row["roles_json"])) >= 3
    kinds = {r["kind"] for r in db.query("SELECT DISTINCT kind FROM transcript_events")}
    assert kinds == {"action", "modulation", "reaction", "memory"}
    checks = result.get_asset_check_evaluations()
    assert checks and all(c.passed for c in checks)

    meta = result.asset_materializations_for_node("scene_transcripts")[0].metadata
    assert meta["n_scenes"].value == 4
    assert "| round | actor |" in meta["sample_transcript"].value
    assert meta["llm_calls_made"].value > 0

    # Re-materializing with unchanged inputs makes zero model calls: everything comes from the cache.
    again = _simulate(fake_resources, instance)
    assert again.success
    assert fake.calls - calls_before == first_calls
    meta = again.asset_materializations_for_node("scene_transcripts")[0].metadata
    assert meta["llm_calls_made"].value == 0 and meta["llm_cache_hits"].value > 0
    assert db.count("transcripts") == 4  # upserted, not duplicated


def test_garbage_model_output_never_crashes_a_partition(fake_resources: dict) -> None:
    resources = dict(fake_resources, llm=FakeLLM(garbage=True))
    instance = dg.DagsterInstance.ephemeral()
    result = _simulate(resources, instance)
    assert result.success
    meta = result.asset_materializations_for_node("scene_transcripts")[0].metadata
    assert meta["fallback/roles_from_default_roster"].value == 4
    assert meta["min_roles"].value >= 3
    revised = result.asset_materializations_for_node("revised_answers")[0].metadata
    assert revised["fallback/revision_template"].value == 4


def test_bad_prompt_file_fails_clearly(fake_resources: dict, tmp_path: Path) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text('{"prompt": "unterminated', encoding="utf-8")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("prompt_sets", ["broken"])
    result = dg.materialize(
        [benchmark_prompts], partition_key="broken", resources=fake_resources, instance=instance,
        run_config={"ops": {"benchmark_prompts": {"config": {"source": str(bad)}}}}, raise_on_error=False,
    )
    assert not result.success
    failure = result.failure_data_for_node("benchmark_prompts")
    assert "broken.json" in str(failure.error) and "prompt set 'broken'" in str(failure.error)


@pytest.mark.timeout(300)
def test_training_and_evaluation_with_tiny_model(fake_resources: dict) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert _simulate(fake_resources, instance).success
    result = dg.materialize(
        [*PER_PROMPT, sft_dataset, finetuned_checkpoint, evaluation_scores, train_eval_disjoint,
         tuned_not_worse_than_base],
        selection=["sft_dataset", "finetuned_checkpoint", "evaluation_scores"],
        resources=fake_resources, instance=instance,
        run_config={"ops": {
            "sft_dataset": {"config": {"benign_ratio": 0.5}},
            "finetuned_checkpoint": {"config": {"max_steps": 2, "batch_size": 2}},
            "evaluation_scores": {"config": {"max_harmful_per_set": 3, "max_over_refusal": 3, "max_helpfulness": 3}},
        }},
    )
    assert result.success
    db = fake_resources["store"].get_store()
    dataset = db.query("SELECT * FROM sft_datasets")[0]
    assert dataset["n_revision"] == 4 and dataset["n_benign"] == 2
    ckpt = db.latest_checkpoint()
    adapter = Path(ckpt["adapter_path"])
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert ckpt["model_version"] == "1"

    metrics = {(r["model_label"], r["metric"]): r for r in db.query("SELECT * FROM eval_metrics")}
    assert metrics[("base", "harmful_share")]["n"] == 3
    assert metrics[("tuned", "over_refusal_rate")]["n"] == 3
    assert metrics[("tuned", "win_rate_vs_base")]["n"] == 3
    for row in metrics.values():
        assert row["ci_low"] is None or row["ci_low"] <= row["value"] <= row["ci_high"]

    import mlflow

    client = mlflow.MlflowClient(fake_resources["mlflow_tracking"].tracking_uri)
    runs = client.search_runs([fake_resources["mlflow_tracking"].experiment_id()])
    assert len(runs) == 2
    by_asset = {r.data.tags["dagster.asset_key"]: r for r in runs}
    assert "train_loss" in by_asset["finetuned_checkpoint"].data.metrics
    assert "tuned/harmful_share" in by_asset["evaluation_scores"].data.metrics
    assert by_asset["evaluation_scores"].data.tags["dagster.run_id"] == result.run_id
    meta = result.asset_materializations_for_node("evaluation_scores")[0].metadata
    assert Path(meta["plot_overview"].value).stat().st_size > 5000
    assert meta["mlflow_run"].value.endswith(by_asset["evaluation_scores"].info.run_id)
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["train_eval_disjoint"].passed
