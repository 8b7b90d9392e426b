"""A sensor for new prompt files and a schedule that retrains only when there is new data."""


import hashlib
import json
import re
import shutil

import dagster as dg

from matrix_assets.data.loaders import PromptFileError, load_prompt_file
from matrix_assets.defs.jobs import simulate_prompt_set, train_and_evaluate
from matrix_assets.defs.partitions import prompt_sets_partitions
from matrix_assets.defs.resources import StoreResource
from matrix_assets.store.prompt_sets import PROMPT_SUFFIXES, drop_dir, versions_dir


def _partition_name(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_") or "prompts"


@dg.sensor(job=simulate_prompt_set, minimum_interval_seconds=30,
           description="A new prompt file in the drop folder becomes a new partition and one run; a changed file "
           "becomes a new version (NAME-v2, ...), never a silent overwrite; an unreadable file is reported and skipped.")
def new_prompt_set_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    folder = drop_dir()
    if not folder.is_dir():
        return dg.SkipReason(f"drop folder {folder} does not exist yet")
    seen: dict[str, dict] = json.loads(context.cursor) if context.cursor else {}
    new_partitions, requests, problems = [], [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PROMPT_SUFFIXES):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        stem = _partition_name(path.stem)
        entry = seen.get(stem)
        if entry and entry["sha"] == digest:
            continue
        try:
            load_prompt_file(path)
        except PromptFileError as exc:
            problems.append(str(exc))
            context.log.error(f"skipping prompt file {path.name}: {exc}")
            seen[stem] = {"sha": digest, "version": entry["version"] if entry else 0, "error": str(exc)}
            continue
        version = (entry["version"] if entry else 0) + 1
        name = stem if version == 1 else f"{stem}-v{version}"
        # Snapshot the exact bytes: re-materializing this partition later reads this version, not the live file.
        versions_dir().mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, versions_dir() / f"{name}{path.suffix.lower()}")
        seen[stem] = {"sha": digest, "version": version}
        new_partitions.append(name)
        requests.append(dg.RunRequest(run_key=f"{name}:{digest[:16]}", partition_key=name))
    if not requests:
        return dg.SkipReason("; ".join(problems) or "no new or changed prompt files")
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[prompt_sets_partitions.build_add_request(new_partitions)],
        cursor=json.dumps(seen, sort_keys=True),
    )


@dg.schedule(job=train_and_evaluate, cron_schedule="0 3 * * *",
             description="Nightly re-training and evaluation, only when revised answers arrived since the last checkpoint.")
def retrain_when_new_revisions(context: dg.ScheduleEvaluationContext, store: StoreResource):  # noqa: ANN201
    reason = new_revisions_since_last_checkpoint(store)
    if reason is None:
        return dg.SkipReason("no revised answers since the latest checkpoint")
    return dg.RunRequest(run_key=reason, tags={"reason": reason})


def new_revisions_since_last_checkpoint(store: StoreResource) -> str | None:
    db = store.get_store()
    newest_revision = db.scalar("SELECT MAX(created_at) FROM revisions")
    if newest_revision is None:
        return None
    checkpoint = db.latest_checkpoint()
    if checkpoint and checkpoint["created_at"] >= newest_revision:
        return None
    return f"revisions-until-{newest_revision}"
