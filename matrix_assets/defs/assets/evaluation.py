"""Base vs tuned on held-out prompts, judged, with bootstrap CIs; logged to MLflow with plots."""


import csv
import uuid

import dagster as dg

from matrix_assets.defs.assets.common import image_md
from matrix_assets.defs.configs import EvaluationConfig
from matrix_assets.defs.resources import LLMResource, MLflowResource, StoreResource
from matrix_assets.evaluation.champion import should_promote
from matrix_assets.evaluation.plots import plot_base_vs_tuned, plot_per_category
from matrix_assets.evaluation.run import EvalPrompt, evaluate, format_table
from matrix_assets.settings import reports_dir
from matrix_assets.simulation.baselines import METHODS
from matrix_assets.store.db import Store, utcnow
from matrix_assets.store.prompt_sets import ensure_prompt_set

OVER_REFUSAL_SET = "xstest_safe"
HELPFULNESS_SET = "vicuna_bench"
CHAMPION_ALIAS = "champion"


def eval_prompts(db: Store, config: EvaluationConfig) -> list[EvalPrompt]:
    """Held-out prompts only: the eval split of each harmful set, XSTest safe, the eval half of Vicuna-Bench."""
    ensure_prompt_set(db, OVER_REFUSAL_SET, train_fraction=0.0)
    ensure_prompt_set(db, HELPFULNESS_SET, train_fraction=0.5)
    sets = config.prompt_sets or [r["name"] for r in db.prompt_sets() if r["role"] == "harmful"]
    prompts: list[EvalPrompt] = []
    for name in sets:
        prompts += [EvalPrompt(p["prompt_id"], p["text"], "harmful", p["category"])
                    for p in db.prompts(name, split="eval", limit=config.max_harmful_per_set)]
    prompts += [EvalPrompt(p["prompt_id"], p["text"], "over_refusal", p["category"])
                for p in db.prompts(OVER_REFUSAL_SET, split="eval", limit=config.max_over_refusal)]
    prompts += [EvalPrompt(p["prompt_id"], p["text"], "helpfulness", p["category"])
                for p in db.prompts(HELPFULNESS_SET, split="eval", limit=config.max_helpfulness)]
    return prompts


def checkpoints_to_evaluate(db: Store, methods: list[str] | None) -> list[dict]:
    """The latest checkpoint of each method, in a fixed method order."""
    return db.latest_per_method("checkpoints", methods, METHODS)


@dg.asset(
    deps=["finetuned_checkpoint"],
    group_name="evaluation",
    kinds={"pytorch", "mlflow"},
    description="Base vs each method's latest checkpoint on held-out prompts: harmlessness (judge score, harmful "
    "share), over-refusal (XSTest safe), helpfulness (pairwise vs base, both orders), 95% bootstrap CIs.",
)
def evaluation_scores(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    store: StoreResource,
    llm: LLMResource,
    judge: LLMResource,
    mlflow_tracking: MLflowResource,
) -> dg.MaterializeResult:
    db = store.get_store()
    llm.check()
    judge.check()
    mlflow_tracking.check()  # before any generation, not after it
    checkpoints = checkpoints_to_evaluate(db, config.methods)
    if not checkpoints:
        raise dg.Failure("no checkpoint to evaluate; materialize finetuned_checkpoint first")
    prompts = eval_prompts(db, config)
    models = {"base": llm.cached(db)}
    models.update({c["method"]: llm.cached(db, adapter_path=c["adapter_path"]) for c in checkpoints})
    judge_backend = judge.cached(db)
    counts = {s: sum(1 for p in prompts if p.eval_set == s) for s in ("harmful", "over_refusal", "helpfulness")}
    context.log.info(f"evaluating base and {[c['checkpoint_id'] for c in checkpoints]} on {counts}")
    report = evaluate(models, judge_backend, prompts, answer_tokens=config.answer_tokens)
    eval_id = f"eval-{uuid.uuid4().hex[:10]}"
    by_method = {c["method"]: c for c in checkpoints}
    _save(db, eval_id, by_method, report, utcnow())

    table = format_table(report.metrics)
    out = reports_dir() / eval_id
    out.mkdir(parents=True, exist_ok=True)
    (out / "base_vs_tuned.txt").write_text(table + "\n")
    with (out / "answers.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", "eval_set", "prompt_id", "harmless_score", "judged_harmful", "rule_refusal", "answer"])
        for a in report.answers:
            writer.writerow([a.model_label, a.eval_set, a.prompt_id, a.harmless_score, a.judged_harmful,
                             a.rule_refusal, a.answer])
    rates = {k: {label: m[k] for label, m in report.metrics.items() if k in m}
             for k in ("harmful_share", "refusal_rate_harmful", "over_refusal_rate", "win_rate_vs_base")}
    overview = plot_base_vs_tuned(rates, out / "base_vs_tuned.png", "Base vs tuned per method (95% bootstrap CI)")
    per_cat = plot_per_category(report.per_category, out / "harmful_by_category.png",
                                "Share of harmful answers by category", "harmful share")

    import mlflow

    decisions = {}
    with mlflow_tracking.start_run(context, run_name=eval_id) as run:
        mlflow.log_params({"eval_id": eval_id, "judge": judge_backend.model_id,
                           **{f"checkpoint_{m}": c["checkpoint_id"] for m, c in by_method.items()},
                           **{f"n_{k}": v for k, v in counts.items()}})
        metrics = {}
        for label, m in report.metrics.items():
            for name, est in m.items():
                metrics.update({f"{label}/{name}": est.value, f"{label}/{name}_ci_low": est.ci_low,
                                f"{label}/{name}_ci_high": est.ci_high})
        metrics.update({f"judge_rule_{k}": float(v) for k, v in report.judge_rule_agreement.items()})
        mlflow.log_metrics({k: v for k, v in metrics.items() if v == v})  # NaN (empty sets) are not logged
        mlflow.log_artifacts(str(out), artifact_path="evaluation")
        for method, checkpoint in by_method.items():
            decisions[method] = _tag_and_maybe_promote(
                mlflow_tracking, checkpoint, report.metrics, method, config.champion_method, config.helpfulness_margin
            )
        mlflow.set_tags({f"champion_decision_{m}": reason for m, (_, reason) in decisions.items()})
        run_id = run.info.run_id

    context.log.info("\n" + table)
    metadata = {
        "eval_id": eval_id,
        "table": dg.MetadataValue.md(f"```\n{table}\n```"),
        "base_harmful_share": report.metrics["base"]["harmful_share"].value,
        "judge": judge_backend.model_id,
        "judge_rule_agreement": report.judge_rule_agreement.get("agreement", float("nan")),
        "judge_rule_kappa": report.judge_rule_agreement.get("kappa", float("nan")),
        "judge_parse_rate": report.metrics["base"]["judge_parse_rate"].value,
        "plot_overview": dg.MetadataValue.path(str(overview)),
        "plot_by_category": dg.MetadataValue.path(str(per_cat)),
        "chart_overview": image_md(overview, "base vs tuned"),
        "chart_by_category": image_md(per_cat, "harmful share by category"),
        "mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_url(run_id)),
        "mlflow_run_id": run_id,
        **{f"n_{k}": v for k, v in counts.items()},
    }
    for method, (promoted, reason) in decisions.items():
        m = report.metrics[method]
        metadata[f"{method}/checkpoint_id"] = by_method[method]["checkpoint_id"]
        metadata[f"{method}/harmful_share"] = m["harmful_share"].value
        metadata[f"{method}/win_rate_vs_base"] = m["win_rate_vs_base"].value if "win_rate_vs_base" in m else float("nan")
        metadata[f"{method}/champion"] = reason + (" -> promoted" if promoted else "")
    return dg.MaterializeResult(metadata=metadata)


def _save(db: Store, eval_id: str, by_method: dict[str, dict], report, now: str) -> None:  # noqa: ANN001
    def checkpoint_of(label: str) -> str | None:
        return by_method[label]["checkpoint_id"] if label in by_method else None

    with db.transaction() as conn:
        db.upsert("eval_answers", [
            {"eval_id": eval_id, "model_label": a.model_label,
             "checkpoint_id": checkpoint_of(a.model_label), "eval_set": a.eval_set,
             "prompt_id": a.prompt_id, "answer": a.answer, "harmless_score": a.harmless_score,
             "judged_harmful": None if a.judged_harmful is None else int(a.judged_harmful),
             "rule_refusal": int(a.rule_refusal), "judge_parsed": int(a.judge_parsed)}
            for a in report.answers
        ], conn=conn)
        db.upsert("eval_pairwise", [
            {"eval_id": eval_id, "model_label": r["model_label"], "prompt_id": r["prompt_id"],
             "verdict_first": r["verdict_first"],
             "verdict_swap": r["verdict_swap"], "outcome": r["outcome"]}
            for r in report.pairwise
        ], conn=conn)
        db.upsert("eval_metrics", [
            {"eval_id": eval_id, "checkpoint_id": checkpoint_of(label), "model_label": label, "metric": name,
             "value": est.value, "ci_low": est.ci_low, "ci_high": est.ci_high, "n": est.n, "created_at": now}
            for label, m in report.metrics.items() for name, est in m.items()
        ], conn=conn)


def _tag_and_maybe_promote(tracking: MLflowResource, checkpoint: dict, metrics, method: str,  # noqa: ANN001
                           champion_method: str, margin: float) -> tuple[bool, str]:
    """Tag the checkpoint's model version with its eval metrics; only `champion_method` may move the alias."""
    from mlflow.exceptions import MlflowException

    version = checkpoint.get("model_version")
    if not version:
        return False, "checkpoint is not registered"
    client = tracking.client()
    name = tracking.registered_model_name
    candidate = {k: e.value for k, e in metrics[method].items()}
    candidate["base_harmful_share"] = metrics["base"]["harmful_share"].value
    for key in ("harmful_share", "win_rate_vs_base", "loss_rate_vs_base", "over_refusal_rate"):
        if key in candidate and candidate[key] == candidate[key]:
            client.set_model_version_tag(name, version, key, f"{candidate[key]:.4f}")
    if method != champion_method:
        return False, f"{method} is a comparison method; only {champion_method} checkpoints become champion"
    try:
        current = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
        if current.version == version:
            return True, "already champion"
        champion = {k: float(v) for k, v in current.tags.items()
                    if k in {"harmful_share", "win_rate_vs_base", "loss_rate_vs_base"}}
    except MlflowException:
        champion = None
    promote, reason = should_promote(candidate, champion, helpfulness_margin=margin)
    if promote:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    return promote, reason
