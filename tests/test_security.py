"""Security properties: API keys stay secret, the UIs bind to localhost only, SQL is never built from values.

- An API key for a remote model server comes from the environment only (`api_key=dg.EnvVar(NAME)`, resolved at
  launch, or the variable named by `api_key_env`), reaches the server as a Bearer header, and appears nowhere else:
  not in Python logs, the Dagster event log, run records and job snapshots (the resource's stored config holds the
  variable's name), materialization metadata, the store's tables, the MLflow store, or any file the pipeline writes
  (error paths included: the test server echoes the Authorization header back in its error bodies).
- scripts/ui.sh binds the Dagster and MLflow servers to 127.0.0.1.
- No `text(...)` / `exec_driver_sql(...)` / `execute(...)` / `Store.query(...)` call in matrix_assets builds SQL with
  f-strings, `%` or `.format` from values; the only exceptions are the store's identifier builders in store/db.py
  (`upsert`, `count`, `load_records`, `delete_rows`, `save_training_groups`, `latest_per_method`), whose table
  and column names come from sql/schema.sql, and each of which refuses a name the schema does not declare.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import shlex
import sqlite3
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import pytest
from dagster._serdes import serialize_value
from http_helpers import JsonHandler
from pipeline_helpers import all_assets, stage_config

from matrix_assets.defs.resources import FakeLLM, MLflowResource, OpenAICompatibleLLM, StoreResource
from matrix_assets.llm.fake import _answer, _score

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "matrix_assets"
SECRET = "sk-live-PLANTED-4f9c2e7d1a0b8c3e6f5d"
KEY_ENV = "MATRIX_TEST_REMOTE_API_KEY"


# ---------------------------------------------------------------------------------------------------- API keys


def _reply(body: dict) -> dict:
    """A completion like FakeBackend's; for a `logprobs=true` request (the pipeline's verdicts: yes/no, A/B) the
    top next-token log-probabilities, as vLLM returns them."""
    prompt = "\n".join(m["content"] for m in body["messages"])
    if not body.get("logprobs"):
        text = _answer(prompt)
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 7, "completion_tokens": len(text.split())}}
    top = [{"token": t, "logprob": lp} for t, lp in _score(prompt, ("yes", "no", "A", "B")).items()]
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": top[0]["token"]},
                         "logprobs": {"content": [{**top[0], "top_logprobs": top}]}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 1}}


class KeyCheckingServer:
    """OpenAI-compatible server on 127.0.0.1 answering like FakeBackend (log-probabilities included); records every
    Authorization header.

    `fail_next` chat requests get HTTP 500 and `reject` makes every chat request a 401; both error bodies echo the
    Authorization header, the way a careless proxy might, to prove that error messages are redacted."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.auth: list[str | None] = []
        self.fail_next = 0
        self.reject = False
        server = self

        class Handler(JsonHandler):
            def do_GET(self) -> None:
                with server.lock:
                    server.auth.append(self.headers.get("Authorization"))
                self.send_json(200, {"object": "list", "data": [{"id": "remote-model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                header = self.headers.get("Authorization")
                with server.lock:
                    server.auth.append(header)
                    fail = server.fail_next > 0 or server.reject
                    server.fail_next = max(0, server.fail_next - 1)
                if fail:
                    self.send_json(401 if server.reject else 500, {"error": "denied", "you_sent": header})
                    return
                self.send_json(200, _reply(body))

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        host, port = self._httpd.server_address[:2]
        self.url = f"http://{host}:{port}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> KeyCheckingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=2)


def _step_failures(result: dg.ExecuteInProcessResult) -> str:
    """Each failed step with the innermost error's message (the exception the asset raised)."""
    lines = []
    for event in result.all_events:
        if event.is_step_failure:
            error = event.event_specific_data.error
            while error.cause is not None:
                error = error.cause
            lines.append(f"{event.step_key}: {error.message.strip()}")
    return "\n".join(lines)


def _sqlite_dump(path: Path) -> str:
    con = sqlite3.connect(path, timeout=30)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return "\n".join(repr(row) for t in tables for row in con.execute(f'SELECT * FROM "{t}"'))
    finally:
        con.close()


@pytest.mark.timeout(180)
def test_api_key_comes_from_env_reaches_server_and_is_never_recorded(
    matrix_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, SECRET)
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    instance = dg.DagsterInstance.local_temp(tempdir=str(dagster_home))  # event log and runs on disk, grepped below
    instance.add_dynamic_partitions("prompt_sets", ["safe_rlhf"])
    store = StoreResource(database_url=f"sqlite:///{matrix_home / 'matrix.db'}")
    tracking = MLflowResource(tracking_uri=f"sqlite:///{matrix_home / 'mlflow.db'}",
                              artifact_root=str(matrix_home / "mlartifacts"))
    results: list[dg.ExecuteInProcessResult] = []
    with KeyCheckingServer() as server:
        # The deployment's way (llm_from_env): the key as dg.EnvVar, resolved when a run starts; and the variable
        # named by api_key_env, read by the backend itself.
        from_env_var = OpenAICompatibleLLM(base_url=server.url, model="remote-model", api_key=dg.EnvVar(KEY_ENV),
                                           api_key_env=None, batch_size=4, max_retries=2)
        named_env = OpenAICompatibleLLM(base_url=server.url, model="remote-model", api_key_env=KEY_ENV, batch_size=4,
                                        max_retries=2)
        for remote in (from_env_var, named_env):
            assert SECRET not in repr(remote) and SECRET not in repr(remote.backend())
            assert SECRET not in json.dumps(remote._convert_to_config_dictionary(), default=str)  # noqa: SLF001
        assert from_env_var._convert_to_config_dictionary()["api_key"] == {"env": KEY_ENV}  # noqa: SLF001
        resources = {"store": store, "llm": from_env_var, "judge": from_env_var, "mlflow_tracking": tracking}

        # 1. The per-prompt stages over the remote server; two transient 500s (echoing the key) are retried.
        server.fail_next = 2
        results.append(dg.materialize(
            all_assets(), selection=[dg.AssetKey("benchmark_prompts"), dg.AssetKey("initial_responses"),
                                     *[dg.AssetKey(["matrix", s]) for s in ("scenes", "critiques", "revisions")]],
            partition_key="safe_rlhf", resources=resources, instance=instance,
            run_config=stage_config(initial_responses={"max_prompts": 2},
                                    matrix__scenes={"max_prompts": 2, "n_roles": 3, "max_rounds": 1},
                                    matrix__critiques={"max_prompts": 2}, matrix__revisions={"max_prompts": 2}),
        ))
        assert results[-1].success

        # 2. The remote model as the evaluation's judge model (judge validation and pairwise helpfulness): its
        #    identity goes to the store and to MLflow.
        db = store.get_store()
        db.upsert("checkpoints", [{"checkpoint_id": "ckpt-sec", "base_model": "fake", "dataset_id": "d",
                                   "method": "matrix", "adapter_path": str(matrix_home / "adapter"), "n_examples": 1,
                                   "created_at": "2024-01-01T00:00:00", "built_at": "2024-01-01T00:00:00"}])
        results.append(dg.materialize(
            all_assets(), selection=["judge_validation", "evaluation_scores"], instance=instance, raise_on_error=False,
            resources={"store": store, "llm": FakeLLM(), "judge": named_env, "mlflow_tracking": tracking},
            run_config=stage_config(
                judge_validation={"model_judge_sample": 4},
                evaluation_scores={"harmful_sets": ["safe_rlhf"], "max_harmful_per_set": 1, "max_safe_per_set": 1,
                                   "max_helpfulness_per_set": 1, "model_judge": True, "pairwise_helpfulness": True}),
        ))
        assert results[-1].success, _step_failures(results[-1])
        assert db.query("SELECT 1 FROM judge_agreement WHERE judge LIKE '%remote-model%'")
        assert db.count("eval_pairwise") == 1

        # 3. The server rejects the key (401, echoing it back): the run fails and the error is recorded. (One more
        #    helpfulness prompt than in 2., so that the judge has an uncached pairwise verdict to ask for.)
        server.reject = True
        results.append(dg.materialize(
            all_assets(), selection=["evaluation_scores"], instance=instance, raise_on_error=False,
            resources={"store": store, "llm": FakeLLM(), "judge": from_env_var, "mlflow_tracking": tracking},
            run_config=stage_config(evaluation_scores={
                "harmful_sets": ["safe_rlhf"], "max_harmful_per_set": 1, "max_safe_per_set": 1,
                "max_helpfulness_per_set": 2, "pairwise_helpfulness": True}),
        ))
        assert not results[-1].success

    # The key went to the server, as a Bearer header, on every request (health checks included).
    assert len(server.auth) > 20
    assert set(server.auth) == {f"Bearer {SECRET}"}

    # ... and nowhere else.
    haystacks: dict[str, str] = {"python logs": caplog.text}
    for result in results:
        run_id = result.run_id
        run = instance.get_run_by_id(run_id)
        haystacks[f"events of {run_id}"] = "\n".join(serialize_value(e) for e in result.all_events)
        haystacks[f"event log of {run_id}"] = "\n".join(serialize_value(e) for e in instance.all_logs(run_id))
        haystacks[f"run record of {run_id}"] = serialize_value(run)
        # Snapshots are stored compressed (a grep of the files would not see into them): the job's resources with
        # their config as Dagster keeps it.
        haystacks[f"job snapshot of {run_id}"] = serialize_value(instance.get_job_snapshot(run.job_snapshot_id))
    haystacks["materialization metadata"] = "\n".join(
        serialize_value(m) for r in results for e in r.all_events if e.is_step_materialization
        for m in [e.step_materialization_data.materialization.metadata]
    )
    haystacks["store tables"] = _sqlite_dump(matrix_home / "matrix.db")
    haystacks["mlflow store"] = _sqlite_dump(matrix_home / "mlflow.db")
    for name, text in haystacks.items():
        assert SECRET not in text, f"API key leaked into {name}"
    # Every file written (databases with their WAL files, Dagster storage, MLflow artifacts, reports, datasets).
    files = [p for root in (matrix_home, dagster_home) for p in root.rglob("*") if p.is_file()]
    assert len(files) > 5
    leaking = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert leaking == []

    # Positive controls: the haystacks hold what we looked for the key next to.
    assert "HTTP 401" in haystacks[f"event log of {results[2].run_id}"] and "***" in caplog.text
    assert server.url in haystacks["materialization metadata"] and server.url in haystacks["store tables"]
    assert "remote-model" in haystacks["mlflow store"]  # the judge model's agreement, logged by judge_validation
    assert KEY_ENV in haystacks[f"job snapshot of {results[0].run_id}"]  # the variable's name stands for the key


# ---------------------------------------------------------------------------------------------------- ui.sh


def _commands(script: str) -> list[list[str]]:
    joined = re.sub(r"\\\n", " ", script)
    out = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append(shlex.split(line.rstrip("&").strip()))
    return out


def _host_of(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg in ("-h", "--host") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return None


def test_ui_script_binds_servers_to_localhost_only() -> None:
    script = (ROOT / "scripts" / "ui.sh").read_text()
    assert "0.0.0.0" not in script
    servers = [argv for argv in _commands(script)
               if any(a.endswith("dagster") for a in argv[:1]) and "dev" in argv
               or any(a.endswith(("dagster-webserver", "dagster-daemon")) for a in argv[:1])
               or argv[:1] and argv[0].endswith("mlflow") and argv[1:2] in (["server"], ["ui"])]
    kinds = {Path(argv[0]).name for argv in servers}
    assert {"dagster", "mlflow"} <= kinds, f"expected a dagster and an mlflow server in ui.sh, found {servers}"
    for argv in servers:
        assert _host_of(argv) == "127.0.0.1", f"{' '.join(argv)} does not bind to 127.0.0.1"


# ---------------------------------------------------------------------------------------------------- SQL building

SQL_CALLS = {"text", "exec_driver_sql", "execute", "executemany", "executescript", "query", "scalar"}
# The store's identifier builders: table and column names from sql/schema.sql (checked against the schema, or
# literals), values always bound. test_whitelisted_builders_refuse_names_the_schema_does_not_declare holds them to it.
# training_data_counts and delete_training_data: table names from the reflected schema only, the set a bound parameter.
WHITELISTED_BUILDERS = ("upsert", "count", "load_records", "delete_rows", "save_training_groups", "latest_per_method",
                        "training_data_counts", "delete_training_data")
WHITELIST = {("store/db.py", name) for name in WHITELISTED_BUILDERS}


class _SqlBuildingFinder(ast.NodeVisitor):
    """Finds SQL calls whose statement is built with f-strings, `%`, `.format` or `+` from values.

    A statement argument is followed through the enclosing function's assignments to its names (`x += y` counts as
    concatenation). A name with no assignment in the function (a parameter, a loop variable) is not flagged where it
    is passed whole, since its callers are checked, but it is a value when concatenated or formatted into SQL.
    Module-level literal constants are not values."""

    def __init__(self, rel: str, tree: ast.Module) -> None:
        self.rel = rel
        self.offenders: list[tuple[int, str]] = []
        self.offender_functions: list[str | None] = []  # the enclosing function of each offender
        self.constants = {
            t.id for node in tree.body if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
            for t in node.targets if isinstance(t, ast.Name)
        }
        self.function: str | None = None
        self.assignments: dict[str, list[ast.expr]] = {}

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        outer = (self.function, self.assignments)
        self.function = node.name
        self.assignments = {}
        for sub in ast.walk(node):
            if isinstance(sub, ast.Assign):
                for target in sub.targets:
                    if isinstance(target, ast.Name):
                        self.assignments.setdefault(target.id, []).append(sub.value)
            elif isinstance(sub, ast.AugAssign) and isinstance(sub.target, ast.Name):
                # x += y: y is concatenated onto x
                self.assignments.setdefault(sub.target.id, []).append(
                    ast.BinOp(left=ast.Constant(""), op=sub.op, right=sub.value))
            elif isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name) and sub.value:
                self.assignments.setdefault(sub.target.id, []).append(sub.value)
            elif isinstance(sub, ast.NamedExpr):
                self.assignments.setdefault(sub.target.id, []).append(sub.value)
        self.generic_visit(node)
        self.function, self.assignments = outer

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def _dynamic(self, expr: ast.expr, seen: frozenset[str] = frozenset()) -> bool:
        """Is this statement built from values?"""
        if isinstance(expr, ast.JoinedStr):
            return any(isinstance(v, ast.FormattedValue) and not self._literal(v.value) for v in expr.values)
        if isinstance(expr, ast.BinOp):
            return not isinstance(expr.op, ast.Add) or not (self._clean(expr.left, seen) and self._clean(expr.right, seen))
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr == "format":
            return True
        if isinstance(expr, ast.IfExp):
            return self._dynamic(expr.body, seen) or self._dynamic(expr.orelse, seen)
        if isinstance(expr, ast.Name) and expr.id not in seen:
            return any(self._dynamic(v, seen | {expr.id}) for v in self.assignments.get(expr.id, []))
        return False

    def _clean(self, expr: ast.expr, seen: frozenset[str]) -> bool:
        """Is this piece of a concatenation made of literals only?"""
        if self._literal(expr):
            return True
        if isinstance(expr, ast.Name):
            values = self.assignments.get(expr.id)
            return expr.id in seen or bool(values) and all(self._clean(v, seen | {expr.id}) for v in values)
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            return self._clean(expr.left, seen) and self._clean(expr.right, seen)
        if isinstance(expr, ast.JoinedStr):
            return not self._dynamic(expr, seen)
        if isinstance(expr, ast.IfExp):
            return self._clean(expr.body, seen) and self._clean(expr.orelse, seen)
        return False

    def _literal(self, expr: ast.expr) -> bool:
        return isinstance(expr, ast.Constant) or isinstance(expr, ast.Name) and expr.id in self.constants

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name in SQL_CALLS and node.args and self._dynamic(node.args[0]):
            if (self.rel, self.function) not in WHITELIST:
                self.offenders.append((node.lineno, ast.unparse(node)[:160]))
                self.offender_functions.append(self.function)
        self.generic_visit(node)


def find_sql_building(source: str, rel: str) -> list[tuple[int, str]]:
    tree = ast.parse(source)
    finder = _SqlBuildingFinder(rel, tree)
    finder.visit(tree)
    return finder.offenders


def functions_building_sql(source: str, rel: str) -> set[str | None]:
    """The functions in which `find_sql_building` finds something."""
    tree = ast.parse(source)
    finder = _SqlBuildingFinder(rel, tree)
    finder.visit(tree)
    return set(finder.offender_functions)


def test_sql_building_check_catches_the_patterns_it_is_meant_to() -> None:
    planted = '''
import sqlalchemy as sa
LOCK_ID = 42

def bad(conn, db, user_id, table):
    conn.execute(sa.text(f"SELECT * FROM prompts WHERE prompt_id = '{user_id}'"))     # 6: f-string
    conn.exec_driver_sql("DELETE FROM t WHERE id = %s" % user_id)                       # 7: %
    db.query("SELECT * FROM t WHERE name = '{}'".format(user_id))                       # 8: .format
    sql = "SELECT * FROM t WHERE a = '" + user_id + "'"
    db.scalar(sql)                                                                        # 10: + via a variable
    stmt = f"DROP TABLE {table}"
    sql2 = stmt
    conn.exec_driver_sql(sql2)                                                            # 13: through two names

def good(conn, db, user_id, sql):
    conn.execute(sa.text("SELECT * FROM t WHERE id = :id"), {"id": user_id})
    q = "SELECT * FROM prompts WHERE prompt_set = :s"
    q += " AND split = :split"
    db.query(q, s=user_id, split="train")
    db.query(sql)                                 # a parameter: its callers are checked
    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({LOCK_ID})")  # a literal module constant
    ax.text(0.5, 0.5, f"{user_id} no data")       # not SQL-shaped: first argument is a number

def upsert(table):
    return sa.text(f"INSERT INTO {table} VALUES (1)")   # allowed only in store/db.py
'''
    assert [line for line, _ in find_sql_building(planted, "elsewhere.py")] == [6, 7, 8, 10, 13, 25]
    assert [line for line, _ in find_sql_building(planted, "store/db.py")] == [6, 7, 8, 10, 13]


def test_no_sql_is_built_from_values_in_the_package() -> None:
    offenders = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    for path in files:
        rel = path.relative_to(PACKAGE).as_posix()
        offenders += [f"matrix_assets/{rel}:{line}: {code}" for line, code in find_sql_building(path.read_text(), rel)]
    assert not offenders, "SQL built from values (use bound parameters):\n" + "\n".join(offenders)
    # the whitelisted builders really are where the whitelist says, each of them (so the whitelist cannot silently
    # go stale), and nothing else in store/db.py builds SQL
    db_source = (PACKAGE / "store" / "db.py").read_text()
    assert functions_building_sql(db_source, "store/db.py-without-whitelist") == set(WHITELISTED_BUILDERS)


def test_whitelisted_builders_refuse_names_the_schema_does_not_declare(tmp_path: Path) -> None:
    """What makes the builders safe: a table or column name that sql/schema.sql does not declare never reaches SQL."""
    from dataclasses import dataclass

    from matrix_assets.store.db import Store

    @dataclass
    class Row:
        prompt_id: str

    db = Store(f"sqlite:///{tmp_path / 'matrix.db'}")
    hostile = "prompts; DROP TABLE prompts; --"
    with pytest.raises(ValueError, match="unknown table"):
        db.upsert(hostile, [{"prompt_id": "p"}])
    with pytest.raises(ValueError, match="bad column name"):
        db.upsert("prompts", [{"prompt_id": "p", "text) VALUES ('x'); --": "y"}])
    with pytest.raises(ValueError, match="unknown table"):
        db.count(hostile)
    with pytest.raises(ValueError, match="unknown table"):
        db.load_records(hostile, Row)
    with pytest.raises(ValueError, match="has no column"):
        db.load_records("critiques", Row, **{"method = method OR 1": "x"})
    with pytest.raises(ValueError, match="unknown table"):
        db.delete_rows(hostile, prompt_id="p")
    with pytest.raises(ValueError, match="bad filters"):
        db.delete_rows("generations", **{"1 = 1 OR cache_key": "x"})
    with pytest.raises(ValueError, match="no per-method rows"):
        db.latest_per_method(hostile, None, [])
    assert db.count("prompts") == 0  # still there, and untouched
