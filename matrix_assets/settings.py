"""Where the pipeline keeps its state by default; every path can be moved with an environment variable."""

from __future__ import annotations

import os
from pathlib import Path


def matrix_home() -> Path:
    """Root of the embedded deployment's state (SQLite store, MLflow store, adapters, datasets)."""
    return Path(os.environ.get("MATRIX_HOME", ".matrix")).resolve()


def default_database_url() -> str:
    """The store: `MATRIX_DATABASE_URL` (PostgreSQL in production), else SQLite under MATRIX_HOME."""
    return os.environ.get("MATRIX_DATABASE_URL") or f"sqlite:///{matrix_home() / 'matrix.db'}"


def drop_dir() -> Path:
    """Folder watched by the new-prompt-set sensor: a file `ROLE/NAME.ext` there is the prompt set `NAME` with
    that role (one subfolder per role)."""
    return Path(os.environ.get("MATRIX_DROP_DIR") or matrix_home() / "drop")


def default_mlflow_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{matrix_home() / 'mlflow.db'}"


def mlflow_ui_url() -> str:
    """Where the MLflow UI serves, for links from Dagster: the one setting `scripts/ui.sh` and the MLflow resource
    both read (scripts/ui.sh starts MLflow on its port)."""
    return os.environ.get("MATRIX_MLFLOW_UI_URL", "http://127.0.0.1:5000").rstrip("/")


def default_artifact_root() -> str:
    return os.environ.get("MATRIX_MLFLOW_ARTIFACTS") or str(matrix_home() / "mlartifacts")


def checkpoints_dir() -> Path:
    return matrix_home() / "checkpoints"


def datasets_dir() -> Path:
    return matrix_home() / "datasets"


def reports_dir() -> Path:
    return matrix_home() / "reports"


def evaluate_dropped_sets() -> bool:
    """MATRIX_EVALUATE_DROPPED_SETS=1: a safe or helpfulness file dropped in its folder is, besides registered, also
    evaluated at once (the existing checkpoints on the default sets plus it: an exploratory evaluation)."""
    return os.environ.get("MATRIX_EVALUATE_DROPPED_SETS", "0").strip().lower() in ("1", "true", "yes")


def method_packages() -> list[str]:
    """Importable packages outside this one that each define a method (`METHOD`), from `MATRIX_METHOD_PACKAGES`
    (comma-separated); installed distributions add theirs through the `matrix_assets.methods` entry-point group."""
    return [name.strip() for name in os.environ.get("MATRIX_METHOD_PACKAGES", "").split(",") if name.strip()]
