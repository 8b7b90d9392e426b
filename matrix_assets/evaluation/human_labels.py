"""Human-labelled chat-model completions used to validate refusal judges.

A judge's refusal verdicts only count once their agreement with human labels is measured
(see :mod:`matrix_assets.evaluation.stats`). The reference labels come from XSTest v2
(Röttger et al., 2023; CC BY 4.0): the completions of four chat models on the 450 XSTest
prompts, each labelled by two annotators with a final adjudicated label. The CSVs are bundled
byte-for-byte under ``matrix_assets/data/xstest_v2_labeled/`` (provenance in its README.md).

The binary label used everywhere: refusal = ``final_label`` in {``2_full_refusal``,
``3_partial_refusal``}. Partial refusals count as refusals because for over-refusal a safe
prompt that is half-refused has still been refused in part, and because the two classes are
the judges' only output.

Note that these prompts are the same XSTest prompts our over-refusal evaluation uses: any
classifier fitted on this data must read the completion only, never the prompt, or it would
learn per-prompt answers instead of what a refusal looks like.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LABELS",
    "REFUSAL_LABELS",
    "XSTEST_V2_DIR",
    "XSTEST_V2_MODELS",
    "LabeledCompletion",
    "load_xstest_v2",
    "xstest_v2_path",
]

#: Folder of the bundled CSVs (shipped as package data).
XSTEST_V2_DIR: Path = Path(__file__).resolve().parent.parent / "data" / "xstest_v2_labeled"

#: The chat models whose completions are bundled, in file-name spelling.
XSTEST_V2_MODELS: tuple[str, ...] = ("gpt4", "llama2orig", "mistralguard", "mistralinstruct")

#: All values ``final_label`` may take; anything else means a corrupted file.
LABELS: tuple[str, ...] = ("1_full_compliance", "2_full_refusal", "3_partial_refusal")

#: ``final_label`` values that count as a refusal.
REFUSAL_LABELS: frozenset[str] = frozenset({"2_full_refusal", "3_partial_refusal"})

_COLUMNS: tuple[str, ...] = (
    "id", "type", "prompt", "completion", "annotation_1", "annotation_2", "agreement", "final_label",
)


@dataclass(frozen=True)
class LabeledCompletion:
    """One model completion of one XSTest prompt with its adjudicated human label."""

    model: str
    id: str
    type: str
    prompt: str
    completion: str
    final_label: str
    refusal: bool


def xstest_v2_path(model: str) -> Path:
    """Path of the bundled CSV of ``model`` (one of :data:`XSTEST_V2_MODELS`)."""
    if model not in XSTEST_V2_MODELS:
        raise ValueError(f"unknown XSTest v2 model {model!r}; expected one of {XSTEST_V2_MODELS}")
    return XSTEST_V2_DIR / f"xstest_v2_completions_{model}.csv"


def load_xstest_v2(models: Sequence[str] | None = None) -> list[LabeledCompletion]:
    """Load the bundled labelled completions of ``models`` (default: all four), in file order.

    Raises ``ValueError`` on an unexpected header or label rather than skipping rows: a
    silently shrunken reference set would make every agreement figure wrong.
    """
    chosen = XSTEST_V2_MODELS if models is None else tuple(models)
    out: list[LabeledCompletion] = []
    for model in chosen:
        path = xstest_v2_path(model)
        # newline="" because completions contain embedded newlines inside quoted fields.
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if tuple(reader.fieldnames or ()) != _COLUMNS:
                raise ValueError(f"{path.name}: unexpected columns {reader.fieldnames}")
            for row in reader:
                label = row["final_label"]
                if label not in LABELS:
                    raise ValueError(f"{path.name}, id {row['id']}: unknown final_label {label!r}")
                out.append(
                    LabeledCompletion(
                        model=model,
                        id=row["id"],
                        type=row["type"],
                        prompt=row["prompt"],
                        completion=row["completion"],
                        final_label=label,
                        refusal=label in REFUSAL_LABELS,
                    )
                )
    return out
