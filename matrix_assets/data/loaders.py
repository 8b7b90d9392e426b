"""Prompt-set loaders: read a prompt file into a list of :class:`PromptRecord`.

Formats (chosen by file extension, case-insensitive):

* ``.csv``: a header row, then one prompt per row. The prompt column is ``prompt_column`` when
  given, otherwise the first header that matches :data:`PROMPT_COLUMN_CANDIDATES` (in that order,
  compared case-insensitively after stripping). Category: ``category_column``, else a ``category``
  column if any. Every row must have as many fields as the header.
* ``.txt``: one prompt per line (``\\n``, ``\\r\\n`` or ``\\r``).
* ``.json``: one of
    - a list of strings;
    - a list of objects: the prompt key is resolved like a CSV column (against the first object's
      keys) and every object must have it; the category key likewise;
    - the nested HarmfulQA shape ``{topic: {subtopic: [question, ...]}}``; category = topic;
    - ``{category: [question, ...]}``; category = the key.
* ``.jsonl``: one object per line, keys resolved as for a JSON list of objects. The ``turns`` key
  (Vicuna-Bench, MT-Bench) is the last prompt candidate; a list-valued prompt field yields its
  first element, i.e. the first turn.

``source_id`` is the record's ``id`` / ``question_id`` field when the file has one, otherwise its
1-based position in the file (``"row 3"``, ``"line 7"``, ``"item 2"``,
``"Social Sciences / Economics / item 1"``); the same label names the record in error messages.

``filter={"label": "safe"}`` keeps only the rows or objects whose field equals the value. Values are
compared as strings: a JSON string as is, any other JSON scalar as its JSON text (``1``, ``true``,
``null``). Rows removed by the filter are not validated further. A filter on a format without
fields (TXT, JSON list of strings, nested HarmfulQA) is an error.

Normalisation, applied to every prompt, category and id, in this order:

1. The file is decoded as UTF-8; a leading UTF-8 BOM is accepted and dropped. Bytes that are not
   valid UTF-8 raise :class:`PromptFileError` naming the byte offset (the encoding is never
   guessed, since a wrong guess silently corrupts non-Latin prompts).
2. Line endings inside a value (``\\r\\n``, lone ``\\r``) become ``\\n``.
3. Control characters (Unicode category ``Cc``) other than newline and tab are removed and counted.
   Format characters (``Cf``, e.g. zero-width joiners) are kept because Arabic, Indic and emoji
   text needs them. No Unicode normal form is applied: non-Latin scripts pass through unchanged.
4. Leading and trailing whitespace is stripped; inner whitespace and newlines are kept.

Then, per file:

* prompts that are empty after normalisation are dropped and counted (``empty_dropped``);
* a prompt longer than ``max_chars`` characters (default 20,000) raises :class:`PromptFileError`
  naming the row, since silently truncating would change what the model is asked;
* exact duplicates (same normalised text) are dropped, keeping the first occurrence, and counted
  (``duplicates_dropped``); duplicates would otherwise leak between train and eval splits;
* an empty file, or a file that yields no prompt at all, raises :class:`PromptFileError`;
* malformed JSON / JSONL raises :class:`PromptFileError` with the line and column.

A missing file raises the usual :class:`FileNotFoundError`.
"""

from __future__ import annotations

import csv
import io
import json
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

__all__ = [
    "BUNDLED_PROMPT_SETS",
    "CATEGORY_COLUMN_CANDIDATES",
    "DEFAULT_MAX_CHARS",
    "ID_COLUMN_CANDIDATES",
    "PROMPT_COLUMN_CANDIDATES",
    "SUPPORTED_SUFFIXES",
    "BundledSet",
    "LoadReport",
    "PromptFileError",
    "PromptRecord",
    "PromptRole",
    "bundled_path",
    "load_bundled",
    "load_prompt_file",
    "load_prompt_file_with_report",
]

# Ordered: the first header / key present wins. "turns" is last so that an explicit prompt field
# beats the multi-turn list when a file has both.
PROMPT_COLUMN_CANDIDATES: tuple[str, ...] = (
    "prompt",
    "goal",
    "question",
    "instruction",
    "text",
    "query",
    "turns",
)
CATEGORY_COLUMN_CANDIDATES: tuple[str, ...] = ("category",)
ID_COLUMN_CANDIDATES: tuple[str, ...] = ("id", "question_id")
SUPPORTED_SUFFIXES: tuple[str, ...] = (".csv", ".txt", ".json", ".jsonl")
DEFAULT_MAX_CHARS = 20_000

_UTF8_BOM = b"\xef\xbb\xbf"
_KEPT_CONTROLS = frozenset("\n\t")

PromptRole = Literal["harmful", "safe", "helpfulness"]


@dataclass(frozen=True)
class PromptRecord:
    """One prompt as loaded from a file."""

    text: str
    category: str | None = None
    source_id: str | None = None


class PromptFileError(ValueError):
    """A prompt file that cannot be loaded; the message names the file and the reason."""


@dataclass(frozen=True)
class LoadReport:
    """What happened while loading one file.

    ``rows_read == prompts_kept + filtered_out + empty_dropped + duplicates_dropped``.
    ``control_chars_removed`` counts characters removed from every prompt read (kept or dropped)
    and from the category and id of kept records.
    """

    path: Path
    rows_read: int
    prompts_kept: int
    filtered_out: int
    empty_dropped: int
    duplicates_dropped: int
    control_chars_removed: int


@dataclass(frozen=True)
class _RawRecord:
    """A record before normalisation; ``where`` labels it in errors and as the fallback id."""

    where: str
    text: Any
    category: Any = None
    source_id: Any = None


def load_prompt_file(
    path: str | Path,
    *,
    prompt_column: str | None = None,
    category_column: str | None = None,
    filter: Mapping[str, str] | None = None,  # noqa: A002 - public keyword name by design
    max_chars: int = DEFAULT_MAX_CHARS,
) -> list[PromptRecord]:
    """Load the prompts of one file; see the module docstring for formats and normalisation."""
    records, _ = load_prompt_file_with_report(
        path,
        prompt_column=prompt_column,
        category_column=category_column,
        filter=filter,
        max_chars=max_chars,
    )
    return records


def load_prompt_file_with_report(
    path: str | Path,
    *,
    prompt_column: str | None = None,
    category_column: str | None = None,
    filter: Mapping[str, str] | None = None,  # noqa: A002
    max_chars: int = DEFAULT_MAX_CHARS,
) -> tuple[list[PromptRecord], LoadReport]:
    """Like :func:`load_prompt_file`, also returning the counts of what was dropped."""
    path = Path(path)
    name = path.name
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise PromptFileError(
            f"{name}: unsupported extension {path.suffix!r}; expected one of "
            f"{', '.join(SUPPORTED_SUFFIXES)}"
        )
    text = _decode(name, path.read_bytes())
    if not text.strip():
        raise PromptFileError(f"{name}: empty file")

    columns = _Columns(prompt_column, category_column, dict(filter) if filter else {})
    if suffix == ".csv":
        raw_records = _read_csv(name, text, columns)
    elif suffix == ".txt":
        columns.reject_fields(name, "a TXT file has no columns")
        raw_records = _read_txt(text)
    elif suffix == ".json":
        raw_records = _read_json(name, text, columns)
    else:
        raw_records = _read_jsonl(name, text, columns)

    records: list[PromptRecord] = []
    seen: set[str] = set()
    rows_read = filtered_out = empty = duplicates = 0
    control_removed = 0
    for raw in raw_records:
        rows_read += 1
        if raw is None:
            filtered_out += 1
            continue
        prompt, removed = _clean(_prompt_text(name, raw))
        control_removed += removed
        if not prompt:
            empty += 1
            continue
        if len(prompt) > max_chars:
            raise PromptFileError(
                f"{name}: {raw.where}: prompt is {len(prompt):,} characters, over the "
                f"max_chars limit of {max_chars:,}; shorten it or raise max_chars "
                "(prompts are never truncated)"
            )
        if prompt in seen:
            duplicates += 1
            continue
        seen.add(prompt)
        category, removed_c = _clean(_scalar_text(name, raw.where, "category", raw.category))
        source_id, removed_i = _clean(_scalar_text(name, raw.where, "id", raw.source_id))
        control_removed += removed_c + removed_i
        records.append(
            PromptRecord(text=prompt, category=category or None, source_id=source_id or raw.where)
        )

    if not records:
        raise PromptFileError(
            f"{name}: no prompts ({rows_read} rows read: {filtered_out} filtered out, "
            f"{empty} empty)"
        )
    report = LoadReport(
        path=path,
        rows_read=rows_read,
        prompts_kept=len(records),
        filtered_out=filtered_out,
        empty_dropped=empty,
        duplicates_dropped=duplicates,
        control_chars_removed=control_removed,
    )
    return records, report


# --------------------------------------------------------------------------- decoding, cleaning


def _decode(name: str, data: bytes) -> str:
    bom = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = bom + exc.start
        raise PromptFileError(
            f"{name}: not valid UTF-8 at byte offset {offset} (byte 0x{data[offset]:02x}); "
            "re-encode the file as UTF-8"
        ) from None


def _clean(value: str | None) -> tuple[str, int]:
    """Normalise one value; return it and the number of control characters removed."""
    if value is None:
        return "", 0
    value = value.replace("\r\n", "\n").replace("\r", "\n")
    kept = [
        ch for ch in value if ch in _KEPT_CONTROLS or unicodedata.category(ch) != "Cc"
    ]
    return "".join(kept).strip(), len(value) - len(kept)


def _scalar_text(name: str, where: str, what: str, value: Any) -> str | None:
    """A field value as text: strings as is, other JSON scalars as their JSON text."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    raise PromptFileError(
        f"{name}: {where}: {what} must be a string or number, got {type(value).__name__}"
    )


def _prompt_text(name: str, raw: _RawRecord) -> str | None:
    value = raw.text
    if isinstance(value, list):
        # Multi-turn benchmarks (Vicuna-Bench "turns"): the first turn is the prompt; later turns
        # depend on the model's first answer, so they cannot stand alone.
        if not value or not all(isinstance(turn, str) for turn in value):
            raise PromptFileError(
                f"{name}: {raw.where}: a list-valued prompt must be a non-empty list of strings"
            )
        return value[0]
    if value is None or isinstance(value, str):
        return value
    raise PromptFileError(
        f"{name}: {raw.where}: prompt must be a string, got {type(value).__name__}"
    )


# --------------------------------------------------------------------------- column resolution


@dataclass
class _Columns:
    """The caller's column choices, resolved against a header or an object's keys."""

    prompt: str | None
    category: str | None
    filter: dict[str, str] = field(default_factory=dict)

    def reject_fields(self, name: str, why: str) -> None:
        if self.filter:
            raise PromptFileError(f"{name}: filter= is not supported here: {why}")
        if self.prompt is not None or self.category is not None:
            raise PromptFileError(
                f"{name}: prompt_column= / category_column= are not supported here: {why}"
            )

    def resolve(self, name: str, available: list[str], kind: str) -> _Resolved:
        def pick(explicit: str | None, candidates: tuple[str, ...], arg: str) -> str | None:
            if explicit is not None:
                if explicit not in available:
                    raise PromptFileError(
                        f"{name}: no {kind} {explicit!r} ({arg}=); {kind}s are {available}"
                    )
                return explicit
            by_folded = {key.strip().casefold(): key for key in available}
            for candidate in candidates:
                if candidate in by_folded:
                    return by_folded[candidate]
            return None

        prompt = pick(self.prompt, PROMPT_COLUMN_CANDIDATES, "prompt_column")
        if prompt is None:
            raise PromptFileError(
                f"{name}: no prompt {kind}; {kind}s are {available}; pass prompt_column= "
                f"(auto-detected: {', '.join(PROMPT_COLUMN_CANDIDATES)})"
            )
        for key in self.filter:
            if key not in available:
                raise PromptFileError(
                    f"{name}: filter {kind} {key!r} not found; {kind}s are {available}"
                )
        return _Resolved(
            prompt=prompt,
            category=pick(self.category, CATEGORY_COLUMN_CANDIDATES, "category_column"),
            source_id=pick(None, ID_COLUMN_CANDIDATES, "id"),
            filter=self.filter,
        )


@dataclass(frozen=True)
class _Resolved:
    prompt: str
    category: str | None
    source_id: str | None
    filter: dict[str, str]

    def record(self, name: str, where: str, row: Mapping[str, Any]) -> _RawRecord | None:
        """The raw record of ``row``, or ``None`` when the filter removes it."""
        for key, wanted in self.filter.items():
            if key not in row:
                raise PromptFileError(f"{name}: {where}: filter field {key!r} missing")
            if _scalar_text(name, where, key, row[key]) != wanted:
                return None
        if self.prompt not in row:
            raise PromptFileError(
                f"{name}: {where}: prompt field {self.prompt!r} missing; keys are {list(row)}"
            )
        return _RawRecord(
            where=where,
            text=row[self.prompt],
            category=row.get(self.category) if self.category else None,
            source_id=row.get(self.source_id) if self.source_id else None,
        )


# --------------------------------------------------------------------------- format readers
# Each reader yields one item per row read: a _RawRecord, or None for a row the filter removed.


def _read_csv(name: str, text: str, columns: _Columns) -> Iterator[_RawRecord | None]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    row_number = 0  # data rows read so far, so that a csv.Error can name the row it hit
    try:
        header = next(reader)
        if len(set(header)) != len(header):
            raise PromptFileError(f"{name}: duplicate column names in header {header}")
        resolved = columns.resolve(name, header, "column")
        for row in reader:
            row_number += 1
            where = f"row {row_number}"
            if not row:
                # A blank line: counted as an empty prompt, like a blank line in a TXT file.
                yield _RawRecord(where=where, text=None)
                continue
            if len(row) != len(header):
                raise PromptFileError(
                    f"{name}: {where} (line {reader.line_num}) has {len(row)} fields, "
                    f"header has {len(header)}"
                )
            yield resolved.record(name, where, dict(zip(header, row)))
    except csv.Error as exc:
        if "field limit" in str(exc):
            # The csv module refuses fields over csv.field_size_limit() (131,072 by default). We
            # do not raise that process-wide limit; such a field is far over max_chars anyway.
            raise PromptFileError(
                f"{name}: row {row_number + 1} (line {reader.line_num}): a field is over the "
                f"CSV field limit of "
                f"{csv.field_size_limit():,} characters (prompts are never truncated)"
            ) from None
        raise PromptFileError(f"{name}: malformed CSV at line {reader.line_num}: {exc}") from None


def _read_txt(text: str) -> Iterator[_RawRecord]:
    # Split on line endings only: str.splitlines() would also split on \x0b, \x0c, \x1c-\x1e,
    # \x85 and U+2028/9, turning a stray control character into an extra prompt.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start an empty one
    for line_number, line in enumerate(lines, start=1):
        yield _RawRecord(where=f"line {line_number}", text=line)


def _parse_json(name: str, text: str, line_offset: int = 0) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptFileError(
            f"{name}: malformed JSON at line {exc.lineno + line_offset}, column {exc.colno}: "
            f"{exc.msg}"
        ) from None


def _question_lists(data: Any) -> list[tuple[tuple[str, ...], list[Any]]] | None:
    """The lists of questions of a nested JSON file with their keys, the first key the category:
    {category: [questions]} or {topic: {subtopic: [questions]}} (CategoricalHarmfulQA's shape); None for any other."""
    if not isinstance(data, dict) or not data:
        return None
    if all(isinstance(questions, list) for questions in data.values()):
        return [((category,), questions) for category, questions in data.items()]
    if all(isinstance(sub, dict) and all(isinstance(qs, list) for qs in sub.values()) for sub in data.values()):
        return [((topic, subtopic), qs) for topic, sub in data.items() for subtopic, qs in sub.items()]
    return None


def _read_json(name: str, text: str, columns: _Columns) -> Iterator[_RawRecord | None]:
    data = _parse_json(name, text)
    if isinstance(data, list):
        if all(isinstance(item, str) for item in data):
            columns.reject_fields(name, "a JSON list of strings has no fields")
            for index, item in enumerate(data, start=1):
                yield _RawRecord(where=f"item {index}", text=item)
            return
        if all(isinstance(item, dict) for item in data):
            resolved = columns.resolve(name, list(data[0]), "key")
            for index, item in enumerate(data, start=1):
                yield resolved.record(name, f"item {index}", item)
            return
        raise PromptFileError(
            f"{name}: a JSON list must hold only strings or only objects, not a mix"
        )
    groups = _question_lists(data)
    if groups is not None:
        columns.reject_fields(name, "a nested {category: [questions]} or {topic: {subtopic: [questions]}} shape "
                              "has no fields")
        for keys, questions in groups:
            for index, question in enumerate(questions, start=1):
                where = " / ".join([*keys, f"item {index}"])
                if not isinstance(question, str):
                    raise PromptFileError(
                        f"{name}: {where}: question must be a string, got {type(question).__name__}"
                    )
                yield _RawRecord(where=where, text=question, category=keys[0])
        return
    raise PromptFileError(
        f"{name}: unsupported JSON shape (top level is {type(data).__name__}); expected a list "
        "of strings, a list of objects, {category: [questions]}, or {category: {subcategory: [questions]}}"
    )


def _read_jsonl(name: str, text: str, columns: _Columns) -> Iterator[_RawRecord | None]:
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    resolved: _Resolved | None = None
    for line_number, line in enumerate(lines, start=1):
        where = f"line {line_number}"
        if not line.strip():
            if line_number < len(lines):  # a blank line counts as empty; the final newline not
                yield _RawRecord(where=where, text=None)
            continue
        item = _parse_json(name, line, line_offset=line_number - 1)
        if not isinstance(item, dict):
            raise PromptFileError(
                f"{name}: {where}: a JSONL line must be an object, got {type(item).__name__}"
            )
        if resolved is None:
            resolved = columns.resolve(name, list(item), "key")
        yield resolved.record(name, where, item)


# --------------------------------------------------------------------------- bundled sets


@dataclass(frozen=True)
class BundledSet:
    """A prompt file shipped in this package, and how to load it."""

    name: str
    filename: str
    description: str
    role: PromptRole
    license: str
    prompt_column: str | None = None
    category_column: str | None = None
    filter: Mapping[str, str] | None = None
    train_fraction: float = 0.5  # evaluation-only sets: 0

    def loader_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`load_prompt_file`."""
        return {
            "prompt_column": self.prompt_column,
            "category_column": self.category_column,
            "filter": dict(self.filter) if self.filter else None,
        }


def _bundled(*sets: BundledSet) -> Mapping[str, BundledSet]:
    return MappingProxyType({s.name: s for s in sets})


# Read-only so that no caller can change what another caller's "advbench" means.
BUNDLED_PROMPT_SETS: Mapping[str, BundledSet] = _bundled(
    BundledSet(
        name="advbench",
        filename="advbench_harmful_behaviors.csv",
        description="AdvBench harmful behaviours (520 instructions; `goal` column).",
        role="harmful",
        license="MIT",
    ),
    BundledSet(
        name="hh_rlhf",
        filename="hh_rlhf_questions.txt",
        description="Anthropic HH-RLHF red-team questions (5,022, one per line).",
        role="harmful",
        license="MIT (data) / Apache-2.0 (repo)",
    ),
    BundledSet(
        name="hh_harmless",
        filename="hh_harmless_eval.jsonl",
        description="HH harmlessness (MATRIX's HH benchmark): first human turns of Anthropic's HH-RLHF "
        "harmless-base test dialogues, the half not used as Stable Alignment's seed memories (1,106).",
        role="harmful",
        license="MIT",
        # Evaluation-only: the paper evaluates on it and trains on other questions, and the other half of the same
        # dialogues are human answers shown to Stable Alignment's agents (see `data/hh_harmless.py`).
        train_fraction=0.0,
    ),
    BundledSet(
        name="safe_rlhf",
        filename="safe_rlhf_eval_prompts.json",
        description="PKU safe-rlhf evaluation prompts (83, 8 harm categories).",
        role="harmful",
        license="Apache-2.0",
    ),
    BundledSet(
        name="harmfulqa",
        filename="harmfulqa.json",
        description="HarmfulQA questions (1,960 published, 1,938 distinct; category = topic).",
        role="harmful",
        license="Apache-2.0",
    ),
    BundledSet(
        name="dangerousqa",
        filename="dangerousqa.json",
        description="DangerousQA questions (200).",
        role="harmful",
        license="Apache-2.0",
    ),
    BundledSet(
        name="xstest_safe",
        filename="xstest_prompts.csv",
        description="XSTest safe prompts (250) that a well-calibrated model should answer; "
        "category = XSTest type.",
        role="safe",
        license="CC-BY-4.0",
        category_column="type",
        filter=MappingProxyType({"label": "safe"}),
        train_fraction=0.0,
    ),
    BundledSet(
        name="vicuna_bench",
        filename="vicuna_bench_questions.jsonl",
        description="Vicuna-Bench questions (80, first turn, 9 categories).",
        role="helpfulness",
        license="Apache-2.0",
    ),
)


def _bundled_set(name: str) -> BundledSet:
    try:
        return BUNDLED_PROMPT_SETS[name]
    except KeyError:
        raise KeyError(
            f"unknown bundled prompt set {name!r}; known: {', '.join(BUNDLED_PROMPT_SETS)}"
        ) from None


def bundled_path(name: str) -> Path:
    """Path of a bundled prompt file; the files live beside this module."""
    return Path(__file__).parent / _bundled_set(name).filename


def load_bundled(name: str) -> list[PromptRecord]:
    """Load a bundled prompt set by name (a key of :data:`BUNDLED_PROMPT_SETS`)."""
    bundled = _bundled_set(name)
    return load_prompt_file(bundled_path(name), **bundled.loader_kwargs())
