"""End to end with the real bundled SmolLM2-135M-Instruct: the README's main command on a tiny partition, every
method (Stable Alignment included) trained and evaluated beside the others.

Slow by nature (the real model generates every stage, LoRA trains five adapters, MLflow records): several minutes.
"""

import json
from pathlib import Path

import pytest

from matrix_assets.cli import main
from matrix_assets.methods.matrix.transcripts import load_transcripts

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(1800)]

RUN = ["run", "--prompt-set", "advbench", "--max-prompts", "2", "--eval-prompts", "2", "--roles", "3", "--steps", "2",
       "--rounds", "1", "--max-steps", "2", "--set", "stable_alignment.grid_size=2",
       "--set", "stable_alignment.seed_pairs_per_agent=1", "--set", "stable_alignment.answer_tokens=32",
       "--set", "stable_alignment.reason_tokens=16", "--set", "judge_validation.model_judge_sample=16"]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("e2e_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MATRIX_HOME", str(home))
        mp.setenv("MATRIX_DAGSTER_STORAGE", str(home / "dagster"))
        for var in ("MATRIX_DATABASE_URL", "MLFLOW_TRACKING_URI", "MATRIX_LLM_BACKEND", "MATRIX_MODEL",
                    "MATRIX_JUDGE_LLM_BACKEND"):
            mp.delenv(var, raising=False)
        assert main(RUN) == 0
    return home


def _store(home: Path):  # noqa: ANN202
    from matrix_assets.store import Store

    return Store(f"sqlite:///{home / 'matrix.db'}")


def test_every_method_wrote_its_data_and_was_trained_and_evaluated(pipeline_run: Path) -> None:
    from matrix_assets.methods import registry

    db = _store(pipeline_run)
    assert db.count("prompts") >= 520
    assert db.count("initial_responses") == 2 and db.count("transcripts") == 2
    assert db.count("sa_interactions") == 4 * 2  # a 2 x 2 society over 2 rounds
    assert {r["method"] for r in db.query("SELECT DISTINCT method FROM training_groups")} == set(registry())
    assert {r["method"] for r in db.query("SELECT method FROM checkpoints")} == set(registry())
    labels = {r["model_label"] for r in db.query("SELECT DISTINCT model_label FROM eval_answers")}
    assert labels == {"base", *registry()}
    models = {r["model_id"] for r in db.query("SELECT DISTINCT model_id FROM generations")}
    assert "smollm2-135m-instruct" in models
    assert any(m.startswith("smollm2-135m-instruct+lora:") for m in models)  # the tuned models generated too
    # Stable Alignment's ratings were read from the model's next-token distribution, never parsed.
    ratings = db.query("SELECT rating, distribution_json FROM sa_ratings")
    assert ratings and all(r["rating"] is None or 1 <= r["rating"] <= 7 for r in ratings)
    assert all(json.loads(r["distribution_json"]) for r in ratings if r["rating"] is not None)


def test_transcripts_are_real_scenes_and_their_fallbacks_are_counted(pipeline_run: Path) -> None:
    db = _store(pipeline_run)
    scenes = load_transcripts(db, "advbench", "smollm2-135m-instruct")
    assert scenes and len(scenes) == db.count("transcripts")  # every scene the run played is read back
    for scene in scenes:
        assert len(scene.roles) >= 3
        assert any(e.kind == "action" and len(e.action) > 10 for e in scene.events)
        feasibility = [e for e in scene.events if e.kind == "modulation"]
        assert feasibility and all(e.feasible is not None for e in feasibility)
        # A verdict is read from the next-token distribution when the model puts at least half its mass on yes/no;
        # every other one (the 135M model often opens with "The" or "I") came from the text and is counted.
        assert scene.fallbacks.get("feasible_from_text", 0) == sum(1 for e in feasibility if e.p_yes is None)
        assert all(0.0 <= e.p_yes <= 1.0 for e in feasibility if e.p_yes is not None)


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
    # Training changed the model: LoRA's B matrices start at zero, so an adapter that learned nothing would give
    # the base model's next-token distribution exactly.
    base = TransformersBackend("smollm2-135m-instruct", prepack_weights=False)
    ids = torch.tensor([base.encode(questions[0])])
    with torch.inference_mode():
        shift = (unmerged.model(input_ids=ids).logits - base.model(input_ids=ids).logits).abs().max().item()
    assert shift > 1e-3, f"the trained adapter leaves the logits unchanged (max shift {shift:.2e})"


def test_mlflow_recorded_every_checkpoint_and_a_registered_version_loads_and_generates(pipeline_run: Path) -> None:
    import mlflow

    from matrix_assets.methods import registry

    uri = f"sqlite:///{pipeline_run / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("matrix-assets")
    runs = client.search_runs([experiment.experiment_id])
    training = {r.data.tags["method"]: r for r in runs if r.data.tags.get("kind") == "training"}
    assert set(training) == set(registry())
    train = training["stable_alignment"]
    assert train.data.metrics["train_steps"] == 2 and train.data.params["trainer"] == "stable_alignment"
    assert len(client.get_metric_history(train.info.run_id, "loss")) == 2
    nested = [r for r in runs if r.data.tags.get("kind") == "evaluation_model"]
    assert {r.data.tags["model_label"] for r in nested} == {"base", *registry()}
    versions = {v.tags["method"]: v for v in client.search_model_versions("name='matrix-aligned'")}
    assert set(versions) == set(registry())

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/matrix-aligned/{versions['matrix'].version}")
    answers = model.predict(["Write one sentence about the sea."], params={"max_new_tokens": 16})
    assert len(answers) == 1 and answers[0].strip()


def test_rerun_of_the_data_stages_is_served_from_the_cache(pipeline_run: Path) -> None:
    """Re-materializing every method's data stages with the same inputs makes zero model calls."""
    import dagster as dg

    from matrix_assets.cli import build_run_configs, parser
    from matrix_assets.defs.jobs import PER_PROMPT_SET
    from matrix_assets.defs.resources import LocalTransformersLLM, MLflowResource, StoreResource
    from pipeline_helpers import all_assets

    db_url = f"sqlite:///{pipeline_run / 'matrix.db'}"
    before = _store(pipeline_run).count("generations")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("prompt_sets", ["advbench"])
    simulate_config, _ = build_run_configs(parser().parse_args(RUN))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MATRIX_HOME", str(pipeline_run))
        result = dg.materialize(
            all_assets(), selection=PER_PROMPT_SET, partition_key="advbench", instance=instance,
            resources={"store": StoreResource(database_url=db_url), "llm": LocalTransformersLLM(),
                       "judge": LocalTransformersLLM(), "mlflow_tracking": MLflowResource()},
            run_config={"ops": simulate_config["ops"]},
        )
    assert result.success
    for node in ("initial_responses", "matrix__scenes", "matrix__critiques", "matrix__revisions", "cai__revisions",
                 "stable_alignment__interactions"):
        meta = result.asset_materializations_for_node(node)[0].metadata
        assert meta["llm_calls_made"].value == 0, node
    assert _store(pipeline_run).count("generations") == before
