"""The two bundled extracts of Anthropic's HH-RLHF harmless-base test dialogues (MIT), and how they were made.

From each dialogue's `chosen` version: its first human turn (the question) and the first assistant reply (the
human-preferred answer). Questions are deduplicated (the first dialogue wins) and split in two by a hash of the
question, so a question lands on one side only:

- `hh_harmless_eval.jsonl`: the questions of one half, the HH harmlessness evaluation set of the MATRIX paper
  (`{"id": "test-ROW", "prompt": QUESTION}`, ROW the 0-based line of the source file);
- `hh_harmless_seed_pairs.jsonl.gz`: the (question, answer) pairs of the other half, the human pairs Stable
  Alignment seeds its agents' memories with (`{"id", "question", "answer"}`); a pair without an answer goes to
  the evaluation half.

No evaluation prompt is ever shown to an agent as a remembered human answer. Regenerate both (byte for byte) with
`python -m matrix_assets.data.hh_harmless SOURCE.jsonl.gz` (SOURCE: anthropics/hh-rlhf, harmless-base/test).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).parent
EVAL_FILE = "hh_harmless_eval.jsonl"
SEED_FILE = "hh_harmless_seed_pairs.jsonl.gz"
_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass(frozen=True)
class Exchange:
    source_id: str
    question: str
    answer: str


def first_exchange(dialogue: str) -> tuple[str, str] | None:
    """The first human turn and the first assistant reply of a `\\n\\nHuman: ... \\n\\nAssistant: ...` dialogue;
    None when it does not open with a human turn answered by the assistant."""
    parts = _TURN.split(dialogue)
    turns = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]
    if len(turns) < 2 or turns[0][0] != "Human" or turns[1][0] != "Assistant" or not turns[0][1]:
        return None
    return turns[0][1], turns[1][1]


def exchanges(rows: Iterable[dict]) -> list[Exchange]:
    """One exchange per distinct question, in source order."""
    seen: set[str] = set()
    out = []
    for row_number, row in enumerate(rows):
        pair = first_exchange(row["chosen"])
        if pair is None or pair[0] in seen:
            continue
        seen.add(pair[0])
        out.append(Exchange(f"test-{row_number}", *pair))
    return out


def is_seed(exchange: Exchange) -> bool:
    """The seed half: a hash of the question alone, so the split never depends on order or on the answer."""
    bucket = int(hashlib.sha256(f"hh-harmless-split\x1f{exchange.question}".encode()).hexdigest()[:8], 16)
    return bool(exchange.answer) and bucket % 2 == 0


def build(source: Path, out_dir: Path = DATA_DIR) -> tuple[int, int]:
    """Write both extracts from the source file; return (evaluation questions, seed pairs)."""
    with gzip.open(source, "rt", encoding="utf-8") as fh:
        items = exchanges(json.loads(line) for line in fh if line.strip())
    evaluation = [e for e in items if not is_seed(e)]
    seeds = [e for e in items if is_seed(e)]
    (out_dir / EVAL_FILE).write_text(
        "".join(json.dumps({"id": e.source_id, "prompt": e.question}, ensure_ascii=False) + "\n" for e in evaluation),
        encoding="utf-8")
    payload = "".join(json.dumps({"id": e.source_id, "question": e.question, "answer": e.answer},
                                 ensure_ascii=False) + "\n" for e in seeds)
    # mtime=0: the same source gives the same bytes.
    (out_dir / SEED_FILE).write_bytes(gzip.compress(payload.encode("utf-8"), compresslevel=9, mtime=0))
    return len(evaluation), len(seeds)


def seed_pairs(path: Path | None = None) -> list[tuple[str, str]]:
    """The bundled human (question, answer) seed pairs, in file order."""
    with gzip.open(path or DATA_DIR / SEED_FILE, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [(row["question"], row["answer"]) for row in rows]


if __name__ == "__main__":
    n_eval, n_seed = build(Path(sys.argv[1]))
    print(f"{n_eval} evaluation questions ({EVAL_FILE}), {n_seed} seed pairs ({SEED_FILE})")
