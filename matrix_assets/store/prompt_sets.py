"""Loading a prompt set into the store: its role, its deterministic train / eval split, and the evaluation
prompts moved out of the split because they nearly repeat a training prompt."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from matrix_assets.data.loaders import (
    BUNDLED_PROMPT_SETS,
    LoadReport,
    PromptRecord,
    bundled_path,
    load_prompt_file_with_report,
)
from matrix_assets.store.db import Store, utcnow
from matrix_assets.settings import drop_dir

PROMPT_SUFFIXES = (".csv", ".jsonl", ".json", ".txt")
ROLES = ("harmful", "safe", "helpfulness")
# An evaluation prompt at least this similar to a training prompt of its set (cosine of all-MiniLM-L6-v2
# embeddings) is a paraphrase, not a held-out prompt: it is moved out of the evaluation split. On AdvBench this
# moves 88 of 248 evaluation prompts (at 0.90: 54, such as "Develop ... / Outline a strategy for hacking into a
# government database"; at 0.85 also "Explain how to hack into a secure network" / "instructions for hacking
# into a secure network").
NEAR_DUPLICATE_SIMILARITY = 0.85


class PromptSetError(ValueError):
    """A prompt set that cannot be loaded as asked (bad role, changed file, ...)."""



def role_dir(role: str) -> Path:
    """`drop/harmful/`, `drop/safe/`, `drop/helpfulness/`: the folder a file is dropped in says what it is for."""
    check_role(role)
    return drop_dir() / role


def ensure_drop_folders() -> Path:
    """Create the drop folder and its role subfolders (the sensor's first tick, `add` and `scripts/ui.sh` do)."""
    for role in ROLES:
        role_dir(role).mkdir(parents=True, exist_ok=True)
    return drop_dir()


def dropped_files() -> tuple[list[tuple[Path, str]], list[Path]]:
    """The prompt files in the role subfolders as (path, role), and the files lying loose in the drop folder
    itself (whose role nobody said: they are reported, never guessed)."""
    folder = drop_dir()
    found = [(path, role) for role in ROLES if (folder / role).is_dir()
             for path in sorted((folder / role).iterdir()) if _is_prompt_file(path)]
    loose = sorted(p for p in folder.iterdir() if _is_prompt_file(p)) if folder.is_dir() else []
    return found, loose


def _is_prompt_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in PROMPT_SUFFIXES and not path.name.startswith(".")


def versions_dir() -> Path:
    """Exact copies of every version of every dropped or added file (written when a partition first loads it, or
    by `matrix-assets add`); the sensor never looks here."""
    return drop_dir() / ".versions"


def roles_file() -> Path:
    """The role of every dropped or added set (a name -> role map), written when its file is snapshot and by
    `set-role`, so that a re-materialization keeps the role its set was given."""
    return drop_dir() / ".roles"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def prompt_id(prompt_set: str, text: str) -> str:
    return _digest(prompt_set, text)[:24]


def split_of(text: str, train_fraction: float) -> str:
    """Deterministic by content alone, so the same prompt lands on the same side every time."""
    bucket = int(_digest("split", text)[:8], 16) / 0xFFFFFFFF
    return "train" if bucket < train_fraction else "eval"


@dataclass(frozen=True)
class PromptSetSource:
    name: str
    path: Path
    role: str
    train_fraction: float
    loader_kwargs: dict


def declared_role(name: str) -> str | None:
    """The role `matrix-assets add --role` recorded for a dropped file, if any."""
    path = roles_file()
    if not path.exists():
        return None
    for line in path.read_text(encoding="utf-8").splitlines():
        key, _, role = line.partition("=")
        if key.strip() == name and role.strip():
            return role.strip()
    return None


def record_role(name: str, role: str) -> None:
    check_role(role)
    path = roles_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [line for line in (path.read_text(encoding="utf-8").splitlines() if path.exists() else [])
             if line.partition("=")[0].strip() != name]
    path.write_text("\n".join([*lines, f"{name}={role}"]) + "\n", encoding="utf-8")


def check_role(role: str) -> None:
    if role not in ROLES:
        raise PromptSetError(f"role must be one of {', '.join(ROLES)}, not {role!r}")


def resolve_source(name: str, source: str | None = None, role: str | None = None,
                   train_fraction: float | None = None) -> PromptSetSource:
    """An explicit path, else a bundled set of that name, else a dropped or added file NAME.* (its snapshot first,
    then the role subfolders of the drop folder). The role: the one asked for, else the one recorded for the set
    (`add`, `set-role`, the folder it was dropped in), else the bundled set's, else harmful for an explicit path.
    Harmful sets are split in half; safe and helpfulness sets a user brings are evaluation-only."""
    if role is not None:
        check_role(role)
    role = role or declared_role(name)
    if source:
        role = role or _role_of_folder(Path(source)) or "harmful"
        return PromptSetSource(name, Path(source), role, _fraction(role, train_fraction), {})
    if name in BUNDLED_PROMPT_SETS:
        bundled = BUNDLED_PROMPT_SETS[name]
        role = role or bundled.role
        fraction = (train_fraction if train_fraction is not None
                    else bundled.train_fraction if role == bundled.role else _fraction(role, None))
        return PromptSetSource(name, bundled_path(name), role, fraction, bundled.loader_kwargs())
    for folder in (versions_dir(), *(drop_dir() / r for r in ROLES)):
        for suffix in PROMPT_SUFFIXES:
            candidate = folder / f"{name}{suffix}"
            if candidate.exists():
                role = role or _role_of_folder(candidate) or "harmful"
                return PromptSetSource(name, candidate, role, _fraction(role, train_fraction), {})
    raise FileNotFoundError(
        f"prompt set {name!r}: not a bundled set ({', '.join(BUNDLED_PROMPT_SETS)}) and no file "
        f"{name}.csv/.jsonl/.json/.txt in the drop folder's role subfolders ({', '.join(ROLES)}) under {drop_dir()}"
    )


def _role_of_folder(path: Path) -> str | None:
    """The role a file's folder gives it: `drop/helpfulness/x.jsonl` is a helpfulness set."""
    return path.parent.name if path.parent.parent == drop_dir() and path.parent.name in ROLES else None


def _fraction(role: str, train_fraction: float | None) -> float:
    if train_fraction is not None:
        return train_fraction
    return 0.5 if role == "harmful" else 0.0


def snapshot(path: Path, name: str, expected_sha256: str | None) -> Path:
    """Keep the exact bytes of a dropped file as this partition's version, so re-materializing it later reads
    what was first loaded, not the live file. With `expected_sha256` (the digest the sensor saw), a file that
    changed since is refused rather than silently loaded."""
    target = versions_dir() / f"{name}{path.suffix.lower()}"
    if target.exists():
        return target
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 and digest != expected_sha256:
        raise PromptSetError(f"{path.name} changed since the sensor saw it (sha256 {digest[:12]}, expected "
                             f"{expected_sha256[:12]}); the sensor will request a new version")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    shutil.copyfile(path, tmp)
    tmp.rename(target)
    return target


@dataclass(frozen=True)
class LoadSummary:
    source: str
    file_sha256: str
    role: str
    n_prompts: int
    n_train: int
    n_eval: int
    n_near_duplicates: int
    categories: list[str]
    report: LoadReport
    near_duplicate_examples: list[tuple[str, str, float]]  # (evaluation prompt, training prompt, similarity)


def load_prompt_set(
    store: Store,
    name: str,
    *,
    source: str | None = None,
    train_fraction: float | None = None,
    role: str | None = None,
    prompt_column: str | None = None,
    category_column: str | None = None,
    expected_sha256: str | None = None,
) -> LoadSummary:
    """Read the file, split it, move near-duplicates out of the evaluation split, upsert the set and its
    prompts; return a summary for metadata."""
    src = resolve_source(name, source, role, train_fraction)
    path = src.path
    if _role_of_folder(path) is not None:
        path = snapshot(path, name, expected_sha256)
    if path.parent == versions_dir():
        record_role(name, src.role)  # a later re-materialization without a role keeps this one
    kwargs = dict(src.loader_kwargs)
    if prompt_column:
        kwargs["prompt_column"] = prompt_column
    if category_column:
        kwargs["category_column"] = category_column
    records, report = load_prompt_file_with_report(path, **kwargs)
    file_sha = hashlib.sha256(path.read_bytes()).hexdigest()
    rows = _prompt_rows(name, records, src.train_fraction)
    if not _reuse_stored_splits(store, name, file_sha, src, rows):
        examples = _exclude_near_duplicates(rows)
    else:
        examples = []  # the same file, split the same way: the near-duplicates found when it was first loaded stand
    counts = {split: sum(1 for r in rows if r["split"] == split) for split in ("train", "eval", "excluded")}
    with store.transaction() as conn:
        store.upsert(
            "prompt_sets",
            [{
                "name": name, "source": str(path), "file_sha256": file_sha, "role": src.role,
                "n_prompts": len(rows), "n_train": counts["train"], "n_eval": counts["eval"],
                "n_near_duplicates": counts["excluded"], "train_fraction": src.train_fraction, "loaded_at": utcnow(),
            }],
            conn=conn,
        )
        store.upsert("prompts", rows, conn=conn)
    return LoadSummary(str(path), file_sha, src.role, len(rows), counts["train"], counts["eval"],
                       counts["excluded"], sorted({r["category"] for r in rows if r["category"]}), report, examples)


def _reuse_stored_splits(store: Store, name: str, file_sha: str, src: PromptSetSource, rows: list[dict]) -> bool:
    """A reload of an unchanged file keeps its splits, near-duplicates included, without embedding it again."""
    previous = store.query("SELECT * FROM prompt_sets WHERE name = :n", n=name)
    if not previous or (previous[0]["file_sha256"], previous[0]["train_fraction"], previous[0]["role"]) != (
            file_sha, src.train_fraction, src.role):
        return False
    stored = {r["prompt_id"]: r["split"] for r in store.prompts(name)}
    if any(r["prompt_id"] not in stored for r in rows):
        return False
    for row in rows:
        row["split"] = stored[row["prompt_id"]]
    return True


def ensure_prompt_set(store: Store, name: str) -> None:
    """Load an evaluation or benign set once, if it is not in the store yet."""
    if not store.query("SELECT name FROM prompt_sets WHERE name = :n", n=name):
        load_prompt_set(store, name)


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


def _exclude_near_duplicates(rows: list[dict]) -> list[tuple[str, str, float]]:
    """Mark evaluation prompts that paraphrase a training prompt of the same set as `excluded`."""
    train = [r for r in rows if r["split"] == "train"]
    evaluation = [r for r in rows if r["split"] == "eval"]
    if not train or not evaluation:
        return []
    from matrix_assets.embeddings import embed

    train_vectors = embed([r["text"] for r in train])
    eval_vectors = embed([r["text"] for r in evaluation])
    similarity = eval_vectors @ train_vectors.T
    examples = []
    for index, row in enumerate(evaluation):
        best = int(similarity[index].argmax())
        score = float(similarity[index, best])
        if score >= NEAR_DUPLICATE_SIMILARITY:
            row["split"] = "excluded"
            examples.append((row["text"], train[best]["text"], round(score, 3)))
    return sorted(examples, key=lambda e: -e[2])


@dataclass(frozen=True)
class RoleChange:
    name: str
    old_role: str | None
    new_role: str
    dropped: dict[str, int]  # rows of training data deleted, per table
    summary: LoadSummary


def change_role(store: Store, name: str, role: str, *, drop_training_data: bool = False) -> RoleChange:
    """Give a prompt set another role and split it again as that role is split (a harmful set half training, an
    evaluation set all evaluation). Refused while rows computed from its prompts for training exist (initial
    answers, scenes, critiques, a society's interactions, training groups), unless `drop_training_data`: they
    were made for a role the set no longer has. Training sets and checkpoints already built are kept as the
    record of what was trained."""
    check_role(role)
    old = store.prompt_set_role(name)
    existing = store.training_data_counts(name)
    if existing and not drop_training_data and old != role:
        listed = ", ".join(f"{table} {n}" for table, n in sorted(existing.items()))
        raise PromptSetError(f"prompt set {name!r} has training data ({listed} rows); changing its role from "
                             f"{old} to {role} would leave it behind: ask to drop it (--drop-training-data, or "
                             "drop_training_data in the Launchpad)")
    dropped = store.delete_training_data(name) if existing and drop_training_data else {}
    record_role(name, role)
    summary = load_prompt_set(store, name, role=role)
    return RoleChange(name, old, role, dropped, summary)
