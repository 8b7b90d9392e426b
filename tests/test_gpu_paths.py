"""The GPU code paths, as far as a CPU-only machine can exercise them: device and dtype selection, the static-cache
decoding a GPU uses (run here on the CPU, where transformers does not compile it), bf16/QLoRA training choices,
and LoRA training through Dagster Pipes in a child process."""

from pathlib import Path

import dagster as dg
import pytest
import torch

from matrix_assets.llm.base import BackendError, GenerationParams
from matrix_assets.llm.transformers_backend import TransformersBackend, model_dtype, resolve_device
from matrix_assets.training.sft import SFTExample, TrainSettings, load_training_model, use_bf16

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "a much longer question about many different things at once"}],
]


def test_auto_device_is_the_gpu_when_torch_sees_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(BackendError, match="sees no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1"


def test_dtype_is_fp32_on_cpu_and_bf16_where_the_gpu_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert model_dtype("cpu") is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert model_dtype("cuda") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert model_dtype("cuda") is torch.float16


def test_static_cache_decoding_gives_the_padded_greedy_text(tiny_model_dir: str) -> None:
    params = GenerationParams(max_new_tokens=8)
    padded = TransformersBackend(tiny_model_dir, device="cpu", decoding="padded").generate(CONVERSATIONS, params)
    static = TransformersBackend(tiny_model_dir, device="cpu", decoding="static")
    assert static.device == "cpu" and static.decoding == "static" and static.prepacked_layers > 0
    assert [c.text for c in static.generate(CONVERSATIONS, params)] == [c.text for c in padded]


def test_training_precision_follows_the_hardware() -> None:
    assert use_bf16("auto", cuda_available=False, bf16_supported=False) is False
    assert use_bf16("auto", cuda_available=True, bf16_supported=True) is True
    assert use_bf16("auto", cuda_available=True, bf16_supported=False) is False
    assert use_bf16("fp32", cuda_available=True, bf16_supported=True) is False
    assert use_bf16("bf16", cuda_available=False, bf16_supported=False) is True


def test_bad_training_choices_fail_before_any_model_loads(tiny_model_dir: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainSettings(precision="fp8").validate()
    with pytest.raises(ValueError, match="quantization must be one of"):
        TrainSettings(quantization="3bit").validate()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        load_training_model(tiny_model_dir, TrainSettings(quantization="4bit"))
    model, bf16 = load_training_model(tiny_model_dir, TrainSettings())
    assert bf16 is False and next(model.parameters()).dtype is torch.float32


def test_pipes_request_round_trips_both_objectives(tmp_path: Path) -> None:
    from matrix_assets.methods.base import RatedResponse, TrainingGroup
    from matrix_assets.training.pipes_entry import read_request, write_request
    from matrix_assets.training.sft import LoraSettings, SFTObjective, StableAlignmentObjective

    sft = [SFTExample("q", "a")]
    write_request(tmp_path / "r.json", "base", sft, tmp_path / "out", LoraSettings(), TrainSettings(max_steps=1),
                  SFTObjective())
    request = read_request(tmp_path / "r.json")
    assert request["examples"] == sft and request["train"] == TrainSettings(max_steps=1)
    assert request["lora"] == LoraSettings() and request["objective"] == SFTObjective()
    groups = [TrainingGroup("p1", "q", "imitation", (RatedResponse("a", 6.0), RatedResponse("b", 2.0)))]
    objective = StableAlignmentObjective(margin=2.0)
    write_request(tmp_path / "s.json", "base", groups, tmp_path / "out", LoraSettings(), TrainSettings(), objective)
    request = read_request(tmp_path / "s.json")
    assert request["examples"] == groups and request["objective"] == objective


@pytest.mark.timeout(600)
def test_checkpoint_trains_in_a_child_process_through_dagster_pipes(fake_resources: dict) -> None:
    """runner=pipes: the adapter is trained by `python -m matrix_assets.training.pipes_entry`, its loss lines reach
    the step's logs through Pipes, and the checkpoint is stored, logged and registered as in process."""
    from pipeline_helpers import simulate, stage_config, train_and_evaluate

    instance = dg.DagsterInstance.ephemeral()
    assert simulate(fake_resources, instance).success
    selection = [dg.AssetKey(["initial_sft", "training_set"]), dg.AssetKey(["initial_sft", "checkpoint"])]
    config = stage_config(initial_sft__training_set={"prompt_sets": ["safe_rlhf"]},
                          initial_sft__checkpoint={"max_steps": 2, "batch_size": 2, "runner": "pipes"})
    result = train_and_evaluate(fake_resources, instance, run_config=config, selection=selection)
    assert result.success
    meta = result.asset_materializations_for_node("initial_sft__checkpoint")[0].metadata
    assert meta["steps"].value == 2 and Path(meta["adapter_path"].value, "adapter_config.json").exists()
    logs = [e.message for e in instance.all_logs(result.run_id) if e.message]
    assert any("training through Dagster Pipes" in m for m in logs)
    assert any("step 2: loss" in m for m in logs)  # streamed from the child process


@pytest.mark.timeout(600)
def test_gpu_benchmark_runs_its_every_measurement_on_a_tiny_model_on_the_cpu(tmp_path: Path) -> None:
    """The prepared GPU script is exercised end to end here (tiny random model, CPU), so that on a GPU machine
    the one command works the first time; without CUDA and without --device cpu it refuses to measure."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    if not torch.cuda.is_available():
        refused = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert refused.returncode == 3 and "no CUDA device" in refused.stderr
    out = tmp_path / "gpu.md"
    run = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--arch", "tiny", "--batch", "4", "--prompt-tokens", "8",
         "--new-tokens", "4", "--scenes", "2", "--train-examples", "4", "--train-tokens", "8", "--train-batch", "2",
         "--train-steps", "1", "--out", str(out)], capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stderr[-3000:]
    table = [line for line in out.read_text(encoding="utf-8").splitlines() if line.startswith("| tiny |")]
    assert len(table) == 1 and "nan" not in table[0].split("|")[10]  # LoRA s/step measured
    assert float(table[0].split("|")[8].replace(",", "")) > 0  # simulation tokens/s measured


def test_cli_sets_a_setting_on_every_methods_checkpoint() -> None:
    from matrix_assets.cli import build_run_configs, parser
    from matrix_assets.methods import registry

    _, train_eval = build_run_configs(parser().parse_args(
        ["run", "--set", "checkpoint.runner=pipes", "--set", "checkpoint.launch_command=accelerate launch"]))
    for method in registry():
        config = train_eval["ops"][f"{method}__checkpoint"]["config"]
        assert config["runner"] == "pipes" and config["launch_command"] == "accelerate launch"
    with pytest.raises(SystemExit, match="no asset of 'checkpoint' has a setting 'nonsense'"):
        build_run_configs(parser().parse_args(["run", "--set", "checkpoint.nonsense=1"]))


@pytest.mark.timeout(600)
def test_a_failing_training_process_fails_the_step(fake_resources: dict) -> None:
    """QLoRA asked for on a machine without CUDA: the child exits non-zero and the checkpoint step fails; nothing
    is stored as a checkpoint."""
    from pipeline_helpers import simulate, stage_config, train_and_evaluate

    if torch.cuda.is_available():
        pytest.skip("this machine could run QLoRA")
    instance = dg.DagsterInstance.ephemeral()
    assert simulate(fake_resources, instance).success
    selection = [dg.AssetKey(["initial_sft", "training_set"]), dg.AssetKey(["initial_sft", "checkpoint"])]
    config = stage_config(initial_sft__training_set={"prompt_sets": ["safe_rlhf"]},
                          initial_sft__checkpoint={"max_steps": 1, "runner": "pipes", "quantization": "4bit"})
    result = train_and_evaluate(fake_resources, instance, run_config=config, selection=selection,
                                raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "exit code" in str(failure.event_specific_data.error).lower() or "pipes" in str(
        failure.event_specific_data.error).lower()
    assert fake_resources["store"].get_store().count("checkpoints") == 0
