"""Automation: a sensor for new prompt files, and nightly re-training through Dagster's automation conditions.

- `new_prompt_set_sensor` (running by default: dropping a file is how a user asks for it) turns each new or
  changed file in the drop folder's role subfolders into a partition: a harmful set gets one run of
  `simulate_prompt_set`, a safe or helpfulness set one run of `register_prompt_set` (loaded for evaluation,
  never trained on). It only reads (besides creating the empty role folders on its first tick): the
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
from pathlib import Path

import dagster as dg

from matrix_assets.data.loaders import PromptFileError, load_prompt_file
from matrix_assets import profiles
from matrix_assets.defs.jobs import evaluate_checkpoints, register_prompt_set, simulate_prompt_set
from matrix_assets.methods import registry
from matrix_assets.settings import evaluate_dropped_sets
from matrix_assets.store.prompt_sets import ROLES, dropped_files, ensure_drop_folders


def _partition_name(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_") or "prompts"


def _job_for(role: str) -> str:
    """Only a harmful set is simulated and trained on; a safe or helpfulness set is registered for evaluation."""
    return simulate_prompt_set.name if role == "harmful" else register_prompt_set.name


@dg.sensor(jobs=[simulate_prompt_set, register_prompt_set, evaluate_checkpoints], minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="A new prompt file in drop/harmful/ becomes a new partition and one run of every method's "
           "data stages; one in drop/safe/ or drop/helpfulness/ a partition registered for evaluation (no training "
           "data is made from it; with MATRIX_EVALUATE_DROPPED_SETS=1 the existing checkpoints are also evaluated on it). A changed file becomes a new version (NAME-v2, ...), never a silent overwrite; "
           "an unreadable file, or one outside the role folders, is reported once and skipped.")
def new_prompt_set_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    folder = ensure_drop_folders()
    seen: dict[str, dict] = json.loads(context.cursor) if context.cursor else {}
    files, loose = dropped_files()
    new_partitions, requests, problems = [], [], []
    for path in loose:
        key = f"loose:{path.name}"
        if key not in seen:
            problem = (f"{path.name} lies in {folder} itself: move it into one of {', '.join(f'{r}/' for r in ROLES)}"
                       " there to say what it is for")
            problems.append(problem)
            context.log.error(problem)
            seen[key] = {"error": problem}
    for path, role in files:
        request = _request_for(context, path, role, seen, problems)
        if request is not None:
            new_partitions.append(request.partition_key)
            requests.append(request)
            if role != "harmful" and evaluate_dropped_sets():
                requests.append(_evaluation_request(request.partition_key, role, request.run_key or ""))
    cursor = json.dumps(seen, sort_keys=True)
    if not requests:
        return dg.SensorResult(skip_reason="; ".join(problems) or "no new or changed prompt files", cursor=cursor)
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[dg.DynamicPartitionsDefinition(name="prompt_sets").build_add_request(
            new_partitions)],
        cursor=cursor,
    )


def _evaluation_request(name: str, role: str, run_key: str) -> dg.RunRequest:
    """The existing checkpoints evaluated on the default sets plus the dropped one (MATRIX_EVALUATE_DROPPED_SETS):
    an exploratory evaluation, which loads the set itself if its registration has not finished yet."""
    defaults = profiles.evaluation("quick")
    sets = [*getattr(defaults, f"{role}_sets"), name]
    return dg.RunRequest(run_key=f"evaluate:{run_key}", job_name=evaluate_checkpoints.name,
                         run_config={"ops": {"evaluation_scores": {"config": {f"{role}_sets": sets}}}},
                         tags={"matrix/role": role, "matrix/prompt_set": name})


def _request_for(context: dg.SensorEvaluationContext, path: Path, role: str, seen: dict[str, dict],
                 problems: list[str]) -> dg.RunRequest | None:
    """The run for a new or changed file (None when it is neither, or unreadable: then `problems` says why)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    stem = _partition_name(path.stem)
    entry = seen.get(stem)
    if entry and entry["sha"] == digest:
        return None
    if entry and entry.get("role", role) != role:
        problem = f"{role}/{path.name}: a set named {stem!r} was dropped as {entry['role']}; rename the file"
        if entry.get("error") != problem:
            problems.append(problem)
            context.log.error(problem)
        seen[stem] = {**entry, "error": problem}
        return None
    version = (entry["version"] if entry else 0) + 1
    try:
        load_prompt_file(path)
    except PromptFileError as exc:
        problems.append(str(exc))
        context.log.error(f"skipping prompt file {role}/{path.name}: {exc}")
        seen[stem] = {"sha": digest, "version": version - 1, "role": role, "error": str(exc)}
        return None
    name = stem if version == 1 else f"{stem}-v{version}"
    seen[stem] = {"sha": digest, "version": version, "role": role}
    config = {"source": str(path), "expected_sha256": digest, "role": role}
    return dg.RunRequest(run_key=f"{name}:{digest[:16]}", partition_key=name, job_name=_job_for(role),
                         run_config={"ops": {"benchmark_prompts": {"config": config}}}, tags={"matrix/role": role})


nightly_retraining = dg.AutomationConditionSensorDefinition(
    "nightly_retraining",
    target=dg.AssetSelection.keys(*[dg.AssetKey([m, leaf]) for m in registry() for leaf in ("training_set",
                                                                                          "checkpoint")])
    | dg.AssetSelection.keys("evaluation_scores"),
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Nightly (03:00) re-training and re-evaluation of the methods whose data changed since.",
)
