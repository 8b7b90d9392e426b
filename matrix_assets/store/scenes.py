"""Saving and loading whole scenes: a transcript and its events are written in one transaction."""

from __future__ import annotations

import json
from collections import Counter

import sqlalchemy as sa

from matrix_assets.simulation.scene import Role, SceneEvent, SceneObject, Transcript
from matrix_assets.store.db import Store, utcnow


def save_transcripts(store: Store, scenes: list[Transcript], *, method: str, model_id: str) -> None:
    now = utcnow()
    with store.transaction() as conn:
        for scene in scenes:
            # Replace, never append: a re-run with other settings must not leave stale events behind.
            conn.execute(
                sa.text("DELETE FROM transcript_events WHERE prompt_id = :p AND method = :m AND model_id = :mid"),
                {"p": scene.prompt_id, "m": method, "mid": model_id},
            )
            store.upsert(
                "transcripts",
                [{
                    "prompt_id": scene.prompt_id, "method": method, "model_id": model_id,
                    "target": scene.target, "plan_json": json.dumps(scene.plan, ensure_ascii=False),
                    "roles_json": json.dumps([r.as_dict() for r in scene.roles], ensure_ascii=False),
                    "objects_json": json.dumps([o.as_dict() for o in scene.objects], ensure_ascii=False),
                    "n_rounds": scene.n_rounds, "outcome": scene.outcome, "consequence": scene.consequence,
                    "fallbacks_json": json.dumps(dict(scene.fallbacks), sort_keys=True), "created_at": now,
                }],
                conn=conn,
            )
            store.upsert(
                "transcript_events",
                [
                    {
                        "prompt_id": scene.prompt_id, "method": method, "model_id": model_id, "seq": seq,
                        "round": e.round, "actor": e.actor, "kind": e.kind, "action": e.action,
                        "observation": e.observation, "audience": json.dumps(list(e.audience), ensure_ascii=False),
                        "feasible": None if e.feasible is None else int(e.feasible),
                    }
                    for seq, e in enumerate(scene.events)
                ],
                conn=conn,
            )


def load_transcripts(store: Store, prompt_set: str, *, method: str, model_id: str) -> list[Transcript]:
    scenes = []
    for row in store.transcripts(prompt_set, method, model_id):
        events = [
            SceneEvent(
                round=e["round"], actor=e["actor"], kind=e["kind"], action=e["action"],
                observation=e["observation"],
                audience=tuple(json.loads(e["audience"])),
                feasible=None if e["feasible"] is None else bool(e["feasible"]),
            )
            for e in store.events(row["prompt_id"], method, model_id)
        ]
        memory = next((e.action for e in reversed(events) if e.kind == "memory"), "")
        scenes.append(
            Transcript(
                prompt_id=row["prompt_id"], question=row["prompt"], answer=row["response"], target=row["target"],
                plan=json.loads(row["plan_json"]),
                roles=[Role(**r) for r in json.loads(row["roles_json"])],
                objects=[SceneObject(**o) for o in json.loads(row["objects_json"])],
                events=events, memory=memory, n_rounds=row["n_rounds"], outcome=row["outcome"],
                consequence=row["consequence"], fallbacks=Counter(json.loads(row["fallbacks_json"])),
            )
        )
    return scenes
