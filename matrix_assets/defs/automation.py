"""Automation: a sensor for new prompt files, and nightly re-training through Dagster's automation conditions.

- `new_prompt_set_sensor` (running by default: dropping a file is how a user asks for it) turns each new or
  changed file in the drop folder into a partition and one run of `simulate_prompt_set`. It only reads: the
  partition's first load snapshots the file's bytes (so "Preview tick result" in the UI changes nothing), and
  the cursor records every file it saw, readable or not, so a bad file is reported once, not every tick.
- `nightly_retraining` (stopped by default: turn it on under Automation in the UI) evaluates the training sets',
  checkpoints' and evaluation's `AutomationCondition.on_cron("0 3 * * *")`: each re-materializes after 03:00
  once all of its upstream assets were updated since, so an unchanged method is neither retrained nor
  re-evaluated.
"""

import hashlib
import json
import re

import dagster as dg

from matrix_assets.data.loaders import PromptFileError, load_prompt_file
from matrix_assets.methods import registry
from matrix_assets.store.prompt_sets import PROMPT_SUFFIXES, declared_role, drop_dir

SIMULATE_JOB = "simulate_prompt_set"


def _partition_name(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_") or "prompts"


@dg.sensor(job_name=SIMULATE_JOB, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="A new prompt file in the drop folder becomes a new partition and one run; a changed file "
           "becomes a new version (NAME-v2, ...), never a silent overwrite; an unreadable file is reported once "
           "and skipped.")
def new_prompt_set_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    folder = drop_dir()
    seen: dict[str, dict] = json.loads(context.cursor) if context.cursor else {}
    if not folder.is_dir():
        return dg.SensorResult(skip_reason=f"drop folder {folder} does not exist yet", cursor=context.cursor)
    new_partitions, requests, problems = [], [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PROMPT_SUFFIXES):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        stem = _partition_name(path.stem)
        entry = seen.get(stem)
        if entry and entry["sha"] == digest:
            continue
        version = (entry["version"] if entry else 0) + 1
        try:
            load_prompt_file(path)
        except PromptFileError as exc:
            problems.append(str(exc))
            context.log.error(f"skipping prompt file {path.name}: {exc}")
            seen[stem] = {"sha": digest, "version": version - 1, "error": str(exc)}
            continue
        name = stem if version == 1 else f"{stem}-v{version}"
        seen[stem] = {"sha": digest, "version": version}
        config = {"source": str(path), "expected_sha256": digest}
        if role := declared_role(stem):
            config["role"] = role
        new_partitions.append(name)
        requests.append(dg.RunRequest(run_key=f"{name}:{digest[:16]}", partition_key=name,
                                      run_config={"ops": {"benchmark_prompts": {"config": config}}}))
    cursor = json.dumps(seen, sort_keys=True)
    if not requests:
        return dg.SensorResult(skip_reason="; ".join(problems) or "no new or changed prompt files", cursor=cursor)
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[dg.DynamicPartitionsDefinition(name="prompt_sets").build_add_request(
            new_partitions)],
        cursor=cursor,
    )


nightly_retraining = dg.AutomationConditionSensorDefinition(
    "nightly_retraining",
    target=dg.AssetSelection.keys(*[dg.AssetKey([m, leaf]) for m in registry() for leaf in ("training_set",
                                                                                          "checkpoint")])
    | dg.AssetSelection.keys("evaluation_scores"),
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Nightly (03:00) re-training and re-evaluation of the methods whose data changed since.",
)
