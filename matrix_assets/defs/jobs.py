"""Jobs: the per-prompt-set stages and the train-and-evaluate stages, and their `_paper` twins; and evaluation alone,
for judging existing checkpoints on new prompt sets without retraining.

The quick jobs carry no run config of their own: every Config class's defaults are the quick profile, so the
Launchpad, a plain "Materialize" and a backfill all run it, and what a user edits in a backfill's config is what
runs (a job-level config would be turned into per-partition config, which Dagster's backfills prefer over theirs).
The paper jobs carry the paper profile."""

import dagster as dg

from matrix_assets.defs.configs import SetRoleConfig, profile_run_config
from matrix_assets.defs.partitions import prompt_sets_partitions
from matrix_assets.defs.resources import StoreResource
from matrix_assets.methods import registry
from matrix_assets.store.prompt_sets import PromptSetError, change_role

PER_PROMPT_SET = dg.AssetSelection.groups("prompts", *registry()) - dg.AssetSelection.keys(
    *[dg.AssetKey([m, leaf]) for m in registry() for leaf in ("training_set", "checkpoint")])
TRAIN_AND_EVALUATE = (dg.AssetSelection.keys(*[dg.AssetKey([m, leaf]) for m in registry()
                                               for leaf in ("training_set", "checkpoint")])
                      | dg.AssetSelection.groups("evaluation"))


def _simulate_job(profile: str, suffix: str):  # noqa: ANN202 - an unresolved asset job
    return dg.define_asset_job(
        f"simulate_prompt_set{suffix}", selection=PER_PROMPT_SET, partitions_def=prompt_sets_partitions,
        config=profile_run_config(profile, partitioned=True) if suffix else None,
        description=f"Every method's data stages for one prompt set (a partition), {profile} profile.",
    )


# The jobs the new-prompt-set sensor launches: a harmful set is simulated; a safe or helpfulness set is only
# registered (loaded, split, checked for near-duplicates) so that evaluations can use it.
simulate_prompt_set = _simulate_job("quick", "")
register_prompt_set = dg.define_asset_job(
    "register_prompt_set", selection=dg.AssetSelection.keys("benchmark_prompts"),
    partitions_def=prompt_sets_partitions,
    description="Load one prompt set (a partition) with its role and splits, without making any training data: "
    "what a safe or helpfulness set dropped in its folder (or added with `matrix-assets add`) gets.",
)


@dg.op(description="Give a prompt set another role (harmful, safe, helpfulness) and split it again; refused while "
       "training data made from it exists, unless drop_training_data.")
def set_prompt_set_role(context: dg.OpExecutionContext, config: SetRoleConfig, store: StoreResource) -> None:
    try:
        change = change_role(store.get_store(), config.name, config.role,
                             drop_training_data=config.drop_training_data)
    except (PromptSetError, FileNotFoundError) as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc
    context.log.info(f"prompt set {change.name!r}: role {change.old_role} -> {change.new_role} "
                     f"({change.summary.n_train} train / {change.summary.n_eval} eval); training data dropped: "
                     f"{change.dropped or 'none'}")
    context.add_output_metadata({"old_role": str(change.old_role), "new_role": change.new_role,
                                 "n_train": change.summary.n_train, "n_eval": change.summary.n_eval,
                                 **{f"dropped/{k}": v for k, v in change.dropped.items()}})


@dg.job(description="Change a prompt set's role (the same as `matrix-assets set-role NAME ROLE`): a set dropped "
        "in the wrong folder, or a bundled set used for something else.")
def change_prompt_set_role() -> None:
    set_prompt_set_role()


def _jobs() -> list:
    # simulate_prompt_set, register_prompt_set and evaluate_checkpoints are module attributes (the sensor targets
    # them), which load_from_defs_folder collects itself.
    jobs = [change_prompt_set_role, _simulate_job("paper", "_paper")]
    for profile, suffix in (("quick", ""), ("paper", "_paper")):
        jobs.append(dg.define_asset_job(
            f"train_and_evaluate{suffix}", selection=TRAIN_AND_EVALUATE,
            config=profile_run_config(profile, partitioned=False) if suffix else None,
            description=f"Training sets, LoRA checkpoints, judge validation and base-vs-tuned evaluation, "
            f"{profile} profile.",
        ))
    return jobs


evaluate_checkpoints = dg.define_asset_job(
    "evaluate_checkpoints", selection=dg.AssetSelection.groups("evaluation"),
    description="Judge validation and evaluation of the latest checkpoints, without retraining (set "
    "harmful_sets / safe_sets / helpfulness_sets in the Launchpad to evaluate on a new prompt set).",
)


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(jobs=_jobs())
