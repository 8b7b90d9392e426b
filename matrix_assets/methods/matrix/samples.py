"""Simulation samples: the scene's own role play as training examples.

The reference implementation trains on three equal parts: helpful answers, harmful questions with their revised
answers, and "simulation data", the (prompt, reply) pairs of the model's own calls inside its scenes (its
`observe2act` log: a character's prompt and the reaction it wrote). Here a sample is one role's reaction: the
`role_reaction` prompt exactly as the role saw it, answered by the reaction the scene recorded. The prompt is
rebuilt from the stored events: every observation the modulator routed is replayed into the memories of the
roles it reached, in order, so each role's memory at the moment it reacted is what it was then.
"""

from __future__ import annotations

from matrix_assets.methods.matrix.scene import Transcript
from matrix_assets.templates import render

SIMULATION_KIND = "matrix_simulation"


def simulation_samples(scene: Transcript, limit: int) -> list[tuple[str, str]]:
    """Up to `limit` (prompt, reaction) pairs of the scene's roles, in the order they reacted."""
    memories: dict[str, list[str]] = {role.name: [] for role in scene.roles}
    samples: list[tuple[str, str]] = []
    for event in scene.events:
        if len(samples) >= limit:
            break
        role = scene.role(event.actor) if event.kind == "reaction" else None
        seen = memories.get(event.actor, [])
        if role is not None and seen:
            # What the engine showed the role: its earlier memories (the last four) and what it has just noticed.
            prompt = render("matrix/role_reaction", name=role.name, description=role.description,
                            status=role.status, memory=seen[:-1][-4:], observation=seen[-1])
            samples.append((prompt, event.action))
        if event.kind in {"modulation", "reaction"}:
            for name in event.audience:
                if name in memories:
                    memories[name].append(event.observation)
    return samples
