"""The per-prompt-set assets every method shares: the prompts themselves, and the model's direct answers."""

import dagster as dg

from matrix_assets.data.loaders import PromptFileError
from matrix_assets.defs.assets.common import (
    GENERATION_RETRY,
    MODEL_POOL,
    cache_metadata,
    cached_llm,
    fail_fast_on_permanent_errors,
    md_table,
)
from matrix_assets.defs.configs import InitialResponsesConfig, PromptSetConfig, settings_from
from matrix_assets.defs.partitions import prompt_sets_partitions
from matrix_assets.defs.resources import LLMResource, StoreResource
from matrix_assets.methods.base import SHARED_PROFILES, answer_directly
from matrix_assets.store.prompt_sets import PromptSetError, load_prompt_set


@dg.asset(
    partitions_def=prompt_sets_partitions,
    group_name="prompts",
    kinds={"python", "sql"},
    description="Loads a prompt set (bundled, or a file in the drop folder) into the store with its role and a "
    "deterministic train / eval split; evaluation prompts that nearly repeat a training prompt are moved out.",
)
def benchmark_prompts(
    context: dg.AssetExecutionContext, config: PromptSetConfig, store: StoreResource
) -> dg.MaterializeResult:
    db = store.get_store()
    name = context.partition_key
    try:
        summary = load_prompt_set(
            db, name, source=config.source, train_fraction=config.train_fraction, role=config.role,
            prompt_column=config.prompt_column, category_column=config.category_column,
            expected_sha256=config.expected_sha256,
        )
    except (PromptFileError, PromptSetError, FileNotFoundError) as exc:
        raise dg.Failure(description=f"prompt set {name!r} cannot be loaded: {exc}", allow_retries=False) from exc
    preview = db.prompts(name, limit=5)
    near = [{"evaluation prompt": a, "training prompt": b, "similarity": s}
            for a, b, s in summary.near_duplicate_examples[:5]]
    return dg.MaterializeResult(
        metadata={
            "source": summary.source,
            "role": summary.role,
            "file_sha256": summary.file_sha256,
            "n_prompts": summary.n_prompts,
            "n_train": summary.n_train,
            "n_eval": summary.n_eval,
            "n_near_duplicates_moved_out": summary.n_near_duplicates,
            "categories": ", ".join(summary.categories) or "none",
            "duplicates_dropped": summary.report.duplicates_dropped,
            "empty_dropped": summary.report.empty_dropped,
            "preview": md_table(preview, ["position", "split", "category", "text"]),
            "near_duplicates": md_table(near, ["evaluation prompt", "training prompt", "similarity"]),
        },
        data_version=dg.DataVersion(summary.file_sha256[:16]),
    )


@dg.asset(
    deps=["benchmark_prompts"],
    partitions_def=prompt_sets_partitions,
    group_name="prompts",
    kinds={"pytorch", "sql"},
    pool=MODEL_POOL,
    retry_policy=GENERATION_RETRY,
    description="r0: the model's direct answer to each training prompt (used by matrix, cai and initial_sft).",
)
def initial_responses(
    context: dg.AssetExecutionContext, config: InitialResponsesConfig, store: StoreResource,  # type: ignore[valid-type]
    llm: LLMResource,
) -> dg.MaterializeResult:
    db = store.get_store()
    settings = settings_from(config, SHARED_PROFILES["quick"])
    prompts = db.train_prompts(context.partition_key, limit=settings.max_prompts)
    if not prompts:
        raise dg.Failure(f"prompt set {context.partition_key!r} has no training prompts; materialize "
                         "benchmark_prompts (evaluation-only sets are never trained on)", allow_retries=False)
    with fail_fast_on_permanent_errors():
        model = cached_llm(context, llm, store, "initial responses")
        answers = answer_directly(model, [p.text for p in prompts], settings.answer_tokens)
    db.save_initial_responses(model.model_id, [(p.prompt_id, a) for p, a in zip(prompts, answers)])
    sample = [{"prompt": p.text, "initial response": a} for p, a in list(zip(prompts, answers))[:3]]
    return dg.MaterializeResult(
        metadata={
            "n_responses": len(answers), "model_id": model.model_id,
            "sample": md_table(sample, ["prompt", "initial response"], 400), **cache_metadata(model.stats),
        }
    )
