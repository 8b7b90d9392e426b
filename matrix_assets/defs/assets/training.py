"""Training data and LoRA checkpoints, one per method (unpartitioned: they consume every prompt set)."""

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import dagster as dg

from matrix_assets.defs.assets.common import cache_metadata, image_md, md_table, progress_logger
from matrix_assets.defs.configs import SFTDatasetConfig, TrainConfig
from matrix_assets.defs.resources import LLMResource, MLflowResource, StoreResource
from matrix_assets.evaluation.plots import plot_loss_curve
from matrix_assets.settings import checkpoints_dir, datasets_dir
from matrix_assets.simulation.baselines import METHODS
from matrix_assets.simulation.engine import SimulationSettings, initial_answers
from matrix_assets.store.db import Store, utcnow
from matrix_assets.store.prompt_sets import ensure_prompt_set
from matrix_assets.training.sft import SFTExample, train_lora

BENIGN_TRAIN_FRACTION = 0.5  # Vicuna-Bench: half for benign training answers, half held out for helpfulness


def _aligned_examples(db: Store, method: str, sets: list[str], model_id: str) -> list[tuple[str, str, str, str]]:
    """(prompt_id, source, prompt, response) of one method, over the chosen prompt sets."""
    if method == "initial_sft":
        return [(r["prompt_id"], "initial_answer", r["prompt"], r["response"])
                for name in sets for r in db.initial_responses(name, model_id)]
    return [(r["prompt_id"], f"{method}_revision", r["prompt"], r["revised"])
            for r in db.revisions(sets, method, model_id)]


@dg.asset(
    deps=["revised_answers", "cai_revisions"],
    group_name="training",
    kinds={"python", "sql"},
    description="One SFT dataset per method: (prompt, aligned answer) pairs of every prompt set, mixed with benign "
    "prompts answered by the model itself so that fine-tuning does not teach it to refuse everything.",
)
def sft_dataset(
    context: dg.AssetExecutionContext, config: SFTDatasetConfig, store: StoreResource, llm: LLMResource
) -> dg.MaterializeResult:
    db = store.get_store()
    unknown = sorted(set(config.methods) - set(METHODS))
    if unknown:
        raise dg.Failure(f"unknown methods {unknown}; choose from {list(METHODS)}")
    cached = llm.cached(db, progress=progress_logger(context, "benign answers"))
    sets = config.prompt_sets or [r["name"] for r in db.prompt_sets() if r["role"] == "harmful"]
    per_method = {m: _aligned_examples(db, m, sets, cached.model_id) for m in config.methods}
    missing = [m for m, rows in per_method.items() if not rows]
    for method in missing:
        context.log.warning(f"method {method!r} has no aligned answers for {sets}; no dataset for it")
    per_method = {m: rows for m, rows in per_method.items() if rows}
    if not per_method:
        raise dg.Failure(f"no aligned answers for prompt sets {sets}; materialize revised_answers first")

    # The same benign self-answers go into every method's dataset, so the methods differ only in alignment data.
    n_benign = round(max(len(rows) for rows in per_method.values()) * config.benign_ratio)
    benign_rows: list[tuple[str, str, str, str]] = []
    if n_benign:
        ensure_prompt_set(db, config.benign_set, train_fraction=BENIGN_TRAIN_FRACTION)
        benign = db.prompts(config.benign_set, split="train", limit=n_benign)
        llm.check()
        answers = initial_answers(cached, [p["text"] for p in benign], SimulationSettings(answer_tokens=config.answer_tokens))
        benign_rows = [(p["prompt_id"], "benign_self_answer", p["text"], a) for p, a in zip(benign, answers)]

    metadata: dict = {"prompt_sets": ", ".join(sets), "n_benign": len(benign_rows), **cache_metadata(cached.stats)}
    for method, rows in per_method.items():
        examples = rows + benign_rows
        dataset_id = _save_dataset(db, method, sets, examples)
        metadata[f"{method}/dataset_id"] = dataset_id
        metadata[f"{method}/n_examples"] = len(examples)
        preview = [{"source": e[1], "prompt": e[2], "response": e[3]} for e in examples[:2] + examples[-1:]]
        metadata[f"{method}/preview"] = md_table(preview, ["source", "prompt", "response"], 250)
    return dg.MaterializeResult(metadata=metadata)


def _save_dataset(db: Store, method: str, sets: list[str], examples: list[tuple[str, str, str, str]]) -> str:
    dataset_id = hashlib.sha256(json.dumps([method, examples], ensure_ascii=False).encode()).hexdigest()[:16]
    path = datasets_dir() / f"sft-{method}-{dataset_id}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for prompt_id, source, prompt, response in examples:
            fh.write(json.dumps({"prompt_id": prompt_id, "source": source, "prompt": prompt, "response": response},
                                ensure_ascii=False) + "\n")
    n_benign = sum(1 for e in examples if e[1] == "benign_self_answer")
    with db.transaction() as conn:
        db.upsert("sft_datasets", [{
            "dataset_id": dataset_id, "method": method, "prompt_sets": ",".join(sets), "path": str(path),
            "n_examples": len(examples), "n_revision": len(examples) - n_benign, "n_benign": n_benign,
            "created_at": utcnow(),
        }], conn=conn)
        db.upsert("sft_examples", [
            {"dataset_id": dataset_id, "position": i, "prompt_id": e[0], "source": e[1], "prompt": e[2], "response": e[3]}
            for i, e in enumerate(examples)
        ], conn=conn)
    return dataset_id


def latest_datasets(db: Store, methods: list[str] | None) -> list[dict]:
    latest = db.latest_per_method("sft_datasets", methods, METHODS)
    if not latest:
        raise dg.Failure("no SFT dataset yet; materialize sft_dataset first")
    return latest


@dg.asset(
    deps=["sft_dataset"],
    group_name="training",
    kinds={"pytorch", "mlflow"},
    description="One LoRA adapter per method, trained with TRL's SFTTrainer on the method's latest SFT dataset; "
    "each logged to its own MLflow run and registered as a model version.",
)
def finetuned_checkpoint(
    context: dg.AssetExecutionContext,
    config: TrainConfig,
    store: StoreResource,
    llm: LLMResource,
    mlflow_tracking: MLflowResource,
) -> dg.MaterializeResult:
    db = store.get_store()
    lora, train = config.lora(), config.train()
    try:
        lora.validate()
    except ValueError as exc:
        raise dg.Failure(f"bad training configuration: {exc}") from exc
    mlflow_tracking.check()  # an unreachable tracking store fails here, not after training
    datasets = latest_datasets(db, config.methods)
    base_model = llm.base_model_path()
    metadata: dict = {}
    for dataset in datasets:
        metadata.update(_train_one(context, db, llm, mlflow_tracking, dataset, base_model, lora, train))
    return dg.MaterializeResult(metadata=metadata)


def _train_one(context, db, llm, tracking, dataset, base_model, lora, train) -> dict:  # noqa: ANN001
    import mlflow

    method = dataset["method"]
    rows = db.query("SELECT prompt, response FROM sft_examples WHERE dataset_id = :d ORDER BY position",
                    d=dataset["dataset_id"])
    examples = [SFTExample(r["prompt"], r["response"]) for r in rows]
    model_name = getattr(llm, "model", base_model)
    # The id is a fingerprint of everything that determines the adapter (data, method, settings, base model):
    # re-materializing with nothing changed reuses the trained adapter instead of paying for training again.
    fingerprint = hashlib.sha256(
        json.dumps([dataset["dataset_id"], method, asdict(lora), asdict(train), model_name], sort_keys=True).encode()
    ).hexdigest()[:12]
    checkpoint_id = f"ckpt-{method}-{fingerprint}"
    existing = db.checkpoint(checkpoint_id)
    if existing and (Path(existing["adapter_path"]) / "adapter_config.json").exists():
        context.log.info(f"{checkpoint_id}: same data and settings as a trained checkpoint; reusing it")
        return {f"{method}/checkpoint_id": checkpoint_id, f"{method}/reused": True,
                f"{method}/mlflow_run": dg.MetadataValue.url(tracking.run_url(existing["mlflow_run_id"]))}
    out_dir = checkpoints_dir() / checkpoint_id
    context.log.info(f"training {checkpoint_id} on {len(examples)} examples ({method})")
    with tracking.start_run(context, run_name=checkpoint_id) as run:
        mlflow.log_params({
            "base_model": model_name, "method": method, "dataset_id": dataset["dataset_id"],
            "n_examples": len(examples), "n_aligned": dataset["n_revision"], "n_benign": dataset["n_benign"],
            "lora_r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
            "lora_target_modules": ",".join(lora.target_modules), "epochs": train.epochs,
            "max_steps": train.max_steps, "learning_rate": train.learning_rate, "batch_size": train.batch_size,
            "max_length": train.max_length, "lr_scheduler": train.lr_scheduler,
        })
        mlflow.set_tag("method", method)

        def on_log(step: int, logs: dict[str, float]) -> None:
            mlflow.log_metrics({k: v for k, v in logs.items() if k in {"loss", "learning_rate", "grad_norm"}}, step=step)
            if "loss" in logs:
                context.log.info(f"{method} step {step}: loss {logs['loss']:.4f}")

        result = train_lora(base_model, examples, out_dir, lora=lora, train=train, on_log=on_log)
        plot = plot_loss_curve([s for s, _ in result.losses], [l for _, l in result.losses], out_dir / "loss.png")
        mlflow.log_metrics({"train_loss": result.train_loss or float("nan"), "train_seconds": result.seconds,
                            "train_steps": result.steps})
        mlflow.log_artifacts(str(result.adapter_path), artifact_path="adapter")
        mlflow.log_artifact(str(plot))
        version = _register(tracking, run.info.run_id, run.info.artifact_uri, checkpoint_id, dataset, base_model)
        run_id = run.info.run_id
    db.upsert("checkpoints", [{
        "checkpoint_id": checkpoint_id, "base_model": model_name, "dataset_id": dataset["dataset_id"],
        "method": method, "adapter_path": str(result.adapter_path), "n_examples": len(examples),
        "train_loss": result.train_loss, "mlflow_run_id": run_id, "registered_model": tracking.registered_model_name,
        "model_version": version, "dagster_run_id": context.run.run_id, "created_at": utcnow(),
    }])
    return {
        f"{method}/checkpoint_id": checkpoint_id,
        f"{method}/adapter_path": dg.MetadataValue.path(str(result.adapter_path)),
        f"{method}/n_examples": len(examples),
        f"{method}/steps": result.steps,
        f"{method}/train_loss": result.train_loss or float("nan"),
        f"{method}/train_seconds": round(result.seconds, 1),
        f"{method}/loss_curve": image_md(plot, f"{method} training loss"),
        f"{method}/mlflow_run": dg.MetadataValue.url(tracking.run_url(run_id)),
        f"{method}/registered_model": f"{tracking.registered_model_name} v{version}",
    }


def _register(tracking: MLflowResource, run_id: str, artifact_uri: str, checkpoint_id: str, dataset: dict,
              base_model: str) -> str:
    """Register the adapter folder as a model version (the base model's identity travels as a tag)."""
    from mlflow.exceptions import MlflowException

    client = tracking.client()
    name = tracking.registered_model_name
    try:
        client.create_registered_model(name, description="LoRA adapters from the matrix-assets pipeline")
    except MlflowException:
        pass  # already registered
    version = client.create_model_version(
        name, source=f"{artifact_uri}/adapter", run_id=run_id,
        tags={"checkpoint_id": checkpoint_id, "dataset_id": dataset["dataset_id"], "method": dataset["method"],
              "base_model": base_model},
    )
    return str(version.version)
