"""The records methods hand to training and the store keeps: a leaf module (it imports nothing of the project),
so that `methods`, `training` and `store` share these types while importing one way."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class RatedResponse:
    text: str
    rating: float | None = None  # on the method's own scale (Stable Alignment: 1-7); None for plain SFT


@dataclass(frozen=True)
class TrainingGroup:
    """One training prompt and the responses a method derived for it."""

    prompt_id: str
    prompt: str  # the user's message the model is trained to answer
    kind: str  # where the responses come from, e.g. "matrix_revision", "imitation", "fixed_refusal"
    responses: tuple[RatedResponse, ...]
    excluded: str | None = None  # why the prompt is left out of the training data (None: it is trained on)

    @property
    def group_id(self) -> str:
        return hashlib.sha256(f"{self.prompt_id}\x1f{self.kind}\x1f{self.prompt}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class RatedGroup:
    """One training group: a prompt (the user message) and its rated responses (`RatedResponse`, every
    rating set, 1-7): what the Stable Alignment trainer reads."""

    group_id: str
    kind: str  # imitation, self_critic or realignment
    prompt: str
    responses: tuple[RatedResponse, ...]

    def to_dict(self) -> dict:
        return {"group_id": self.group_id, "kind": self.kind, "prompt": self.prompt,
                "responses": [{"text": r.text, "rating": r.rating} for r in self.responses]}

    @classmethod
    def from_dict(cls, data: dict) -> RatedGroup:
        return cls(data["group_id"], data["kind"], data["prompt"],
                   tuple(RatedResponse(r["text"], float(r["rating"])) for r in data["responses"]))
