"""Jobs: the per-prompt-set stages and the train-and-evaluate stages, and their `_paper` twins; and evaluation alone,
for judging existing checkpoints on new prompt sets without retraining.

The quick jobs carry no run config of their own: every Config class's defaults are the quick profile, so the
Launchpad, a plain "Materialize" and a backfill all run it, and what a user edits in a backfill's config is what
runs (a job-level config would be turned into per-partition config, which Dagster's backfills prefer over theirs).
The paper jobs carry the paper profile."""

import dagster as dg

from matrix_assets.defs.configs import profile_run_config
from matrix_assets.defs.partitions import prompt_sets_partitions
from matrix_assets.methods import registry

PER_PROMPT_SET = dg.AssetSelection.groups("prompts", *registry()) - dg.AssetSelection.keys(
    *[dg.AssetKey([m, leaf]) for m in registry() for leaf in ("training_set", "checkpoint")])
TRAIN_AND_EVALUATE = (dg.AssetSelection.keys(*[dg.AssetKey([m, leaf]) for m in registry()
                                               for leaf in ("training_set", "checkpoint")])
                      | dg.AssetSelection.groups("evaluation"))


def _jobs() -> list:
    jobs = []
    for profile, suffix in (("quick", ""), ("paper", "_paper")):
        jobs.append(dg.define_asset_job(
            f"simulate_prompt_set{suffix}", selection=PER_PROMPT_SET, partitions_def=prompt_sets_partitions,
            config=profile_run_config(profile, partitioned=True) if suffix else None,
            description=f"Every method's data stages for one prompt set (a partition), {profile} profile.",
        ))
        jobs.append(dg.define_asset_job(
            f"train_and_evaluate{suffix}", selection=TRAIN_AND_EVALUATE,
            config=profile_run_config(profile, partitioned=False) if suffix else None,
            description=f"Training sets, LoRA checkpoints, judge validation and base-vs-tuned evaluation, "
            f"{profile} profile.",
        ))
    jobs.append(dg.define_asset_job(
        "evaluate_checkpoints", selection=dg.AssetSelection.groups("evaluation"),
        description="Judge validation and evaluation of the latest checkpoints, without retraining (set "
        "harmful_sets / safe_sets / helpfulness_sets in the Launchpad to evaluate on a new prompt set).",
    ))
    return jobs


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(jobs=_jobs())
