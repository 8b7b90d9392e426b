"""Saving and loading whole MATRIX scenes: a transcript and its events are written in one transaction, through the
store's generic record calls (the store knows no method's records; `sql/schema.sql` has the two tables)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from matrix_assets.methods.base import MethodStore
from matrix_assets.methods.matrix.scene import PROTAGONIST, Role, SceneEvent, SceneObject, Transcript


class TranscriptStore(MethodStore, Protocol):
    """The store as MATRIX's stages see it: what every method sees, and a transaction that writes a scene's header
    and events together (`matrix_assets.store.db.Store` has it)."""

    def transaction(self) -> AbstractContextManager[Any]: ...

    def delete_rows(self, table: str, *, conn: Any = None, **filters: Any) -> None: ...

    def save_records(self, table: str, records: Sequence[Any], *, conn: Any = None, **columns: Any) -> None: ...


_SCENE_FIELDS = ("target", "plan", "roles", "objects", "protagonist_memory", "memory", "n_rounds", "stopped",
                 "stopped_by", "outcome", "consequence", "fallbacks")


def save_transcript(store: TranscriptStore, model_id: str, scene: Transcript) -> None:
    with store.transaction() as conn:
        # Replace, never append: a re-run with other settings must not leave stale events behind.
        store.delete_rows("transcript_events", conn=conn, prompt_id=scene.prompt_id, model_id=model_id)
        store.save_records("transcripts", [_Header.of(scene)], conn=conn, model_id=model_id)
        store.save_records("transcript_events", [_Event(seq, **vars(e)) for seq, e in enumerate(scene.events)],
                           conn=conn, prompt_id=scene.prompt_id, model_id=model_id)


def load_transcripts(store: TranscriptStore, prompt_set: str, model_id: str, limit: int | None = None
                     ) -> list[Transcript]:
    """The set's stored scenes of `model_id`, in the set's order, with the question and the initial answer."""
    answers = {r.prompt_id: r for r in store.initial_responses(prompt_set, model_id)}
    scenes = []
    for header in store.load_records("transcripts", _Header, prompt_set=prompt_set, limit=limit, model_id=model_id):
        events = store.load_records("transcript_events", _Event, prompt_id=header.prompt_id, model_id=model_id)
        initial = answers.get(header.prompt_id)
        scene = Transcript(prompt_id=header.prompt_id, question=initial.prompt if initial else "",
                           answer=initial.response if initial else "",
                           events=[SceneEvent(**{k: v for k, v in vars(e).items() if k != "seq"}) for e in events])
        for name in _SCENE_FIELDS:
            setattr(scene, name, getattr(header, name))
        scene.protagonist = _protagonist(scene.events)
        scenes.append(scene)
    return scenes


def _protagonist(events: list[SceneEvent]) -> str:
    """The protagonist's name, as the scene gave it: the actor of its actions (every scene plays round 1, whose
    first event is the protagonist's action). The transcripts table has no column of its own for it."""
    return next((e.actor for e in events if e.kind == "action"), PROTAGONIST)


# Row shapes of the two tables (their fields are the columns; lists and dicts travel as JSON).


@dataclass
class _Header:
    prompt_id: str
    target: str
    plan: list[str]
    roles: list[Role]
    objects: list[SceneObject]
    protagonist_memory: list[str]
    memory: str
    n_rounds: int
    stopped: bool
    stopped_by: str
    outcome: str
    consequence: str
    fallbacks: Counter[str] = field(default_factory=Counter)

    @classmethod
    def of(cls, scene: Transcript) -> _Header:
        return cls(scene.prompt_id, **{name: getattr(scene, name) for name in _SCENE_FIELDS})


@dataclass
class _Event:
    seq: int
    round: int
    actor: str
    kind: str
    action: str
    observation: str = ""
    audience: tuple[str, ...] = ()
    feasible: bool | None = None
    p_yes: float | None = None
