"""The Definitions load fast and expose the graph we designed (a snapshot: graph changes show in review)."""

import dagster as dg

from matrix_assets.definitions import defs

EXPECTED_GRAPH = {
    "benchmark_prompts": ("prompts", set()),
    "initial_responses": ("prompts", {"benchmark_prompts"}),
    "matrix/scenes": ("matrix", {"initial_responses"}),
    "matrix/critiques": ("matrix", {"matrix/scenes"}),
    "matrix/revisions": ("matrix", {"matrix/critiques"}),
    "matrix/training_set": ("matrix", {"matrix/revisions"}),
    "matrix/checkpoint": ("matrix", {"matrix/training_set"}),
    "cai/revisions": ("cai", {"initial_responses"}),
    "cai/training_set": ("cai", {"cai/revisions"}),
    "cai/checkpoint": ("cai", {"cai/training_set"}),
    "stable_alignment/interactions": ("stable_alignment", {"benchmark_prompts"}),
    "stable_alignment/training_set": ("stable_alignment", {"stable_alignment/interactions"}),
    "stable_alignment/checkpoint": ("stable_alignment", {"stable_alignment/training_set"}),
    "initial_sft/responses": ("initial_sft", {"initial_responses"}),
    "initial_sft/training_set": ("initial_sft", {"initial_sft/responses"}),
    "initial_sft/checkpoint": ("initial_sft", {"initial_sft/training_set"}),
    "refusal_template/responses": ("refusal_template", {"benchmark_prompts"}),
    "refusal_template/training_set": ("refusal_template", {"refusal_template/responses"}),
    "refusal_template/checkpoint": ("refusal_template", {"refusal_template/training_set"}),
    "judge_validation": ("evaluation", set()),
    "evaluation_scores": ("evaluation", {"matrix/checkpoint", "cai/checkpoint", "stable_alignment/checkpoint",
                                         "initial_sft/checkpoint", "refusal_template/checkpoint",
                                         "judge_validation"}),
}
PARTITIONED = {"benchmark_prompts", "initial_responses", "matrix/scenes", "matrix/critiques", "matrix/revisions",
               "cai/revisions", "stable_alignment/interactions", "initial_sft/responses", "refusal_template/responses"}
MODEL_LOADING = {"initial_responses", "matrix/scenes", "matrix/critiques", "matrix/revisions", "cai/revisions",
                 "stable_alignment/interactions"}


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


def test_generation_assets_share_the_model_pool_and_retry() -> None:
    d = defs()
    for assets_def in d.resolve_asset_graph().assets_defs:
        for key in assets_def.keys:
            name = key.to_user_string()
            if name in MODEL_LOADING:
                spec = assets_def.get_asset_spec(key)
                node = assets_def.node_def
                assert node.pool == "model", name
                assert node.retry_policy is not None and node.retry_policy.max_retries >= 1, name
                assert spec.group_name


def test_jobs_sensors_checks_resources() -> None:
    d = defs()
    assert {j.name for j in d.resolve_all_job_defs()} >= {
        "simulate_prompt_set", "simulate_prompt_set_paper", "train_and_evaluate", "train_and_evaluate_paper",
        "evaluate_checkpoints"}
    assert {s.name for s in d.sensors} == {"new_prompt_set_sensor", "nightly_retraining"}
    assert set(d.resources) == {"store", "llm", "judge", "mlflow_tracking"}
    check_keys = {k.name for c in d.asset_checks for k in c.check_keys}
    assert check_keys == {"tuned_not_worse_than_base", "champion_comparison"}
    in_asset = {spec.name for a in d.resolve_asset_graph().assets_defs if a.keys for spec in a.check_specs}
    assert in_asset == {"model_played_the_scene", "train_eval_disjoint"}
    blocking = {spec.name for a in d.resolve_asset_graph().assets_defs for spec in a.check_specs if spec.blocking}
    assert blocking == {"train_eval_disjoint"}


def test_launchpad_defaults_are_the_quick_profile_and_paper_jobs_carry_the_paper_profile() -> None:
    """A plain "Materialize" in the UI must do what `matrix-assets run` does: the quick profile."""
    import dataclasses

    from matrix_assets.defs.configs import profile_run_config, stage_config
    from matrix_assets.methods import registry

    for method in registry().values():
        for stage in method.stages:
            defaults = stage_config(method.name, stage.name)()
            quick = dataclasses.asdict(method.settings)
            # Dagster config holds sequences as lists; the settings dataclasses as tuples.
            launchpad = {k: getattr(defaults, k) for k in stage.settings}
            assert {k: tuple(v) if isinstance(v, list) else v for k, v in launchpad.items()} == {
                k: quick[k] for k in stage.settings}
    paper = profile_run_config("paper", partitioned=True)["ops"]
    assert paper["matrix__scenes"]["config"]["n_roles"] == 5 and paper["matrix__scenes"]["config"]["max_rounds"] == 5
    assert paper["matrix__scenes"]["config"]["max_prompts"] is None
    quick_scenes = stage_config("matrix", "scenes")()
    assert quick_scenes.n_roles == 3 and quick_scenes.max_prompts == 9
    d = defs()
    assert d.resolve_job_def("train_and_evaluate_paper").run_config["ops"]["matrix__checkpoint"]["config"][
        "learning_rate"] == 2e-5
    assert d.resolve_job_def("simulate_prompt_set_paper").get_run_config_for_partition_key("advbench")["ops"][
        "matrix__scenes"]["config"]["n_roles"] == 5
    # The quick jobs carry no config: the Config defaults are the quick profile, and a backfill's edits apply.
    assert not d.resolve_job_def("train_and_evaluate").run_config


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


def test_every_launchpad_field_explains_itself_and_every_number_has_bounds() -> None:
    """The config classes generated from the settings dataclasses: each field shows a description in the
    Launchpad (not its bare name), and each number the range it may take."""
    import typing

    from matrix_assets.defs.configs import launchpad_configs

    missing = []
    for config in launchpad_configs().values():
        for name, info in config.model_fields.items():
            if not info.description or info.description.lower() == name.replace("_", " "):
                missing.append(f"{config.__name__}.{name}: no description")
            types = set(typing.get_args(info.annotation)) | {info.annotation}
            if types & {int, float} and not any(hasattr(m, b) for m in info.metadata for b in ("ge", "gt", "le", "lt")):
                missing.append(f"{config.__name__}.{name}: a number without bounds")
    assert not missing, "\n".join(missing)


def test_a_value_outside_its_bounds_stops_the_step_before_it_computes() -> None:
    import pydantic
    import pytest

    from matrix_assets.defs.configs import TrainingConfig, stage_config

    scenes = stage_config("matrix", "scenes")
    assert scenes(n_roles=1, top_p=1.0).n_roles == 1
    for bad in ({"n_roles": 0}, {"top_p": 1.5}, {"top_p": 0.0}, {"max_prompts": 0}):
        with pytest.raises(pydantic.ValidationError):
            scenes(**bad)
    assert scenes(max_prompts=None).max_prompts is None  # None: every prompt
    with pytest.raises(pydantic.ValidationError):
        TrainingConfig(learning_rate=0.0)


def test_the_readme_settings_reference_is_what_the_code_declares() -> None:
    """The README's settings block is generated from the settings dataclasses: a default, a paper value, a range or
    a description changed in the code and not regenerated (`matrix-assets settings --readme README.md`) fails."""
    from pathlib import Path

    from matrix_assets.defs.configs import README_BEGIN, README_END, settings_reference, with_settings_reference

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index(README_BEGIN) + len(README_BEGIN):readme.index(README_END)]
    assert block.strip() == settings_reference().strip(), "run: matrix-assets settings --readme README.md"
    assert "| `n_roles` | 3 | 5 | ≥ 1 |" in block and "| `learning_rate` | 0.002 | 2e-05 | > 0.0 |" in block
    assert with_settings_reference(readme) == readme
    stale = readme.replace("| `n_roles` | 3 | 5 |", "| `n_roles` | 4 | 5 |")
    assert with_settings_reference(stale) == readme  # regenerating repairs an edited row
