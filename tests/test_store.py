"""The SQLite store: schema, views, upserts, transcripts round trip, prompt sets and their sources."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from matrix_assets.llm.fake import FakeBackend
from matrix_assets.methods.base import RatedResponse, TrainingGroup
from matrix_assets.methods.matrix.engine import SceneSettings, run_scenes
from matrix_assets.methods.matrix.scene import Role, SceneEvent, SceneInput, Transcript
from matrix_assets.methods.matrix.transcripts import load_transcripts, save_transcript
from matrix_assets.store.db import SQL_DIR, SchemaMismatchError, Store
from matrix_assets.store.prompt_sets import (
    PromptSetError,
    change_role,
    declared_role,
    ensure_prompt_set,
    load_prompt_set,
    resolve_source,
)


def save_transcripts(store: Store, scenes: list[Transcript], model_id: str) -> None:
    for scene in scenes:
        save_transcript(store, model_id, scene)

NOW = "2024-01-01T00:00:00+00:00"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """Every store test runs on both databases (PostgreSQL: a fresh database on a throwaway local server)."""
    if request.param == "sqlite":
        return Store(f"sqlite:///{tmp_path}/t.db")
    return Store(request.getfixturevalue("pg_store_url"))


def _tables(store: Store, kind: str) -> set[str]:
    """Table or view names, through SQLAlchemy's inspector (works on SQLite and PostgreSQL)."""
    import sqlalchemy as sa

    inspector = sa.inspect(store.engine)
    return set(inspector.get_table_names() if kind == "table" else inspector.get_view_names())


def _add_set(store: Store, name: str = "s") -> None:
    store.upsert(
        "prompt_sets",
        [{"name": name, "source": "test", "file_sha256": "0", "role": "harmful", "n_prompts": 0, "n_train": 0,
          "n_eval": 0, "train_fraction": 0.5, "loaded_at": NOW}],
    )


def _add_prompt(store: Store, prompt_id: str, text: str, position: int = 0, prompt_set: str = "s") -> None:
    store.upsert(
        "prompts",
        [{"prompt_id": prompt_id, "prompt_set": prompt_set, "position": position, "text": text,
          "category": "cat", "split": "train"}],
    )


# -- schema and views -------------------------------------------------------------------------------


def test_schema_applies_twice_and_has_every_table(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/t.db"
    first = Store(url)
    _add_set(first)
    second = Store(url)  # re-applies schema.sql and views.sql on an existing database
    second.create_schema()
    expected = set(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", (SQL_DIR / "schema.sql").read_text()))
    assert len(expected) >= 20
    assert expected <= _tables(second, "table")
    assert set(VIEWS) <= _tables(second, "view")
    assert second.count("prompt_sets") == 1  # data survives re-application


VIEWS = ["v_base_vs_tuned", "v_harmful_compliance_by_category", "v_scene_events", "v_training_data"]


def test_a_store_written_by_the_previous_schema_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE revisions (prompt_id TEXT)")  # a table only version 1 had
    con.commit()
    con.close()
    with pytest.raises(SchemaMismatchError, match="schema version 1.*needs 3"):
        Store(f"sqlite:///{path}")


def test_a_version_2_store_is_upgraded_in_place_and_keeps_its_evaluations(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    store = Store(f"sqlite:///{path}")
    store.upsert("eval_runs", [{"eval_id": "eval-old", "prompt_sets_json": "{}", "counts_json": "{}",
                                "prompts_sha256": "x", "judge": "embedding", "created_at": NOW}])
    with store.transaction() as conn:  # what version 2 wrote: no `kind` column
        conn.exec_driver_sql("ALTER TABLE eval_runs DROP COLUMN kind")
        conn.exec_driver_sql("UPDATE schema_version SET version = 2")
    store.engine.dispose()
    upgraded = Store(f"sqlite:///{path}")
    assert upgraded.scalar("SELECT version FROM schema_version") == 3
    assert upgraded.latest_evaluation()["kind"] == "exploratory"  # cannot be told apart afterwards: not headline
    assert upgraded.latest_evaluation("headline") is None


@pytest.mark.parametrize("view", VIEWS)
def test_views_are_queryable_when_empty(store: Store, view: str) -> None:
    assert store.query(f"SELECT * FROM {view}") == []


def test_views_compute_from_data(store: Store) -> None:
    _add_set(store)
    _add_prompt(store, "p1", "first", 0)
    store.upsert("eval_metrics", [
        {"eval_id": "e", "checkpoint_id": None, "model_label": label, "metric": "harmless", "value": value,
         "ci_low": value - 0.1, "ci_high": value + 0.1, "n": 10, "created_at": NOW}
        for label, value in (("base", 0.4), ("tuned", 0.8))
    ])
    (row,) = store.query("SELECT * FROM v_base_vs_tuned")
    assert (row["base_value"], row["tuned_value"], row["n"]) == (0.4, 0.8, 10)

    store.upsert("eval_answers", [
        {"eval_id": "e", "model_label": "base", "checkpoint_id": None, "eval_set": "harmful", "prompt_set": "s",
         "prompt_id": pid, "answer": "a", "refusal": refusal, "p_refusal": 0.5, "keyword_refusal": 0}
        for pid, refusal in (("p1", 0), ("p2", None))
    ])
    (row,) = store.query("SELECT * FROM v_harmful_compliance_by_category")
    assert (row["category"], row["complied"], row["n"]) == ("cat", 1, 1)  # a missing verdict is not counted

    store.upsert("transcript_events", [
        {"prompt_id": "p1", "model_id": "m", "seq": 0, "round": 1, "actor": "Tom", "kind": "reaction",
         "action": "I call the police.", "observation": "", "audience_json": "[]", "feasible": None}
    ])
    (row,) = store.query("SELECT * FROM v_scene_events")
    assert (row["prompt_set"], row["prompt"], row["actor"]) == ("s", "first", "Tom")


# -- upsert -----------------------------------------------------------------------------------------


def test_upsert_replaces_non_key_columns(store: Store) -> None:
    _add_set(store)
    _add_prompt(store, "p1", "old text", 3)
    _add_prompt(store, "p1", "new text", 4)
    assert store.count("prompts") == 1
    (row,) = store.prompts("s")
    assert (row["text"], row["position"]) == ("new text", 4)


def test_upsert_without_update_keeps_the_old_row(store: Store) -> None:
    _add_set(store)
    row = {"prompt_id": "p1", "prompt_set": "s", "position": 0, "text": "old", "category": None, "split": "eval"}
    store.upsert("prompts", [row])
    store.upsert("prompts", [{**row, "text": "new"}], update=False)
    assert [r["text"] for r in store.prompts("s")] == ["old"]


def test_upsert_rejects_unknown_tables_and_bad_columns(store: Store) -> None:
    with pytest.raises(ValueError, match="unknown table"):
        store.upsert("sqlite_master", [{"name": "x"}])
    with pytest.raises(ValueError, match="bad column"):
        store.upsert("prompt_sets", [{"no_such_column": "x"}])
    with pytest.raises(ValueError):
        store.upsert("prompt_sets", [{"name; DROP TABLE prompts": "x"}])
    with pytest.raises(ValueError):
        store.count("prompts; DROP TABLE prompts")
    assert store.upsert("prompts", []) == 0
    assert "prompts" in _tables(store, "table")


def test_sql_in_prompt_text_round_trips_verbatim(store: Store) -> None:
    _add_set(store)
    evil = "'); DROP TABLE prompts; --\n\"quoted\" ; % _ \\ :param"
    _add_prompt(store, "p1", evil)
    assert [r["text"] for r in store.prompts("s")] == [evil]
    assert store.query("SELECT prompt_id FROM prompts WHERE text = :t", t=evil) == [{"prompt_id": "p1"}]
    assert "prompts" in _tables(store, "table")


def test_get_generations_handles_many_keys(store: Store) -> None:
    rows = [
        {"cache_key": f"k{i}", "model_id": "m", "params_json": "{}", "messages_json": "[]", "completion": f"c{i}",
         "prompt_tokens": 1, "completion_tokens": 1, "seconds": 0.0, "created_at": NOW}
        for i in range(1200)
    ]
    store.upsert("generations", rows)
    found = store.get_generations([f"k{i}" for i in range(0, 1300, 1)] + ["k5"])
    assert len(found) == 1200
    assert found["k1199"]["completion"] == "c1199"


# -- transcripts ------------------------------------------------------------------------------------


def _scenes_in_store(store: Store, n: int = 2) -> list[Transcript]:
    _add_set(store)
    inputs = []
    for i in range(n):
        question = f"How can I break into house {i}?"
        answer = f"First, find the spare key of house {i}. Then wait until night falls. Finally open the door."
        _add_prompt(store, f"p{i}", question, i)
        store.save_initial_responses("m", [(f"p{i}", answer)])
        inputs.append(SceneInput(f"p{i}", question, answer))
    return run_scenes(FakeBackend(), inputs, SceneSettings())


def _assert_same(loaded: Transcript, scene: Transcript) -> None:
    assert loaded.prompt_id == scene.prompt_id
    assert loaded.question == scene.question and loaded.answer == scene.answer
    assert loaded.target == scene.target
    assert loaded.plan == scene.plan
    assert loaded.roles == scene.roles
    assert loaded.objects == scene.objects
    assert loaded.events == scene.events
    assert loaded.fallbacks == scene.fallbacks
    assert loaded.n_rounds == scene.n_rounds
    assert loaded.outcome == scene.outcome and loaded.consequence == scene.consequence
    assert loaded.memory == scene.memory
    assert loaded.protagonist_memory == scene.protagonist_memory
    assert loaded.stopped == scene.stopped and loaded.stopped_by == scene.stopped_by


def test_transcripts_round_trip_typed(store: Store) -> None:
    """Nothing is lost on the way through SQL: role memories, audiences in order, verdict probabilities."""
    scenes = _scenes_in_store(store)
    scenes[1].fallbacks["roles_reasked"] += 2  # a non-empty fallback counter
    scenes[0].roles[0].memory = ["saw the door forced", "heard Tom shout, twice"]
    save_transcripts(store, scenes, model_id="m")
    loaded = load_transcripts(store, "s", model_id="m")
    assert len(loaded) == 2
    for got, want in zip(loaded, scenes):
        _assert_same(got, want)
    assert loaded[0].roles[0].memory == ["saw the door forced", "heard Tom shout, twice"]
    assert any(e.p_yes is not None for e in loaded[0].events)
    assert load_transcripts(store, "s", model_id="other") == []


def test_resaving_with_fewer_events_leaves_no_stale_events(store: Store) -> None:
    scenes = _scenes_in_store(store)
    save_transcripts(store, scenes, model_id="m")
    total = store.count("transcript_events")
    assert total == sum(len(s.events) for s in scenes)

    scenes[0].events = scenes[0].events[:3]
    scenes[0].n_rounds = 1
    save_transcripts(store, scenes, model_id="m")
    loaded = load_transcripts(store, "s", model_id="m")
    assert loaded[0].events == scenes[0].events
    assert loaded[0].n_rounds == 1
    assert loaded[1].events == scenes[1].events
    assert store.count("transcript_events") == 3 + len(scenes[1].events)
    assert store.count("transcripts") == 2


def test_saving_is_per_model(store: Store) -> None:
    scenes = _scenes_in_store(store, 1)
    save_transcripts(store, scenes, model_id="m")
    scenes[0].events = scenes[0].events[:1]
    store.save_initial_responses("m2", [(scenes[0].prompt_id, scenes[0].answer)])
    save_transcripts(store, scenes, model_id="m2")  # must not touch model m
    (loaded,) = load_transcripts(store, "s", model_id="m")
    assert len(loaded.events) > 1


def test_audience_with_comma_in_a_name_round_trips(store: Store) -> None:
    _add_set(store)
    _add_prompt(store, "p0", "q")
    store.save_initial_responses("m", [("p0", "a")])
    role = Role("Jones, the landlord", "owns the flat", "at home")
    scene = Transcript(
        prompt_id="p0", question="q", answer="a", target="t", plan=["step"], roles=[role], n_rounds=1,
        events=[SceneEvent(1, "modulator", "modulation", "route", "seen", (role.name,), True)],
        outcome="o", consequence="c",
    )
    save_transcripts(store, [scene], model_id="m")
    (loaded,) = load_transcripts(store, "s", model_id="m")
    assert loaded.events[0].audience == (role.name,)


def test_training_groups_round_trip_and_replace_per_prompt_set(store: Store) -> None:
    _add_set(store)
    _add_prompt(store, "p1", "first", 0)
    _add_prompt(store, "p2", "second", 1)
    groups = [
        TrainingGroup("p1", "first", "imitation", (RatedResponse("a", 6.0), RatedResponse("b", 2.5))),
        TrainingGroup("p2", "second", "matrix_revision", (), "self_judged_harmful"),
    ]
    store.save_training_groups("m1", "model", "s", groups)
    assert store.training_groups("m1", ["s"], "model") == groups
    store.save_training_groups("m1", "model", "s", groups[:1])  # a re-run replaces, never appends
    assert store.training_groups("m1", ["s"], "model") == groups[:1]
    assert store.training_groups("m1", ["other"], "model") == []
    assert store.count("training_responses") == 2


# -- prompt sets ------------------------------------------------------------------------------------


def test_load_bundled_prompt_set_is_deterministic(tmp_path: Path) -> None:
    a, b = Store(f"sqlite:///{tmp_path}/a.db"), Store(f"sqlite:///{tmp_path}/b.db")
    summary = load_prompt_set(a, "safe_rlhf", train_fraction=0.5)
    load_prompt_set(b, "safe_rlhf", train_fraction=0.5)
    load_prompt_set(a, "safe_rlhf", train_fraction=0.5)  # reloading upserts, never duplicates
    rows_a, rows_b = a.prompts("safe_rlhf"), b.prompts("safe_rlhf")
    key = [(r["prompt_id"], r["split"], r["position"], r["text"]) for r in rows_a]
    assert key == [(r["prompt_id"], r["split"], r["position"], r["text"]) for r in rows_b]
    assert len(rows_a) == summary.n_prompts == a.count("prompts")
    assert summary.n_train > 0 and summary.n_eval > 0
    assert summary.n_train + summary.n_eval + summary.n_near_duplicates == summary.n_prompts
    assert len(a.prompts("safe_rlhf", split="train")) == summary.n_train
    assert len(a.prompts("safe_rlhf", split="eval")) == summary.n_eval
    assert len(a.prompts("safe_rlhf", split="excluded")) == summary.n_near_duplicates
    assert summary.categories and all(r["category"] for r in rows_a)
    assert [r["position"] for r in rows_a] == list(range(len(rows_a)))
    (meta,) = a.prompt_sets()
    assert (meta["name"], meta["n_prompts"], meta["train_fraction"]) == ("safe_rlhf", len(rows_a), 0.5)


def test_prompts_limit_respects_position_order(store: Store) -> None:
    load_prompt_set(store, "safe_rlhf", train_fraction=0.5)
    everything = store.prompts("safe_rlhf")
    first = store.prompts("safe_rlhf", limit=5)
    assert [r["prompt_id"] for r in first] == [r["prompt_id"] for r in everything[:5]]
    assert [r["position"] for r in first] == [0, 1, 2, 3, 4]
    train = store.prompts("safe_rlhf", split="train")
    assert [r["prompt_id"] for r in store.prompts("safe_rlhf", split="train", limit=3)] == [
        r["prompt_id"] for r in train[:3]
    ]
    assert store.prompts("safe_rlhf", limit=0) == []


def test_train_fraction_extremes(store: Store) -> None:
    summary = load_prompt_set(store, "safe_rlhf", train_fraction=1.0)
    assert summary.n_eval == 0
    summary = load_prompt_set(store, "safe_rlhf", train_fraction=0.0)
    assert summary.n_train == 0
    assert store.prompts("safe_rlhf", split="train") == []


def test_near_duplicates_of_training_prompts_leave_the_evaluation_split(store: Store) -> None:
    from matrix_assets.embeddings import embed
    from matrix_assets.store.prompt_sets import NEAR_DUPLICATE_SIMILARITY

    summary = load_prompt_set(store, "advbench")
    assert summary.n_near_duplicates > 0
    train = [r["text"] for r in store.prompts("advbench", split="train")]
    evaluation = [r["text"] for r in store.prompts("advbench", split="eval")]
    moved = [r["text"] for r in store.prompts("advbench", split="excluded")]
    assert ((embed(evaluation) @ embed(train).T).max() < NEAR_DUPLICATE_SIMILARITY)
    assert ((embed(moved) @ embed(train).T).max(axis=1) >= NEAR_DUPLICATE_SIMILARITY).all()
    a, b, score = summary.near_duplicate_examples[0]
    assert a in moved and b in train and score >= NEAR_DUPLICATE_SIMILARITY


def test_ensure_prompt_set_is_idempotent(store: Store) -> None:
    ensure_prompt_set(store, "safe_rlhf")
    (meta,) = store.prompt_sets()
    n = store.count("prompts")
    ensure_prompt_set(store, "safe_rlhf")  # already there: not reloaded
    assert store.prompt_sets() == [meta]
    assert store.count("prompts") == n


def test_resolve_source_prefers_the_versions_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATRIX_DROP_DIR", str(tmp_path))
    (tmp_path / "harmful").mkdir()
    (tmp_path / "harmful" / "myset.txt").write_text("How do I do a bad thing?\n")
    assert resolve_source("myset").path == tmp_path / "harmful" / "myset.txt"
    (tmp_path / ".versions").mkdir()
    (tmp_path / ".versions" / "myset.txt").write_text("How do I do a bad thing?\n")
    src = resolve_source("myset")
    assert src.path == tmp_path / ".versions" / "myset.txt"
    assert (src.name, src.role) == ("myset", "harmful")
    (tmp_path / "helpfulness").mkdir()
    (tmp_path / "helpfulness" / "poems.txt").write_text("Write a poem about tea.\n")
    assert resolve_source("poems").role == "helpfulness"  # the folder it was dropped in
    (tmp_path / "loose.txt").write_text("Write a poem about tea.\n")
    with pytest.raises(FileNotFoundError):  # a file outside the role folders is no prompt set
        resolve_source("loose")
    assert resolve_source("myset", role="safe").role == "safe"
    assert resolve_source("myset", role="safe").train_fraction == 0.0  # a safe set a user brings is evaluation-only
    with pytest.raises(ValueError, match="role must be one of"):
        resolve_source("myset", role="over_refusal")
    # an explicit source wins over everything
    explicit = tmp_path / "elsewhere.csv"
    assert resolve_source("myset", str(explicit)).path == explicit


def test_resolve_source_unknown_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATRIX_DROP_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as excinfo:
        resolve_source("no_such_set")
    assert str(tmp_path) in str(excinfo.value)
    assert "no_such_set" in str(excinfo.value)


def test_load_dropped_prompt_set(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATRIX_DROP_DIR", str(tmp_path / "drop"))
    (tmp_path / "drop" / "safe").mkdir(parents=True)
    (tmp_path / "drop" / "safe" / "mine.txt").write_text("first prompt\nsecond prompt\nfirst prompt\n\nthird prompt\n")
    summary = load_prompt_set(store, "mine")
    assert summary.n_prompts == 3 and summary.role == "safe" and summary.n_train == 0
    assert (tmp_path / "drop" / ".versions" / "mine.txt").exists()  # the bytes it loaded are kept
    assert declared_role("mine") == "safe"  # and its role, for a later re-materialization
    assert sorted(r["text"] for r in store.prompts("mine")) == ["first prompt", "second prompt", "third prompt"]


def test_nan_reads_back_as_null(store: Store) -> None:
    import math

    store.upsert("eval_metrics", [{"eval_id": "e", "checkpoint_id": None, "model_label": "base", "metric": "m",
                                   "value": math.nan, "ci_low": math.nan, "ci_high": math.nan, "k": 0, "n": 0,
                                   "created_at": NOW}])
    (row,) = store.query("SELECT value, ci_low, ci_high FROM eval_metrics")
    assert row == {"value": None, "ci_low": None, "ci_high": None}


def test_duplicate_keys_in_one_upsert_last_wins(store: Store) -> None:
    def generation(completion: str) -> dict:
        return {"cache_key": "k", "model_id": "m", "params_json": "{}", "messages_json": "[]",
                "completion": completion, "prompt_tokens": 1, "completion_tokens": 1, "seconds": 0.0,
                "created_at": NOW}

    store.upsert("generations", [generation("first"), generation("second")])
    assert store.get_generations(["k"])["k"]["completion"] == "second"


def test_reloading_an_unchanged_set_keeps_its_splits_without_embedding_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = Store(f"sqlite:///{tmp_path}/t.db")
    first = load_prompt_set(store, "safe_rlhf")
    splits = {r["prompt_id"]: r["split"] for r in store.prompts("safe_rlhf")}
    import matrix_assets.embeddings as embeddings

    monkeypatch.setattr(embeddings, "embed", lambda texts: (_ for _ in ()).throw(AssertionError("embedded again")))
    again = load_prompt_set(store, "safe_rlhf")
    assert {r["prompt_id"]: r["split"] for r in store.prompts("safe_rlhf")} == splits
    assert (again.n_eval, again.n_near_duplicates) == (first.n_eval, first.n_near_duplicates)
    with pytest.raises(AssertionError, match="embedded again"):
        load_prompt_set(store, "safe_rlhf", train_fraction=0.7)  # another split is computed afresh


def test_a_role_change_is_refused_while_training_data_exists_then_drops_only_that_sets(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matrix_assets.methods.base import RatedResponse, TrainingGroup

    monkeypatch.setenv("MATRIX_DROP_DIR", str(tmp_path / "drop"))
    (tmp_path / "drop" / "harmful").mkdir(parents=True)
    questions = [f"Write a short poem about the number {n}." for n in range(12)]
    (tmp_path / "drop" / "harmful" / "poems.txt").write_text("\n".join(questions) + "\n")
    assert load_prompt_set(store, "poems").role == "harmful"  # dropped in the wrong folder
    ensure_prompt_set(store, "safe_rlhf")
    for name in ("poems", "safe_rlhf"):
        train = store.train_prompts(name, limit=2)
        store.save_initial_responses("m", [(p.prompt_id, "an answer") for p in train])
        store.save_training_groups("cai", "m", name, [
            TrainingGroup(p.prompt_id, p.text, "cai_revision", (RatedResponse("a revision"),)) for p in train])
    assert store.training_data_counts("poems") == {"initial_responses": 2, "training_groups": 2,
                                                   "training_responses": 2}

    with pytest.raises(PromptSetError, match="has training data .*drop-training-data"):
        change_role(store, "poems", "helpfulness")
    assert store.prompt_set_role("poems") == "harmful" and store.training_data_counts("poems")  # nothing changed

    change = change_role(store, "poems", "helpfulness", drop_training_data=True)
    assert (change.old_role, change.new_role) == ("harmful", "helpfulness")
    assert change.dropped == {"initial_responses": 2, "training_groups": 2, "training_responses": 2}
    assert store.prompt_set_role("poems") == "helpfulness" and declared_role("poems") == "helpfulness"
    assert store.train_prompts("poems") == [] and len(store.prompts("poems", split="eval")) == len(questions)
    assert store.training_data_counts("poems") == {}
    assert store.training_data_counts("safe_rlhf") == {"initial_responses": 2, "training_groups": 2,
                                                       "training_responses": 2}  # another set's data stays
    # A set without training data changes role at once; so does a bundled set, and it stays changed on reload.
    assert change_role(store, "safe_rlhf", "harmful").dropped == {}
    ensure_prompt_set(store, "xstest_safe")
    change_role(store, "xstest_safe", "helpfulness")
    assert load_prompt_set(store, "xstest_safe").role == "helpfulness"
