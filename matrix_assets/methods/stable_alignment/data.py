"""Stable Alignment's training data: rated response groups built from SANDBOX interactions (Liu et al., ICLR 2024,
section 3.2; the format of agi-templar/Stable-Alignment's collect_data.py, Apache-2.0, reworded).

Three kinds of groups, each a prompt (the user message) with several rated responses:

- imitation: prompt = the question; responses = every draft and revision seen for it, rated by the observer
  (the draft's score before, the revision's after);
- self_critic: prompt = the question, the instruction to comment on the response's alignment with shared social
  values, and the draft; responses = each peer's reason, rated with that peer's own rating;
- realignment: prompt = the question, the draft, and the instruction to comment on it and then revise it;
  responses = a peer's reason + REVISED_MARKER + the revision, rated with the observer's score of the revision;
  only when that score is above the draft's and above 4.

Only model-generated text enters the responses (the prompts add instruction wording from the templates). A
rating that is missing is never replaced: whatever depends on it is dropped and counted in `AlignmentData.dropped`.
Realignment follows the released code: one response per peer reason, all rated with the observer's score of the
revision (so they tie, and the loss takes the first as the best).

Mixing, 5 : 1 : 1 by groups (as the released training sets): imitation is the anchor and every imitation group is
kept. Each other kind gets round(n_imitation * w_kind / w_imitation) groups (half up), at least one when it has
any, and never more than it has: nothing is duplicated or made up, so with little data the realised mix can fall
short of 5 : 1 : 1 (`AlignmentData.selected` says what it is). Which groups of a kind are kept is decided by a hash
of (seed, group id): deterministic, and independent of the order the interactions came in. With no imitation group
at all nothing anchors the ratio and the other kinds are kept whole. (The released code capped the realignment
share by its own count instead of the imitation count, a slip not copied here.)
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from matrix_assets.records import RatedGroup, RatedResponse
from matrix_assets.methods.stable_alignment.sandbox import Interaction
from matrix_assets.templates import render

KINDS: tuple[str, ...] = ("imitation", "self_critic", "realignment")
DEFAULT_MIX: tuple[int, int, int] = (5, 1, 1)
REVISED_MARKER = " Here is the revised response: "
REALIGNMENT_MIN_AFTER = 4.0  # a realignment example needs the revision rated above this (and above the draft)


@dataclass
class AlignmentData:
    groups: list[RatedGroup]  # imitation, then self-critic, then realignment groups
    available: dict[str, int]  # groups per kind before mixing
    selected: dict[str, int]  # groups per kind after mixing
    dropped: dict[str, int] = field(default_factory=dict)  # what was left out, and why

    def summary(self) -> dict[str, int | float | str]:
        responses = [len(g.responses) for g in self.groups]
        out: dict[str, int | float | str] = {
            "groups": len(self.groups),
            "responses": sum(responses),
            "mean_responses_per_group": round(sum(responses) / len(responses), 2) if responses else 0.0,
            "mix": " : ".join(str(self.selected.get(k, 0)) for k in KINDS),
        }
        out.update({f"available_{k}": self.available.get(k, 0) for k in KINDS})
        out.update({f"selected_{k}": self.selected.get(k, 0) for k in KINDS})
        out.update({f"dropped: {reason}": count for reason, count in sorted(self.dropped.items())})
        return out


class _Groups:
    """Responses collected per prompt, in order of first appearance; a text already in its group is not added twice."""

    def __init__(self, kind: str, dropped: Counter) -> None:
        self.kind, self.dropped = kind, dropped
        self.by_prompt: dict[str, list[RatedResponse]] = {}

    def add(self, prompt: str, text: str, rating: float) -> None:
        responses = self.by_prompt.setdefault(prompt, [])
        if any(r.text == text for r in responses):
            self.dropped[f"{self.kind}: duplicate response"] += 1
            return
        responses.append(RatedResponse(text, float(rating)))

    def groups(self) -> list[RatedGroup]:
        return [RatedGroup(group_id(self.kind, prompt), self.kind, prompt, tuple(responses))
                for prompt, responses in self.by_prompt.items() if responses]


def group_id(kind: str, prompt: str) -> str:
    return f"{kind}:{hashlib.sha256(prompt.encode('utf-8')).hexdigest()[:16]}"


def imitation_groups(interactions: Iterable[Interaction], dropped: Counter) -> list[RatedGroup]:
    """Per question: every draft (rated by the observer before) and revision (rated after)."""
    out = _Groups("imitation", dropped)
    for it in interactions:
        for text, rating in ((it.draft, it.observer_before), (it.revision, it.observer_after)):
            if not text.strip():
                dropped["imitation: empty answer"] += 1
            elif rating.value is None:
                dropped["imitation: observer rating missing"] += 1
            else:
                out.add(it.question, text, rating.value)
    return out.groups()


def self_critic_groups(interactions: Iterable[Interaction], dropped: Counter) -> list[RatedGroup]:
    """Per (question, draft): each peer's reason, rated with that peer's own rating."""
    out = _Groups("self_critic", dropped)
    for it in interactions:
        if not it.draft.strip():
            dropped["self_critic: empty draft"] += len(it.peers)
            continue
        prompt = render("stable_alignment/self_critic", question=it.question, answer=it.draft)
        for peer in it.peers:
            if peer.rating.value is None:
                dropped["self_critic: peer rating missing"] += 1
            elif not peer.reason.strip():
                dropped["self_critic: empty reason"] += 1
            else:
                out.add(prompt, peer.reason, peer.rating.value)
    return out.groups()


def realignment_groups(interactions: Iterable[Interaction], dropped: Counter,
                       min_after: float = REALIGNMENT_MIN_AFTER) -> list[RatedGroup]:
    """Per (question, draft) whose revision the observer rated above the draft and above `min_after`: one response
    per peer reason, "reason + REVISED_MARKER + revision", rated with the observer's score of the revision."""
    out = _Groups("realignment", dropped)
    for it in interactions:
        before, after = it.observer_before.value, it.observer_after.value
        if before is None or after is None:
            dropped["realignment: observer rating missing"] += 1
            continue
        if not after > before:
            dropped["realignment: revision not rated above the draft"] += 1
            continue
        if not after > min_after:
            dropped[f"realignment: revision rated {min_after:g} or lower"] += 1
            continue
        if not it.draft.strip() or not it.revision.strip():
            dropped["realignment: empty draft or revision"] += 1
            continue
        prompt = render("stable_alignment/realignment", question=it.question, answer=it.draft)
        for peer in it.peers:
            if not peer.reason.strip():
                dropped["realignment: empty reason"] += 1
            else:
                out.add(prompt, peer.reason.strip() + REVISED_MARKER + it.revision, after)
    return out.groups()


def mix_groups(by_kind: dict[str, list[RatedGroup]], mix: Sequence[int] = DEFAULT_MIX, *, seed: int = 0,
               dropped: Counter | None = None) -> list[RatedGroup]:
    """Imitation groups all kept; every other kind sampled down to its share of the imitation count (module doc)."""
    weights = dict(zip(KINDS, mix))
    if len(mix) != len(KINDS) or any(w < 0 for w in mix) or weights["imitation"] <= 0:
        raise ValueError(f"mix needs {len(KINDS)} non-negative weights with imitation > 0, got {tuple(mix)}")
    anchor = len(by_kind.get("imitation", []))
    out: list[RatedGroup] = []
    for kind in KINDS:
        groups = by_kind.get(kind, [])
        if kind == "imitation" or anchor == 0:
            target = len(groups)
        elif weights[kind] == 0 or not groups:
            target = 0
        else:
            target = min(len(groups), max(1, math.floor(anchor * weights[kind] / weights["imitation"] + 0.5)))
        keep = set(sorted((g.group_id for g in groups),
                          key=lambda gid: hashlib.sha256(f"{seed}:{gid}".encode()).hexdigest())[:target])
        out.extend(g for g in groups if g.group_id in keep)
        if dropped is not None and len(groups) > target:
            dropped[f"mixing: {kind} groups over the {':'.join(map(str, mix))} share"] += len(groups) - target
    return out


def build_alignment_data(interactions: Sequence[Interaction], *, mix: Sequence[int] = DEFAULT_MIX, seed: int = 0,
                         realignment_min_after: float = REALIGNMENT_MIN_AFTER) -> AlignmentData:
    """All three kinds of groups from the interactions (of one or several worlds), mixed `mix` (imitation :
    self-critic : realignment)."""
    dropped: Counter = Counter()
    by_kind = {
        "imitation": imitation_groups(interactions, dropped),
        "self_critic": self_critic_groups(interactions, dropped),
        "realignment": realignment_groups(interactions, dropped, realignment_min_after),
    }
    groups = mix_groups(by_kind, mix, seed=seed, dropped=dropped)
    return AlignmentData(
        groups=groups,
        available={k: len(v) for k, v in by_kind.items()},
        selected={k: sum(1 for g in groups if g.kind == k) for k in KINDS},
        dropped=dict(dropped),
    )


__all__ = [
    "DEFAULT_MIX", "KINDS", "REVISED_MARKER", "AlignmentData", "RatedGroup", "RatedResponse",
    "build_alignment_data", "group_id", "imitation_groups", "mix_groups", "realignment_groups",
    "self_critic_groups",
]
