"""How a method's training groups become the examples a checkpoint is trained on.

Every method's aligned groups get the same benign mix: benign prompts answered by the model itself (the training
split of a helpfulness set), `benign_ratio` per answer to a training prompt, so that fine-tuning does not teach a
model to refuse everything and the methods differ only in their alignment data. Simulation samples (MATRIX's role
play, the paper's third part) are aligned data but answer no training prompt: they earn no benign examples, so
the paper's mix (helpful, harmful-with-revision, simulation in equal parts) is `benign_ratio` 1 with one
simulation sample per revision. Excluded groups are counted, never trained on and never replaced.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from matrix_assets.methods.base import RatedResponse, TrainingGroup

BENIGN_KIND = "benign_self_answer"


@dataclass(frozen=True)
class TrainingSet:
    method: str
    trainer: str
    prompt_sets: tuple[str, ...]
    groups: tuple[TrainingGroup, ...]  # aligned groups first, then the benign ones
    n_aligned: int
    n_benign: int
    n_excluded: int
    excluded_reasons: dict[str, int]

    @property
    def dataset_id(self) -> str:
        payload = [self.method, self.trainer, [(g.prompt_id, g.kind, g.prompt, [(r.text, r.rating) for r in g.responses])
                                               for g in self.groups]]
        return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()[:16]

    @property
    def n_examples(self) -> int:
        return sum(len(g.responses) for g in self.groups)


# Kinds of aligned groups that are not answers to a training prompt (see the module docstring).
SIMULATION_KINDS = frozenset({"matrix_simulation"})


def benign_count(n_aligned: int, ratio: float) -> int:
    """Benign examples for `n_aligned` answers to training prompts (count them with `benign_basis`)."""
    return round(n_aligned * ratio)


def benign_basis(groups: Sequence[TrainingGroup]) -> int:
    """The aligned groups that earn benign examples: trained-on answers to training prompts, simulation samples
    left out."""
    return sum(1 for g in groups if g.excluded is None and g.responses and g.kind not in SIMULATION_KINDS)


def build_training_set(method: str, trainer: str, prompt_sets: Sequence[str], groups: Sequence[TrainingGroup],
                       benign: Sequence[tuple[str, str, str]]) -> TrainingSet:
    """`groups`: the method's groups (excluded ones included, to be counted); `benign`: (prompt_id, prompt,
    the model's own answer) rows, already sized by `benign_count`."""
    aligned = [g for g in groups if g.excluded is None and g.responses]
    excluded: dict[str, int] = {}
    for g in groups:
        if g.excluded is not None:
            excluded[g.excluded] = excluded.get(g.excluded, 0) + 1
    benign_groups = [TrainingGroup(pid, prompt, BENIGN_KIND, (RatedResponse(text),)) for pid, prompt, text in benign
                     if text.strip()]
    return TrainingSet(method, trainer, tuple(prompt_sets), tuple(aligned + benign_groups), len(aligned),
                       len(benign_groups), sum(excluded.values()), excluded)
