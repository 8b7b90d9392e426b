"""Training data and the LoRA checkpoint (unpartitioned: they consume every materialized prompt set)."""


import hashlib
import json
import uuid

import dagster as dg

from matrix_assets.defs.assets.common import cache_metadata, md_table, progress_logger
from matrix_assets.defs.configs import SFTDatasetConfig, TrainConfig
from matrix_assets.defs.resources import LLMResource, MLflowResource, StoreResource
from matrix_assets.evaluation.plots import plot_loss_curve
from matrix_assets.settings import checkpoints_dir, datasets_dir
from matrix_assets.simulation.engine import SimulationSettings, initial_answers
from matrix_assets.store.db import utcnow
from matrix_assets.store.prompt_sets import ensure_prompt_set
from matrix_assets.training.sft import SFTExample, train_lora

BENIGN_TRAIN_FRACTION = 0.5  # Vicuna-Bench: half for benign training answers, half held out for helpfulness


@dg.asset(
    deps=["revised_answers"],
    group_name="training",
    kinds={"python", "sql"},
    description="(prompt, revised answer) pairs of every prompt set, mixed with benign prompts answered by the "
    "model itself so that fine-tuning does not teach it to refuse everything.",
)
def sft_dataset(
    context: dg.AssetExecutionContext, config: SFTDatasetConfig, store: StoreResource, llm: LLMResource
) -> dg.MaterializeResult:
    db = store.get_store()
    cached = llm.cached(db)
    sets = config.prompt_sets or [r["name"] for r in db.prompt_sets() if r["role"] == "harmful"]
    revisions = db.revisions(sets, config.method, cached.model_id)
    if not revisions:
        raise dg.Failure(f"no revised answers for prompt sets {sets} (method {config.method!r}); materialize revised_answers")
    examples = [(r["prompt_id"], "revision", r["prompt"], r["revised"]) for r in revisions]

    n_benign = round(len(revisions) * config.benign_ratio)
    if n_benign:
        ensure_prompt_set(db, config.benign_set, train_fraction=BENIGN_TRAIN_FRACTION)
        benign = db.prompts(config.benign_set, split="train", limit=n_benign)
        llm.check()
        cached.generate = _with_progress(cached, context)  # type: ignore[method-assign]
        answers = initial_answers(cached, [p["text"] for p in benign], SimulationSettings(answer_tokens=config.answer_tokens))
        examples += [(p["prompt_id"], "benign_self_answer", p["text"], a) for p, a in zip(benign, answers)]

    dataset_id = hashlib.sha256(json.dumps(examples, ensure_ascii=False).encode()).hexdigest()[:16]
    path = datasets_dir() / f"sft-{dataset_id}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for prompt_id, source, prompt, response in examples:
            fh.write(json.dumps({"prompt_id": prompt_id, "source": source, "prompt": prompt, "response": response},
                                ensure_ascii=False) + "\n")
    n_revision = sum(1 for e in examples if e[1] == "revision")
    with db.transaction() as conn:
        db.upsert(
            "sft_datasets",
            [{"dataset_id": dataset_id, "method": config.method, "prompt_sets": ",".join(sets), "path": str(path),
              "n_examples": len(examples), "n_revision": n_revision, "n_benign": len(examples) - n_revision,
              "created_at": utcnow()}],
            conn=conn,
        )
        db.upsert(
            "sft_examples",
            [{"dataset_id": dataset_id, "position": i, "prompt_id": e[0], "source": e[1], "prompt": e[2],
              "response": e[3]} for i, e in enumerate(examples)],
            conn=conn,
        )
    preview = [{"source": e[1], "prompt": e[2], "response": e[3]} for e in examples[:3] + examples[-2:]]
    return dg.MaterializeResult(
        metadata={
            "dataset_id": dataset_id, "path": dg.MetadataValue.path(str(path)), "n_examples": len(examples),
            "n_revision": n_revision, "n_benign": len(examples) - n_revision, "prompt_sets": ", ".join(sets),
            "preview": md_table(preview, ["source", "prompt", "response"], 300), **cache_metadata(cached.stats),
        },
        data_version=dg.DataVersion(dataset_id),
    )


def _with_progress(cached, context):  # noqa: ANN001, ANN202
    generate, progress = cached.generate, progress_logger(context, "benign answers")
    return lambda conversations, params: generate(conversations, params, progress=progress)


def latest_dataset(db) -> dict:  # noqa: ANN001
    rows = db.query("SELECT * FROM sft_datasets ORDER BY created_at DESC, dataset_id DESC LIMIT 1")
    if not rows:
        raise dg.Failure("no SFT dataset yet; materialize sft_dataset first")
    return rows[0]


@dg.asset(
    deps=["sft_dataset"],
    group_name="training",
    kinds={"pytorch", "mlflow"},
    description="LoRA adapter trained with TRL's SFTTrainer on the latest SFT dataset; logged to MLflow and "
    "registered as a model version.",
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
    dataset = latest_dataset(db)
    rows = db.query("SELECT prompt, response FROM sft_examples WHERE dataset_id = :d ORDER BY position",
                    d=dataset["dataset_id"])
    examples = [SFTExample(r["prompt"], r["response"]) for r in rows]
    base_model = llm.base_model_path()
    checkpoint_id = f"ckpt-{utcnow().replace(':', '').replace('-', '')[:15]}-{uuid.uuid4().hex[:6]}"
    out_dir = checkpoints_dir() / checkpoint_id
    import mlflow

    with mlflow_tracking.start_run(context, run_name=checkpoint_id) as run:
        mlflow.log_params({
            "base_model": getattr(llm, "model", base_model), "dataset_id": dataset["dataset_id"],
            "method": dataset["method"], "n_examples": len(examples), "n_revision": dataset["n_revision"],
            "n_benign": dataset["n_benign"], "lora_r": lora.r, "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout, "lora_target_modules": ",".join(lora.target_modules),
            "epochs": train.epochs, "max_steps": train.max_steps, "learning_rate": train.learning_rate,
            "batch_size": train.batch_size, "max_length": train.max_length, "lr_scheduler": train.lr_scheduler,
        })

        def on_log(step: int, logs: dict[str, float]) -> None:
            mlflow.log_metrics({k: v for k, v in logs.items() if k in {"loss", "learning_rate", "grad_norm"}}, step=step)
            if "loss" in logs:
                context.log.info(f"training step {step}: loss {logs['loss']:.4f}")

        result = train_lora(base_model, examples, out_dir, lora=lora, train=train, on_log=on_log)
        plot = plot_loss_curve([s for s, _ in result.losses], [l for _, l in result.losses], out_dir / "loss.png")
        mlflow.log_metrics({"train_loss": result.train_loss or float("nan"), "train_seconds": result.seconds,
                            "train_steps": result.steps})
        mlflow.log_artifacts(str(result.adapter_path), artifact_path="adapter")
        mlflow.log_artifact(str(plot))
        version = _register(mlflow_tracking, run.info.run_id, run.info.artifact_uri, checkpoint_id,
                            dataset["dataset_id"], base_model)
        run_id = run.info.run_id

    db.upsert(
        "checkpoints",
        [{"checkpoint_id": checkpoint_id, "base_model": getattr(llm, "model", base_model),
          "dataset_id": dataset["dataset_id"], "method": dataset["method"], "adapter_path": str(result.adapter_path),
          "n_examples": len(examples), "train_loss": result.train_loss, "mlflow_run_id": run_id,
          "registered_model": mlflow_tracking.registered_model_name, "model_version": version,
          "dagster_run_id": context.run.run_id, "created_at": utcnow()}],
    )
    return dg.MaterializeResult(
        metadata={
            "checkpoint_id": checkpoint_id, "adapter_path": dg.MetadataValue.path(str(result.adapter_path)),
            "n_examples": len(examples), "steps": result.steps, "train_loss": result.train_loss or float("nan"),
            "train_seconds": round(result.seconds, 1), "loss_curve": dg.MetadataValue.path(str(plot)),
            "mlflow_run": dg.MetadataValue.url(mlflow_tracking.run_url(run_id)), "mlflow_run_id": run_id,
            "registered_model": f"{mlflow_tracking.registered_model_name} v{version}",
        }
    )


def _register(tracking: MLflowResource, run_id: str, artifact_uri: str, checkpoint_id: str, dataset_id: str,
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
        tags={"checkpoint_id": checkpoint_id, "dataset_id": dataset_id, "base_model": base_model},
    )
    return str(version.version)
