import dagster as dg

from matrix_assets.defs.partitions import prompt_sets_partitions

# Per prompt set: load, answer, simulate, critique, revise (and the comparison baselines' revisions).
simulate_prompt_set = dg.define_asset_job(
    "simulate_prompt_set",
    selection=dg.AssetSelection.groups("prompts", "matrix_simulation", "baselines"),
    partitions_def=prompt_sets_partitions,
    description="The per-prompt MATRIX stages for one prompt set (a partition).",
)

# Across every prompt set: build the SFT data, train the LoRA checkpoint, evaluate it against base.
train_and_evaluate = dg.define_asset_job(
    "train_and_evaluate",
    selection=dg.AssetSelection.groups("training", "evaluation"),
    description="SFT dataset from all revised answers, LoRA fine-tuning, base-vs-tuned evaluation.",
)
