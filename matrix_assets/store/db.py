"""The project's database, through SQLAlchemy Core.

SQLite (a file, WAL mode) is the embedded default; PostgreSQL is the production database. The DDL in
`sql/schema.sql` and `sql/views.sql` is the single source of truth for the schema and is applied here.
Every statement is parameterised; table and column names only ever come from the fixed `_TABLE_KEYS`
map below, never from input.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"

# Conflict keys of every table that the code writes: upserts use them, and they double as the whitelist
# of table names that may appear in generated SQL.
_TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "prompt_sets": ("name",),
    "prompts": ("prompt_id",),
    "generations": ("cache_key",),
    "initial_responses": ("prompt_id", "model_id"),
    "transcripts": ("prompt_id", "method", "model_id"),
    "transcript_events": ("prompt_id", "method", "model_id", "seq"),
    "critiques": ("prompt_id", "method", "model_id"),
    "revisions": ("prompt_id", "method", "model_id"),
    "sft_datasets": ("dataset_id",),
    "sft_examples": ("dataset_id", "position"),
    "checkpoints": ("checkpoint_id",),
    "eval_answers": ("eval_id", "model_label", "prompt_id"),
    "eval_pairwise": ("eval_id", "model_label", "prompt_id"),
    "eval_metrics": ("eval_id", "model_label", "metric"),
}
# Newest-first listings of the per-method tables (fixed SQL: no identifier is ever interpolated).
_LATEST_PER_METHOD_SQL = {
    "sft_datasets": "SELECT * FROM sft_datasets ORDER BY created_at DESC, dataset_id DESC",
    "checkpoints": "SELECT * FROM checkpoints ORDER BY created_at DESC, checkpoint_id DESC",
}
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")
_CREATE_VIEW = re.compile(r"^CREATE VIEW (\w+) AS", re.IGNORECASE)
# Any constant: serialises schema creation between processes that start at once on one PostgreSQL database.
_SCHEMA_LOCK_ID = 0x6D61747269780001


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


def default_database_url() -> str:
    url = os.environ.get("MATRIX_DATABASE_URL")
    if url:
        return url
    home = Path(os.environ.get("MATRIX_HOME", ".matrix"))
    return f"sqlite:///{(home / 'matrix.db').resolve()}"


def _split_sql(script: str) -> list[str]:
    lines = [line for line in script.splitlines() if not line.strip().startswith("--")]
    return [stmt.strip() for stmt in "\n".join(lines).split(";") if stmt.strip()]


class Store:
    """Typed access to the project's tables. Create one per process; it is cheap to keep around."""

    def __init__(self, url: str | None = None, *, create: bool = True) -> None:
        self.url = url or default_database_url()
        self.engine: Engine = self._make_engine(self.url)
        if create:
            self.create_schema()

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
            if conn.dialect.name == "sqlite" and self._sqlite_views_current(conn, views):
                # pysqlite autocommits each DDL statement: dropping and re-creating an unchanged view would leave
                # a moment in which another process's query of it fails.
                return
            for stmt in views:
                conn.exec_driver_sql(stmt)

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
        keys = _TABLE_KEYS[table]
        columns = list(rows[0].keys())
        for name in columns:
            if not _IDENTIFIER.match(name):
                raise ValueError(f"bad column name {name!r}")
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

    def count(self, table: str) -> int:
        if table not in _TABLE_KEYS:
            raise ValueError(f"unknown table {table!r}")
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

    # -- per-stage reads ---------------------------------------------------------------------------

    def initial_responses(self, prompt_set: str, model_id: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT p.prompt_id, p.text AS prompt, p.category, r.response FROM initial_responses r "
            "JOIN prompts p ON p.prompt_id = r.prompt_id "
            "WHERE p.prompt_set = :s AND r.model_id = :m ORDER BY p.position",
            s=prompt_set, m=model_id,
        )

    def transcripts(self, prompt_set: str, method: str, model_id: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT p.text AS prompt, r.response, t.* FROM transcripts t "
            "JOIN prompts p ON p.prompt_id = t.prompt_id "
            "JOIN initial_responses r ON r.prompt_id = t.prompt_id AND r.model_id = t.model_id "
            "WHERE p.prompt_set = :s AND t.method = :method AND t.model_id = :m ORDER BY p.position",
            s=prompt_set, method=method, m=model_id,
        )

    def events(self, prompt_id: str, method: str, model_id: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT * FROM transcript_events WHERE prompt_id = :p AND method = :method AND model_id = :m "
            "ORDER BY seq",
            p=prompt_id, method=method, m=model_id,
        )

    def critiques(self, prompt_set: str, method: str, model_id: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT p.text AS prompt, r.response, c.* FROM critiques c "
            "JOIN prompts p ON p.prompt_id = c.prompt_id "
            "JOIN initial_responses r ON r.prompt_id = c.prompt_id AND r.model_id = c.model_id "
            "WHERE p.prompt_set = :s AND c.method = :method AND c.model_id = :m ORDER BY p.position",
            s=prompt_set, method=method, m=model_id,
        )

    def revisions(self, prompt_sets: Sequence[str], method: str, model_id: str) -> list[dict[str, Any]]:
        stmt = (
            "SELECT p.prompt_set, p.text AS prompt, r.response AS initial, v.* FROM revisions v "
            "JOIN prompts p ON p.prompt_id = v.prompt_id "
            "JOIN initial_responses r ON r.prompt_id = v.prompt_id AND r.model_id = v.model_id "
            "WHERE p.prompt_set IN :sets AND v.method = :method AND v.model_id = :m "
            "ORDER BY p.prompt_set, p.position"
        )
        with self.engine.connect() as conn:
            result = conn.execute(
                sa.text(stmt).bindparams(sa.bindparam("sets", expanding=True)),
                {"sets": list(prompt_sets), "method": method, "m": model_id},
            )
            return [dict(row._mapping) for row in result]

    def latest_per_method(
        self, table: str, methods: Sequence[str] | None, order: Sequence[str]
    ) -> list[dict[str, Any]]:
        """The newest row of `table` (sft_datasets or checkpoints) for each method, in the given method order."""
        if table not in _LATEST_PER_METHOD_SQL:
            raise ValueError(f"no per-method rows in {table!r}")
        latest: dict[str, dict[str, Any]] = {}
        for row in self.query(_LATEST_PER_METHOD_SQL[table]):
            if (methods is None or row["method"] in methods) and row["method"] not in latest:
                latest[row["method"]] = row
        return [latest[m] for m in order if m in latest]

    def latest_checkpoint(self) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM checkpoints ORDER BY created_at DESC, checkpoint_id DESC LIMIT 1")
        return rows[0] if rows else None

    def checkpoint(self, checkpoint_id: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM checkpoints WHERE checkpoint_id = :c", c=checkpoint_id)
        return rows[0] if rows else None
