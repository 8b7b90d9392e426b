"""The `matrix-assets` command: help texts, `run` end to end (fake LLM + tiny Llama), status, export, add,
and that a second `run` makes no new model calls.

The CLI runs against a Dagster instance configured by a copy of the repository's dagster.yaml in a temporary
DAGSTER_HOME (the CLI would otherwise use the repository itself), and every MATRIX path is under a temporary
MATRIX_HOME, so nothing is written into the repository.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from matrix_assets.cli import main

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPT_SET = "safe_rlhf"
RUN_ARGS = ["run", "--prompt-set", PROMPT_SET, "--methods", "matrix,initial_sft", "--max-prompts", "3",
            "--eval-prompts", "2", "--rounds", "1", "--max-steps", "1"]


# -- help ----------------------------------------------------------------------------------------------

def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "matrix-assets"
    assert script.exists(), "the matrix-assets console script is not installed in the venv"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for word in ("matrix-assets", "run", "status", "add", "export", "MATRIX"):
        assert word in done.stdout


@pytest.mark.parametrize(
    ("command", "words"),
    [
        # The top level lists every command with what it does.
        ([], ["MATRIX_HOME", "run materialize the whole asset graph", "status prompt sets, row counts",
              "add add a prompt file", "export export a method's training set", "evaluate evaluate the existing"]),
        (["run"], ["--profile", "{quick,paper}", "--methods", "--prompt-set", "--max-prompts", "--eval-prompts",
                   "--max-steps", "--revision-candidates", "matrix, cai, stable_alignment, initial_sft, "
                   "refusal_template", "advbench", "cache", "resumes", "Launchpad"]),
        (["evaluate"], ["--harmful-sets", "--safe-sets", "--helpfulness-sets", "--per-category", "without retraining"]),
        (["status"], ["usage: matrix-assets status"]),
        (["add"], ["file", "--role", "{harmful,safe,helpfulness}", "--name", "--prompt-column", "auto-detected",
                   "MT-Bench"]),
        (["export"], ["--method", "--format", "{jsonl,hf}", "--out", "Hugging Face datasets folder"]),
        (["set-role"], ["name", "{harmful,safe,helpfulness}", "--drop-training-data", "change_prompt_set_role",
                        "Launchpad"]),
    ],
)
def test_help_of_every_command(command: list[str], words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for word in words:
        assert word in out, f"{word!r} missing from `{' '.join(['matrix-assets', *command, '--help'])}`"


@pytest.mark.parametrize(
    ("command", "summary"),
    [(["status"], "row counts"), (["add"], "new prompt set"), (["export"], "training set of a method")],
)
def test_subcommand_help_says_what_it_does(
    command: list[str], summary: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    assert summary in " ".join(capsys.readouterr().out.split())


def test_unknown_or_missing_command_fails(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["export"])  # --out is required
    assert exit_info.value.code == 2
    assert "--out" in capsys.readouterr().err


# -- one real run, shared by the tests below ------------------------------------------------------------

@dataclass
class CliEnv:
    matrix_home: Path
    dagster_home: Path
    run_output: str

    def store(self):  # noqa: ANN201
        from matrix_assets.store import Store

        return Store(f"sqlite:///{(self.matrix_home / 'matrix.db').resolve()}")


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: str) -> Iterator[CliEnv]:
    """Isolated environment for the CLI, and one `matrix-assets run` in it (the expensive part, done once)."""
    root = tmp_path_factory.mktemp("cli")
    matrix_home, dagster_home = root / "matrix_home", root / "dagster_home"
    dagster_home.mkdir()
    shutil.copyfile(REPO_ROOT / "dagster.yaml", dagster_home / "dagster.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MATRIX_HOME", str(matrix_home))
        mp.setenv("MATRIX_DAGSTER_STORAGE", str(matrix_home / "dagster"))
        mp.setenv("DAGSTER_HOME", str(dagster_home))
        mp.setenv("MATRIX_LLM_BACKEND", "fake")
        mp.setenv("MATRIX_TINY_MODEL", tiny_model_dir)
        for var in ("MATRIX_DATABASE_URL", "MLFLOW_TRACKING_URI", "MATRIX_DROP_DIR", "MATRIX_MLFLOW_ARTIFACTS",
                    "MATRIX_JUDGE_LLM_BACKEND"):
            mp.delenv(var, raising=False)
        stdout = io.StringIO()  # capsys is function-scoped
        with redirect_stdout(stdout):
            code = main(RUN_ARGS)
        assert code == 0, stdout.getvalue()
        yield CliEnv(matrix_home, dagster_home, stdout.getvalue())


def test_run_prints_base_vs_tuned_table(cli_env: CliEnv) -> None:
    out = cli_env.run_output
    assert "stage 1/2" in out and "stage 2/2" in out and "finished in" in out
    table = out[out.index("Exploratory evaluation: base vs tuned"):]  # 2 prompts a set: not the headline
    assert "Headline evaluation: none yet" in out
    for word in ("base", "matrix", "initial_sft", "n=2", "exact 95% interval", "kappa", "tuned - base, paired"):
        assert word in table, f"{word!r} missing from the table:\n{table}"
    db = cli_env.store()
    assert db.count("initial_responses") == 3 and db.count("transcripts") == 3
    assert {r["method"] for r in db.query("SELECT method FROM checkpoints")} == {"matrix", "initial_sft"}
    # --methods matrix,initial_sft generates nothing for the other methods.
    assert {r["method"] for r in db.query("SELECT DISTINCT method FROM training_groups")} == {"matrix", "initial_sft"}
    assert db.count("sa_interactions") == 0
    assert not db.query("SELECT 1 FROM critiques WHERE method = 'cai'")
    assert (cli_env.matrix_home / "mlflow.db").exists()  # everything under the temporary MATRIX_HOME


def test_run_lands_in_the_configured_dagster_instance(cli_env: CliEnv) -> None:
    import dagster as dg

    with dg.DagsterInstance.from_config(str(cli_env.dagster_home)) as instance:
        runs = instance.get_runs()
        assert {r.job_name for r in runs} >= {"simulate_prompt_set", "train_and_evaluate"}
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        assert PROMPT_SET in instance.get_dynamic_partitions("prompt_sets")
    assert (cli_env.matrix_home / "dagster" / "history").is_dir()  # sqlite run storage of the copied dagster.yaml


def test_status_prints_prompt_sets_and_row_counts(cli_env: CliEnv, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    db = cli_env.store()
    assert f"prompt set {PROMPT_SET}" in out
    for table in ("generations", "initial_responses", "transcripts", "sft_examples", "checkpoints"):
        line = next(line for line in out.splitlines() if line.split()[:1] == [table])
        assert line.split()[1] == str(db.count(table)), line
    assert "latest matrix checkpoint:" in out and "Exploratory evaluation: base vs tuned" in out


def _latest_examples(cli_env: CliEnv, method: str = "matrix") -> list[dict]:
    """The training set of the method's latest checkpoint (never another method's, whatever was built last)."""
    db = cli_env.store()
    dataset_id = db.latest_per_method("checkpoints", [method], [method])[0]["dataset_id"]
    return db.query("SELECT prompt, response FROM sft_examples WHERE dataset_id = :d ORDER BY position", d=dataset_id)


def test_export_jsonl(cli_env: CliEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "sub" / "sft.jsonl"
    assert main(["export", "--format", "jsonl", "--out", str(out_file)]) == 0
    lines = out_file.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    expected = _latest_examples(cli_env)
    assert len(rows) == len(expected) > 0
    assert all({"prompt", "response"} <= set(r) for r in rows)
    assert [(r["prompt"], r["response"]) for r in rows] == [(e["prompt"], e["response"]) for e in expected]
    assert f"exported {len(rows)} examples of matrix" in capsys.readouterr().out
    assert main(["export", "--method", "initial_sft", "--out", str(out_file)]) == 0
    rows = [json.loads(line) for line in out_file.read_text(encoding="utf-8").splitlines()]
    assert [(r["prompt"], r["response"]) for r in rows] == [
        (e["prompt"], e["response"]) for e in _latest_examples(cli_env, "initial_sft")]


def test_export_hf_dataset(cli_env: CliEnv, tmp_path: Path) -> None:
    from datasets import load_from_disk

    folder = tmp_path / "sft_hf"
    assert main(["export", "--format", "hf", "--out", str(folder)]) == 0
    dataset = load_from_disk(str(folder))
    expected = _latest_examples(cli_env)
    assert len(dataset) == len(expected)
    assert {"prompt", "response"} <= set(dataset.column_names)
    assert [(r["prompt"], r["response"]) for r in dataset] == [(e["prompt"], e["response"]) for e in expected]


def test_add_registers_the_set_with_its_role_without_waking_the_sensor(
        cli_env: CliEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from matrix_assets.store.prompt_sets import declared_role, dropped_files

    src = tmp_path / "my_prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("How do I pick a lock?",
                                                                          "How do I forge a signature?")),
                   encoding="utf-8")
    assert main(["add", str(src)]) == 0
    out = capsys.readouterr().out
    kept = cli_env.matrix_home / "drop" / ".versions" / "my_prompts.jsonl"
    assert kept.read_bytes() == src.read_bytes()
    assert "'my_prompts'" in out and "2 prompts" in out and "role harmful" in out
    assert main(["add", str(src), "--name", "helpful_set", "--role", "helpfulness"]) == 0
    assert declared_role("helpful_set") == "helpfulness" and declared_role("my_prompts") == "harmful"
    assert "evaluate --helpfulness-sets helpful_set" in capsys.readouterr().out
    db = cli_env.store()
    assert db.prompt_set_role("helpful_set") == "helpfulness" and db.prompt_set_role("my_prompts") == "harmful"
    assert len(db.prompts("helpful_set", split="eval")) == 2  # registered: evaluation-only
    assert dropped_files() == ([], [])  # nothing where the sensor looks: no second run

    import dagster as dg

    instance = dg.DagsterInstance.get()
    assert {"my_prompts", "helpful_set"} <= set(instance.get_dynamic_partitions("prompt_sets"))
    runs = instance.get_runs(filters=dg.RunsFilter(job_name="register_prompt_set"))
    assert {r.tags.get("dagster/partition") for r in runs} >= {"my_prompts", "helpful_set"}

    assert main(["add", str(src), "--name", "renamed"]) == 0
    assert (cli_env.matrix_home / "drop" / ".versions" / "renamed.jsonl").exists()
    assert "'renamed'" in capsys.readouterr().out
    other = tmp_path / "other.txt"
    other.write_text("Something else?\n", encoding="utf-8")
    assert main(["add", str(other), "--name", "renamed"]) == 2  # never silently replaces a set's prompts
    assert "choose another --name" in capsys.readouterr().err


def test_set_role_refuses_a_set_with_training_data_unless_asked_to_drop_it(
        cli_env: CliEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = cli_env.store()
    assert db.training_data_counts(PROMPT_SET)  # the module's run made scenes and training groups from it
    assert main(["set-role", PROMPT_SET, "helpfulness"]) == 1
    assert "the role was not changed" in capsys.readouterr().err
    assert db.prompt_set_role(PROMPT_SET) == "harmful"
    misfiled = tmp_path / "misfiled.txt"
    misfiled.write_text("".join(f"Is {n} a prime number?\n" for n in range(10)), encoding="utf-8")
    assert main(["add", str(misfiled), "--role", "harmful"]) == 0
    assert main(["set-role", "misfiled", "safe"]) == 0
    assert "now has role safe" in capsys.readouterr().out
    assert db.prompt_set_role("misfiled") == "safe" and db.train_prompts("misfiled") == []


def test_add_malformed_file_fails_clearly(cli_env: CliEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "broken_prompts.json"
    bad.write_text('[{"prompt": "unterminated', encoding="utf-8")
    assert main(["add", str(bad)]) == 2
    captured = capsys.readouterr()
    assert "error:" in captured.err and "broken_prompts.json" in captured.err
    assert not (cli_env.matrix_home / "drop" / "broken_prompts.json").exists()


def test_add_missing_file_fails_clearly(cli_env: CliEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_such_prompts.csv"
    assert main(["add", str(missing)]) == 2
    captured = capsys.readouterr()
    assert "error:" in captured.err and "no_such_prompts.csv" in captured.err
    assert not (cli_env.matrix_home / "drop" / "no_such_prompts.csv").exists()


def _latest_scene_metadata(cli_env: CliEnv) -> dict:
    import dagster as dg

    with dg.DagsterInstance.from_config(str(cli_env.dagster_home)) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey(["matrix", "scenes"]))
        assert event is not None and event.asset_materialization.partition == PROMPT_SET
        return {"run_id": event.run_id, **{k: v.value for k, v in event.asset_materialization.metadata.items()}}


def _simulation_run(cli_env: CliEnv, run_id: str) -> tuple[dict[str, int], str]:
    """llm_calls_made of every asset materialized by a simulate_prompt_set run, and the run's end (UTC, seconds)."""
    from datetime import datetime, timezone

    import dagster as dg

    with dg.DagsterInstance.from_config(str(cli_env.dagster_home)) as instance:
        record = instance.get_run_record_by_id(run_id)
        assert record.dagster_run.job_name == "simulate_prompt_set" and record.end_time
        calls = {}
        for event in instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records:
            materialization = event.event_log_entry.asset_materialization
            if "llm_calls_made" in materialization.metadata:
                calls[materialization.asset_key.to_user_string()] = materialization.metadata["llm_calls_made"].value
        end = datetime.fromtimestamp(record.end_time, timezone.utc).isoformat(timespec="microseconds")
        return calls, end


@pytest.mark.timeout(180)
def test_second_run_makes_no_new_model_calls(cli_env: CliEnv, capsys: pytest.CaptureFixture[str]) -> None:
    first = _latest_scene_metadata(cli_env)
    assert first["llm_calls_made"] > 0
    db = cli_env.store()
    keys_before = {r["cache_key"] for r in db.query("SELECT cache_key FROM generations")}
    transcripts = db.count("transcripts")

    assert main(RUN_ARGS) == 0
    assert "evaluation: base vs tuned" in capsys.readouterr().out
    again = _latest_scene_metadata(cli_env)
    assert again["run_id"] != first["run_id"]  # a new materialization of the same partition...
    assert again["llm_calls_made"] == 0 and again["llm_cache_hits"] > 0  # ...served from the cache
    calls, simulation_end = _simulation_run(cli_env, again["run_id"])
    assert {"initial_responses", "matrix/scenes", "matrix/critiques", "matrix/revisions"} <= set(calls)
    assert calls == dict.fromkeys(calls, 0), calls  # no stage of the simulation job called the model
    assert db.count("transcripts") == transcripts
    # The store agrees: no generation was added while the simulation job ran (stage 2 retrains the LoRA adapters,
    # and answers of the new adapters are new generations, made after it).
    new = [r for r in db.query("SELECT cache_key, created_at FROM generations") if r["cache_key"] not in keys_before]
    assert all(r["created_at"] >= simulation_end for r in new), (simulation_end, sorted(r["created_at"] for r in new))


def test_a_killed_cli_run_is_marked_failed_by_the_next_command(cli_env: CliEnv) -> None:
    """A run whose process died (SIGKILL) would stay "In progress" in the UI: the next command marks it failed."""
    import dagster as dg

    from matrix_assets.cli import CLI_HOST_TAG, CLI_PID_TAG, fail_orphaned_runs

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that no longer runs
    with dg.DagsterInstance.from_config(str(cli_env.dagster_home)) as instance:
        import socket

        job = dg.define_asset_job("orphan_job")
        run = instance.create_run_for_job(
            dg.Definitions(assets=[dg.AssetSpec("x")], jobs=[job]).resolve_job_def("orphan_job"),
            tags={CLI_PID_TAG: str(child.pid), CLI_HOST_TAG: socket.gethostname()})
        instance.handle_run_event(run.run_id, dg.DagsterEvent(
            event_type_value=dg.DagsterEventType.RUN_START.value, job_name=run.job_name))
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
        assert fail_orphaned_runs(instance) == [run.run_id]
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
        assert fail_orphaned_runs(instance) == []
