"""Small helpers shared by the asset modules (metadata formatting, progress logging)."""


import base64
import os
import time
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any

import dagster as dg

from matrix_assets.defs.resources import LLMResource, StoreResource
from matrix_assets.store.generation_cache import CachedBackend, CacheStats


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


def md_table(rows: list[Mapping[str, Any]], columns: list[str], max_chars: int = 200) -> dg.MetadataValue:
    def cell(value: Any) -> str:
        return str(value).replace("|", "/").replace("\n", " ")[:max_chars]

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return dg.MetadataValue.md("\n".join(lines))
