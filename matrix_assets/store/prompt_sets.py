"""Loading a prompt set into the store with its deterministic train / eval split."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from matrix_assets.data.loaders import (
    BUNDLED_PROMPT_SETS,
    PromptRecord,
    bundled_path,
    load_prompt_file_with_report,
)
from matrix_assets.store.db import Store, utcnow

PROMPT_SUFFIXES = (".csv", ".jsonl", ".json", ".txt")


def drop_dir() -> Path:
    """Folder watched by the new-prompt-set sensor; a file `NAME.ext` there is the prompt set `NAME`."""
    return Path(os.environ.get("MATRIX_DROP_DIR", Path(os.environ.get("MATRIX_HOME", ".matrix")) / "drop"))


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def prompt_id(prompt_set: str, text: str) -> str:
    return _digest(prompt_set, text)[:24]


def split_of(text: str, train_fraction: float) -> str:
    """Deterministic by content alone, so the same prompt lands on the same side every time."""
    bucket = int(_digest("split", text)[:8], 16) / 0xFFFFFFFF
    return "train" if bucket < train_fraction else "eval"


def versions_dir() -> Path:
    """Exact copies of every version of every dropped file (the sensor writes them; loading prefers them)."""
    return drop_dir() / ".versions"


@dataclass(frozen=True)
class PromptSetSource:
    name: str
    path: Path
    role: str
    loader_kwargs: dict


def resolve_source(name: str, source: str | None = None, role: str = "harmful") -> PromptSetSource:
    """An explicit path, else a bundled set of that name, else a file NAME.* in the drop folder."""
    if source:
        return PromptSetSource(name, Path(source), role, {})
    if name in BUNDLED_PROMPT_SETS:
        bundled = BUNDLED_PROMPT_SETS[name]
        return PromptSetSource(name, bundled_path(name), bundled.role, bundled.loader_kwargs())
    for folder in (versions_dir(), drop_dir()):
        for suffix in PROMPT_SUFFIXES:
            candidate = folder / f"{name}{suffix}"
            if candidate.exists():
                return PromptSetSource(name, candidate, role, {})
    raise FileNotFoundError(
        f"prompt set {name!r}: not a bundled set ({', '.join(BUNDLED_PROMPT_SETS)}) and no file "
        f"{name}.csv/.jsonl/.json/.txt in the drop folder {drop_dir()}"
    )


def load_prompt_set(
    store: Store,
    name: str,
    *,
    source: str | None = None,
    train_fraction: float = 0.5,
    role: str = "harmful",
    prompt_column: str | None = None,
    category_column: str | None = None,
) -> dict:
    """Read the file, split it, upsert the set and its prompts; return a summary for metadata."""
    src = resolve_source(name, source, role)
    kwargs = dict(src.loader_kwargs)
    if prompt_column:
        kwargs["prompt_column"] = prompt_column
    if category_column:
        kwargs["category_column"] = category_column
    records, report = load_prompt_file_with_report(src.path, **kwargs)
    file_sha = hashlib.sha256(src.path.read_bytes()).hexdigest()
    rows = _prompt_rows(name, records, train_fraction)
    n_train = sum(1 for r in rows if r["split"] == "train")
    with store.transaction() as conn:
        store.upsert(
            "prompt_sets",
            [{
                "name": name, "source": str(src.path), "file_sha256": file_sha, "role": src.role,
                "n_prompts": len(rows), "n_train": n_train, "n_eval": len(rows) - n_train,
                "train_fraction": train_fraction, "loaded_at": utcnow(),
            }],
            conn=conn,
        )
        store.upsert("prompts", rows, conn=conn)
    return {
        "source": str(src.path), "file_sha256": file_sha, "role": src.role, "n_prompts": len(rows),
        "n_train": n_train, "n_eval": len(rows) - n_train, "report": report,
        "categories": sorted({r["category"] for r in rows if r["category"]}),
    }


def ensure_prompt_set(store: Store, name: str, *, train_fraction: float) -> None:
    """Load a reference set (benign / over-refusal) once, if it is not in the store yet."""
    if not store.query("SELECT name FROM prompt_sets WHERE name = :n", n=name):
        load_prompt_set(store, name, train_fraction=train_fraction)


def _prompt_rows(name: str, records: list[PromptRecord], train_fraction: float) -> list[dict]:
    rows = [
        {
            "prompt_id": prompt_id(name, r.text), "prompt_set": name, "text": r.text,
            "category": r.category, "split": split_of(r.text, train_fraction),
        }
        for r in records
    ]
    # Processing order: a content hash, so that "the first N prompts" is a fair sample of the set.
    rows.sort(key=lambda r: _digest("order", r["text"]))
    for position, row in enumerate(rows):
        row["position"] = position
    return rows
