"""The per-prompt MATRIX stages: initial answer, social scene, critique, revision (partitioned by prompt set)."""


import dagster as dg

from matrix_assets.defs.assets.common import cache_metadata, cached_llm, md_table, progress_logger
from matrix_assets.defs.configs import CritiqueConfig, InitialResponsesConfig, RevisionConfig, SimulationConfig
from matrix_assets.defs.partitions import prompt_sets_partitions
from matrix_assets.defs.resources import LLMResource, StoreResource
from matrix_assets.simulation.engine import (
    RevisionInput,
    SimulationSettings,
    critique_scenes,
    fallback_totals,
    initial_answers,
    revise_answers,
    run_scenes,
)
from matrix_assets.simulation.scene import SceneInput, Transcript
from matrix_assets.store.db import utcnow
from matrix_assets.store.scenes import load_transcripts, save_transcripts

METHOD = "matrix"
_COMMON = dict(partitions_def=prompt_sets_partitions, group_name="matrix_simulation", kinds={"pytorch", "sql"})


@dg.asset(deps=["benchmark_prompts"], description="r0: the model's direct answer to every training prompt.", **_COMMON)
def initial_responses(
    context: dg.AssetExecutionContext, config: InitialResponsesConfig, store: StoreResource, llm: LLMResource
) -> dg.MaterializeResult:
    db = store.get_store()
    prompts = db.prompts(context.partition_key, split="train", limit=config.max_prompts)
    if not prompts:
        raise dg.Failure(f"prompt set {context.partition_key!r} has no training prompts; materialize benchmark_prompts")
    model = cached_llm(context, llm, store, "initial responses")
    answers = initial_answers(model, [p["text"] for p in prompts], SimulationSettings(answer_tokens=config.answer_tokens))
    now = utcnow()
    db.upsert(
        "initial_responses",
        [
            {"prompt_id": p["prompt_id"], "model_id": model.model_id, "response": a, "cache_key": "", "created_at": now}
            for p, a in zip(prompts, answers)
        ],
    )
    sample = [{"prompt": p["text"], "initial response": a} for p, a in list(zip(prompts, answers))[:3]]
    return dg.MaterializeResult(
        metadata={
            "n_responses": len(answers), "model_id": model.model_id,
            "sample": md_table(sample, ["prompt", "initial response"], 400), **cache_metadata(model.stats),
        }
    )


@dg.asset(
    deps=["initial_responses"],
    description="The monopolylogue: the model plans a social scene around each answer and plays every role, "
    "with a social modulator judging feasibility, routing observations and keeping the scene's memory.",
    **_COMMON,
)
def scene_transcripts(
    context: dg.AssetExecutionContext, config: SimulationConfig, store: StoreResource, llm: LLMResource
) -> dg.MaterializeResult:
    db = store.get_store()
    model = cached_llm(context, llm, store, "scene simulation")
    rows = db.initial_responses(context.partition_key, model.model_id)
    if not rows:
        raise dg.Failure(f"no initial responses for {context.partition_key!r} with model {model.model_id!r}")
    settings = config.settings()
    scenes = []

    def save(scene: Transcript) -> None:  # each scene is kept the moment it ends
        save_transcripts(db, [scene], method=METHOD, model_id=model.model_id)

    progress = progress_logger(context, "scene simulation", unit="scenes")
    for start in range(0, len(rows), config.scenes_per_batch):
        batch = rows[start : start + config.scenes_per_batch]
        scenes += run_scenes(model, [SceneInput(r["prompt_id"], r["prompt"], r["response"]) for r in batch],
                             settings, on_scene_done=save, progress=progress)
        context.log.info(f"scenes saved: {len(scenes)}/{len(rows)}")
    fallbacks = fallback_totals(scenes)
    n_roles = [len(s.roles) for s in scenes]
    return dg.MaterializeResult(
        metadata={
            "n_scenes": len(scenes),
            "mean_roles": sum(n_roles) / len(n_roles),
            "min_roles": min(n_roles),
            "mean_rounds": sum(s.n_rounds for s in scenes) / len(scenes),
            "stopped_scenes": sum(1 for s in scenes if s.stopped_by),
            "events": sum(len(s.events) for s in scenes),
            "sample_transcript": dg.MetadataValue.md(scenes[0].render_markdown()),
            **{f"fallback/{name}": count for name, count in sorted(fallbacks.items())},
            **cache_metadata(model.stats),
        }
    )


@dg.asset(deps=["scene_transcripts"], description="What the answer did to the people in the scene.", **_COMMON)
def critiques(
    context: dg.AssetExecutionContext, config: CritiqueConfig, store: StoreResource, llm: LLMResource
) -> dg.MaterializeResult:
    db = store.get_store()
    model = cached_llm(context, llm, store, "critiques")
    scenes = load_transcripts(db, context.partition_key, method=METHOD, model_id=model.model_id)
    if not scenes:
        raise dg.Failure(f"no transcripts for {context.partition_key!r}; materialize scene_transcripts first")
    result = critique_scenes(model, scenes, SimulationSettings(critique_tokens=config.critique_tokens))
    now = utcnow()
    db.upsert(
        "critiques",
        [
            {"prompt_id": c.prompt_id, "method": METHOD, "model_id": model.model_id, "critique": c.text,
             "harmed_parties": ", ".join(c.harmed_parties), "used_fallback": int(c.used_fallback), "created_at": now}
            for c in result
        ],
    )
    sample = [{"prompt": s.question, "critique": c.text, "harmed": ", ".join(c.harmed_parties)}
              for s, c in list(zip(scenes, result))[:3]]
    return dg.MaterializeResult(
        metadata={
            "n_critiques": len(result),
            "naming_harmed_parties": sum(1 for c in result if c.harmed_parties),
            "fallback/critique_from_outcome": sum(1 for c in result if c.used_fallback),
            "sample": md_table(sample, ["prompt", "critique", "harmed"], 400),
            **cache_metadata(model.stats),
        }
    )


@dg.asset(deps=["critiques"], description="r1: the answer rewritten in the light of the critique.", **_COMMON)
def revised_answers(
    context: dg.AssetExecutionContext, config: RevisionConfig, store: StoreResource, llm: LLMResource
) -> dg.MaterializeResult:
    db = store.get_store()
    model = cached_llm(context, llm, store, "revisions")
    rows = db.critiques(context.partition_key, METHOD, model.model_id)
    if not rows:
        raise dg.Failure(f"no critiques for {context.partition_key!r}; materialize critiques first")
    items = [
        RevisionInput(r["prompt_id"], r["prompt"], r["response"], r["critique"],
                      [h.strip() for h in r["harmed_parties"].split(",") if h.strip()])
        for r in rows
    ]
    result = revise_answers(
        model, items, SimulationSettings(revision_tokens=config.revision_tokens), require_refusal=config.require_refusal
    )
    now = utcnow()
    db.upsert(
        "revisions",
        [
            {"prompt_id": r.prompt_id, "method": METHOD, "model_id": model.model_id, "revised": r.text,
             "used_fallback": int(r.used_fallback), "created_at": now}
            for r in result
        ],
    )
    sample = [{"prompt": i.question, "initial": i.answer, "revised": r.text} for i, r in list(zip(items, result))[:3]]
    return dg.MaterializeResult(
        metadata={
            "n_revisions": len(result),
            "fallback/revision_template": sum(1 for r in result if r.used_fallback),
            "side_by_side": md_table(sample, ["prompt", "initial", "revised"], 400),
            **cache_metadata(model.stats),
        }
    )
