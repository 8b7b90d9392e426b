"""What only PostgreSQL needs: schema races, concurrent writers, Dagster's instance and MLflow on PostgreSQL
(a throwaway local cluster, see tests/conftest.py). The store's own behaviour is tested on both databases by
tests/test_store.py, whose `store` fixture is parametrized over SQLite and PostgreSQL.

Skipped when PostgreSQL is not installed (`scripts/pg_local.sh install`); MATRIX_TEST_POSTGRES_URL points the
tests at another server.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from pipeline_helpers import quick_data_config, simulate

from matrix_assets.llm.base import GenerationParams
from matrix_assets.llm.fake import FakeBackend
from matrix_assets.methods import registry
from matrix_assets.store.db import SQL_DIR, Store
from matrix_assets.store.generation_cache import CachedBackend
from matrix_assets.store.prompt_sets import load_prompt_set

NOW = "2024-01-01T00:00:00+00:00"
VIEWS = set(re.findall(r"^CREATE VIEW (\w+) AS", (SQL_DIR / "views.sql").read_text(), re.MULTILINE))


@pytest.fixture
def store(pg_store_url: str) -> Store:
    return Store(pg_store_url)


def _add_set(store: Store, name: str = "s") -> None:
    store.upsert(
        "prompt_sets",
        [{"name": name, "source": "test", "file_sha256": "0", "role": "harmful", "n_prompts": 0, "n_train": 0,
          "n_eval": 0, "train_fraction": 0.5, "loaded_at": NOW}],
    )


def _add_prompt(store: Store, prompt_id: str, text: str, position: int = 0) -> None:
    store.upsert(
        "prompts",
        [{"prompt_id": prompt_id, "prompt_set": "s", "position": position, "text": text, "category": "cat",
          "split": "train"}],
    )


def _generation(key: str, completion: str = "c") -> dict:
    return {"cache_key": key, "model_id": "m", "params_json": "{}", "messages_json": "[]", "completion": completion,
            "prompt_tokens": 1, "completion_tokens": 1, "seconds": 0.0, "created_at": NOW}


# -- schema, views, upserts -------------------------------------------------------------------------


def test_schema_applies_twice_and_every_table_and_view_exists(pg_store_url: str) -> None:
    first = Store(pg_store_url)
    _add_set(first)
    second = Store(pg_store_url)  # re-applies schema.sql and views.sql on an existing database
    second.create_schema()
    inspector = sa.inspect(second.engine)
    expected = set(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", (SQL_DIR / "schema.sql").read_text()))
    assert len(expected) >= 14
    assert expected <= set(inspector.get_table_names())
    assert {"v_base_vs_tuned", "v_harmful_compliance_by_category", "v_scene_events", "v_training_data"} <= VIEWS
    assert VIEWS <= set(inspector.get_view_names())
    assert second.count("prompt_sets") == 1  # data survives re-application
    for view in VIEWS:
        assert second.query(f"SELECT * FROM {view}") == []


def test_concurrent_schema_creation_on_a_fresh_database(pg_store_url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def create() -> None:
        try:
            barrier.wait()
            Store(pg_store_url)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# -- transcripts, cache, prompt sets --------------------------------------------------------------------


def test_generation_cache(store: Store) -> None:
    convs = [[{"role": "user", "content": f"question {i} " + "x" * i}] for i in range(7)]
    params = GenerationParams(max_new_tokens=32)
    backend = FakeBackend()
    first = CachedBackend(backend, store, chunk_size=3).generate(convs, params)
    assert backend.calls == 7 and store.count("generations") == 7
    again = FakeBackend()
    second = CachedBackend(again, store).generate(convs, params)
    assert again.calls == 0
    assert all(c.cached for c in second)
    assert [(c.text, c.prompt_tokens, c.completion_tokens) for c in second] == [
        (c.text, c.prompt_tokens, c.completion_tokens) for c in first
    ]


def test_load_bundled_prompt_set_matches_sqlite(store: Store, tmp_path: Path) -> None:
    summary = load_prompt_set(store, "safe_rlhf", train_fraction=0.5)
    load_prompt_set(store, "safe_rlhf", train_fraction=0.5)  # reloading upserts, never duplicates
    sqlite = Store(f"sqlite:///{tmp_path}/s.db")
    load_prompt_set(sqlite, "safe_rlhf", train_fraction=0.5)
    key = ("prompt_id", "prompt_set", "position", "text", "category", "split")
    rows = [tuple(r[k] for k in key) for r in store.prompts("safe_rlhf")]
    assert rows == [tuple(r[k] for k in key) for r in sqlite.prompts("safe_rlhf")]
    assert len(rows) == summary.n_prompts == store.count("prompts")
    assert len(store.prompts("safe_rlhf", split="eval")) == summary.n_eval > 0
    (meta,) = store.prompt_sets()
    assert (meta["name"], meta["n_prompts"], meta["train_fraction"]) == ("safe_rlhf", len(rows), 0.5)


# -- concurrent writers -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_concurrent_writers_upsert_without_errors_or_duplicates(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue("pg_store_url") if backend == "postgresql" else f"sqlite:///{tmp_path}/c.db"
    Store(url)
    # each writer upserts 200 generations: 150 of its own and 50 that the other one writes as well
    shared = [f"shared{i:02d}" for i in range(50)]
    work = {
        # the second writer meets the shared keys in the opposite order: the classic deadlock, unless upsert
        # locks rows in a fixed order
        "a": [f"a{i}" for i in range(150)] + shared,
        "b": list(reversed(shared)) + [f"b{i}" for i in range(150)],
    }
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(work))

    def write(name: str) -> None:
        try:
            store = Store(url, create=False)  # a separate engine, as in another process
            keys = work[name]
            barrier.wait()
            for start in range(0, len(keys), 25):  # one transaction per batch, several of them overlapping
                batch = keys[start : start + 25]
                batch = batch[::2] + batch[1::2]  # not in key order within a batch either
                store.upsert("generations", [_generation(k, f"{name}:{k}") for k in batch])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(name,)) for name in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    check = Store(url, create=False)
    assert check.count("generations") == 350
    assert check.scalar("SELECT COUNT(DISTINCT cache_key) FROM generations") == 350
    owners = {r["completion"].split(":")[0] for r in check.query(
        "SELECT completion FROM generations WHERE cache_key LIKE 'shared%'")}
    assert owners <= {"a", "b"}


# -- Dagster and MLflow on PostgreSQL --------------------------------------------------------------------


def test_per_prompt_assets_with_postgres_store_and_dagster_instance(
    pg_database: Callable[[], str], matrix_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every method's per-prompt-set stages (the `simulate_prompt_set` selection), as in test_pipeline_fake.py,
    with the store and Dagster's instance both on PostgreSQL."""
    import yaml
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    from matrix_assets.defs.resources import FakeLLM, MLflowResource, StoreResource

    store_url, dagster_url = pg_database(), pg_database()
    resources = {
        "store": StoreResource(database_url=store_url),
        "llm": FakeLLM(),
        "judge": FakeLLM(),
        "mlflow_tracking": MLflowResource(tracking_uri=f"sqlite:///{matrix_home / 'mlflow.db'}",
                                          artifact_root=str(matrix_home / "mlartifacts")),
    }
    run_config = quick_data_config(4, n_roles=4, max_rounds=2)
    scenes = dg.AssetKey(["matrix", "scenes"])
    # the instance config that docs/postgres.md tells users to copy into $DAGSTER_HOME
    config = yaml.safe_load((Path(__file__).parent.parent / "dagster.postgres.yaml").read_text())
    assert config["storage"] == {"postgres": {"postgres_url": {"env": "MATRIX_DAGSTER_PG_URL"}}}
    monkeypatch.setenv("MATRIX_DAGSTER_PG_URL", dagster_url)
    with dg.instance_for_test(overrides=config) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        result = simulate(resources, instance, run_config=run_config)
        assert result.success
        checks = result.get_asset_check_evaluations()  # the scenes' in-asset check, stored in PostgreSQL
        assert {c.check_name for c in checks} == {"model_played_the_scene"} and all(c.passed for c in checks)
        assert instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(scenes, "model_played_the_scene")])
        again = simulate(resources, instance, run_config=run_config)  # everything from the cache, upserted not duplicated
        assert again.success
        meta = again.asset_materializations_for_node("matrix__scenes")[0].metadata
        assert meta["llm_calls_made"].value == 0 and meta["llm_cache_hits"].value > 0
        assert len(instance.get_runs()) == 2
        assert instance.get_latest_materialization_event(scenes) is not None

    db = Store(store_url, create=False)
    assert db.count("initial_responses") == 4
    assert db.count("transcripts") == 4
    assert db.count("transcript_events") > 4 * 3
    rows = db.query("SELECT method, COUNT(*) AS n FROM critiques GROUP BY method ORDER BY method")
    assert [(r["method"], r["n"]) for r in rows] == [("cai", 4), ("matrix", 4)]
    # every method's training data (matrix's and cai's revisions among it), one group per prompt, not duplicated
    groups = {r["method"]: r["n"] for r in db.query(
        "SELECT method, COUNT(*) AS n FROM training_groups GROUP BY method")}
    assert set(groups) == set(registry())
    assert all(n == 4 for m, n in groups.items() if m != "stable_alignment"), groups
    assert db.count("revision_candidates") == 4 * registry()["matrix"].settings.revision_candidates
    dagster_db = sa.create_engine(dagster_url)
    try:
        with dagster_db.connect() as conn:  # the runs really are in PostgreSQL
            assert conn.exec_driver_sql("SELECT COUNT(*) FROM runs").scalar() == 2
    finally:
        dagster_db.dispose()


def test_mlflow_tracking_and_registry_on_postgres(pg_store_url: str, tmp_path: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=pg_store_url)
    experiment_id = client.create_experiment("matrix-pg", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment_id, run_name="train")
    client.log_metric(run.info.run_id, "train_loss", 1.25, step=1)
    client.set_terminated(run.info.run_id)
    client.create_registered_model("matrix-aligned")
    version = client.create_model_version(
        "matrix-aligned", source=f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id
    )
    client.set_registered_model_alias("matrix-aligned", "champion", version.version)

    fresh = mlflow.MlflowClient(tracking_uri=pg_store_url)  # read back through another client
    assert fresh.get_run(run.info.run_id).data.metrics == {"train_loss": 1.25}
    assert fresh.get_experiment_by_name("matrix-pg").experiment_id == experiment_id
    champion = fresh.get_model_version_by_alias("matrix-aligned", "champion")
    assert (champion.version, champion.run_id) == (version.version, run.info.run_id)
