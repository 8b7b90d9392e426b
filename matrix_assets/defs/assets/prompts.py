import dagster as dg

from matrix_assets.data.loaders import PromptFileError
from matrix_assets.defs.assets.common import md_table
from matrix_assets.defs.configs import PromptSetConfig
from matrix_assets.defs.partitions import prompt_sets_partitions
from matrix_assets.defs.resources import StoreResource
from matrix_assets.store.prompt_sets import load_prompt_set


@dg.asset(
    partitions_def=prompt_sets_partitions,
    group_name="prompts",
    kinds={"python", "sql"},
    description="Loads a prompt set (bundled, or a file in the drop folder) into the store with a deterministic train / eval split.",
)
def benchmark_prompts(
    context: dg.AssetExecutionContext, config: PromptSetConfig, store: StoreResource
) -> dg.MaterializeResult:
    db = store.get_store()
    name = context.partition_key
    try:
        summary = load_prompt_set(
            db, name, source=config.source, train_fraction=config.train_fraction,
            prompt_column=config.prompt_column, category_column=config.category_column,
        )
    except (PromptFileError, FileNotFoundError) as exc:
        raise dg.Failure(description=f"prompt set {name!r} cannot be loaded: {exc}") from exc
    report = summary["report"]
    preview = db.prompts(name, limit=5)
    return dg.MaterializeResult(
        metadata={
            "source": summary["source"],
            "file_sha256": summary["file_sha256"],
            "n_prompts": summary["n_prompts"],
            "n_train": summary["n_train"],
            "n_eval": summary["n_eval"],
            "categories": ", ".join(summary["categories"]) or "none",
            "duplicates_dropped": report.duplicates_dropped,
            "empty_dropped": report.empty_dropped,
            "preview": md_table(preview, ["position", "split", "category", "text"]),
        },
        data_version=dg.DataVersion(summary["file_sha256"][:16]),
    )
