"""Build the shipped labelled sample of a model's answers from independent reads of one `label export` file.

    .venv/bin/python scripts/bundle_labelled_answers.py --store .matrix/matrix.db --export sample.csv \
        --read A=reads/a.csv --read B=reads/b.csv [--read C=reads/c.csv] --model-id smollm2-135m-instruct \
        --labeller "..." --method "..."

Each read is a CSV (`item_id,refusal,harmful_content,notes`) written blind by one reader. Reads A and B cover every
item; a third read C, when given, covers the items where A and B disagree on either label, and the label is the
majority of the three. The agreement of A and B (Cohen's kappa on refusal, full or partial, and on harmful content)
is written into the provenance JSON. The bundled CSV (`matrix_assets/data/labelled_answers/MODEL_ID.csv`) carries
each answer's model and evaluation set, read from the store that produced the export.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from matrix_assets.evaluation.labels import (  # noqa: E402
    BUNDLED_COLUMNS, BUNDLED_SAMPLES_DIR, HARMFUL_LABELS, REFUSAL_LABELS, item_id,
)
from matrix_assets.evaluation.stats import agreement_report  # noqa: E402
from matrix_assets.store.db import Store  # noqa: E402


def read(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = {r["item_id"].strip(): {"refusal": r["refusal"].strip(), "harmful_content": r["harmful_content"].strip()}
                for r in csv.DictReader(fh)}
    for item, labels in rows.items():
        if labels["refusal"] not in REFUSAL_LABELS or labels["harmful_content"] not in HARMFUL_LABELS:
            raise SystemExit(f"{path}: item {item}: unknown label {labels}")
    return rows


def kappa(a: list[bool], b: list[bool]) -> dict[str, float]:
    r = agreement_report(a, b)

    def number(x: float) -> float | None:  # undefined (no variation in either read) -> null, not NaN
        return None if x != x else round(x, 3)

    return {"kappa": number(r.kappa), "ci_low": number(r.kappa_ci_low), "ci_high": number(r.kappa_ci_high),
            "agree": sum(x == y for x, y in zip(a, b)), "n": len(a), "positives": [sum(a), sum(b)]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, required=True, help="the SQLite store the export came from")
    p.add_argument("--export", type=Path, required=True, help="the file `label export` wrote")
    p.add_argument("--read", action="append", required=True, metavar="NAME=CSV", help="a reader's labels")
    p.add_argument("--model-id", required=True)
    p.add_argument("--labeller", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--out-dir", type=Path, default=BUNDLED_SAMPLES_DIR)
    args = p.parse_args()
    with args.export.open(newline="", encoding="utf-8") as fh:
        exported = list(csv.DictReader(fh))
    reads = {name: read(Path(path)) for name, path in (r.split("=", 1) for r in args.read)}
    names = list(reads)
    a, b = reads[names[0]], reads[names[1]]
    ids = [row["item_id"] for row in exported]
    missing = [i for i in ids if i not in a or i not in b]
    if missing:
        raise SystemExit(f"reads {names[0]} and {names[1]} must cover every item; missing {missing[:5]}")
    refused = {n: {i: REFUSAL_LABELS[r["refusal"]] == 1 for i, r in rows.items()} for n, rows in reads.items()}
    harmful = {n: {i: r["harmful_content"] == "yes" for i, r in rows.items()} for n, rows in reads.items()}
    disagree = [i for i in ids if refused[names[0]][i] != refused[names[1]][i]
                or harmful[names[0]][i] != harmful[names[1]][i]]
    third = names[2] if len(names) > 2 else None
    if third and [i for i in disagree if i not in reads[third]]:
        raise SystemExit(f"read {third} must cover the {len(disagree)} items A and B disagree on")

    def majority(labels: dict[str, dict[str, bool]], item: str) -> bool:
        votes = [labels[n][item] for n in names if item in labels[n]]
        return sum(votes) * 2 > len(votes) if len(votes) % 2 else votes[0]  # a tie (no third read) keeps A's

    answers = {item_id(r["eval_id"], r["model_label"], r["prompt_id"]): r
               for r in Store(f"sqlite:///{args.store.resolve()}").query(
                   "SELECT eval_id, model_label, prompt_id, eval_set, prompt_set FROM eval_answers")}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out_csv = args.out_dir / f"{args.model_id}.csv"
    with out_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=BUNDLED_COLUMNS)
        writer.writeheader()
        for row in exported:
            i = row["item_id"]
            source = answers[i]
            refusal = majority(refused, i)
            # Full vs partial refusal: the first reader's kind among the readers who called it a refusal.
            kind = next((reads[n][i]["refusal"] for n in names if i in reads[n] and refused[n][i]), "2_full_refusal")
            writer.writerow({"model_label": source["model_label"], "eval_set": source["eval_set"],
                             "prompt_set": source["prompt_set"], "question": row["question"], "answer": row["answer"],
                             "refusal": kind if refusal else "1_full_compliance",
                             "harmful_content": "yes" if majority(harmful, i) else "no"})
    meta = {
        "eval_id": exported[0]["eval_id"], "model_id": args.model_id, "n": len(exported),
        "labeller": args.labeller, "method": args.method, "human_labels": False,
        "agreement_between_first_two_reads": {
            "refusal": kappa([refused[names[0]][i] for i in ids], [refused[names[1]][i] for i in ids]),
            "harmful_content": kappa([harmful[names[0]][i] for i in ids], [harmful[names[1]][i] for i in ids]),
        },
        "items_the_first_two_reads_disagreed_on": len(disagree),
        "third_read": third is not None,
        "built_by": "scripts/bundle_labelled_answers.py",
    }
    out_csv.with_suffix(".json").write_text(json.dumps(meta, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    print(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
