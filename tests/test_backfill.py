"""A real Dagster backfill of the `simulate_prompt_set` assets (every method's per-prompt-set stages) over two
prompt-set partitions, on the repository's instance configuration (a copy of dagster.yaml: SQLite storage,
QueuedRunCoordinator, DefaultRunLauncher).

Dagster's own machinery does the work, as `dagster-daemon` would: the backfill is stored in the instance as an
asset `PartitionBackfill` of the job's asset selection with a run config (what the UI's "Materialize" of
selected partitions creates from the Launchpad), the backfill daemon's iteration turns it into one queued run
per partition, the run-queue daemon's iteration dequeues them and the DefaultRunLauncher executes each in its
own process through the code location's gRPC server. (A backfill of the job's own partition set would ignore
a backfill-scoped run config: the job carries the quick profile as partition-scoped config, which Dagster
prefers, so it always runs the quick profile.) The two daemon iterations are driven from the test (as Dagster's
own tests do) so that the test is bounded and leaves no daemon behind. The fake LLM backend is chosen through
the environment, which the gRPC server and the run processes inherit.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from pipeline_helpers import quick_data_config

from matrix_assets.methods import registry

REPO_ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = ["safe_rlhf", "dangerousqa"]
MAX_PROMPTS = 2
SCENES = dg.AssetKey(["matrix", "scenes"])
RUN_CONFIG = {
    # Every step in the run's own process: the default multiprocess executor would start one process per step.
    "execution": {"config": {"in_process": {}}},
    # Every stage that selects prompts (initial_responses and each method's stages) limited to MAX_PROMPTS.
    **quick_data_config(MAX_PROMPTS, n_roles=3, plan_steps=2, max_rounds=1),
}
TIMEOUT_S = 150.0  # per backfill: each run process loads the sentence encoder for benchmark_prompts


@pytest.fixture
def dagster_home(tmp_path: Path, matrix_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("MATRIX_LLM_BACKEND", "fake")
    for var in ("MATRIX_JUDGE_LLM_BACKEND", "MATRIX_TINY_MODEL"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def instance(dagster_home: Path) -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.get() as inst:
        yield inst


@pytest.fixture
def workspace_context(instance: dg.DagsterInstance):  # noqa: ANN201
    from dagster._core.test_utils import create_test_daemon_workspace_context
    from dagster._core.workspace.load_target import ModuleTarget

    target = ModuleTarget(
        module_name="matrix_assets.definitions", attribute=None, working_directory=str(REPO_ROOT), location_name=None
    )
    with create_test_daemon_workspace_context(target, instance) as context:
        yield context


def _job_selection(workspace_context) -> list[dg.AssetKey]:  # noqa: ANN001
    """The assets of the `simulate_prompt_set` job, as the code location (gRPC server) reports them."""
    from matrix_assets.defs.jobs import PER_PROMPT_SET

    request_context = workspace_context.create_request_context()
    entries = request_context.get_code_location_entries()
    assert len(entries) == 1
    entry = next(iter(entries.values()))
    assert entry.code_location, entry.load_error
    (repo,) = entry.code_location.get_repositories().values()
    job = repo.get_full_job("simulate_prompt_set")
    keys = sorted(PER_PROMPT_SET.resolve(request_context.asset_graph))
    assert {"__".join(k.path) for k in keys} == set(job.node_names_in_topological_order) and SCENES in keys
    return keys


def _backfill(workspace_context, partitions: list[str]):  # noqa: ANN001, ANN202
    """Store a backfill of the job's assets and drive the backfill and run-queue daemons until it reaches a final
    status."""
    from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
    from dagster._core.utils import make_new_backfill_id
    from dagster._daemon.backfill import execute_backfill_iteration
    from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon
    from dagster._time import get_current_timestamp

    instance = workspace_context.instance
    backfill_id = make_new_backfill_id()
    instance.add_backfill(
        PartitionBackfill.from_asset_partitions(
            backfill_id=backfill_id,
            asset_graph=workspace_context.create_request_context().asset_graph,
            partition_names=partitions,
            asset_selection=_job_selection(workspace_context),
            backfill_timestamp=get_current_timestamp(),
            tags={},
            dynamic_partitions_store=instance,
            all_partitions=False,
            title=None,
            description=None,
            run_config=RUN_CONFIG,
        )
    )
    logger = logging.getLogger("test_backfill")
    deadline = time.monotonic() + TIMEOUT_S
    with QueuedRunCoordinatorDaemon(interval_seconds=1) as queue_daemon:
        while True:
            list(execute_backfill_iteration(workspace_context, logger))
            list(queue_daemon.run_iteration(workspace_context))
            backfill = instance.get_backfill(backfill_id)
            if backfill.status not in (BulkActionStatus.REQUESTED,):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"backfill {backfill_id} still {backfill.status} after {TIMEOUT_S:.0f} s")
            time.sleep(0.5)
    runs = instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
    return backfill, runs


def _metadata(instance: dg.DagsterInstance, run_id: str) -> dict[dg.AssetKey, dict]:
    """Each asset the run materialized, with its metadata values."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
    out = {}
    for record in records:
        materialization = record.event_log_entry.asset_materialization
        out[materialization.asset_key] = {k: v.value for k, v in materialization.metadata.items()}
    return out


def _scene_metadata(instance: dg.DagsterInstance, run_id: str) -> dict:
    materialized = _metadata(instance, run_id)
    assert SCENES in materialized, f"run {run_id} did not materialize matrix/scenes"
    return materialized[SCENES]


@pytest.mark.timeout(360)
def test_backfill_two_partitions_then_again_for_free(
    instance: dg.DagsterInstance, workspace_context, matrix_home: Path
) -> None:
    from dagster._core.execution.backfill import BulkActionStatus

    from matrix_assets.store import Store

    from dagster._core.launcher import DefaultRunLauncher
    from dagster._core.run_coordinator import QueuedRunCoordinator

    # The repository's instance configuration: runs are queued, then launched in processes of their own.
    assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
    assert isinstance(instance.run_launcher, DefaultRunLauncher)
    instance.add_dynamic_partitions("prompt_sets", PARTITIONS)

    backfill, runs = _backfill(workspace_context, PARTITIONS)
    assert backfill.status == BulkActionStatus.COMPLETED_SUCCESS, backfill.error
    assert sorted(r.tags["dagster/partition"] for r in runs) == sorted(PARTITIONS)
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    for run in runs:
        meta = _scene_metadata(instance, run.run_id)
        assert meta["n_scenes"] == MAX_PROMPTS and meta["llm_calls_made"] > 0

    db = Store(f"sqlite:///{matrix_home / 'matrix.db'}")
    loaded = {r["name"] for r in db.prompt_sets()}
    assert set(PARTITIONS) <= loaded
    assert db.count("initial_responses") == MAX_PROMPTS * len(PARTITIONS)
    assert db.count("transcripts") == MAX_PROMPTS * len(PARTITIONS)
    assert {r["n_rounds"] for r in db.query("SELECT n_rounds FROM transcripts")} == {1}  # the run config reached it
    expected = MAX_PROMPTS * len(PARTITIONS)
    rows = db.query("SELECT method, COUNT(*) AS n FROM critiques GROUP BY method ORDER BY method")
    assert [(r["method"], r["n"]) for r in rows] == [("cai", expected), ("matrix", expected)]  # the critiquing methods
    # Every method's training data (what the old `revisions` table held for matrix and cai), one group per prompt.
    groups = {r["method"]: r["n"] for r in db.query(
        "SELECT method, COUNT(DISTINCT prompt_id) AS n FROM training_groups GROUP BY method")}
    assert set(groups) == set(registry())
    assert all(n == expected for m, n in groups.items() if m != "stable_alignment"), groups
    generations = db.count("generations")
    assert generations > 0

    # The same partitions again: every step re-materializes, and every model call comes from the cache.
    again, runs_again = _backfill(workspace_context, PARTITIONS)
    assert again.status == BulkActionStatus.COMPLETED_SUCCESS, again.error
    assert again.backfill_id != backfill.backfill_id
    assert sorted(r.tags["dagster/partition"] for r in runs_again) == sorted(PARTITIONS)
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs_again)
    for run in runs_again:
        meta = _scene_metadata(instance, run.run_id)
        assert meta["llm_calls_made"] == 0 and meta["llm_cache_hits"] > 0
        # ... and so does every other stage that asks the model.
        calls = {key.to_user_string(): m["llm_calls_made"] for key, m in _metadata(instance, run.run_id).items()
                 if "llm_calls_made" in m}
        assert len(calls) >= 3 and set(calls.values()) == {0}, calls
    assert db.count("generations") == generations
    assert db.count("transcripts") == MAX_PROMPTS * len(PARTITIONS)  # upserted, not duplicated
