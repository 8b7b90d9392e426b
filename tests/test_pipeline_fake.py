"""The whole asset graph with the deterministic fake LLM (and a tiny real Llama for LoRA training)."""

import json
from pathlib import Path

import dagster as dg
import pytest

from matrix_assets.defs.asset_checks import (
    champion_comparison,
    train_eval_disjoint,
    transcripts_well_formed,
    tuned_not_worse_than_base,
)
from matrix_assets.defs.assets.baselines import cai_revisions_asset
from matrix_assets.defs.assets.evaluation import evaluation_scores
from matrix_assets.defs.assets.prompts import benchmark_prompts
from matrix_assets.defs.assets.simulation import critiques, initial_responses, revised_answers, scene_transcripts
from matrix_assets.defs.assets.training import finetuned_checkpoint, sft_dataset
from matrix_assets.defs.resources import FakeLLM

PER_PROMPT = [benchmark_prompts, initial_responses, scene_transcripts, critiques, revised_answers, cai_revisions_asset]
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
    for table in ("critiques", "revisions"):  # one row per prompt for matrix and for the cai baseline
        rows = db.query(f"SELECT method, COUNT(*) AS n FROM {table} GROUP BY method ORDER BY method")
        assert [(r["method"], r["n"]) for r in rows] == [("cai", 4), ("matrix", 4)]
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
    cai = result.asset_materializations_for_node("cai_revisions")[0].metadata
    assert cai["fallback/critique_default"].value == 4 and cai["fallback/revision_template"].value == 4


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
         tuned_not_worse_than_base, champion_comparison],
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
    datasets = {r["method"]: r for r in db.query("SELECT * FROM sft_datasets")}
    assert set(datasets) == {"matrix", "cai", "initial_sft"}
    for dataset in datasets.values():  # 4 aligned examples each, the same 2 benign self-answers in each
        assert dataset["n_revision"] == 4 and dataset["n_benign"] == 2
    checkpoints = {r["method"]: r for r in db.query("SELECT * FROM checkpoints")}
    assert set(checkpoints) == {"matrix", "cai", "initial_sft"}
    for ckpt in checkpoints.values():
        adapter = Path(ckpt["adapter_path"])
        assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert sorted(c["model_version"] for c in checkpoints.values()) == ["1", "2", "3"]

    metrics = {(r["model_label"], r["metric"]): r for r in db.query("SELECT * FROM eval_metrics")}
    assert {label for label, _ in metrics} == {"base", "matrix", "cai", "initial_sft"}
    assert metrics[("base", "harmful_share")]["n"] == 3
    assert metrics[("matrix", "over_refusal_rate")]["n"] == 3
    assert metrics[("cai", "win_rate_vs_base")]["n"] == 3
    assert metrics[("matrix", "harmful_share")]["checkpoint_id"] == checkpoints["matrix"]["checkpoint_id"]
    for row in metrics.values():
        assert row["ci_low"] is None or row["ci_low"] <= row["value"] <= row["ci_high"]
    assert db.count("eval_pairwise") == 3 * 3  # three tuned models, each judged against base on 3 prompts

    import mlflow

    tracking = fake_resources["mlflow_tracking"]
    client = mlflow.MlflowClient(tracking.tracking_uri)
    runs = client.search_runs([tracking.experiment_id()])
    assert len(runs) == 4  # three training runs and one evaluation run
    training = [r for r in runs if r.data.tags["dagster.asset_key"] == "finetuned_checkpoint"]
    assert {r.data.tags["method"] for r in training} == {"matrix", "cai", "initial_sft"}
    assert all("train_loss" in r.data.metrics for r in training)
    evaluation = next(r for r in runs if r.data.tags["dagster.asset_key"] == "evaluation_scores")
    assert "matrix/harmful_share" in evaluation.data.metrics and "cai/win_rate_vs_base_ci_high" in evaluation.data.metrics
    assert evaluation.data.tags["dagster.run_id"] == result.run_id
    versions = {v.tags["method"]: v for v in client.search_model_versions(f"name='{tracking.registered_model_name}'")}
    assert "harmful_share" in versions["cai"].tags  # every version carries its eval metrics
    meta = result.asset_materializations_for_node("evaluation_scores")[0].metadata
    assert Path(meta["plot_overview"].value).stat().st_size > 5000
    assert meta["mlflow_run"].value.endswith(evaluation.info.run_id)
    assert "only matrix checkpoints become champion" in meta["cai/champion"].value
    assert meta["chart_overview"].value.startswith("![base vs tuned](data:image/png;base64,")
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["train_eval_disjoint"].passed

    # Same data, same settings: re-materializing the checkpoint reuses the trained adapters, no new training run.
    again = dg.materialize(
        [*PER_PROMPT, sft_dataset, finetuned_checkpoint, evaluation_scores], selection=["finetuned_checkpoint"],
        resources=fake_resources, instance=instance,
        run_config={"ops": {"finetuned_checkpoint": {"config": {"max_steps": 2, "batch_size": 2}}}},
    )
    reused = again.asset_materializations_for_node("finetuned_checkpoint")[0].metadata
    assert all(reused[f"{m}/reused"].value for m in ("matrix", "cai", "initial_sft"))
    assert db.count("checkpoints") == 3
    assert len(client.search_runs([tracking.experiment_id()])) == 4
    comparison = checks["champion_comparison"]
    if "-> promoted" in meta["matrix/champion"].value:
        assert comparison.passed and comparison.metadata["latest_is_champion"].value is True
    else:
        assert comparison.metadata  # says why there is no champion, or what the champion is
