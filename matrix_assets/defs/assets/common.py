"""Small helpers shared by the asset modules (metadata formatting, progress logging)."""


import base64
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg

from matrix_assets.defs.resources import LLMResource, StoreResource
from matrix_assets.llm.base import PermanentBackendError
from matrix_assets.methods.base import Markdown, StageOutcome
from matrix_assets.store.db import Store
from matrix_assets.store.generation_cache import CachedBackend, CacheStats

# Generation is resumable through the cache, so a retry costs only what was not generated yet.
GENERATION_RETRY = dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL)
MODEL_POOL = "model"  # one model-loading step at a time per pool slot (dagster.yaml limits it to 1 on a CPU)


@contextmanager
def fail_fast_on_permanent_errors() -> Iterator[None]:
    """An unknown model or a request the server rejects fails the step at once: a retry could only repeat it."""
    try:
        yield
    except PermanentBackendError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc


def progress_logger(
    context: dg.AssetExecutionContext, what: str, unit: str = "generations"
) -> Callable[[int, int], None]:
    """Report generation progress: a log line at most every ~10 s (the Dagster UI's event log), and a
    terminal progress bar when the CLI asks for one (MATRIX_PROGRESS_BARS=1, set when stderr is a TTY).

    The cache calls it with done=0 when a batch of cache misses starts, then after every chunk; the scene
    engine calls it with done=0, then as each scene ends."""
    clock = {"started": time.monotonic(), "last": 0.0, "batch": 0}
    bar: dict[str, Any] = {"bar": None}
    show_bar = os.environ.get("MATRIX_PROGRESS_BARS") == "1"

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done == 0:
            clock.update(started=now, last=now, batch=clock["batch"] + 1)
            if show_bar:
                from tqdm import tqdm

                bar["bar"] = tqdm(total=total, desc=f"{what} #{clock['batch']}", unit=unit[:5], leave=False)
            return
        if bar["bar"] is not None:
            bar["bar"].update(done - bar["bar"].n)
            if done == total:
                bar["bar"].close()
                bar["bar"] = None
        if done == total or now - clock["last"] >= 10:
            clock["last"] = now
            rate = done / max(now - clock["started"], 1e-9)
            context.log.info(
                f"{what}, batch {clock['batch']}: {done}/{total} {unit} "
                f"({rate:.2f}/s, ~{(total - done) / rate:.0f}s left)"
            )

    return report


def image_md(path: Path, alt: str) -> dg.MetadataValue:
    """A PNG shown inline in the Dagster UI (Markdown with a data URI), so people look rather than read."""
    encoded = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{encoded})")


def cached_llm(
    context: dg.AssetExecutionContext, llm: LLMResource, store: StoreResource, what: str
) -> CachedBackend:
    """The asset's model behind the generation cache, with progress reporting; fails fast (missing model,
    server down) before any work."""
    llm.check()
    return llm.cached(store.get_store(), progress=progress_logger(context, what))


def cache_metadata(stats: CacheStats) -> dict[str, Any]:
    return dict(stats.as_metadata())


class AssetStageContext:
    """A method stage's view of the run (`methods.base.StageContext`): the cached models, the store, the log."""

    def __init__(self, context: dg.AssetExecutionContext, store: StoreResource, llm: LLMResource,
                 judge: LLMResource | None, *, loads_model: bool) -> None:
        self._context = context
        self.partition = context.partition_key
        self.store: Store = store.get_store()
        self._llm_resource, self._judge_resource = llm, judge
        self._llm: CachedBackend | None = None
        self._judge: CachedBackend | None = None
        if loads_model:
            llm.check()  # fail fast (missing model, server down) before any work

    @property
    def llm(self) -> CachedBackend:
        if self._llm is None:
            self._llm = self._llm_resource.cached(self.store, progress=progress_logger(self._context, "generation"))
        return self._llm

    @property
    def judge(self) -> CachedBackend:
        if self._judge is None:
            if self._judge_resource is None:
                raise RuntimeError("this stage did not declare that it uses the judge")
            self._judge_resource.check()
            self._judge = self._judge_resource.cached(self.store, progress=progress_logger(self._context, "judge"))
        return self._judge

    @property
    def model_id(self) -> str:
        return self._llm_resource.model_identity()

    def log(self, message: str) -> None:
        self._context.log.info(message)

    def progress(self, what: str, unit: str = "generations") -> Callable[[int, int], None]:
        return progress_logger(self._context, what, unit)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self._llm is not None:
            out.update(cache_metadata(self._llm.stats))
        if self._judge is not None:
            out.update({f"judge_{k}": v for k, v in cache_metadata(self._judge.stats).items()})
        return out


def outcome_metadata(outcome: StageOutcome) -> dict[str, Any]:
    """A stage's outcome as Dagster metadata: Markdown rendered, lists of rows as tables, fallbacks with shares."""
    metadata: dict[str, Any] = {}
    for key, value in outcome.metadata.items():
        if isinstance(value, Markdown):
            metadata[key] = dg.MetadataValue.md(str(value))
        elif isinstance(value, list) and value and isinstance(value[0], Mapping):
            metadata[key] = md_table(value, list(value[0].keys()), 400)
        else:
            metadata[key] = value
    for name, count in sorted(outcome.fallbacks.items()):
        metadata[f"fallback/{name}"] = count
    for family, count in sorted(outcome.items_with_fallback.items()):
        metadata[f"fallback_share/{family}"] = round(count / outcome.n_items, 3) if outcome.n_items else 0.0
    return metadata


def md_table(rows: list[Mapping[str, Any]], columns: list[str], max_chars: int = 200) -> dg.MetadataValue:
    def cell(value: Any) -> str:
        return str(value).replace("|", "/").replace("\n", " ")[:max_chars]

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return dg.MetadataValue.md("\n".join(lines))
