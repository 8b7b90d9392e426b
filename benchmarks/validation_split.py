"""The validation split the benchmarks choose settings on, shared by `tune_on_validation.py` and
`structured_output.py`: AdvBench training-split prompts that neither the quick run (the first 9) nor Stable
Alignment's seed memories (the next 18) use, the bundled model, and one cached store so the scripts share their
model calls. Importing it first also sets the offline environment the scripts need before transformers loads."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from matrix_assets.store.db import Store  # noqa: E402
from matrix_assets.store.prompt_sets import load_prompt_set  # noqa: E402

MODEL = "smollm2-135m-instruct"
QUICK_PROMPTS, SEED_PROMPTS = 9, 18
FIRST_VALIDATION = QUICK_PROMPTS + SEED_PROMPTS
ANSWER_TOKENS = 128  # initial answers, as in tuning (their generations are shared through the cache)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def open_store(folder: Path) -> Store:
    """The shared cache (`tuning.db` in `folder`), with AdvBench loaded and split."""
    store = Store(f"sqlite:///{folder / 'tuning.db'}")
    load_prompt_set(store, "advbench")
    return store


def validation_prompts(store: Store, n: int) -> list:
    """The n validation prompts (stored Prompt records), from training-split position FIRST_VALIDATION on."""
    return store.train_prompts("advbench")[FIRST_VALIDATION : FIRST_VALIDATION + n]
