"""SQLAlchemy-backed store for prompts, generations, transcripts, checkpoints and scores."""

from matrix_assets.store.db import Store, default_database_url

__all__ = ["Store", "default_database_url"]
