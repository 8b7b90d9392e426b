"""End to end with the real bundled SmolLM2-135M-Instruct: the README's main command on a tiny partition.

Slow by nature (the real model generates every stage, LoRA trains, MLflow records): about 2-3 minutes here.
"""

import json
from pathlib import Path

import pytest

from matrix_assets.cli import main

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("e2e_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MATRIX_HOME", str(home))
        mp.setenv("MATRIX_DAGSTER_STORAGE", str(home / "dagster"))
        for var in ("MATRIX_DATABASE_URL", "MLFLOW_TRACKING_URI", "MATRIX_LLM_BACKEND", "MATRIX_MODEL"):
            mp.delenv(var, raising=False)
        code = main(["run", "--prompt-set", "advbench", "--max-prompts", "2", "--eval-prompts", "2",
                     "--roles", "3", "--steps", "2", "--rounds", "1", "--max-steps", "2"])
        assert code == 0
    return home


def _store(home: Path):  # noqa: ANN202
    from matrix_assets.store import Store

    return Store(f"sqlite:///{home / 'matrix.db'}")


def test_every_stage_wrote_rows(pipeline_run: Path) -> None:
    db = _store(pipeline_run)
    assert db.count("prompts") >= 520
    assert db.count("initial_responses") == 2
    assert db.count("transcripts") == 2
    assert db.count("critiques") == 2 * 2  # matrix and the cai baseline
    assert db.count("revisions") == 2 * 2
    assert {r["method"] for r in db.query("SELECT method FROM checkpoints")} == {"matrix", "cai", "initial_sft"}
    assert db.count("eval_answers") == 4 * (2 + 2 + 2)  # base + three tuned models over three sets of 2
    models = {r["model_id"] for r in db.query("SELECT DISTINCT model_id FROM generations")}
    assert "smollm2-135m-instruct" in models
    assert any(m.startswith("smollm2-135m-instruct+lora:") for m in models)  # the tuned model generated too


def test_transcripts_are_real_scenes(pipeline_run: Path) -> None:
    db = _store(pipeline_run)
    for row in db.query("SELECT * FROM transcripts"):
        roles = json.loads(row["roles_json"])
        assert len(roles) >= 3
        events = db.events(row["prompt_id"], row["method"], row["model_id"])
        actors = {e["actor"] for e in events if e["kind"] == "reaction"}
        assert actors and actors <= {r["name"] for r in roles}
        assert any(e["kind"] == "action" and len(e["action"]) > 10 for e in events)


def test_adapter_loads_and_generates(pipeline_run: Path) -> None:
    import torch

    from matrix_assets.llm.base import GenerationParams
    from matrix_assets.llm.transformers_backend import TransformersBackend

    ckpt = _store(pipeline_run).query("SELECT * FROM checkpoints WHERE method = 'matrix'")[0]
    adapter = Path(ckpt["adapter_path"])
    assert (adapter / "adapter_model.safetensors").stat().st_size > 10_000
    tuned = TransformersBackend("smollm2-135m-instruct", adapter_path=str(adapter))
    questions = [[{"role": "user", "content": q}] for q in ("How do I pick a lock?", "Write a haiku about rain.")]
    out = tuned.generate(questions, GenerationParams(max_new_tokens=24))
    assert out[0].completion_tokens > 0 and out[0].text
    # The default backend merges the adapter and runs oneDNN-prepacked linears: same answers as plain PEFT.
    assert tuned.prepacked_layers > 0 or not torch.backends.mkldnn.is_available()
    unmerged = TransformersBackend("smollm2-135m-instruct", adapter_path=str(adapter), prepack_weights=False)
    assert [c.text for c in out] == [c.text for c in unmerged.generate(questions, GenerationParams(max_new_tokens=24))]


def test_mlflow_recorded_training_and_evaluation(pipeline_run: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{pipeline_run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("matrix-assets")
    all_runs = client.search_runs([experiment.experiment_id])
    runs = {(r.data.tags["dagster.asset_key"], r.data.tags.get("method")): r for r in all_runs}
    assert len(all_runs) == 4  # three training runs (one per method) and one evaluation run
    train = runs[("finetuned_checkpoint", "matrix")]
    assert train.data.metrics["train_steps"] == 2 and train.data.metrics["train_loss"] > 0
    assert train.data.params["lora_r"] == "8"
    history = client.get_metric_history(train.info.run_id, "loss")
    assert len(history) == 2
    evaluation = runs[("evaluation_scores", None)]
    assert "matrix/harmful_share_ci_high" in evaluation.data.metrics
    versions = {v.tags["method"]: v for v in client.search_model_versions("name='matrix-aligned'")}
    assert set(versions) == {"matrix", "cai", "initial_sft"}
    assert versions["matrix"].run_id == train.info.run_id
    artifacts = {a.path for a in client.list_artifacts(train.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts


def test_rerun_is_served_from_cache(pipeline_run: Path) -> None:
    """Re-materializing the simulation with the same inputs makes zero model calls."""
    import dagster as dg

    from matrix_assets.defs.resources import LocalTransformersLLM, StoreResource
    from matrix_assets.defs.assets.baselines import cai_revisions_asset
    from matrix_assets.defs.assets.simulation import critiques, initial_responses, revised_answers, scene_transcripts

    db_url = f"sqlite:///{pipeline_run / 'matrix.db'}"
    before = _store(pipeline_run).count("generations")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("prompt_sets", ["advbench"])
    result = dg.materialize(
        [initial_responses, scene_transcripts, critiques, revised_answers, cai_revisions_asset],
        partition_key="advbench",
        resources={"store": StoreResource(database_url=db_url), "llm": LocalTransformersLLM()}, instance=instance,
        run_config={"ops": {"initial_responses": {"config": {"max_prompts": 2}},
                            "scene_transcripts": {"config": {"n_roles": 3, "plan_steps": 2, "max_rounds": 1,
                                                             "max_observers": 3}}}},
    )
    assert result.success
    for node in ("initial_responses", "scene_transcripts", "critiques", "revised_answers", "cai_revisions"):
        meta = result.asset_materializations_for_node(node)[0].metadata
        assert meta["llm_calls_made"].value == 0, node
    assert _store(pipeline_run).count("generations") == before
