"""The MATRIX social scene engine: plain Python over a ChatBackend, no Dagster inside."""

from matrix_assets.simulation.engine import (
    SimulationSettings,
    critique_scenes,
    initial_answers,
    revise_answers,
    run_scenes,
)
from matrix_assets.simulation.scene import Critique, Revision, Role, SceneEvent, SceneInput, SceneObject, Transcript

__all__ = [
    "Critique",
    "Revision",
    "Role",
    "SceneEvent",
    "SceneInput",
    "SceneObject",
    "SimulationSettings",
    "Transcript",
    "critique_scenes",
    "initial_answers",
    "revise_answers",
    "run_scenes",
]
