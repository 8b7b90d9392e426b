"""The one Definitions object: everything under matrix_assets/defs/ (assets, checks, jobs, sensors, resources)."""

from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(project_root=Path(__file__).resolve().parent.parent)
