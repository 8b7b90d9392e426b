"""matrix-assets: run the self-alignment pipeline from a terminal.

The same assets, jobs and profiles as the Dagster UI, executed in-process against the Dagster instance of this
repository (runs and materializations show up in `dagster dev` afterwards). `run` with no options does what a
plain "Materialize" of the two jobs does in the UI: the quick profile.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
CLI_PID_TAG = "matrix/cli_pid"
CLI_HOST_TAG = "matrix/cli_host"


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


def fail_orphaned_runs(instance: Any) -> list[str]:
    """Runs this CLI started on this machine whose process is gone (killed, machine crashed) are marked failed,
    instead of staying "In progress" in the UI forever: the in-process executor has no run worker that Dagster's
    run monitoring could check."""
    import dagster as dg

    failed = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        pid, host = run.tags.get(CLI_PID_TAG), run.tags.get(CLI_HOST_TAG)
        if not pid or host != socket.gethostname() or _alive(int(pid)):
            continue
        instance.report_run_failed(run, f"the matrix-assets process (pid {pid}) that ran it ended without "
                                        "finishing it (killed?); re-run to resume: the cache keeps what was generated")
        # A step of the dead run may still hold the `model` pool's slot: give it back, or every later run waits.
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        failed.append(run.run_id)
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _selection(methods: list[str] | None, leaves: tuple[str, ...]) -> list[Any] | None:
    """Asset keys of the chosen methods' assets (None: every method)."""
    import dagster as dg

    from matrix_assets.methods import registry

    if not methods:
        return None
    keys = []
    for name in methods:
        method = registry()[name]
        names = [s.name for s in method.stages] if "stages" in leaves else []
        names += [leaf for leaf in leaves if leaf != "stages"]
        keys += [dg.AssetKey([name, leaf]) for leaf in names]
    return keys


def build_run_configs(args: argparse.Namespace) -> tuple[dict, dict]:
    """Run config of the per-prompt-set job and of the train-and-evaluate job: the chosen profile, then the
    command line's overrides."""
    from matrix_assets.defs.configs import profile_run_config

    simulate = profile_run_config(args.profile, partitioned=True)
    train_eval = profile_run_config(args.profile, partitioned=False)
    ops = simulate["ops"]
    stage_overrides = {"max_prompts": args.max_prompts, "n_roles": args.roles, "plan_steps": args.steps,
                       "max_rounds": args.rounds, "revision_candidates": args.revision_candidates}
    for name, value in stage_overrides.items():
        if value is None:
            continue
        for op, entry in ops.items():
            if name in entry["config"]:
                entry["config"][name] = None if (name == "max_prompts" and value == 0) else value
    if args.train_fraction is not None:
        ops["benchmark_prompts"] = {"config": {"train_fraction": args.train_fraction}}
    for op, entry in train_eval["ops"].items():
        config = entry["config"]
        if op.endswith("__training_set"):
            config["prompt_sets"] = [args.prompt_set]
            if args.benign_ratio is not None:
                config["benign_ratio"] = args.benign_ratio
        if op.endswith("__checkpoint"):
            for name in ("epochs", "learning_rate", "max_steps"):
                if getattr(args, name) is not None:
                    config[name] = getattr(args, name)
    evaluation = train_eval["ops"]["evaluation_scores"]["config"]
    harmful = [args.prompt_set, *[s for s in evaluation["harmful_sets"] if s != args.prompt_set]]
    evaluation["harmful_sets"] = harmful
    if args.methods:
        evaluation["methods"] = args.methods
    if args.eval_prompts is not None:
        for key in ("max_harmful_per_set", "max_safe_per_set", "max_helpfulness_per_set"):
            evaluation[key] = args.eval_prompts or None
    for assignment in args.set or []:
        _apply_setting(assignment, simulate["ops"], train_eval["ops"])
    quiet = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    return {**quiet, **simulate}, {**quiet, **train_eval}


def _apply_setting(assignment: str, *op_configs: dict) -> None:
    """`NAME.FIELD=VALUE`: FIELD of every asset of method NAME, of the asset NAME, or of every method's asset NAME
    (`checkpoint.runner=pipes`) that has it; VALUE as JSON when it parses (numbers, true/false, null, lists), else
    as text."""
    target, _, value_text = assignment.partition("=")
    name, _, field = target.rpartition(".")
    if not name or not field or not _:
        raise SystemExit(f"--set {assignment!r}: expected NAME.FIELD=VALUE, e.g. stable_alignment.grid_size=2")
    try:
        value = json.loads(value_text)
    except json.JSONDecodeError:
        value = value_text
    hits = 0
    for ops in op_configs:
        for op, entry in ops.items():
            if (op == name or op.startswith(f"{name}__") or op.endswith(f"__{name}")) and field in entry["config"]:
                entry["config"][field] = value
                hits += 1
    if not hits:
        raise SystemExit(f"--set {assignment!r}: no asset of {name!r} has a setting {field!r}")


def cmd_run(args: argparse.Namespace) -> int:
    _prepare_environment()
    import dagster as dg

    defs, instance = _definitions(), _instance()
    orphans = fail_orphaned_runs(instance)
    if orphans:
        print(f"[matrix-assets] marked {len(orphans)} interrupted run(s) as failed: {', '.join(orphans)}")
    if args.prompt_set not in instance.get_dynamic_partitions("prompt_sets"):
        instance.add_dynamic_partitions("prompt_sets", [args.prompt_set])
    simulate_config, train_eval_config = build_run_configs(args)
    suffix = "" if args.profile == "quick" else "_paper"
    tags = {CLI_PID_TAG: str(os.getpid()), CLI_HOST_TAG: socket.gethostname()}
    began = time.perf_counter()
    shared = [dg.AssetKey("benchmark_prompts"), dg.AssetKey("initial_responses")]
    stages = _selection(args.methods, ("stages",))
    print(f"[matrix-assets] stage 1/2: data of {', '.join(args.methods) if args.methods else 'every method'} on "
          f"prompt set {args.prompt_set!r} ({args.profile} profile)", flush=True)
    result = defs.resolve_job_def(f"simulate_prompt_set{suffix}").execute_in_process(
        run_config=simulate_config, instance=instance, partition_key=args.prompt_set, raise_on_error=False,
        asset_selection=None if stages is None else shared + stages, tags=tags,
    )
    if not result.success:
        print("[matrix-assets] the data stages failed; see the log above. Nothing generated so far is lost: "
              "re-run to resume.")
        return 1
    warnings = check_warnings(result)
    print("[matrix-assets] stage 2/2: training sets, LoRA checkpoints, judge validation, evaluation", flush=True)
    trained = _selection(args.methods, ("training_set", "checkpoint"))
    evaluation = [dg.AssetKey("judge_validation"), dg.AssetKey("evaluation_scores")]
    result = defs.resolve_job_def(f"train_and_evaluate{suffix}").execute_in_process(
        run_config=train_eval_config, instance=instance, raise_on_error=False,
        asset_selection=None if trained is None else trained + evaluation, tags=tags,
    )
    if not result.success:
        print("[matrix-assets] training/evaluation failed; see the log above.")
        return 1
    warnings += check_warnings(result)
    print(f"\n[matrix-assets] finished in {time.perf_counter() - began:.0f} s\n")
    print(latest_table())
    for line in warnings:
        print(f"[matrix-assets] warning: {line}")
    return 0


def check_warnings(result: Any) -> list[str]:
    """One line per asset check of the run that did not pass (a model too weak to play its scenes, a regression of
    the tuned model), so the summary under the table says what the table alone would hide."""
    lines = []
    for evaluation in result.get_asset_check_evaluations():
        if evaluation.passed:
            continue
        verdict = evaluation.metadata.get("verdict")
        detail = verdict.value if verdict is not None else evaluation.description or "did not pass"
        partition = f" ({evaluation.partition})" if getattr(evaluation, "partition", None) else ""
        lines.append(f"{evaluation.asset_key.to_user_string()}{partition}, check {evaluation.check_name}: {detail}")
    return lines


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate the existing checkpoints (no retraining) on the given prompt sets."""
    _prepare_environment()
    from matrix_assets import profiles

    defs, instance = _definitions(), _instance()
    fail_orphaned_runs(instance)
    settings = dataclasses.asdict(profiles.evaluation(args.profile))
    for role in ("harmful", "safe", "helpfulness"):
        chosen = getattr(args, f"{role}_sets")
        if chosen:
            settings[f"{role}_sets"] = chosen
    if args.per_category:
        settings["per_category"] = args.per_category
    if args.eval_prompts is not None:
        settings["max_harmful_per_set"] = settings["max_safe_per_set"] = args.eval_prompts or None
    if args.methods:
        settings["methods"] = args.methods
    config = {"ops": {"evaluation_scores": {"config": {k: list(v) if isinstance(v, tuple) else v
                                                       for k, v in settings.items()}}}}
    result = defs.resolve_job_def("evaluate_checkpoints").execute_in_process(
        run_config=config, instance=instance, raise_on_error=False,
        tags={CLI_PID_TAG: str(os.getpid()), CLI_HOST_TAG: socket.gethostname()})
    if not result.success:
        print("[matrix-assets] evaluation failed; see the log above.")
        return 1
    print(latest_table())
    return 0


def latest_table() -> str:
    """The latest headline evaluation's table, and after it the latest exploratory one when that is newer: a
    small or custom evaluation never stands in for the headline."""
    from matrix_assets.store import Store

    db = Store()
    headline, exploratory = db.latest_evaluation("headline"), db.latest_evaluation("exploratory")
    if headline is None and exploratory is None:
        return "no evaluation stored yet"
    parts = [evaluation_table(db, headline) if headline else
             "Headline evaluation: none yet (an evaluation on a profile's default prompt sets and sizes)."]
    if exploratory and (headline is None or exploratory["created_at"] > headline["created_at"]):
        parts.append(evaluation_table(db, exploratory))
    return "\n\n".join(parts)


def evaluation_table(db: Any, run: dict[str, Any]) -> str:
    """One stored evaluation as text: its kind, prompts, rates and paired differences."""
    from matrix_assets.evaluation.run import HEADLINE, _table
    from matrix_assets.evaluation.stats import Rate, format_points
    from matrix_assets.methods import registry

    rows = db.evaluation_metrics(run["eval_id"])
    metrics: dict[str, dict[str, Rate]] = {}
    for r in rows:
        nan = float("nan")
        metrics.setdefault(r["model_label"], {})[r["metric"]] = Rate(
            r["k"] or 0, r["n"], *(nan if r[k] is None else r[k] for k in ("value", "ci_low", "ci_high")))
    order = ["base", *registry(), "champion"]
    labels = sorted(metrics, key=lambda k: order.index(k) if k in order else len(order))
    table = [["metric", *labels]]
    for key, title in HEADLINE:
        if any(key in metrics[label] for label in labels):
            table.append([title, *(metrics[label][key].format() if key in metrics[label] else "-" for label in labels)])
    paired = db.evaluation_paired(run["eval_id"])
    by = {(p["model_label"], p["metric"]): p for p in paired}
    diff = [["tuned - base, paired", *[label for label in labels if label != "base"]]]
    for key, title in HEADLINE:
        cells = []
        for label in diff[0][1:]:
            p = by.get((label, key))
            cells.append("-" if p is None or not p["n"] else
                         f"{format_points(p['diff'])} pts [{format_points(p['diff_ci_low'])}, "
                         f"{format_points(p['diff_ci_high'])}]"
                         f" p={p['mcnemar_p']:.2g} (n={p['n']})")
        if any(c != "-" for c in cells):
            diff.append([title.strip(), *cells])
    from matrix_assets.evaluation.refusal import DEFAULT_JUDGE, HELD_OUT_MODEL
    from matrix_assets.evaluation.validation import LABELLED_SUBSET, SHIPPED_SUBSET

    agreement = db.judge_agreement(run["judge_validation_id"] or "", DEFAULT_JUDGE, subset=HELD_OUT_MODEL)
    own = (db.judge_agreement(run["judge_validation_id"] or "", DEFAULT_JUDGE, subset=LABELLED_SUBSET)
           or db.judge_agreement(run["judge_validation_id"] or "", DEFAULT_JUDGE, subset=SHIPPED_SUBSET))
    validation = [agreement] if agreement else []
    checkpoints = sorted({f"{r['model_label']}={r['checkpoint_id']}" for r in rows if r["checkpoint_id"]})
    counts = json.loads(run["counts_json"])
    head = [f"{run['kind'].capitalize()} evaluation: base vs tuned on held-out prompts ({run['eval_id']}; "
            f"{', '.join(checkpoints)}).",
            f"Prompts: {json.dumps(json.loads(run['prompt_sets_json']))}, counts {counts}.",
            "Each cell: share of prompts, exact 95% interval, n. Judge: the prompt-aware refusal judge" +
            (f" (kappa {validation[0]['value']:.2f} [{validation[0]['ci_low']:.2f}, {validation[0]['ci_high']:.2f}] "
             f"against human labels on {validation[0]['subset']} completions, a model it was not fitted on; its "
             "sibling mistralguard, the same weights, was)." if validation else " (not validated in this store).")]
    head.append(f"On labelled answers of the model being graded: kappa {own['value']:.2f} [{own['ci_low']:.2f}, "
                f"{own['ci_high']:.2f}] (n={own['n']}); the '... corrected' rows undo the judges' error measured there."
                if own else "No labelled answers of the model being graded yet: no corrected rates "
                "(`matrix-assets label export`, then `label import`).")
    head.append("Harmful content: a corrected rate needs labelled answers that give harmful help (the judge's "
                "sensitivity); where the labels hold none, only the labelled share is shown. The champion rule "
                "compares the judge's raw verdicts prompt by prompt.")
    return "\n".join(head) + "\n\n" + _table(table) + ("\n\n" + _table(diff) if len(diff) > 1 else "")


def cmd_settings(args: argparse.Namespace) -> int:
    from matrix_assets.defs.configs import settings_reference, with_settings_reference

    if args.readme is None:
        print(settings_reference(), end="")
        return 0
    path = Path(args.readme)
    path.write_text(with_settings_reference(path.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"settings reference written into {path}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    _prepare_environment()
    from matrix_assets.store import Store

    orphans = fail_orphaned_runs(_instance())
    db = Store()
    print(f"store: {db.url}")
    if orphans:
        print(f"marked {len(orphans)} interrupted run(s) as failed")
    sets = db.prompt_sets()
    width = max([16, *(len(row["name"]) for row in sets)])
    for row in sets:
        print(f"  prompt set {row['name']:<{width}} {row['n_prompts']:>5} prompts ({row['n_train']} train / "
              f"{row['n_eval']} eval / {row['n_near_duplicates']} near-duplicates out)  role={row['role']}")
    for table in ("generations", "initial_responses", "transcripts", "transcript_events", "critiques",
                  "revision_candidates", "sa_interactions", "training_groups", "sft_examples", "checkpoints",
                  "eval_answers"):
        print(f"  {table:<20} {db.count(table):>7} rows")
    for ckpt in db.latest_per_method("checkpoints", None, db.checkpoint_methods()):
        print(f"latest {ckpt['method']} checkpoint: {ckpt['checkpoint_id']} (MLflow run {ckpt['mlflow_run_id']}, "
              f"{ckpt['registered_model']} v{ckpt['model_version']})")
    print(latest_table())
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    """Register a prompt file as a set with a role, through the `register_prompt_set` job (as the sensor does for
    a safe or helpfulness file). The file is kept where the sensor does not look, so no second run starts."""
    _prepare_environment()
    from matrix_assets.data.loaders import PromptFileError, load_prompt_file
    from matrix_assets.store.prompt_sets import ensure_drop_folders, record_role, versions_dir

    path = Path(args.file)
    try:
        records = load_prompt_file(path, prompt_column=args.prompt_column)
    except (PromptFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    name = args.name or path.stem
    ensure_drop_folders()
    kept = versions_dir() / f"{name}{path.suffix.lower()}"
    taken = [p for p in versions_dir().glob(f"{name}.*") if p.read_bytes() != path.read_bytes()]
    if taken:
        print(f"error: a prompt set {name!r} with other prompts exists ({taken[0]}); choose another --name",
              file=sys.stderr)
        return 2
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, kept)
    record_role(name, args.role)
    config = {"role": args.role, **({"prompt_column": args.prompt_column} if args.prompt_column else {})}
    if not _execute("register_prompt_set", {"ops": {"benchmark_prompts": {"config": config}}}, partition=name):
        print("[matrix-assets] registering the prompt set failed; see the log above.", file=sys.stderr)
        return 1
    categories = sorted({r.category for r in records if r.category})
    print(f"added prompt set {name!r} ({len(records)} prompts, role {args.role}"
          f"{f', {len(categories)} categories' if categories else ''}); its file is kept as {kept}")
    if args.role == "harmful":
        print(f"  train and evaluate on it:  matrix-assets run --prompt-set {name}")
    print(f"  evaluate the existing checkpoints on it:  matrix-assets evaluate --{args.role}-sets {name}"
          + (" --per-category 5" if categories else ""))
    return 0


def cmd_set_role(args: argparse.Namespace) -> int:
    """The `change_prompt_set_role` job, in this process."""
    _prepare_environment()
    config = {"name": args.name, "role": args.role, "drop_training_data": args.drop_training_data}
    if not _execute("change_prompt_set_role", {"ops": {"set_prompt_set_role": {"config": config}}}):
        print("[matrix-assets] the role was not changed; see the log above.", file=sys.stderr)
        return 1
    from matrix_assets.store import Store

    print(f"prompt set {args.name!r} now has role {Store().prompt_set_role(args.name)}")
    return 0


def _execute(job: str, run_config: dict, partition: str | None = None) -> bool:
    """Run one job of the definitions in this process, on this repository's Dagster instance (so the UI shows
    it), adding the partition first if it is new."""
    defs, instance = _definitions(), _instance()
    if partition is not None and partition not in instance.get_dynamic_partitions("prompt_sets"):
        instance.add_dynamic_partitions("prompt_sets", [partition])
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    result = defs.resolve_job_def(job).execute_in_process(
        run_config={**quiet, **run_config}, instance=instance, partition_key=partition, raise_on_error=False,
        tags={CLI_PID_TAG: str(os.getpid()), CLI_HOST_TAG: socket.gethostname()})
    return result.success


def cmd_label_export(args: argparse.Namespace) -> int:
    """A blind, stratified sample of one evaluation's answers, for a person to label."""
    _prepare_environment()
    from matrix_assets.evaluation.labels import sample_for_labelling, write_label_file
    from matrix_assets.store import Store

    db = Store()
    run = db.latest_evaluation("headline") if args.eval == "latest" else db.evaluation(args.eval)
    if run is None:
        print(f"error: no evaluation {args.eval!r} in the store ({db.url})", file=sys.stderr)
        return 2
    answers = db.evaluation_answers(run["eval_id"])
    items = sample_for_labelling(answers, args.n, seed=args.seed)
    csv_path, page = write_label_file(Path(args.out), run["eval_id"], items)
    print(f"wrote {len(items)} of the {len(answers)} answers of {run['eval_id']} to {csv_path} (and {page}: open it "
          "in a browser to label one answer at a time, then save the CSV); no model or verdict is shown")
    print(f"  then:  matrix-assets label import {csv_path} --labeller 'WHO' --method 'HOW'")
    return 0


def cmd_label_import(args: argparse.Namespace) -> int:
    _prepare_environment()
    from matrix_assets.evaluation.labels import LabelFileError, read_label_file
    from matrix_assets.store import Store
    from matrix_assets.store.db import utcnow

    db = Store()
    answers = db.all_evaluation_answers()
    try:
        imported = read_label_file(Path(args.file), answers, labeller=args.labeller, method=args.method,
                                   created_at=utcnow())
    except (LabelFileError, OSError, UnicodeDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    db.save_answer_labels(imported.rows)
    print(f"stored {len(imported.rows)} labelled answers as label set {imported.label_set} ({imported.n_refusal} "
          f"with a refusal label, {imported.n_harmful} with a harmful-content label), labelled by {args.labeller}; "
          "the next evaluation reports each judge's agreement with them and rates corrected for its error")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _prepare_environment()
    from matrix_assets.store import Store

    db = Store()
    checkpoints = db.latest_per_method("checkpoints", [args.method], [args.method])
    if checkpoints:
        found = db.dataset(checkpoints[0]["dataset_id"])
        rows = [found] if found else []
    else:
        rows = db.latest_per_method("sft_datasets", [args.method], [args.method])
    if not rows:
        print(f"error: no training set of method {args.method!r} yet; run the pipeline first", file=sys.stderr)
        return 2
    dataset = rows[0]
    examples = [{k: e[k] for k in ("group_index", "prompt", "response", "rating", "source")}
                for e in db.training_examples(dataset["dataset_id"])]
    out = Path(args.out)
    if args.format == "jsonl":
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as fh:
            for e in examples:
                fh.write(json.dumps(e, ensure_ascii=False) + "\n")
    else:
        from datasets import Dataset

        Dataset.from_list(examples).save_to_disk(str(out))
    print(f"exported {len(examples)} examples of {args.method} dataset {dataset['dataset_id']} "
          f"({'the latest checkpoint' if checkpoints else 'no checkpoint yet: the latest'}'s) to {out} ({args.format})")
    return 0


def _method_list(value: str) -> list[str]:
    from matrix_assets.methods import method_names

    names = [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in names if m not in method_names()]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {', '.join(method_names())}")
    return names


def _set_list(value: str) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()]


def parser() -> argparse.ArgumentParser:
    from matrix_assets.methods import registry

    methods_help = "; ".join(f"{m.name}: {m.description}" for m in registry().values())
    p = argparse.ArgumentParser(
        prog="matrix-assets",
        description="Self-alignment of a language model as Dagster assets: MATRIX (the model simulates the social "
        "consequences of its answers, critiques and revises them) and Stable Alignment (a simulated society rates "
        "answers), each fine-tuned with LoRA, beside two controls, and evaluated base vs tuned with validated "
        "judges. State lives in .matrix/ (SQLite store, MLflow store, adapters) unless MATRIX_HOME says otherwise.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="materialize the whole asset graph for one prompt set and print the base-vs-tuned table",
        description="Runs simulate_prompt_set for the prompt set, then train_and_evaluate, in this process, with a "
        "named profile: quick (the default: minutes on a 2-core CPU) or paper (the papers' sizes: hours, meant for "
        "a GPU or an OpenAI-compatible server). Every model call is cached in the store: re-running resumes and "
        f"pays only for what is missing. Methods: {methods_help}.",
    )
    run.add_argument("--profile", choices=("quick", "paper"), default="quick",
                     help="settings of every stage (default quick; the Launchpad's defaults are the same)")
    run.add_argument("--prompt-set", default="advbench", help="harmful prompt set to align on: bundled (advbench, "
                     "hh_rlhf, safe_rlhf, harmfulqa, dangerousqa) or added with `add` (default advbench)")
    run.add_argument("--methods", type=_method_list, default=None,
                     help=f"comma-separated methods to train and compare (default: all: {', '.join(registry())})")
    run.add_argument("--max-prompts", type=int, default=None,
                     help="training prompts per method (quick: 8; 0 = all)")
    run.add_argument("--eval-prompts", type=int, default=None,
                     help="held-out prompts per evaluation set, harmful, safe and helpfulness (quick: 50, 100 and "
                     "all; 0 = all)")
    run.add_argument("--roles", type=int, default=None, help="MATRIX roles per scene (quick 3, paper 5)")
    run.add_argument("--steps", type=int, default=None, help="MATRIX plan steps (quick 3, paper 5)")
    run.add_argument("--rounds", type=int, default=None, help="MATRIX interaction rounds (quick 2, paper 5)")
    run.add_argument("--revision-candidates", type=int, default=None,
                     help="MATRIX revisions sampled per prompt, the model choosing (1 = the paper)")
    run.add_argument("--train-fraction", type=float, default=None, help="share of the prompt set used for training")
    run.add_argument("--benign-ratio", type=float, default=None, help="benign self-answered examples per aligned one")
    run.add_argument("--epochs", type=float, default=None, help="LoRA epochs (override the profile)")
    run.add_argument("--learning-rate", type=float, default=None, help="LoRA learning rate (override the profile)")
    run.add_argument("--max-steps", type=int, default=None, help="cap on optimizer steps (overrides epochs when > 0)")
    run.add_argument("--set", action="append", metavar="NAME.FIELD=VALUE",
                     help="any other setting of the Launchpad, for every asset of a method or for one asset, e.g. "
                     "--set stable_alignment.grid_size=2 --set matrix.max_reactions=2 "
                     "--set evaluation_scores.model_judge=true; NAME may be a method, an asset, or an asset of every method: "
                     "--set checkpoint.runner=pipes (repeatable)")
    run.set_defaults(func=cmd_run)

    evaluate = sub.add_parser(
        "evaluate", help="evaluate the existing checkpoints on prompt sets of your choice (no retraining)",
        description="Runs the evaluate_checkpoints job, without retraining: judge validation, then base vs each method's latest "
        "checkpoint on the held-out prompts of the given sets (a set added with `add FILE --role ...` included).",
    )
    evaluate.add_argument("--profile", choices=("quick", "paper"), default="quick")
    evaluate.add_argument("--harmful-sets", type=_set_list, default=None, help="comma-separated harmful sets")
    evaluate.add_argument("--safe-sets", type=_set_list, default=None, help="comma-separated safe sets")
    evaluate.add_argument("--helpfulness-sets", type=_set_list, default=None,
                          help="comma-separated helpfulness sets (replace Vicuna-Bench; list both to join them)")
    evaluate.add_argument("--per-category", type=int, default=None,
                          help="for sets with categories: this many prompts per category")
    evaluate.add_argument("--eval-prompts", type=int, default=None, help="prompts per harmful and safe set (0 = all)")
    evaluate.add_argument("--methods", type=_method_list, default=None, help="methods whose checkpoints to evaluate")
    evaluate.set_defaults(func=cmd_evaluate)

    status = sub.add_parser(
        "status", help="prompt sets, row counts, latest checkpoints and evaluation table",
        description="Prints the prompt sets, the row counts of the main tables, the latest checkpoint of each "
        "method and the latest base-vs-tuned table, from the store (MATRIX_DATABASE_URL or .matrix/matrix.db).",
    )
    status.set_defaults(func=cmd_status)

    settings = sub.add_parser(
        "settings", help="every setting of every asset: quick default, paper value, range, description",
        description="Prints the Launchpad's settings of each asset as Markdown tables, generated from the settings "
        "dataclasses (their one source); --readme FILE rewrites the reference block of that README instead.",
    )
    settings.add_argument("--readme", default=None, help="a README whose settings reference block to regenerate")
    settings.set_defaults(func=cmd_settings)

    add = sub.add_parser(
        "add", help="add a prompt file (CSV / JSONL / JSON / TXT) as a new prompt set",
        description="Validates a prompt file (the same loader as the pipeline: a clear error names the file and the "
        "reason; nested JSON {category: [questions]} or {category: {subcategory: [questions]}} keeps its "
        "categories) and registers it as a new prompt set with a role: harmful (trained on and evaluated), safe "
        "(over-refusal) or helpfulness (e.g. MT-Bench's question file: first turns). It runs the "
        "register_prompt_set job, as dropping the file in drop/ROLE/ does while the UI runs, but keeps the file "
        "where the sensor does not look, so no second run starts.",
    )
    add.add_argument("file", help="the prompt file")
    add.add_argument("--role", choices=("harmful", "safe", "helpfulness"), default="harmful",
                     help="what the set is for (default harmful)")
    add.add_argument("--name", help="prompt set name (default: the file name without extension)")
    add.add_argument("--prompt-column", help="column or key holding the prompt (auto-detected by default)")
    add.set_defaults(func=cmd_add)

    set_role = sub.add_parser(
        "set-role", help="change a prompt set's role (harmful, safe, helpfulness)",
        description="Runs the change_prompt_set_role job (also in the Launchpad): the set is split again as its new "
        "role is (harmful: half training; safe and helpfulness: all evaluation). Refused while training data made "
        "from the set exists (initial answers, scenes, critiques, interactions, training groups), unless "
        "--drop-training-data; training sets and checkpoints already built are kept.",
    )
    set_role.add_argument("name", help="the prompt set")
    set_role.add_argument("role", choices=("harmful", "safe", "helpfulness"), help="its new role")
    set_role.add_argument("--drop-training-data", action="store_true",
                          help="delete the training data made from the set for its old role")
    set_role.set_defaults(func=cmd_set_role)

    label = sub.add_parser(
        "label", help="label answers of the model being graded, to measure the judges on them",
        description="The judges were validated on other chat models' answers; these labels measure them on this "
        "model's. `export` writes a blind sample of an evaluation's answers (question and answer only, shuffled, "
        "stratified by model and prompt kind) as a CSV and an HTML page that writes the same CSV; `import` stores "
        "the labelled file with who labelled and how. Every later evaluation reports rates corrected for each "
        "judge's error on them (Rogan-Gladen).",
    )
    label_sub = label.add_subparsers(dest="label_command", required=True)
    label_export = label_sub.add_parser("export", help="a sample of an evaluation's answers to label",
                                        description="Writes FILE.csv and FILE.html (XSTest's labelling scheme).")
    label_export.add_argument("--eval", default="latest", help="evaluation id (default: the latest headline one)")
    label_export.add_argument("--n", type=int, default=200, help="answers to sample (default 200)")
    label_export.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same file)")
    label_export.add_argument("--out", required=True, help="the CSV to write (the HTML page goes beside it)")
    label_export.set_defaults(func=cmd_label_export)
    label_import = label_sub.add_parser("import", help="store a labelled file",
                                        description="Refuses a file with an unknown item or label, naming the line.")
    label_import.add_argument("file", help="the labelled CSV")
    label_import.add_argument("--labeller", required=True, help="who labelled (a name, or the model that read them)")
    label_import.add_argument("--method", required=True, help="how: e.g. 'two independent reads, consensus'; "
                              "say 'not human' where a model labelled")
    label_import.set_defaults(func=cmd_label_import)

    export = sub.add_parser(
        "export", help="export a method's training set",
        description="Exports the training set of a method's latest checkpoint (prompt / response / rating / source "
        "rows) as a JSONL file or a Hugging Face `datasets` folder (load it back with datasets.load_from_disk).",
    )
    export.add_argument("--method", type=lambda v: _method_list(v)[0], default="matrix",
                        help="whose training set (default matrix)")
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
