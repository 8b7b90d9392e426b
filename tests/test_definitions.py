"""The Definitions load fast and expose the graph we designed (a snapshot: graph changes show in review)."""

import dagster as dg

from matrix_assets.definitions import defs

EXPECTED_GRAPH = {
    "benchmark_prompts": ("prompts", set()),
    "initial_responses": ("matrix_simulation", {"benchmark_prompts"}),
    "scene_transcripts": ("matrix_simulation", {"initial_responses"}),
    "critiques": ("matrix_simulation", {"scene_transcripts"}),
    "revised_answers": ("matrix_simulation", {"critiques"}),
    "cai_revisions": ("baselines", {"initial_responses"}),
    "sft_dataset": ("training", {"revised_answers", "cai_revisions"}),
    "finetuned_checkpoint": ("training", {"sft_dataset"}),
    "evaluation_scores": ("evaluation", {"finetuned_checkpoint"}),
}
PARTITIONED = {"benchmark_prompts", "initial_responses", "scene_transcripts", "critiques", "revised_answers",
               "cai_revisions"}


def test_asset_graph_snapshot() -> None:
    d = defs()
    graph = d.resolve_asset_graph()
    seen = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        seen[key.to_user_string()] = (node.group_name, {k.to_user_string() for k in node.parent_keys})
        is_partitioned = node.partitions_def is not None
        assert is_partitioned == (key.to_user_string() in PARTITIONED), key
        if is_partitioned:
            assert isinstance(node.partitions_def, dg.DynamicPartitionsDefinition)
            assert node.partitions_def.name == "prompt_sets"
    assert seen == EXPECTED_GRAPH


def test_jobs_sensor_schedule_checks_resources() -> None:
    d = defs()
    assert {j.name for j in d.resolve_all_job_defs()} >= {"simulate_prompt_set", "train_and_evaluate"}
    assert [s.name for s in d.sensors] == ["new_prompt_set_sensor"]
    assert [s.name for s in d.schedules] == ["retrain_when_new_revisions"]
    assert set(d.resources) == {"store", "llm", "judge", "mlflow_tracking"}
    check_keys = {k.name for c in d.asset_checks for k in c.check_keys}
    assert check_keys == {"transcripts_well_formed", "train_eval_disjoint", "tuned_not_worse_than_base",
                          "champion_comparison"}


def test_definitions_do_not_import_heavy_libraries() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from matrix_assets.definitions import defs; defs(); "
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'mlflow') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_the_local_backend_is_configured_from_the_environment(monkeypatch) -> None:  # noqa: ANN001
    import pytest

    from matrix_assets.defs.resources import LocalTransformersLLM, llm_from_env

    monkeypatch.delenv("MATRIX_LLM_BACKEND", raising=False)
    monkeypatch.setenv("MATRIX_DECODING", "padded")
    monkeypatch.setenv("MATRIX_PREPACK_WEIGHTS", "off")
    llm = llm_from_env()
    assert isinstance(llm, LocalTransformersLLM) and llm.decoding == "padded" and llm.prepack_weights is False
    monkeypatch.delenv("MATRIX_PREPACK_WEIGHTS")
    assert llm_from_env().prepack_weights is True
    monkeypatch.setenv("MATRIX_PREPACK_WEIGHTS", "maybe")
    with pytest.raises(ValueError, match="MATRIX_PREPACK_WEIGHTS must be"):
        llm_from_env()
