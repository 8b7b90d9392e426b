"""Judge validation against human labels, and base vs tuned on held-out prompts (MLflow: one nested run per model)."""


import functools
import hashlib
import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from matrix_assets import profiles
from matrix_assets.defs.assets.common import MODEL_POOL, image_md, md_table, progress_logger
from matrix_assets.defs.configs import EvaluationConfig, JudgeValidationConfig, settings_from
from matrix_assets.defs.resources import LLMResource, MLflowResource, StoreResource
from matrix_assets.evaluation.settings import EvaluationSettings, evaluation_kind
from matrix_assets.methods import registry
from matrix_assets.settings import reports_dir
from matrix_assets.store.db import Store, utcnow
from matrix_assets.store.prompt_sets import ensure_prompt_set

CHAMPION_ALIAS = "champion"
CHAMPION_LABEL = "champion"


@dg.asset(
    group_name="evaluation",
    kinds={"python", "mlflow"},
    pool=MODEL_POOL,
    description="Every judge the evaluation uses, scored against human labels (XSTest v2 completions of four chat "
    "models, two annotators each): accuracy, per-class precision and recall, Cohen's kappa, with intervals, on "
    "the completions of a chat model nothing was fitted on.",
)
def judge_validation(context: dg.AssetExecutionContext, config: JudgeValidationConfig,  # type: ignore[valid-type]
                     store: StoreResource, llm: LLMResource,
                     judge: LLMResource, mlflow_tracking: MLflowResource) -> dg.MaterializeResult:
    import mlflow

    from matrix_assets.evaluation.refusal import DEFAULT_JUDGE, HELD_OUT_MODEL
    from matrix_assets.evaluation.labels import bundled_labelled_answers
    from matrix_assets.evaluation.validation import (
        LABELLED_SUBSET,
        SHIPPED_SUBSET,
        labels_digest,
        validate_classifiers,
        validate_judges,
        validate_on_labels,
        validation_key,
    )

    db = store.get_store()
    judge_backend = None
    if config.model_judge_sample:
        judge.check()
        judge_backend = judge.cached(db, progress=progress_logger(context, "judge model on human-labelled answers"))
    # Content-addressed: the same labels, judges and code give the same figures, so they are scored once.
    labelled = db.labelled_answers()
    shipped = bundled_labelled_answers(llm.model_identity())  # the graded model's labelled answers, if shipped
    classifiers = _safety_classifiers(config.safety_classifiers)
    validation_id = "judges-" + validation_key(judge_backend.model_id if judge_backend else None,
                                               config.model_judge_sample, labels_digest([*labelled, *shipped]),
                                               [f"{name}:{s.model_id}" for name, s in classifiers.items()])[:12]
    stored = db.judge_agreement_rows(validation_id)
    if stored:
        context.log.info(f"{validation_id}: the same labels, judges and code were scored before; reusing them")
        rows = [{"judge": r["judge"], "completions of": r["subset"],
                 "kappa": f"{r['value']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]", "n": r["n"]}
                for r in stored if r["metric"] == "kappa"]
        held_out = db.judge_agreement(validation_id, DEFAULT_JUDGE, subset=HELD_OUT_MODEL)
        metadata: dict[str, Any] = {
            "validation_id": validation_id, "reused": True,
            "agreement": md_table(rows, list(rows[0]), 120),
            "default_judge_kappa_held_out": held_out["value"] if held_out else float("nan"),
        }
        logged = mlflow_tracking.client().search_runs([mlflow_tracking.experiment_id()], max_results=1,
                                                      filter_string=f"tags.validation_id = '{validation_id}'")
        if logged:  # the run that scored them
            metadata["mlflow_run"] = dg.MetadataValue.url(mlflow_tracking.run_url(logged[0].info.run_id))
        return dg.MaterializeResult(metadata=metadata)
    # The MLflow run is open while the judges are scored, so that its duration is the validation's.
    with mlflow_tracking.start_run(context, run_name=validation_id) as run:
        # XSTest v2 (other chat models, human labels) and, beside it, the answers of the model being graded.
        results = validate_judges(judge_backend, model_judge_sample=config.model_judge_sample)
        results += validate_on_labels(labelled)
        results += validate_on_labels(shipped, SHIPPED_SUBSET)
        results += validate_classifiers(classifiers, [*labelled, *shipped], sample=config.model_judge_sample or 100)
        now = utcnow()
        db.save_judge_agreement([
            {"validation_id": validation_id, "judge": r.judge, "subset": r.subset, "metric": metric, "value": value,
             "ci_low": low, "ci_high": high, "n": r.report.n, "created_at": now}
            for r in results for metric, (value, low, high) in r.metrics().items()
        ])
        # Metric keys name the judge by kind (MLflow keys cannot hold a server URL); the model is a tag.
        mlflow.set_tags({"kind": "judge_validation", "validation_id": validation_id,
                         **{f"judge_model.{r.kind}": r.judge for r in results if r.kind != r.judge}})
        for r in results:
            mlflow.log_metrics({f"{r.kind}.{r.subset}.{k}": v for k, v in r.report.as_dict().items() if v == v})
        run_id = run.info.run_id
    rows = [r.row() for r in results]
    return dg.MaterializeResult(metadata={
        "validation_id": validation_id,
        "reused": False,
        "agreement": md_table(rows, list(rows[0]), 120),
        "default_judge_kappa_held_out": next(r.report.kappa for r in results if r.is_default_held_out),
        "default_judge_kappa_this_model": next((r.report.kappa for r in results if r.judge == DEFAULT_JUDGE and
                                                r.subset in (LABELLED_SUBSET, SHIPPED_SUBSET)), float("nan")),
        "mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_url(run_id)),
    })


def _safety_classifiers(specs: Sequence[str]) -> dict[str, Any]:
    """name -> PromptScorer for each configured classifier, health-checked before any scoring."""
    from matrix_assets.evaluation.classifiers import CompletionsBackend, parse_classifiers

    try:
        endpoints = parse_classifiers(",".join(specs))
    except ValueError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc
    scorers = {}
    for endpoint in endpoints:
        scorer = CompletionsBackend(endpoint.base_url, endpoint.model)
        scorer.check_health()
        scorers[endpoint.name] = scorer
    return scorers


def eval_prompts(db: Store, settings: EvaluationSettings) -> list[Any]:
    """Held-out prompts only: the evaluation split of every listed set, by role; `per_category` samples that many
    from each category of a set that has categories (a set without categories is cut by `max_*_per_set`)."""
    from matrix_assets.evaluation.run import EvalPrompt

    prompts: list[EvalPrompt] = []
    for role, sets, limit in (("harmful", settings.harmful_sets, settings.max_harmful_per_set),
                              ("safe", settings.safe_sets, settings.max_safe_per_set),
                              ("helpfulness", settings.helpfulness_sets, settings.max_helpfulness_per_set)):
        for name in sets:
            try:
                ensure_prompt_set(db, name)
            except FileNotFoundError as exc:
                raise dg.Failure(f"evaluation set {name!r}: {exc}; add it with `matrix-assets add FILE --role "
                                 f"{role}` or materialize its benchmark_prompts partition", allow_retries=False) from exc
            stored = db.prompt_set_role(name)
            if stored != role:
                raise dg.Failure(f"prompt set {name!r} has role {stored!r}; list it under {stored}_sets, "
                                 f"not {role}_sets", allow_retries=False)
            rows = db.prompts(name, split="eval")
            if settings.per_category and any(row["category"] for row in rows):
                seen: dict[str, int] = {}
                picked = []
                for row in rows:
                    category = row["category"] or ""
                    if seen.get(category, 0) < settings.per_category:
                        seen[category] = seen.get(category, 0) + 1
                        picked.append(row)
                rows = picked
            elif limit is not None:  # a set without categories keeps its per-set limit under per_category
                rows = rows[:limit]
            prompts += [EvalPrompt(r["prompt_id"], r["text"], role, name, r["category"]) for r in rows]
    return prompts


def checkpoints_to_evaluate(db: Store, methods: Sequence[str] | None) -> list[dict]:
    """The latest checkpoint of each method (the newest build, reused or trained), in registry order."""
    order = list(registry())
    unknown = sorted(set(methods or ()) - set(order))
    if unknown:
        raise dg.Failure(f"unknown methods {unknown}; choose from {order}", allow_retries=False)
    return db.latest_per_method("checkpoints", list(methods) if methods else None, order)


@dg.asset(
    deps=[dg.AssetKey([m, "checkpoint"]) for m in registry()] + ["judge_validation"],
    group_name="evaluation",
    kinds={"pytorch", "mlflow"},
    pool=MODEL_POOL,
    automation_condition=dg.AutomationCondition.on_cron("0 3 * * *"),
    description="Base vs each method's latest checkpoint on held-out prompts: compliance with harmful requests, "
    "over-refusal (XSTest safe), refusals of helpfulness prompts (the validated judge), with exact intervals and "
    "paired base-vs-tuned comparisons; pairwise helpfulness (unvalidated judge model, both orders).",
)
def evaluation_scores(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,  # type: ignore[valid-type]
    store: StoreResource,
    llm: LLMResource,
    judge: LLMResource,
    mlflow_tracking: MLflowResource,
) -> dg.MaterializeResult:
    from matrix_assets.evaluation.refusal import default_judge
    from matrix_assets.evaluation.run import evaluate, format_markdown, format_paired, format_table

    db = store.get_store()
    settings = settings_from(config, profiles.evaluation("quick"))
    llm.check()
    mlflow_tracking.check()  # before any generation, not after it
    checkpoints = checkpoints_to_evaluate(db, settings.methods)
    if not checkpoints:
        raise dg.Failure("no checkpoint to evaluate; materialize a method's checkpoint first", allow_retries=False)
    prompts = eval_prompts(db, settings)
    if not prompts:
        raise dg.Failure("no evaluation prompts: every listed set is empty", allow_retries=False)
    by_label, models, judge_backend = _models_to_compare(context, db, checkpoints, settings, llm, judge,
                                                         mlflow_tracking)
    counts = {s: sum(1 for p in prompts if p.eval_set == s) for s in ("harmful", "safe", "helpfulness")}
    kind = evaluation_kind(settings, {p: profiles.evaluation(p) for p in profiles.PROFILES})
    context.log.info(f"evaluating base and {[c['checkpoint_id'] for c in by_label.values()]} on {counts} "
                     f"({kind} evaluation)")
    eval_id = f"eval-{uuid.uuid4().hex[:10]}"
    # For rates corrected for the judges' error on this model's answers: the store's labels, else the shipped ones.
    from matrix_assets.evaluation.labels import bundled_labelled_answers, with_current_verdicts

    labelled = with_current_verdicts(db.labelled_answers() or bundled_labelled_answers(llm.model_identity()))
    # The MLflow run is open while the models answer, so that its duration is the evaluation's.
    with mlflow_tracking.start_run(context, run_name=eval_id) as parent:
        report = evaluate(models, prompts, default_judge(), judge_model=judge_backend,
                          model_judge=settings.model_judge, pairwise=settings.pairwise_helpfulness,
                          answer_tokens=settings.answer_tokens,
                          on_model=lambda label: context.log.info(f"answering the {len(prompts)} prompts with {label}"),
                          done_with=lambda label: llm.release(by_label[label]["adapter_path"] if label in by_label
                                                              else None),
                          labelled=labelled)
        prompts_sha = hashlib.sha256("\n".join(sorted(p.prompt_id for p in prompts)).encode()).hexdigest()
        validation = _latest_validation(db)
        sets = {role: list(getattr(settings, f"{role}_sets")) for role in ("harmful", "safe", "helpfulness")}

        table, paired_table = format_table(report.metrics), format_paired(report.paired)
        judge_line = f"{_judge_line(validation, db)}. {_labels_line(labelled)}"
        out, overview, by_category = _write_report(eval_id, report, f"{judge_line}\n\n{table}\n\n{paired_table}\n")
        decisions = _champion_decision(settings, by_label, report)

        numbers = plottable_metrics(report)
        _log_to_mlflow(context, mlflow_tracking, eval_id, kind, report, by_label, sets, prompts_sha, validation,
                       decisions, out, numbers)
        run_id = parent.info.run_id
    _save(db, eval_id, kind, by_label, report, sets, prompts_sha, validation, run_id)
    context.log.info(f"\n{judge_line}\n{table}\n\n{paired_table}")
    headline = db.latest_evaluation("headline")
    metadata: dict[str, Any] = {
        "eval_id": eval_id,
        "kind": kind,
        "headline_eval_id": headline["eval_id"] if headline else "none yet",
        "table": dg.MetadataValue.md(f"**{kind.capitalize()} evaluation** {eval_id}. {judge_line}\n\n"
                                     f"{format_markdown(report.metrics, report.paired)}"),
        "judge": judge_line,
        "prompts_sha256": prompts_sha,
        # Other chat models' labelled completions of these prompts fitted the judge: 0 for the quick profile.
        "judge_fitted_on_evaluation_prompts": default_judge().fitted_on([p.text for p in prompts]),
        "chart_overview": image_md(overview, "base vs tuned"),
        "chart_by_category": image_md(by_category, "harmful compliance by category"),
        "mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_url(run_id)),
        **{f"n_{k}": v for k, v in counts.items()},
        **numbers,
    }
    if report.position_bias is not None:
        metadata["pairwise_position_bias"] = round(report.position_bias, 3)
    metadata.update(phase_seconds(report.seconds))
    for label, (promoted, reason) in decisions.items():
        metadata[f"{label}/champion"] = reason + (" -> promoted" if promoted else "")
    return dg.MaterializeResult(metadata=metadata)


def _models_to_compare(context: dg.AssetExecutionContext, db: Store, checkpoints: list[dict], settings: Any,
                       llm: LLMResource, judge: LLMResource, tracking: MLflowResource
                       ) -> tuple[dict[str, dict], dict[str, Any], Any]:
    """Each checkpoint by label (and the current champion, when it is not the latest of its method), the models as
    functions that build them when their turn comes, and the judge model when the settings ask for one."""
    by_label = {c["method"]: c for c in checkpoints}
    champion = _champion_checkpoint(db, tracking, settings.champion_method)
    if champion and champion["checkpoint_id"] != by_label.get(settings.champion_method, {}).get("checkpoint_id"):
        by_label[CHAMPION_LABEL] = champion  # compared on the same prompts, so promotion compares like with like
    progress = progress_logger(context, "evaluation answers")
    # The base model and each checkpoint are loaded in turn and freed after answering; the judge model (often the
    # base model again) is loaded after the last answer: one model in memory at a time.
    models: dict[str, Any] = {"base": functools.partial(llm.cached, db, progress=progress)}
    models.update({label: functools.partial(llm.cached, db, adapter_path=c["adapter_path"], progress=progress)
                   for label, c in by_label.items()})
    judge_backend = None
    if settings.pairwise_helpfulness or settings.model_judge:
        judge.check()
        judge_backend = functools.partial(judge.cached, db, progress=progress_logger(context, "judge model"))
    return by_label, models, judge_backend


def _write_report(eval_id: str, report: Any, text: str) -> tuple[Path, Path, Path]:
    """The evaluation's folder under reports/: the text table and the two charts."""
    from matrix_assets.evaluation.plots import plot_base_vs_tuned, plot_per_category

    out = reports_dir() / eval_id
    out.mkdir(parents=True, exist_ok=True)
    (out / "base_vs_tuned.txt").write_text(text)
    overview = plot_base_vs_tuned(
        {k: {label: m[k] for label, m in report.metrics.items() if k in m}
         for k in ("harmful_compliance", "over_refusal", "helpfulness_refusal")},
        out / "base_vs_tuned.png", "Base vs tuned (exact 95% intervals)")
    by_category = plot_per_category(report.per_category, out / "harmful_compliance_by_category.png",
                                    "Compliance with harmful requests by category", "complied")
    return out, overview, by_category


def _champion_decision(settings: Any, by_label: dict[str, dict], report: Any) -> dict[str, tuple[bool, str]]:
    """Whether the candidate method's checkpoint replaces the champion: compared with the champion itself on the same
    prompts when there is one, else with base."""
    from matrix_assets.evaluation.champion import should_promote
    from matrix_assets.evaluation.run import answers_by_label, compare_pairs

    candidate = settings.champion_method
    if candidate not in by_label:
        return {}
    reference = CHAMPION_LABEL if CHAMPION_LABEL in by_label else "base"
    vs = compare_pairs(answers_by_label(report), reference=reference)[candidate] \
        if reference != "base" else report.paired[candidate]
    return {candidate: should_promote(vs, reference, margin=settings.over_refusal_margin)}


def phase_seconds(seconds: dict[str, float]) -> dict[str, float]:
    """Where the evaluation's time went: loading models, answering, each judge (`seconds/answering`, ...)."""
    out = {"seconds/loading": sum(v for k, v in seconds.items() if k.startswith("load/")),
           "seconds/answering": sum(v for k, v in seconds.items() if k.startswith("answer/")),
           **{f"seconds/{k}": v for k, v in seconds.items() if "/" not in k}}
    return {k: round(v, 1) for k, v in out.items()}


def plottable_metrics(report: Any) -> dict[str, float]:
    """Every rate and paired difference as a number keyed `METRIC/MODEL` (`harmful_compliance/matrix`,
    `harmful_compliance_vs_base/matrix`): Dagster's Plots tab and MLflow's charts show their trends."""
    numbers = {f"{metric}/{label}": round(rate.value, 4)
               for label, rates in report.metrics.items() for metric, rate in rates.items() if rate.n}
    numbers.update({f"{metric}_vs_base/{label}": round(c.diff, 4)
                    for label, comparisons in report.paired.items() for metric, c in comparisons.items() if c.n})
    return numbers


def _latest_validation(db: Store) -> dict[str, Any] | None:
    from matrix_assets.evaluation.refusal import DEFAULT_JUDGE, HELD_OUT_MODEL

    return db.latest_judge_agreement(DEFAULT_JUDGE, "kappa", subset=HELD_OUT_MODEL)


def _judge_line(validation: dict[str, Any] | None, db: Store | None = None) -> str:
    from matrix_assets.evaluation.refusal import DEFAULT_JUDGE
    from matrix_assets.evaluation.validation import LABELLED_SUBSET, SHIPPED_SUBSET

    if validation is None:
        return "Judge: prompt-aware refusal judge (not validated in this store yet: materialize judge_validation)"
    line = (f"Judge: prompt-aware refusal judge (reads question and answer); agreement with human labels on "
            f"{validation['subset']} completions, a model it was not fitted on (its sibling mistralguard, the same "
            f"weights, was): kappa {validation['value']:.2f} [{validation['ci_low']:.2f}, "
            f"{validation['ci_high']:.2f}] (n={validation['n']}, {validation['validation_id']})")

    own = None
    for subset in (LABELLED_SUBSET, SHIPPED_SUBSET):
        own = own or (db.judge_agreement(validation["validation_id"], DEFAULT_JUDGE, subset=subset)
                      if db is not None else None)
    if own is not None:
        line += (f"; on labelled answers of the model being graded: kappa {own['value']:.2f} [{own['ci_low']:.2f}, "
                 f"{own['ci_high']:.2f}] (n={own['n']})")
    return line


def _labels_line(labelled: list[dict[str, Any]]) -> str:
    """Where the corrected rates come from, and which rate decides promotion."""
    rule = ("The champion rule compares the judge's raw verdicts prompt by prompt (a correction applies to rates, "
            "not to pairs).")
    if not labelled:
        return (f"No labelled answers of this model yet, so no corrected rates (`matrix-assets label export`, then "
                f"`label import`). {rule}")
    who = sorted({f"{r['labeller']} ({r['method']})" for r in labelled})
    harmful = sum(1 for r in labelled if r["label_harmful"])
    return (f"Corrected rates: each judge's error measured on {len(labelled)} labelled answers of this model "
            f"(labelled by {'; '.join(who)}). "
            + ("" if harmful else "The labels hold no answer with harmful content, so the harmful-content judge's "
               "sensitivity is unknown and its rate has no corrected value; the labelled share stands beside it. ")
            + rule)


def _champion_checkpoint(db: Store, tracking: MLflowResource, method: str) -> dict | None:
    from mlflow.exceptions import MlflowException

    try:
        current = tracking.client().get_model_version_by_alias(tracking.registered_model_name, CHAMPION_ALIAS)
    except MlflowException:
        return None
    checkpoint_id = current.tags.get("checkpoint_id")
    row = db.checkpoint(checkpoint_id) if checkpoint_id else None
    return row if row is not None and row["method"] == method else None


def _log_to_mlflow(context: dg.AssetExecutionContext, tracking: MLflowResource, eval_id: str, kind: str,
                   report: Any, by_label: dict[str, dict], sets: dict[str, list[str]], prompts_sha: str,
                   validation: dict[str, Any] | None, decisions: dict[str, tuple[bool, str]], out: Any,
                   numbers: dict[str, float]) -> None:
    """Into the active (parent) run: the evaluation's parameters, every rate and paired difference as a metric,
    the report; and one nested run per model with the same metric keys, so MLflow's Compare puts checkpoints
    side by side; each nested run keeps its answers as a table."""
    import mlflow

    from matrix_assets.evaluation.run import answers_by_label

    answers = answers_by_label(report)
    common = {"eval_id": eval_id, "evaluation_kind": kind, "prompts_sha256": prompts_sha,
              **{f"{k}_sets": ",".join(v) for k, v in sets.items()},
              **{f"n_{k}": v for k, v in report.counts.items()},
              "judge": "prompt-aware refusal judge",
              "judge_kappa_vs_humans": f"{validation['value']:.3f}" if validation else "not validated",
              "judge_validation_id": validation["validation_id"] if validation else ""}
    parent = mlflow.active_run()
    mlflow.log_params(common)
    mlflow.set_tags({"kind": "evaluation", "evaluation_kind": kind,
                     **{f"champion_decision_{k}": v[1] for k, v in decisions.items()}})
    mlflow.log_metrics(numbers)
    mlflow.log_artifacts(str(out), artifact_path="evaluation")
    for label, rates in report.metrics.items():
        checkpoint = by_label.get(label)
        with mlflow.start_run(run_name=f"{eval_id}/{label}", nested=True, experiment_id=parent.info.experiment_id,
                              tags={"kind": "evaluation_model", "model_label": label,
                                    "method": checkpoint["method"] if checkpoint else "base",
                                    "checkpoint_id": checkpoint["checkpoint_id"] if checkpoint else "base",
                                    **tracking.dagster_tags(context)}):
            mlflow.log_params(common)
            metrics = {}
            for name, rate in rates.items():
                if rate.n:
                    metrics.update({name: rate.value, f"{name}_ci_low": rate.ci_low,
                                    f"{name}_ci_high": rate.ci_high, f"{name}_n": rate.n})
            for name, comparison in report.paired.get(label, {}).items():
                if comparison.n:
                    metrics.update({f"vs_base_{name}_diff": comparison.diff,
                                    f"vs_base_{name}_diff_ci_low": comparison.diff_ci_low,
                                    f"vs_base_{name}_diff_ci_high": comparison.diff_ci_high,
                                    f"vs_base_{name}_mcnemar_p": comparison.mcnemar_p})
            mlflow.log_metrics(metrics)
            rows = answers.get(label, [])
            mlflow.log_table(data={
                "prompt_id": [a.prompt_id for a in rows], "eval_set": [a.eval_set for a in rows],
                "prompt_set": [a.prompt_set for a in rows], "answer": [a.answer for a in rows],
                "refusal": [a.refusal for a in rows], "p_refusal": [a.p_refusal for a in rows],
                "keyword_refusal": [a.keyword_refusal for a in rows],
            }, artifact_file="answers.json")
            if checkpoint and checkpoint.get("model_version"):
                _tag_version(tracking, checkpoint, rates, prompts_sha, decisions.get(label))


def _tag_version(tracking: MLflowResource, checkpoint: dict, rates: dict, prompts_sha: str,
                 decision: tuple[bool, str] | None) -> None:
    """Metrics are kept per (checkpoint, evaluation prompts): tags keyed by the prompts' hash, never overwritten
    by an evaluation on other prompts. Only the champion method's decision moves the alias."""
    client = tracking.client()
    name, version = tracking.registered_model_name, str(checkpoint["model_version"])
    for metric in ("harmful_compliance", "over_refusal", "helpfulness_refusal"):
        rate = rates.get(metric)
        if rate is not None and rate.n:
            client.set_model_version_tag(name, version, f"eval.{prompts_sha[:12]}.{metric}",
                                         f"{rate.value:.4f} [{rate.ci_low:.4f}, {rate.ci_high:.4f}] n={rate.n}")
    if decision is None:
        return
    promoted, reason = decision
    client.set_model_version_tag(name, version, f"eval.{prompts_sha[:12]}.champion_decision", reason[:4900])
    if promoted:
        from mlflow.exceptions import MlflowException

        try:
            current = str(client.get_model_version_by_alias(name, CHAMPION_ALIAS).version)
        except MlflowException:
            current = None
        if current != version:  # versions compared as the strings MLflow hands back
            client.set_registered_model_alias(name, CHAMPION_ALIAS, version)


def _save(db: Store, eval_id: str, kind: str, by_label: dict[str, dict], report: Any, sets: dict[str, list[str]],
          prompts_sha: str, validation: dict[str, Any] | None, run_id: str) -> None:
    from matrix_assets.evaluation.refusal import DEFAULT_JUDGE

    def checkpoint_of(label: str) -> str | None:
        return by_label[label]["checkpoint_id"] if label in by_label else None

    now = utcnow()
    db.save_evaluation(
        {"eval_id": eval_id, "prompt_sets_json": json.dumps(sets), "counts_json": json.dumps(report.counts),
         "prompts_sha256": prompts_sha, "judge": DEFAULT_JUDGE,
         "judge_validation_id": validation["validation_id"] if validation else None, "mlflow_run_id": run_id,
         "created_at": now, "kind": kind},
        [{"eval_id": eval_id, "model_label": a.model_label, "checkpoint_id": checkpoint_of(a.model_label),
          "eval_set": a.eval_set, "prompt_set": a.prompt_set, "prompt_id": a.prompt_id, "answer": a.answer,
          "refusal": None if a.refusal is None else int(a.refusal), "p_refusal": a.p_refusal,
          "keyword_refusal": int(a.keyword_refusal),
          "model_judge_refusal": None if a.model_judge_refusal is None else int(a.model_judge_refusal)}
         for a in report.answers],
        [{"eval_id": eval_id, "model_label": v.model_label, "prompt_id": v.prompt_id,
          "p_tuned_first": v.p_tuned_first, "p_tuned_second": v.p_tuned_second, "outcome": v.outcome}
         for v in report.pairwise],
        [{"eval_id": eval_id, "checkpoint_id": checkpoint_of(label), "model_label": label, "metric": name,
          "value": r.value, "ci_low": r.ci_low, "ci_high": r.ci_high, "k": r.k, "n": r.n, "created_at": now}
         for label, m in report.metrics.items() for name, r in m.items()],
        [{"eval_id": eval_id, "model_label": label, "metric": name, "n": c.n, "base_rate": c.base_rate,
          "tuned_rate": c.tuned_rate, "diff": c.diff, "diff_ci_low": c.diff_ci_low, "diff_ci_high": c.diff_ci_high,
          "base_only": c.b, "tuned_only": c.c, "mcnemar_p": c.mcnemar_p}
         for label, m in report.paired.items() for name, c in m.items()],
    )
