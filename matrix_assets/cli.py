"""matrix-assets: run the MATRIX self-alignment pipeline from a terminal.

The same assets as the Dagster UI, executed in-process against the Dagster instance of this repository
(runs and materializations show up in `dagster dev` afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _prepare_environment() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if sys.stderr.isatty():
        os.environ.setdefault("MATRIX_PROGRESS_BARS", "1")  # generation progress bars in a terminal
    os.environ.setdefault("MATRIX_HOME", str(REPO_ROOT / ".matrix"))
    os.environ.setdefault("MATRIX_DAGSTER_STORAGE", str(Path(os.environ["MATRIX_HOME"]) / "dagster"))
    if "DAGSTER_HOME" not in os.environ and (REPO_ROOT / "dagster.yaml").exists():
        os.environ["DAGSTER_HOME"] = str(REPO_ROOT)


def _instance():  # noqa: ANN202
    import dagster as dg

    return dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()


def _definitions():  # noqa: ANN202
    from matrix_assets.definitions import defs

    return defs()


def build_run_configs(args: argparse.Namespace) -> tuple[dict, dict]:
    """Run config of the per-prompt-set job and of the train-and-evaluate job."""
    quiet = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    simulate = {
        **quiet,
        "ops": {
            "benchmark_prompts": {"config": {"train_fraction": args.train_fraction}},
            "initial_responses": {"config": {"max_prompts": args.max_prompts}},
            "scene_transcripts": {
                "config": {"n_roles": args.roles, "plan_steps": args.steps, "max_rounds": args.rounds,
                           "max_observers": args.observers}
            },
        }
    }
    train_eval = {
        **quiet,
        "ops": {
            "sft_dataset": {"config": {"prompt_sets": [args.prompt_set], "benign_ratio": args.benign_ratio,
                                       "methods": args.methods}},
            "finetuned_checkpoint": {
                "config": {"epochs": args.epochs, "max_steps": args.max_steps, "learning_rate": args.learning_rate,
                           "methods": args.methods}
            },
            "evaluation_scores": {
                "config": {"prompt_sets": [args.prompt_set], "max_harmful_per_set": args.eval_prompts,
                           "max_over_refusal": args.eval_prompts, "max_helpfulness": args.eval_prompts,
                           "methods": args.methods}
            },
        }
    }
    return simulate, train_eval


def cmd_run(args: argparse.Namespace) -> int:
    if args.full:
        args.max_prompts = args.eval_prompts = None
        args.roles, args.steps, args.rounds, args.observers = 5, 5, 5, 5
    # Training defaults depend on the data size: a dozen examples need more epochs and a higher rate.
    if args.epochs is None:
        args.epochs = 3.0 if args.full else 8.0
    if args.learning_rate is None:
        args.learning_rate = 2e-4 if args.full else 2e-3
    _prepare_environment()
    defs, instance = _definitions(), _instance()
    if args.prompt_set not in instance.get_dynamic_partitions("prompt_sets"):
        instance.add_dynamic_partitions("prompt_sets", [args.prompt_set])
    simulate_config, train_eval_config = build_run_configs(args)
    began = time.perf_counter()
    print(f"[matrix-assets] stage 1/2: MATRIX simulation on prompt set {args.prompt_set!r} "
          f"({args.max_prompts or 'all'} training prompts)", flush=True)
    result = defs.resolve_job_def("simulate_prompt_set").execute_in_process(
        run_config=simulate_config, instance=instance, partition_key=args.prompt_set, raise_on_error=False
    )
    if not result.success:
        print("[matrix-assets] simulation failed; see the log above. Nothing generated so far is lost: re-run to resume.")
        return 1
    print("[matrix-assets] stage 2/2: SFT dataset, LoRA fine-tuning, evaluation", flush=True)
    result = defs.resolve_job_def("train_and_evaluate").execute_in_process(
        run_config=train_eval_config, instance=instance, raise_on_error=False
    )
    if not result.success:
        print("[matrix-assets] training/evaluation failed; see the log above.")
        return 1
    print(f"\n[matrix-assets] finished in {time.perf_counter() - began:.0f} s\n")
    print(latest_table())
    return 0


def latest_table() -> str:
    from matrix_assets.evaluation.metrics import Estimate
    from matrix_assets.evaluation.run import format_table
    from matrix_assets.store import Store

    db = Store()
    rows = db.query(
        "SELECT * FROM eval_metrics WHERE eval_id = (SELECT eval_id FROM eval_metrics "
        "ORDER BY created_at DESC, eval_id DESC LIMIT 1) ORDER BY model_label"
    )
    if not rows:
        return "no evaluation stored yet"
    metrics: dict[str, dict[str, Estimate]] = {}
    for r in rows:
        metrics.setdefault(r["model_label"], {})[r["metric"]] = Estimate(
            *(float("nan") if r[k] is None else r[k] for k in ("value", "ci_low", "ci_high")), r["n"]
        )
    from matrix_assets.simulation.baselines import METHODS

    order = ["base", *METHODS]
    ordered = {k: metrics[k] for k in sorted(metrics, key=lambda k: order.index(k) if k in order else len(order))}
    checkpoints = sorted({f"{r['model_label']}={r['checkpoint_id']}" for r in rows if r["checkpoint_id"]})
    head = (f"Base vs tuned on held-out prompts ({rows[0]['eval_id']}; {', '.join(checkpoints)}).\n"
            "Columns: base model, and one LoRA checkpoint per method (matrix = social-scene simulation, cai = "
            "fixed-principle critique/revise, initial_sft = fine-tuning on the model's own answers).\n"
            "95% bootstrap CIs; n = prompts behind each figure. With the bundled 135M model as judge, judge scores "
            "are noisy; the rule-based refusal rates are shown beside them.\n")
    return head + format_table(ordered)


def cmd_status(args: argparse.Namespace) -> int:
    _prepare_environment()
    from matrix_assets.store import Store

    db = Store()
    print(f"store: {db.url}")
    for row in db.prompt_sets():
        print(f"  prompt set {row['name']:<16} {row['n_prompts']:>5} prompts ({row['n_train']} train / "
              f"{row['n_eval']} eval)  role={row['role']}")
    for table in ("generations", "initial_responses", "transcripts", "transcript_events", "critiques", "revisions",
                  "sft_examples", "checkpoints", "eval_answers"):
        print(f"  {table:<18} {db.count(table):>7} rows")
    ckpt = db.latest_checkpoint()
    if ckpt:
        print(f"latest checkpoint: {ckpt['checkpoint_id']} (MLflow run {ckpt['mlflow_run_id']}, "
              f"{ckpt['registered_model']} v{ckpt['model_version']})")
    print(latest_table())
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    _prepare_environment()
    from matrix_assets.data.loaders import PromptFileError, load_prompt_file
    from matrix_assets.store.prompt_sets import drop_dir

    path = Path(args.file)
    try:
        records = load_prompt_file(path, prompt_column=args.prompt_column)
    except (PromptFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    name = args.name or path.stem
    drop_dir().mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, drop_dir() / f"{name}{path.suffix.lower()}")
    print(f"added prompt set {name!r} ({len(records)} prompts) to {drop_dir()}; the sensor picks it up, or run:\n"
          f"  matrix-assets run --prompt-set {name}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _prepare_environment()
    from matrix_assets.store import Store

    db = Store()
    rows = db.query("SELECT * FROM sft_datasets ORDER BY created_at DESC, dataset_id DESC LIMIT 1")
    if not rows:
        print("error: no SFT dataset yet; run the pipeline first", file=sys.stderr)
        return 2
    examples = db.query("SELECT prompt, response, source FROM sft_examples WHERE dataset_id = :d ORDER BY position",
                        d=rows[0]["dataset_id"])
    out = Path(args.out)
    if args.format == "jsonl":
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as fh:
            for e in examples:
                fh.write(json.dumps(e, ensure_ascii=False) + "\n")
    else:
        from datasets import Dataset

        Dataset.from_list(examples).save_to_disk(str(out))
    print(f"exported {len(examples)} examples of dataset {rows[0]['dataset_id']} to {out} ({args.format})")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="matrix-assets",
        description="MATRIX self-alignment as Dagster assets: the model answers, simulates the social consequences "
        "of its answer, critiques and revises it, is fine-tuned with LoRA on the revisions, and is evaluated base "
        "vs tuned. State lives in .matrix/ (SQLite store, MLflow store, adapters) unless MATRIX_HOME says otherwise.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="materialize the whole asset graph for one prompt set and print the base-vs-tuned table",
        description="Runs the simulate_prompt_set job for the prompt set, then train_and_evaluate, in this process. "
        "Every model call is cached in the store: re-running resumes and pays only for what is missing.",
    )
    run.add_argument("--prompt-set", default="advbench", help="bundled set (advbench, hh_rlhf, safe_rlhf, harmfulqa, "
                     "dangerousqa) or a file name added with `add` (default: advbench)")
    run.add_argument("--max-prompts", type=int, default=8, help="training prompts to simulate (default 8)")
    run.add_argument("--eval-prompts", type=int, default=8,
                     help="held-out prompts per evaluation set: harmful, XSTest safe, Vicuna (default 8)")
    run.add_argument("--roles", type=int, default=3, help="roles per scene besides the protagonist (default 3; paper ~5)")
    run.add_argument("--steps", type=int, default=3, help="plan steps per scene (default 3; paper ~5)")
    run.add_argument("--rounds", type=int, default=2, help="interaction rounds per scene (default 2)")
    run.add_argument("--observers", type=int, default=3, help="roles that react to one action at most (default 3)")
    run.add_argument("--train-fraction", type=float, default=0.5, help="share of each set used for training (0.5)")
    run.add_argument("--benign-ratio", type=float, default=0.5, help="benign self-answered examples per revision (0.5)")
    run.add_argument("--epochs", type=float, default=None,
                     help="LoRA epochs (default 8 for the quick run's ~12 examples per method; --full uses the "
                     "paper's 3)")
    run.add_argument("--max-steps", type=int, default=-1, help="cap on optimizer steps (overrides epochs when > 0)")
    run.add_argument("--learning-rate", type=float, default=None,
                     help="LoRA learning rate (default 2e-3 for the quick run: at 2e-4 a dozen examples do not move "
                     "the model at all; --full uses 2e-4)")
    run.add_argument("--methods", type=lambda v: [m.strip() for m in v.split(",") if m.strip()],
                     default=["matrix", "cai", "initial_sft"],
                     help="comma-separated methods to train and compare (default: matrix,cai,initial_sft)")
    run.add_argument("--full", action="store_true",
                     help="the whole prompt set and all held-out prompts with the paper's scene size (5 roles, "
                     "5 steps, 5 rounds): hours on a CPU, meant for a GPU or an OpenAI-compatible server")
    run.set_defaults(func=cmd_run)

    status = sub.add_parser(
        "status", help="prompt sets, row counts, latest checkpoint and evaluation table",
        description="Prints the prompt sets, the row counts of every table, the latest checkpoint and the latest "
        "base-vs-tuned table, from the store (MATRIX_DATABASE_URL or .matrix/matrix.db).",
    )
    status.set_defaults(func=cmd_status)

    add = sub.add_parser(
        "add", help="add a prompt file (CSV / JSONL / JSON / TXT) as a new prompt set",
        description="Validates a prompt file (the same loader as the pipeline: a clear error names the file and the "
        "reason) and copies it into the drop folder as a new prompt set; the sensor then starts its run, or run it "
        "with `matrix-assets run --prompt-set NAME`.",
    )
    add.add_argument("file", help="the prompt file")
    add.add_argument("--name", help="prompt set name (default: the file name without extension)")
    add.add_argument("--prompt-column", help="column or key holding the prompt (auto-detected by default)")
    add.set_defaults(func=cmd_add)

    export = sub.add_parser(
        "export", help="export the latest aligned SFT dataset",
        description="Exports the latest aligned SFT dataset (prompt / response / source rows) as a JSONL file or a "
        "Hugging Face `datasets` folder (load it back with datasets.load_from_disk).",
    )
    export.add_argument("--format", choices=("jsonl", "hf"), default="jsonl",
                        help="jsonl file, or a Hugging Face datasets folder (save_to_disk)")
    export.add_argument("--out", required=True, help="output file (jsonl) or folder (hf)")
    export.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
