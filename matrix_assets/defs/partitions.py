import dagster as dg

# One partition per prompt set (a bundled set name or a file stem from the drop folder).
prompt_sets_partitions = dg.DynamicPartitionsDefinition(name="prompt_sets")
