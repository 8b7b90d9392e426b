"""The asset factory: every registered method becomes its data stages (partitioned by prompt set), a training set
and a checkpoint, all under the method's key prefix and group (`matrix/scenes`, `matrix/training_set`,
`matrix/checkpoint`, ...). Nothing here knows a method by name."""


import dataclasses
import hashlib
import json
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

import dagster as dg

from matrix_assets import profiles
from matrix_assets.defs.assets.common import (
    GENERATION_RETRY,
    fail_fast_on_permanent_errors,
    MODEL_POOL,
    AssetStageContext,
    image_md,
    md_table,
    outcome_metadata,
    progress_logger,
)
from matrix_assets.defs.configs import TrainingConfig, TrainingSetConfig, settings_from, stage_config
from matrix_assets.defs.partitions import prompt_sets_partitions
from matrix_assets.defs.resources import LLMResource, MLflowResource, StoreResource
from matrix_assets.llm.memory import release_memory
from matrix_assets.methods import registry
from matrix_assets.methods.base import Method, StageSpec, answer_directly
from matrix_assets.methods.mixing import TrainingSet, benign_basis, benign_count, build_training_set
from matrix_assets.settings import checkpoints_dir, datasets_dir
from matrix_assets.store.db import Store, utcnow
from matrix_assets.store.prompt_sets import NEAR_DUPLICATE_SIMILARITY, ensure_prompt_set

# Re-train nightly, but only when a method's data changed since the last run (Dagster's own staleness logic).
NIGHTLY = dg.AutomationCondition.on_cron("0 3 * * *")


def asset_key(name: str) -> dg.AssetKey:
    return dg.AssetKey(name.split("/"))


def stage_asset(method: Method, stage: StageSpec) -> dg.AssetsDefinition:
    config_type = stage_config(method.name, stage.name)
    # A stage check judges one partition's output, so it is partitioned like its asset: each evaluation is recorded
    # for the partition it checked (Dagster fills it in from the step), not as an unpartitioned result. Check
    # partitions are a Dagster preview: used knowingly, its warning would only repeat on every code-location load.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        check_specs = [dg.AssetCheckSpec(check.name, asset=[method.name, stage.name], partitions_def=prompt_sets_partitions,
                                         description=check.description, blocking=check.blocking)
                       for check in stage.checks]

    @dg.asset(
        key=[method.name, stage.name],
        deps=[asset_key(d) for d in stage.deps],
        partitions_def=prompt_sets_partitions,
        group_name=method.name,
        kinds={"pytorch", "sql"} if stage.loads_model else {"python", "sql"},
        description=stage.description,
        pool=MODEL_POOL if stage.loads_model else None,
        retry_policy=GENERATION_RETRY if stage.loads_model else None,
        check_specs=check_specs,
        tags={"method": method.name},
    )
    def _stage(context: dg.AssetExecutionContext, config: config_type, store: StoreResource,  # type: ignore[valid-type]
               llm: LLMResource, judge: LLMResource) -> dg.MaterializeResult:
        settings = settings_from(config, method.settings)
        with fail_fast_on_permanent_errors():
            ctx = AssetStageContext(context, store, llm, judge if stage.uses_judge else None,
                                    loads_model=stage.loads_model)
            try:
                outcome = stage.run(ctx, settings)
            except LookupError as exc:
                raise dg.Failure(str(exc), allow_retries=False) from exc
        metadata = {**outcome_metadata(outcome), **ctx.stats()}
        check_results = []
        for check in stage.checks:
            verdict = check.evaluate(outcome)
            check_results.append(dg.AssetCheckResult(
                check_name=check.name, passed=verdict.passed, metadata=dict(verdict.metadata),
                severity=dg.AssetCheckSeverity.ERROR if check.blocking else dg.AssetCheckSeverity.WARN))
        return dg.MaterializeResult(metadata=metadata, check_results=check_results)

    return _stage


def training_set_asset(method: Method) -> dg.AssetsDefinition:
    last = method.stages[-1]

    @dg.asset(
        key=[method.name, "training_set"],
        deps=[dg.AssetKey([method.name, last.name])],
        group_name=method.name,
        kinds={"python", "sql"},
        description=f"{method.title}: the training examples from every chosen prompt set, mixed with benign prompts "
        "answered by the model itself; prompts the method left out are counted.",
        automation_condition=NIGHTLY,
        pool=MODEL_POOL,
        retry_policy=GENERATION_RETRY,
        check_specs=[dg.AssetCheckSpec("train_eval_disjoint", asset=[method.name, "training_set"], blocking=True,
                                       description="No training prompt is, or nearly repeats (embedding cosine >= "
                                       f"{NEAR_DUPLICATE_SIMILARITY}), a prompt of an evaluation split.")],
        tags={"method": method.name},
    )
    def _training_set(context: dg.AssetExecutionContext, config: TrainingSetConfig, store: StoreResource,  # type: ignore[valid-type]
                      llm: LLMResource) -> dg.MaterializeResult:
        db = store.get_store()
        settings = settings_from(config, profiles.training_set("quick"))
        model_id = llm.model_identity()
        groups = db.training_groups(method.name, settings.prompt_sets, model_id)
        included = [g for g in groups if g.excluded is None and g.responses]
        if not included:
            raise dg.Failure(f"{method.name}: no training data for prompt sets {list(settings.prompt_sets)} and "
                             f"model {model_id!r}; materialize {method.name}/{last.name} for them first", allow_retries=False)
        n_benign = benign_count(benign_basis(included), settings.benign_ratio)
        benign_rows: list[tuple[str, str, str]] = []
        if n_benign:
            ensure_prompt_set(db, settings.benign_set)
            benign = db.train_prompts(settings.benign_set, limit=n_benign)
            with fail_fast_on_permanent_errors():
                llm.check()
                cached = llm.cached(db, progress=progress_logger(context, "benign answers"))
                answers = answer_directly(cached, [p.text for p in benign], settings.answer_tokens)
            benign_rows = [(p.prompt_id, p.text, a) for p, a in zip(benign, answers)]
        dataset = build_training_set(method.name, method.trainer, settings.prompt_sets, groups, benign_rows)
        path = _save_dataset(db, dataset)
        overlap = _train_eval_overlap(db, [g.prompt for g in dataset.groups[: dataset.n_aligned]])
        preview = [{"kind": g.kind, "prompt": g.prompt, "response": g.responses[0].text,
                    "rating": g.responses[0].rating} for g in [*dataset.groups[:2], *dataset.groups[-1:]]]
        return dg.MaterializeResult(
            # The dataset id is this materialization's data version: the checkpoint reads which dataset to train
            # on from here (not from "the latest row"), and the UI marks checkpoints stale when it changes.
            data_version=dg.DataVersion(dataset.dataset_id),
            metadata={
                "dataset_id": dataset.dataset_id, "path": dg.MetadataValue.path(str(path)),
                DISJOINT_PASSED: not overlap,
                "prompt_sets": ", ".join(settings.prompt_sets), "n_groups": len(dataset.groups),
                "n_examples": dataset.n_examples, "n_aligned": dataset.n_aligned, "n_benign": dataset.n_benign,
                "n_excluded": dataset.n_excluded,
                **{f"excluded/{reason}": n for reason, n in sorted(dataset.excluded_reasons.items())},
                "preview": md_table(preview, ["kind", "prompt", "response", "rating"], 250),
            },
            check_results=[dg.AssetCheckResult(
                check_name="train_eval_disjoint", passed=not overlap,
                metadata={"overlapping_prompts": len(overlap),
                          "examples": " | ".join(f"{a[:60]} ~ {b[:60]} ({s:.2f})" for a, b, s in overlap[:3])},
            )],
        )

    return _training_set


def _save_dataset(db: Store, dataset: TrainingSet) -> Path:
    path = datasets_dir() / f"{dataset.method}-{dataset.dataset_id}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"group_index": gi, "prompt_id": g.prompt_id, "source": g.kind, "prompt": g.prompt, "response": r.text,
             "rating": r.rating} for gi, g in enumerate(dataset.groups) for r in g.responses]
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    db.save_training_set(dataset, str(path), rows)
    return path


def _train_eval_overlap(db: Store, prompts: list[str]) -> list[tuple[str, str, float]]:
    """Training prompts equal to, or paraphrasing, any prompt of an evaluation split in the store."""
    from matrix_assets.embeddings import embed

    evaluation = db.evaluation_prompt_texts()
    if not prompts or not evaluation:
        return []
    exact = set(evaluation)
    similarity = embed(prompts) @ embed(evaluation).T
    found = []
    for i, prompt in enumerate(prompts):
        j = int(similarity[i].argmax())
        if prompt in exact or similarity[i, j] >= NEAR_DUPLICATE_SIMILARITY:
            found.append((prompt, evaluation[j], float(similarity[i, j])))
    return found


def checkpoint_asset(method: Method) -> dg.AssetsDefinition:
    @dg.asset(
        key=[method.name, "checkpoint"],
        deps=[dg.AssetKey([method.name, "training_set"])],
        group_name=method.name,
        kinds={"pytorch", "mlflow"},
        description=f"{method.title}: a LoRA adapter trained ({method.trainer}) on the dataset of the latest "
        f"{method.name}/training_set materialization (refused if it failed its blocking check); "
        "logged to its own MLflow run and registered as a loadable model version.",
        pool=MODEL_POOL,
        automation_condition=NIGHTLY,
        tags={"method": method.name},
    )
    def _checkpoint(context: dg.AssetExecutionContext, config: TrainingConfig, store: StoreResource,  # type: ignore[valid-type]
                    llm: LLMResource, mlflow_tracking: MLflowResource) -> dg.MaterializeResult:
        db = store.get_store()
        settings = settings_from(config, profiles.training("quick"))
        try:
            settings.lora().validate()
            settings.train().validate()
            if settings.runner not in TRAINING_RUNNERS:
                raise ValueError(f"runner must be one of {', '.join(TRAINING_RUNNERS)}, not {settings.runner!r}")
        except ValueError as exc:
            raise dg.Failure(f"bad training configuration: {exc}", allow_retries=False) from exc
        mlflow_tracking.check()  # an unreachable tracking store fails here, not after training
        dataset = upstream_training_set(context, db, method)
        metadata = train_checkpoint(context, db, llm, mlflow_tracking, method, dataset, settings)
        return dg.MaterializeResult(metadata={**metadata, "dataset_id": dataset["dataset_id"]})

    return _checkpoint


DISJOINT_PASSED = "train_eval_disjoint_passed"


def upstream_training_set(context: dg.AssetExecutionContext, db: Store, method: Method) -> dict[str, Any]:
    """The dataset of the latest `METHOD/training_set` materialization in this Dagster instance, whichever run made
    it; refused when that materialization failed its blocking `train_eval_disjoint` check (a checkpoint-only or
    nightly run must not train on it any more than the run that built it could)."""
    key = dg.AssetKey([method.name, "training_set"])
    event = context.instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        raise dg.Failure(f"no materialization of {key.to_user_string()} in this Dagster instance; materialize it "
                         "first", allow_retries=False)
    metadata = event.asset_materialization.metadata
    dataset_id = metadata["dataset_id"].value if "dataset_id" in metadata else None
    if DISJOINT_PASSED in metadata and not metadata[DISJOINT_PASSED].value:
        raise dg.Failure(f"refusing to train on {dataset_id}: its {key.to_user_string()} materialization (run "
                         f"{event.run_id}) failed the blocking train_eval_disjoint check; rebuild the training set "
                         "without evaluation prompts", allow_retries=False)
    dataset = db.training_set(str(dataset_id)) if dataset_id else None
    if dataset is None:
        raise dg.Failure(f"{key.to_user_string()} (run {event.run_id}) names dataset {dataset_id!r}, which this "
                         "store does not hold; re-materialize the training set", allow_retries=False)
    context.log.info(f"training on {dataset_id}, built by run {event.run_id}")
    return dataset


def train_checkpoint(context: dg.AssetExecutionContext, db: Store, llm: LLMResource, tracking: MLflowResource,
                     method: Method, dataset: dict, settings: Any) -> dict[str, Any]:
    import mlflow

    from matrix_assets.evaluation.plots import plot_loss_curve
    from matrix_assets.training.sft import train_lora

    rows = db.training_examples(dataset["dataset_id"])
    examples, objective = _examples(method, rows)
    base_model = llm.base_model_path()
    model_name = llm.model_identity()
    lora, train = settings.lora(), settings.train()
    # The id is a fingerprint of everything that determines the adapter (data, method, settings, base model):
    # re-materializing with nothing changed reuses the trained adapter instead of paying for training again.
    fingerprint = hashlib.sha256(json.dumps(
        [dataset["dataset_id"], method.name, dataclasses.asdict(lora), dataclasses.asdict(train),
         dataclasses.asdict(objective), model_name], sort_keys=True, default=str).encode()).hexdigest()[:12]
    checkpoint_id = f"ckpt-{method.name}-{fingerprint}"
    existing = db.checkpoint(checkpoint_id)
    if existing and (Path(existing["adapter_path"]) / "adapter_config.json").exists():
        context.log.info(f"{checkpoint_id}: same data and settings as a trained checkpoint; reusing it")
        # The reused checkpoint is this materialization's output: the latest for evaluation from now on.
        db.touch_checkpoint(checkpoint_id, context.run.run_id)
        return {"checkpoint_id": checkpoint_id, "reused": True,
                "mlflow_run": dg.MetadataValue.url(tracking.run_url(existing["mlflow_run_id"]))}
    out_dir = checkpoints_dir() / checkpoint_id
    llm.release()  # the generation backend an earlier step kept in this process: training loads its own copy
    context.log.info(f"training {checkpoint_id} on {len(examples)} {type(examples[0]).__name__ if examples else 'examples'}s")
    with tracking.start_run(context, run_name=checkpoint_id) as run:
        mlflow.log_params({
            "base_model": model_name, "method": method.name, "trainer": method.trainer,
            "dataset_id": dataset["dataset_id"], "n_examples": dataset["n_examples"], "n_groups": dataset["n_groups"],
            "n_aligned": dataset["n_aligned"], "n_benign": dataset["n_benign"], "n_excluded": dataset["n_excluded"],
            **{f"lora_{k}": v for k, v in dataclasses.asdict(lora).items()},
            **dataclasses.asdict(train), **{f"objective_{k}": v for k, v in dataclasses.asdict(objective).items()},
        })
        mlflow.set_tags({"method": method.name, "control": str(method.control).lower(), "kind": "training"})

        def on_log(step: int, logs: dict[str, float]) -> None:
            mlflow.log_metrics({k: v for k, v in logs.items() if k in {"loss", "learning_rate", "grad_norm"}},
                               step=step)
            if "loss" in logs:
                context.log.info(f"{method.name} step {step}: loss {logs['loss']:.4f}")

        if settings.runner == "pipes":
            result = train_through_pipes(context, base_model, examples, out_dir, lora, train, objective,
                                         settings.launch_command)
            for step, loss in result.losses:
                mlflow.log_metric("loss", loss, step=step)
        else:
            result = train_lora(base_model, examples, out_dir, lora=lora, train=train, on_log=on_log,
                                objective=objective)
            release_memory()  # the trained model and its optimizer, before the next step loads another
        plot = plot_loss_curve([s for s, _ in result.losses], [v for _, v in result.losses], out_dir / "loss.png")
        mlflow.log_metrics({"train_loss": result.train_loss or float("nan"), "train_seconds": result.seconds,
                            "train_steps": result.steps})
        mlflow.log_artifacts(str(result.adapter_path), artifact_path="adapter")
        mlflow.log_artifact(str(plot))
        description = (
            f"{method.title} ({method.name}{', a control' if method.control else ''}): LoRA adapter {checkpoint_id} "
            f"on {model_name}, trained ({method.trainer}) on dataset {dataset['dataset_id']}: "
            f"{dataset['n_aligned']} groups from the method on prompt sets "
            f"{', '.join(json.loads(dataset['prompt_sets_json']))} and {dataset['n_benign']} benign self-answers "
            f"({dataset['n_examples']} responses; {dataset['n_excluded']} prompts left out). Load the latest of this "
            f"method with models:/{tracking.registered_model_name}@{method.name}.")
        version = tracking.register_adapter(run.info.run_id, result.adapter_path, llm.base_model_name(), {
            "checkpoint_id": checkpoint_id, "dataset_id": dataset["dataset_id"], "method": method.name,
            "base_model": model_name}, description=description, alias=method.name)
        run_id = run.info.run_id
    now = utcnow()
    db.save_checkpoint({
        "checkpoint_id": checkpoint_id, "base_model": model_name, "dataset_id": dataset["dataset_id"],
        "method": method.name, "adapter_path": str(result.adapter_path), "n_examples": len(examples),
        "train_loss": result.train_loss, "mlflow_run_id": run_id, "registered_model": tracking.registered_model_name,
        "model_version": version, "dagster_run_id": context.run.run_id, "created_at": now, "built_at": now,
    })
    return {
        "checkpoint_id": checkpoint_id,
        "adapter_path": dg.MetadataValue.path(str(result.adapter_path)),
        "n_examples": len(examples),
        "steps": result.steps,
        "train_loss": result.train_loss or float("nan"),
        "train_seconds": round(result.seconds, 1),
        "loss_curve": image_md(plot, f"{method.name} training loss"),
        "mlflow_run": dg.MetadataValue.url(tracking.run_url(run_id)),
        "registered_model": f"{tracking.registered_model_name} v{version}",
    }


TRAINING_RUNNERS = ("in_process", "pipes")


def train_through_pipes(context: dg.AssetExecutionContext, base_model: str, examples: list[Any], out_dir: Path,
                        lora: Any, train: Any, objective: Any, launch_command: str) -> Any:
    """Train in a child process (`training/pipes_entry.py`) through Dagster Pipes: its log lines stream into this
    step's logs, a non-zero exit fails the step, and the orchestrator's memory never holds the model."""
    from matrix_assets.training.pipes_entry import read_result, write_request

    request = out_dir / "request.json"
    write_request(request, base_model, examples, out_dir, lora, train, objective)
    command = [*(shlex.split(launch_command) if launch_command else [sys.executable]),
               "-m", "matrix_assets.training.pipes_entry", "--request", str(request)]
    context.log.info(f"training through Dagster Pipes: {' '.join(command)}")
    dg.PipesSubprocessClient().run(command=command, context=context)
    return read_result(out_dir)


def _examples(method: Method, rows: list[dict]) -> tuple[list[Any], Any]:
    """The stored training set as the method's objective trains on it (SFT pairs, rated groups, ...)."""
    from matrix_assets.records import RatedResponse, TrainingGroup

    groups: dict[int, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group_index"], []).append(row)
    stored = [TrainingGroup(g[0]["prompt_id"], g[0]["prompt"], g[0]["source"],
                            tuple(RatedResponse(r["response"], r["rating"]) for r in g)) for g in groups.values()]
    return method.objective.examples(stored), method.objective


def method_assets() -> list[dg.AssetsDefinition]:
    assets: list[dg.AssetsDefinition] = []
    for method in registry().values():
        assets += [stage_asset(method, stage) for stage in method.stages]
        assets += [training_set_asset(method), checkpoint_asset(method)]
    return assets


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(assets=method_assets())
