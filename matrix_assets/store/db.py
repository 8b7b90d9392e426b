"""The project's database, through SQLAlchemy Core.

SQLite (a file, WAL mode) is the embedded default; PostgreSQL is the production database. The DDL in
`sql/schema.sql` and `sql/views.sql` is the single source of truth for the schema and is applied here.
Every statement is parameterised; table and column names only ever come from sql/schema.sql (the tables it
declares, their columns and primary keys as the database reports them), never from input. The store owns
every query of the project and hands back typed records.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import math
import re
import types
import typing
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from matrix_assets.methods.base import InitialResponse, PromptRecord
from matrix_assets.records import RatedResponse, TrainingGroup
from matrix_assets.settings import default_database_url

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
SCHEMA_VERSION = 3  # bump with every change of a table's shape in sql/schema.sql
# Older versions this one upgrades in place (version -> statements to the next), so that nothing computed is lost.
_MIGRATIONS = {
    # 2 -> 3: evaluations are labelled headline or exploratory; earlier ones cannot be told apart afterwards.
    2: ["ALTER TABLE eval_runs ADD COLUMN kind TEXT NOT NULL DEFAULT 'exploratory'"],
}

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")
_CREATE_TABLE = re.compile(r"CREATE TABLE IF NOT EXISTS (\w+)", re.IGNORECASE)
_CREATE_VIEW = re.compile(r"^CREATE VIEW (\w+) AS", re.IGNORECASE)
# Any constant: serialises schema creation between processes that start at once on one PostgreSQL database.
_SCHEMA_LOCK_ID = 0x6D61747269780001


class SchemaMismatchError(RuntimeError):
    """The database was written by a version of matrix-assets with another schema."""


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")  # no same-second ties


def _set_wal(cursor: Any, attempts: int = 100) -> None:
    """Switching a new file to WAL needs an exclusive lock and can fail with "database is locked" without
    waiting for the busy timeout while another process opens the same new file: retry for up to ~10 s."""
    import sqlite3
    import time

    for attempt in range(attempts):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.1)




def _split_sql(script: str) -> list[str]:
    # Comments go first (a semicolon may appear in one); the DDL has no string literal containing "--".
    lines = [line.split("--", 1)[0].rstrip() for line in script.splitlines()]
    return [stmt.strip() for stmt in "\n".join(lines).split(";") if stmt.strip()]


def schema_tables() -> list[str]:
    """The tables sql/schema.sql declares: the only names generated SQL may ever contain."""
    return _CREATE_TABLE.findall((SQL_DIR / "schema.sql").read_text())


class Store:
    """Typed access to the project's tables. Create one per process; it is cheap to keep around."""

    def __init__(self, url: str | None = None, *, create: bool = True) -> None:
        self.url = url or default_database_url()
        self.engine: Engine = self._make_engine(self.url)
        if create:
            self.create_schema()
        self._tables = self._reflect_tables()

    def _reflect_tables(self) -> dict[str, tuple[tuple[str, ...], frozenset[str]]]:
        """Each schema table's primary key (the upsert conflict key) and columns, read from the database, so
        sql/schema.sql stays the only place they are written."""
        inspector = sa.inspect(self.engine)
        existing = set(inspector.get_table_names())
        tables = {}
        for name in schema_tables():
            if name in existing:
                keys = tuple(inspector.get_pk_constraint(name)["constrained_columns"])
                columns = frozenset(c["name"] for c in inspector.get_columns(name))
                tables[name] = (keys, columns)
        return tables

    @staticmethod
    def _make_engine(url: str) -> Engine:
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(url, connect_args={"timeout": 60})

            @sa.event.listens_for(engine, "connect")
            def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
                cursor = dbapi_conn.cursor()
                # WAL lets Dagster runs of two partitions read while one writes; busy_timeout makes writers wait.
                _set_wal(cursor)
                cursor.execute("PRAGMA busy_timeout=60000")
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.close()

            return engine
        for scheme in ("postgresql://", "postgres://"):
            if url.startswith(scheme):
                # sqlalchemy 2.1 changes the default driver; name psycopg2 explicitly.
                url = "postgresql+psycopg2://" + url[len(scheme) :]
        return sa.create_engine(url, pool_pre_ping=True)

    def create_schema(self) -> None:
        with self._sqlite_schema_lock():
            self._create_schema()

    @contextmanager
    def _sqlite_schema_lock(self) -> Iterator[None]:
        """pysqlite autocommits DDL, so two processes creating the schema of one new SQLite file at once can
        interleave DROP VIEW / CREATE VIEW ("view already exists"): on SQLite files they take turns on a lock file."""
        path = self.url.split("///", 1)[-1] if self.url.startswith("sqlite") else ""
        if not path or path == ":memory:":
            yield
            return
        import fcntl

        with open(f"{path}.schema-lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _create_schema(self) -> None:
        views = _split_sql((SQL_DIR / "views.sql").read_text())
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Concurrent CREATE TABLE IF NOT EXISTS of the same table can fail on PostgreSQL (unique violation
                # in pg_type), e.g. when several Dagster step processes start on a fresh database: take turns.
                # Everything below then runs in this one transaction, so nobody ever sees a view missing.
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": _SCHEMA_LOCK_ID})
            for stmt in _split_sql((SQL_DIR / "schema.sql").read_text()):
                conn.exec_driver_sql(stmt)
            self._check_version(conn)
            if conn.dialect.name == "sqlite" and self._sqlite_views_current(conn, views):
                # pysqlite autocommits each DDL statement: dropping and re-creating an unchanged view would leave
                # a moment in which another process's query of it fails.
                return
            for stmt in views:
                conn.exec_driver_sql(stmt)

    def _check_version(self, conn: Connection) -> None:
        stored = conn.execute(sa.text("SELECT version FROM schema_version WHERE id = 1")).scalar()
        if stored is None:
            # A new database, or one from before versioning: version 1 had a `revisions` table.
            if "revisions" in sa.inspect(conn).get_table_names():
                raise SchemaMismatchError(self._mismatch(1))
            conn.execute(sa.text("INSERT INTO schema_version (id, version) VALUES (1, :v)"), {"v": SCHEMA_VERSION})
        elif stored < SCHEMA_VERSION and all(v in _MIGRATIONS for v in range(int(stored), SCHEMA_VERSION)):
            for version in range(int(stored), SCHEMA_VERSION):
                for stmt in _MIGRATIONS[version]:
                    conn.exec_driver_sql(stmt)
            conn.execute(sa.text("UPDATE schema_version SET version = :v WHERE id = 1"), {"v": SCHEMA_VERSION})
        elif stored != SCHEMA_VERSION:
            raise SchemaMismatchError(self._mismatch(int(stored)))

    def _mismatch(self, found: int) -> str:
        where = self.url.split("///", 1)[-1] if self.url.startswith("sqlite") else "the database"
        return (f"the store at {where} has schema version {found}; this version of matrix-assets needs "
                f"{SCHEMA_VERSION}. Keep the old state by moving it away (e.g. `mv .matrix .matrix-old`, or point "
                "MATRIX_HOME / MATRIX_DATABASE_URL elsewhere) and run again: every stage is recomputed.")

    @staticmethod
    def _sqlite_views_current(conn: Connection, views: Sequence[str]) -> bool:
        wanted = {m.group(1): stmt for stmt in views if (m := _CREATE_VIEW.match(stmt))}
        stored = dict(conn.exec_driver_sql("SELECT name, sql FROM sqlite_master WHERE type = 'view'").all())
        return all(stored.get(name) == stmt for name, stmt in wanted.items())

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # -- generic helpers -------------------------------------------------------------------------

    def upsert(self, table: str, rows: Sequence[Mapping[str, Any]], *, conn: Connection | None = None,
               update: bool = True) -> int:
        """Insert rows; on a key conflict replace the non-key columns (or keep the old row)."""
        if not rows:
            return 0
        keys, known = self._table(table)
        columns = list(rows[0].keys())
        for name in columns:
            if not _IDENTIFIER.match(name) or name not in known:
                raise ValueError(f"bad column name {name!r} for table {table!r}")
        non_keys = [c for c in columns if c not in keys]
        # Rows in key order: concurrent PostgreSQL transactions that upsert overlapping keys then lock them in the
        # same order and cannot deadlock (the sort is stable, so the last of duplicate keys still wins).
        # NaN becomes NULL, as SQLite stores it, so that both databases read back None.
        params = sorted(
            ({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows),
            key=lambda r: tuple(str(r.get(k)) for k in keys),
        )
        conflict = (
            f"DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in non_keys)}" if update and non_keys else "DO NOTHING"
        )
        stmt = sa.text(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(':' + c for c in columns)}) "
            f"ON CONFLICT ({', '.join(keys)}) {conflict}"
        )
        if conn is not None:
            conn.execute(stmt, params)
        else:
            with self.engine.begin() as own:
                own.execute(stmt, params)
        return len(rows)

    def query(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(sa.text(sql), params)]

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar()

    def _table(self, table: str) -> tuple[tuple[str, ...], frozenset[str]]:
        if table not in self._tables:
            raise ValueError(f"unknown table {table!r}")
        return self._tables[table]

    def count(self, table: str) -> int:
        self._table(table)
        return int(self.scalar(f"SELECT COUNT(*) FROM {table}"))

    # -- generation cache ------------------------------------------------------------------------

    def get_generations(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, dict[str, Any]] = {}
        stmt = sa.text(
            "SELECT cache_key, completion, prompt_tokens, completion_tokens FROM generations "
            "WHERE cache_key IN :keys"
        ).bindparams(sa.bindparam("keys", expanding=True))
        with self.engine.connect() as conn:
            for start in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
                chunk = keys[start : start + 500]
                for row in conn.execute(stmt, {"keys": chunk}):
                    found[row.cache_key] = dict(row._mapping)
        return found

    def save_generations(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Cache rows are immutable: a key already stored keeps its first answer."""
        self.upsert("generations", rows, update=False)

    # -- prompts ---------------------------------------------------------------------------------

    def prompts(self, prompt_set: str, split: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM prompts WHERE prompt_set = :s"
        params: dict[str, Any] = {"s": prompt_set}
        if split:
            sql += " AND split = :split"
            params["split"] = split
        sql += " ORDER BY position"
        if limit is not None:
            sql += " LIMIT :limit"
            params["limit"] = int(limit)
        return self.query(sql, **params)

    def prompt_sets(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM prompt_sets ORDER BY name")

    # -- typed records ----------------------------------------------------------------------------------

    def save_records(self, table: str, records: Sequence[Any], *, conn: Connection | None = None,
                     **columns: Any) -> int:
        """Upsert dataclass records into `table`: each field is a column of the same name (a list, dict or
        nested dataclass field goes to `NAME_json` as JSON), plus the fixed `columns` (method, model_id, ...);
        `created_at` is filled in when the table has it."""
        _, known = self._table(table)
        now = utcnow()
        rows = []
        for record in records:
            row = dict(columns)
            for name, value in _record_fields(record).items():
                row[name if name in known else f"{name}_json"] = value
            if "created_at" in known and "created_at" not in row:
                row["created_at"] = now
            rows.append(row)
        return self.upsert(table, rows, conn=conn)

    def load_records(self, table: str, record_type: type[T], *, prompt_set: str | None = None,
                     limit: int | None = None, **filters: Any) -> list[T]:
        """Records of `record_type` from `table`, decoded by the dataclass's field types (JSON columns back into
        lists, dicts and nested dataclasses). `prompt_set` keeps the rows whose prompt belongs to that set, in
        the set's order; other `filters` are column = value."""
        keys, known = self._table(table)
        hints = typing.get_type_hints(record_type)
        names = [f.name for f in dataclasses.fields(record_type) if f.init]
        selected = [n if n in known else f"{n}_json" for n in names]
        for column in [*selected, *filters]:
            if column not in known:
                raise ValueError(f"table {table!r} has no column {column!r}")
        where = [f"t.{column} = :f_{column}" for column in filters]
        params: dict[str, Any] = {f"f_{column}": value for column, value in filters.items()}
        join, order = "", ", ".join(f"t.{k}" for k in keys)
        if prompt_set is not None:
            join = " JOIN prompts p ON p.prompt_id = t.prompt_id"
            where.append("p.prompt_set = :prompt_set")
            params["prompt_set"] = prompt_set
            order = f"p.position, {order}"
        sql = f"SELECT {', '.join('t.' + c for c in selected)} FROM {table} t{join}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY {order}"
        if limit is not None:
            sql += " LIMIT :limit"
            params["limit"] = int(limit)
        out = []
        for row in self.query(sql, **params):
            values = {name: _decode(hints[name], row[column]) for name, column in zip(names, selected)}
            out.append(record_type(**values))
        return out

    def delete_rows(self, table: str, *, conn: Connection | None = None, **filters: Any) -> None:
        """DELETE FROM table WHERE column = value AND ...: replacing a stage's rows, never appending to them."""
        _, known = self._table(table)
        if not filters or any(column not in known for column in filters):
            raise ValueError(f"bad filters for {table!r}: {sorted(filters)}")
        stmt = sa.text(f"DELETE FROM {table} WHERE " + " AND ".join(f"{c} = :{c}" for c in filters))
        if conn is not None:
            conn.execute(stmt, filters)
        else:
            with self.engine.begin() as own:
                own.execute(stmt, filters)

    # -- prompts and the shared stages ---------------------------------------------------------------------

    def train_prompts(self, prompt_set: str, limit: int | None = None) -> list[PromptRecord]:
        return [PromptRecord(r["prompt_id"], r["text"], r["category"])
                for r in self.prompts(prompt_set, split="train", limit=limit)]

    def initial_responses(self, prompt_set: str, model_id: str, limit: int | None = None) -> list[InitialResponse]:
        """The model's direct answers to the set's training prompts, in the set's order."""
        sql = ("SELECT p.prompt_id, p.text AS prompt, r.response, p.category FROM initial_responses r "
               "JOIN prompts p ON p.prompt_id = r.prompt_id "
               "WHERE p.prompt_set = :s AND r.model_id = :m AND p.split = 'train' ORDER BY p.position")
        params: dict[str, Any] = {"s": prompt_set, "m": model_id}
        if limit is not None:
            sql += " LIMIT :limit"
            params["limit"] = int(limit)
        return [InitialResponse(r["prompt_id"], r["prompt"], r["response"], r["category"])
                for r in self.query(sql, **params)]

    def save_initial_responses(self, model_id: str, answers: Sequence[tuple[str, str]]) -> None:
        now = utcnow()
        self.upsert("initial_responses", [{"prompt_id": pid, "model_id": model_id, "response": text,
                                            "created_at": now} for pid, text in answers])

    # -- training data -------------------------------------------------------------------------------------

    def save_training_groups(self, method: str, model_id: str, prompt_set: str,
                             groups: Sequence[TrainingGroup]) -> None:
        """Replace the method's training groups of one prompt set (a re-run with other settings leaves no stale
        group behind), in one transaction."""
        now = utcnow()
        with self.transaction() as conn:
            for table in ("training_responses", "training_groups"):
                stmt = (f"DELETE FROM {table} WHERE method = :m AND model_id = :mid AND group_id IN "
                        "(SELECT group_id FROM training_groups WHERE method = :m AND model_id = :mid "
                        "AND prompt_set = :s)")
                conn.execute(sa.text(stmt), {"m": method, "mid": model_id, "s": prompt_set})
            self.upsert("training_groups", [
                {"method": method, "model_id": model_id, "group_id": g.group_id, "prompt_set": prompt_set,
                 "prompt_id": g.prompt_id, "kind": g.kind, "prompt": g.prompt, "excluded": g.excluded,
                 "created_at": now} for g in groups
            ], conn=conn)
            self.upsert("training_responses", [
                {"method": method, "model_id": model_id, "group_id": g.group_id, "position": i, "text": r.text,
                 "rating": r.rating} for g in groups for i, r in enumerate(g.responses)
            ], conn=conn)

    def training_groups(self, method: str, prompt_sets: Sequence[str], model_id: str) -> list[TrainingGroup]:
        """A method's groups over the prompt sets, excluded ones included (their `excluded` says why)."""
        stmt = sa.text(
            "SELECT g.group_id, g.prompt_id, g.prompt, g.kind, g.excluded, r.text, r.rating "
            "FROM training_groups g JOIN prompts p ON p.prompt_id = g.prompt_id "
            "LEFT JOIN training_responses r ON r.method = g.method AND r.model_id = g.model_id "
            "AND r.group_id = g.group_id "
            "WHERE g.method = :m AND g.model_id = :mid AND g.prompt_set IN :sets "
            "ORDER BY g.prompt_set, p.position, g.kind, r.position"
        ).bindparams(sa.bindparam("sets", expanding=True))
        groups: dict[str, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for row in conn.execute(stmt, {"m": method, "mid": model_id, "sets": list(prompt_sets)}):
                group = groups.setdefault(row.group_id, {"row": row, "responses": []})
                if row.text is not None:
                    group["responses"].append(RatedResponse(row.text, row.rating))
        return [TrainingGroup(g["row"].prompt_id, g["row"].prompt, g["row"].kind, tuple(g["responses"]),
                              g["row"].excluded) for g in groups.values()]

    def save_training_set(self, dataset: Any, path: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """A method's training set (`methods.mixing.TrainingSet`) and its examples, in one transaction."""
        with self.transaction() as conn:
            self.upsert("sft_datasets", [{
                "dataset_id": dataset.dataset_id, "method": dataset.method, "trainer": dataset.trainer,
                "prompt_sets_json": json.dumps(list(dataset.prompt_sets)), "path": path,
                "n_examples": dataset.n_examples, "n_groups": len(dataset.groups), "n_aligned": dataset.n_aligned,
                "n_benign": dataset.n_benign, "n_excluded": dataset.n_excluded, "created_at": utcnow(),
            }], conn=conn)
            self.upsert("sft_examples", [{"dataset_id": dataset.dataset_id, "position": i, **row}
                                         for i, row in enumerate(rows)], conn=conn)

    def training_examples(self, dataset_id: str) -> list[dict[str, Any]]:
        """The examples of a stored training set, in order (group_index, prompt_id, source, prompt, response,
        rating)."""
        return self.query("SELECT group_index, prompt_id, source, prompt, response, rating FROM sft_examples "
                          "WHERE dataset_id = :d ORDER BY position", d=dataset_id)

    def dataset(self, dataset_id: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM sft_datasets WHERE dataset_id = :d", d=dataset_id)
        return rows[0] if rows else None

    def evaluation_prompt_texts(self) -> list[str]:
        """Every prompt of every evaluation split in the store (for the train/eval disjointness check)."""
        return [r["text"] for r in self.query("SELECT DISTINCT text FROM prompts WHERE split = 'eval' ORDER BY text")]

    # Tables that hold no training data of a prompt set although they name its prompts: the set itself, the
    # generation cache (keyed by the messages, reused by whoever asks the same), the evaluation's records, and the
    # training sets and checkpoints already built (the record of what a checkpoint learned from).
    _NOT_TRAINING_DATA = frozenset({
        "schema_version", "prompt_sets", "prompts", "generations", "sft_datasets", "sft_examples", "checkpoints",
        "eval_runs", "eval_answers", "eval_pairwise", "eval_metrics", "eval_paired", "judge_agreement",
        "answer_labels"})

    def _training_data_tables(self) -> list[tuple[str, str]]:
        """(table, how its rows belong to a set) for every stage table of every method: by a `prompt_set`
        column, by a `prompt_id` of the set, or (rated responses) by a `group_id` of the set's training groups.
        Read from the schema, so a new method's tables are covered without naming them here."""
        out = []
        for table, (_, columns) in self._tables.items():
            if table in self._NOT_TRAINING_DATA:
                continue
            if "prompt_set" in columns:
                out.append((table, "prompt_set = :s"))
            elif "prompt_id" in columns:
                out.append((table, "prompt_id IN (SELECT prompt_id FROM prompts WHERE prompt_set = :s)"))
            elif "group_id" in columns and "training_groups" in self._tables:
                out.append((table, "EXISTS (SELECT 1 FROM training_groups g WHERE g.prompt_set = :s AND "
                                   f"g.method = {table}.method AND g.model_id = {table}.model_id AND "
                                   f"g.group_id = {table}.group_id)"))
        # Rows found through training_groups go before the groups themselves.
        return sorted(out, key=lambda t: t[0] == "training_groups")

    def training_data_counts(self, prompt_set: str) -> dict[str, int]:
        """Rows computed from the set's prompts on the way to training, per table (only tables that have any)."""
        counts = {table: int(self.scalar(f"SELECT COUNT(*) FROM {table} WHERE {where}", s=prompt_set))
                  for table, where in self._training_data_tables()}
        return {table: n for table, n in counts.items() if n}

    def delete_training_data(self, prompt_set: str) -> dict[str, int]:
        """Delete what `training_data_counts` counts, in one transaction; returns the counts deleted."""
        deleted = {}
        with self.transaction() as conn:
            for table, where in self._training_data_tables():
                n = conn.execute(sa.text(f"DELETE FROM {table} WHERE {where}"), {"s": prompt_set}).rowcount
                if n:
                    deleted[table] = int(n)
        return deleted

    def prompt_set_role(self, name: str) -> str | None:
        rows = self.query("SELECT role FROM prompt_sets WHERE name = :n", n=name)
        return rows[0]["role"] if rows else None

    # -- evaluation ---------------------------------------------------------------------------------------------

    def save_judge_agreement(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self.upsert("judge_agreement", rows)

    def latest_judge_agreement(self, judge: str, metric: str = "kappa", subset: str | None = None
                               ) -> dict[str, Any] | None:
        """The newest figure of a judge; `subset` names whose answers it was measured on (a validation measures
        several: XSTest's held-out chat model, the graded model's labelled answers)."""
        rows = self.query("SELECT * FROM judge_agreement WHERE judge = :j AND metric = :m AND "
                          "(:s IS NULL OR subset = :s) ORDER BY created_at DESC, validation_id DESC LIMIT 1",
                          j=judge, m=metric, s=subset)
        return rows[0] if rows else None

    def judge_agreement_rows(self, validation_id: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM judge_agreement WHERE validation_id = :v ORDER BY judge, subset, metric",
                          v=validation_id)

    def judge_agreement(self, validation_id: str, judge: str, metric: str = "kappa",
                        subset: str | None = None) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM judge_agreement WHERE validation_id = :v AND judge = :j AND metric = :m "
                          "AND (:s IS NULL OR subset = :s) ORDER BY subset", v=validation_id, j=judge, m=metric,
                          s=subset)
        return rows[0] if rows else None

    def save_evaluation(self, run: Mapping[str, Any], answers: Sequence[Mapping[str, Any]],
                        pairwise: Sequence[Mapping[str, Any]], metrics: Sequence[Mapping[str, Any]],
                        paired: Sequence[Mapping[str, Any]]) -> None:
        """One evaluation's rows (run, answers, pairwise verdicts, rates, paired comparisons), all or nothing."""
        with self.transaction() as conn:
            self.upsert("eval_runs", [run], conn=conn)
            self.upsert("eval_answers", answers, conn=conn)
            self.upsert("eval_pairwise", pairwise, conn=conn)
            self.upsert("eval_metrics", metrics, conn=conn)
            self.upsert("eval_paired", paired, conn=conn)

    def evaluation(self, eval_id: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM eval_runs WHERE eval_id = :e", e=eval_id)
        return rows[0] if rows else None

    def all_evaluation_answers(self) -> list[dict[str, Any]]:
        """Every stored answer of every evaluation (to map labelled items back to them)."""
        return [a for run in self.query("SELECT eval_id FROM eval_runs ORDER BY eval_id")
                for a in self.evaluation_answers(run["eval_id"])]

    def evaluation_answers(self, eval_id: str) -> list[dict[str, Any]]:
        """Every answer of one evaluation with its prompt's text, in a stable order."""
        return self.query("SELECT a.*, p.text AS question FROM eval_answers a JOIN prompts p ON p.prompt_id = "
                          "a.prompt_id WHERE a.eval_id = :e ORDER BY a.model_label, a.eval_set, a.prompt_id",
                          e=eval_id)

    def save_answer_labels(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self.upsert("answer_labels", rows)

    def labelled_answers(self) -> list[dict[str, Any]]:
        """Every labelled answer beside the judges' verdicts on it (all label sets, all evaluations)."""
        return self.query(
            "SELECT l.label_set, l.eval_id, l.model_label, l.prompt_id, l.eval_set, l.refusal AS label_refusal, "
            "l.harmful_content AS label_harmful, l.labeller, l.method, a.refusal AS judge_refusal, "
            "a.keyword_refusal, a.model_judge_refusal, a.answer, p.text AS question FROM answer_labels l "
            "JOIN eval_answers a ON a.eval_id = l.eval_id AND a.model_label = l.model_label AND "
            "a.prompt_id = l.prompt_id JOIN prompts p ON p.prompt_id = l.prompt_id "
            "ORDER BY l.label_set, l.eval_id, l.model_label, l.prompt_id")

    def latest_evaluation(self, kind: str | None = None) -> dict[str, Any] | None:
        """The newest evaluation, or the newest of a kind ('headline' or 'exploratory')."""
        if kind is None:
            rows = self.query("SELECT * FROM eval_runs ORDER BY created_at DESC, eval_id DESC LIMIT 1")
        else:
            rows = self.query("SELECT * FROM eval_runs WHERE kind = :k ORDER BY created_at DESC, eval_id DESC "
                              "LIMIT 1", k=kind)
        return rows[0] if rows else None

    def evaluation_metrics(self, eval_id: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM eval_metrics WHERE eval_id = :e ORDER BY model_label, metric", e=eval_id)

    def evaluation_paired(self, eval_id: str, metric: str | None = None) -> list[dict[str, Any]]:
        if metric is None:
            return self.query("SELECT * FROM eval_paired WHERE eval_id = :e ORDER BY model_label, metric", e=eval_id)
        return self.query("SELECT * FROM eval_paired WHERE eval_id = :e AND metric = :m ORDER BY model_label",
                          e=eval_id, m=metric)

    # -- checkpoints -----------------------------------------------------------------------------------------

    def latest_per_method(self, table: str, methods: Sequence[str] | None, order: Sequence[str]
                          ) -> list[dict[str, Any]]:
        """The newest row of `sft_datasets` or `checkpoints` for each method, in the given method order.
        Checkpoints are ordered by when a `METHOD/checkpoint` materialization last produced them (a reused one counts as new)."""
        column = {"sft_datasets": ("created_at", "dataset_id"), "checkpoints": ("built_at", "checkpoint_id")}
        if table not in column:
            raise ValueError(f"no per-method rows in {table!r}")
        when, key = column[table]
        latest: dict[str, dict[str, Any]] = {}
        for row in self.query(f"SELECT * FROM {table} ORDER BY {when} DESC, {key} DESC"):
            if (methods is None or row["method"] in methods) and row["method"] not in latest:
                latest[row["method"]] = row
        return [latest[m] for m in order if m in latest]

    def save_checkpoint(self, row: Mapping[str, Any]) -> None:
        self.upsert("checkpoints", [row])

    def checkpoint_methods(self) -> list[str]:
        return [r["method"] for r in self.query("SELECT DISTINCT method FROM checkpoints ORDER BY method")]

    def touch_checkpoint(self, checkpoint_id: str, dagster_run_id: str) -> None:
        """A reused checkpoint is the latest build from now on (evaluation picks the newest `built_at`)."""
        with self.engine.begin() as conn:
            conn.execute(sa.text("UPDATE checkpoints SET built_at = :t, dagster_run_id = :r WHERE checkpoint_id = :c"),
                         {"t": utcnow(), "r": dagster_run_id, "c": checkpoint_id})

    def training_set(self, dataset_id: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM sft_datasets WHERE dataset_id = :d", d=dataset_id)
        return rows[0] if rows else None

    def checkpoint(self, checkpoint_id: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM checkpoints WHERE checkpoint_id = :c", c=checkpoint_id)
        return rows[0] if rows else None


T = typing.TypeVar("T")
_SCALARS = (str, int, float, bool, type(None))


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _record_fields(record: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if isinstance(value, bool):
            value = int(value)
        elif not isinstance(value, _SCALARS):
            value = json.dumps(_jsonable(value), ensure_ascii=False, sort_keys=True)
        out[f.name] = value
    return out


def _decode(hint: Any, value: Any) -> Any:
    """A column value back into the field's declared type."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        return _decode(args[0], value) if len(args) == 1 else value
    if hint is bool:
        return bool(value)
    if hint in (str, int, float):
        return hint(value)
    return _from_json(hint, json.loads(value) if isinstance(value, str) else value)


def _from_json(hint: Any, data: Any) -> Any:
    if data is None:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        return _from_json(non_none[0], data) if len(non_none) == 1 else data
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        return hint(**{k: _from_json(hints[k], v) for k, v in data.items()})
    if origin in (list, Sequence, collections.abc.Sequence):
        return [_from_json(args[0], v) for v in data] if args else list(data)
    if origin is tuple:
        item = args[0] if args else Any
        return tuple(_from_json(item, v) for v in data)
    if origin in (dict, Mapping, collections.abc.Mapping) or origin is Counter or hint is Counter:
        values = {k: _from_json(args[1], v) for k, v in data.items()} if len(args) == 2 else dict(data)
        return Counter(values) if (origin is Counter or hint is Counter) else values
    return data
