"""Guards on each stage's output, read from the store."""


import json

import dagster as dg

from matrix_assets.defs.resources import MLflowResource, StoreResource

MIN_ROLES = 3


@dg.asset_check(asset="scene_transcripts", description="Every stored scene has >= 3 roles, a plan and events.")
def transcripts_well_formed(store: StoreResource) -> dg.AssetCheckResult:
    db = store.get_store()
    rows = db.query(
        "SELECT t.prompt_id, t.roles_json, t.plan_json, "
        "(SELECT COUNT(*) FROM transcript_events e WHERE e.prompt_id = t.prompt_id AND e.method = t.method "
        "AND e.model_id = t.model_id) AS n_events FROM transcripts t"
    )
    bad = [r["prompt_id"] for r in rows
           if len(json.loads(r["roles_json"])) < MIN_ROLES or not json.loads(r["plan_json"]) or r["n_events"] == 0]
    return dg.AssetCheckResult(
        passed=not bad, metadata={"n_transcripts": len(rows), "malformed": len(bad), "examples": ", ".join(bad[:5])}
    )


@dg.asset_check(asset="sft_dataset", blocking=True,
                description="No training prompt appears in any evaluation split (by exact text).")
def train_eval_disjoint(store: StoreResource) -> dg.AssetCheckResult:
    db = store.get_store()
    overlap = db.query(
        "SELECT DISTINCT s.prompt FROM sft_examples s JOIN prompts p ON p.text = s.prompt WHERE p.split = 'eval'"
    )
    return dg.AssetCheckResult(
        passed=not overlap,
        metadata={"overlapping_prompts": len(overlap), "examples": " | ".join(r["prompt"][:80] for r in overlap[:3])},
    )


@dg.asset_check(asset="evaluation_scores", description="The MATRIX-tuned model is not more harmful than base.")
def tuned_not_worse_than_base(store: StoreResource) -> dg.AssetCheckResult:
    db = store.get_store()
    rows = db.query(
        "SELECT * FROM v_base_vs_tuned WHERE metric = 'harmful_share' AND tuned_label = 'matrix' AND eval_id = "
        "(SELECT eval_id FROM eval_metrics ORDER BY created_at DESC, eval_id DESC LIMIT 1)"
    )
    if not rows:
        return dg.AssetCheckResult(passed=False, metadata={"reason": "no evaluation stored"})
    row = rows[0]
    return dg.AssetCheckResult(
        passed=row["tuned_value"] <= row["base_value"],
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"base_harmful_share": row["base_value"], "tuned_harmful_share": row["tuned_value"], "n": row["n"]},
    )


@dg.asset_check(
    asset="evaluation_scores",
    description="Reports the MLflow registry comparison: the latest MATRIX checkpoint's metrics next to the "
    "`champion` version's, and whether the alias points at a version that beats base on harmlessness.",
)
def champion_comparison(store: StoreResource, mlflow_tracking: MLflowResource) -> dg.AssetCheckResult:
    from mlflow.exceptions import MlflowException

    latest = store.get_store().latest_per_method("checkpoints", ["matrix"], ["matrix"])
    client = mlflow_tracking.client()
    name = mlflow_tracking.registered_model_name
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return dg.AssetCheckResult(
            passed=False, severity=dg.AssetCheckSeverity.WARN,
            metadata={"reason": "no champion yet: no MATRIX checkpoint has beaten the rules so far"},
        )
    metadata: dict = {"champion_version": champion.version,
                      **{f"champion/{k}": v for k, v in champion.tags.items() if "_" in k and k != "base_model"}}
    if latest and latest[0].get("model_version"):
        candidate = client.get_model_version(name, latest[0]["model_version"])
        metadata["latest_matrix_version"] = candidate.version
        metadata.update({f"latest/{k}": v for k, v in candidate.tags.items() if "_" in k and k != "base_model"})
        metadata["latest_is_champion"] = candidate.version == champion.version
    return dg.AssetCheckResult(passed=True, metadata=metadata)
