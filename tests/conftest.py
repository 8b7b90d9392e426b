"""Shared fixtures: isolated state folders, a tiny real Llama for fast training tests, Dagster resources."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True, scope="module")
def _free_models_after_each_module():  # noqa: ANN202
    """Models built by one test module are freed when it ends: the suite's peak memory is then one module's."""
    yield
    from matrix_assets.defs.resources import release_models

    release_models()


@pytest.fixture
def matrix_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every path the pipeline writes to, moved under tmp_path."""
    home = tmp_path / "matrix_home"
    monkeypatch.setenv("MATRIX_HOME", str(home))
    monkeypatch.setenv("MATRIX_DAGSTER_STORAGE", str(home / "dagster"))
    for var in ("MATRIX_DATABASE_URL", "MLFLOW_TRACKING_URI", "MATRIX_DROP_DIR", "MATRIX_MLFLOW_ARTIFACTS"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer Llama with the real SmolLM2 tokenizer and chat template: trains and generates in well under 1 s."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "smollm2_tokenizer")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture
def fake_resources(matrix_home: Path, tiny_model_dir: str) -> dict:
    from matrix_assets.defs.resources import FakeLLM, MLflowResource, StoreResource

    return {
        "store": StoreResource(database_url=f"sqlite:///{matrix_home / 'matrix.db'}"),
        "llm": FakeLLM(tiny_model_path=tiny_model_dir),
        "judge": FakeLLM(),
        "mlflow_tracking": MLflowResource(
            tracking_uri=f"sqlite:///{matrix_home / 'mlflow.db'}", artifact_root=str(matrix_home / "mlartifacts")
        ),
    }


# -- PostgreSQL ---------------------------------------------------------------------------------------
# The store tests also run against PostgreSQL: MATRIX_TEST_POSTGRES_URL names a server to use (its user needs
# CREATEDB); otherwise a throwaway cluster is started with scripts/pg_local.sh when PostgreSQL is installed,
# and the tests are skipped when it is not. Every test gets a database of its own, dropped afterwards.

from collections.abc import Callable, Iterator  # noqa: E402

PG_LOCAL = Path(__file__).resolve().parent.parent / "scripts" / "pg_local.sh"


def _pg_installed() -> bool:
    import glob
    import shutil

    return bool(glob.glob("/usr/lib/postgresql/*/bin/initdb") or shutil.which("initdb"))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    import shutil
    import socket
    import subprocess
    import tempfile

    url = os.environ.get("MATRIX_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    if not _pg_installed():
        pytest.skip("PostgreSQL not installed: run scripts/pg_local.sh install")
    with socket.socket() as sock:  # a free loopback port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Not under pytest's tmp folder: that is private to the user, and the server runs as `postgres` under root.
    folder = tempfile.mkdtemp(prefix="matrix-pg-")
    try:
        started = subprocess.run(
            ["bash", str(PG_LOCAL), "start", folder, str(port)], capture_output=True, text=True, timeout=120
        )
        if started.returncode != 0:
            pytest.fail(f"scripts/pg_local.sh start failed:\n{started.stdout}\n{started.stderr}")
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(PG_LOCAL), "stop", folder], capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pg_database(postgres_url: str) -> Iterator[Callable[[], str]]:
    """A factory of fresh, uniquely named databases on the test server (URLs); all are dropped at teardown."""
    import uuid

    import psycopg2
    import sqlalchemy as sa

    server = sa.engine.make_url(postgres_url)
    created: list[str] = []

    def admin():  # noqa: ANN202
        conn = psycopg2.connect(
            host=server.host, port=server.port, user=server.username, password=server.password,
            dbname=server.database or "postgres",
        )
        conn.autocommit = True
        return conn

    def create() -> str:
        name = f"matrix_test_{uuid.uuid4().hex[:16]}"
        conn = admin()
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        created.append(name)
        return server.set(drivername="postgresql+psycopg2", database=name).render_as_string(hide_password=False)

    yield create
    if created:
        conn = admin()
        try:
            with conn.cursor() as cur:
                for name in created:  # WITH (FORCE): engines of the test may still hold pooled connections
                    cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            conn.close()


@pytest.fixture
def pg_store_url(pg_database: Callable[[], str]) -> str:
    """SQLAlchemy URL of a fresh, empty PostgreSQL database for this test only."""
    return pg_database()
