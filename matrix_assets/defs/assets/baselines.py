"""Training data of the comparison methods, on the same prompts as MATRIX (partitioned by prompt set)."""

import dagster as dg

from matrix_assets.defs.assets.common import cache_metadata, cached_llm, md_table
from matrix_assets.defs.configs import RevisionConfig
from matrix_assets.defs.partitions import prompt_sets_partitions
from matrix_assets.defs.resources import LLMResource, StoreResource
from matrix_assets.simulation.baselines import cai_critiques, cai_revisions
from matrix_assets.simulation.engine import RevisionInput, SimulationSettings
from matrix_assets.store.db import utcnow

CAI = "cai"


@dg.asset(
    name="cai_revisions",
    deps=["initial_responses"],
    partitions_def=prompt_sets_partitions,
    group_name="baselines",
    kinds={"pytorch", "sql"},
    description="Constitutional-AI-style baseline: critique each initial answer against fixed principles "
    "(prompts/principles.txt) and revise it, with no social simulation.",
)
def cai_revisions_asset(
    context: dg.AssetExecutionContext, config: RevisionConfig, store: StoreResource, llm: LLMResource
) -> dg.MaterializeResult:
    db = store.get_store()
    model = cached_llm(context, llm, store, "cai baseline")
    rows = db.initial_responses(context.partition_key, model.model_id)
    if not rows:
        raise dg.Failure(f"no initial responses for {context.partition_key!r}; materialize initial_responses first")
    settings = SimulationSettings(revision_tokens=config.revision_tokens)
    items = [RevisionInput(r["prompt_id"], r["prompt"], r["response"], "") for r in rows]
    crits = cai_critiques(model, items, settings)
    items = [RevisionInput(i.prompt_id, i.question, i.answer, c.text) for i, c in zip(items, crits)]
    revs = cai_revisions(model, items, settings, require_refusal=config.require_refusal)
    now = utcnow()
    with db.transaction() as conn:
        db.upsert("critiques", [
            {"prompt_id": c.prompt_id, "method": CAI, "model_id": model.model_id, "critique": c.text,
             "harmed_parties": "", "used_fallback": int(c.used_fallback), "created_at": now} for c in crits
        ], conn=conn)
        db.upsert("revisions", [
            {"prompt_id": r.prompt_id, "method": CAI, "model_id": model.model_id, "revised": r.text,
             "used_fallback": int(r.used_fallback), "created_at": now} for r in revs
        ], conn=conn)
    sample = [{"prompt": i.question, "critique": c.text, "revised": r.text} for i, c, r in list(zip(items, crits, revs))[:3]]
    return dg.MaterializeResult(metadata={
        "n_revisions": len(revs),
        "fallback/critique_default": sum(1 for c in crits if c.used_fallback),
        "fallback/revision_template": sum(1 for r in revs if r.used_fallback),
        "sample": md_table(sample, ["prompt", "critique", "revised"], 300),
        **cache_metadata(model.stats),
    })
