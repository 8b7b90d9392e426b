"""Data of a social scene: who is in it, what they do and notice, and what the model concluded from it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# The person who asked the question, acting on the answer, when the scene does not let the model name them (the
# quick profile) or the model's name for them cannot be used.
PROTAGONIST = "The asker"
ELLIPSIS = "…"


def shorten(text: str, limit: int, *, keep_end: bool = False) -> str:
    """`text` in at most `limit` characters: whole words only, the cut marked with an ellipsis (at the end, or at
    the start with `keep_end`). Text that fits comes back unchanged; a cut one collapses its whitespace. Only a
    single word longer than `limit` is ever cut inside (there is no word boundary to cut at)."""
    text = text.strip()
    if len(text) <= limit:
        return text
    words = text.split()
    kept: list[str] = []
    size = len(ELLIPSIS) - 1  # each kept word adds itself and a space
    for word in reversed(words) if keep_end else words:
        if size + 1 + len(word) > limit:
            break
        kept.append(word)
        size += 1 + len(word)
    if not kept:
        return ELLIPSIS + text[len(text) - limit + 1 :] if keep_end else text[: limit - 1] + ELLIPSIS
    if keep_end:
        return ELLIPSIS + " ".join(reversed(kept))
    return " ".join(kept).rstrip(",;:") + ELLIPSIS


@dataclass(frozen=True)
class SceneInput:
    prompt_id: str
    question: str
    answer: str  # the initial response r0


@dataclass
class Role:
    name: str
    description: str
    status: str
    memory: list[str] = field(default_factory=list)  # what this role has observed, in order


@dataclass
class SceneObject:
    name: str
    state: str


@dataclass
class SceneEvent:
    """One step of the scene. `action`: what the actor did (or, for the modulator, what it decided);
    `observation` / `audience`: what the modulator routed, to whom; `feasible`: the modulator's verdict on a
    protagonist's action (None elsewhere); `p_yes`: the probability behind that verdict when it was read from
    the model's next-token distribution."""

    round: int
    actor: str
    kind: str  # action | modulation | reaction | objects | memory
    action: str
    observation: str = ""
    audience: tuple[str, ...] = ()
    feasible: bool | None = None
    p_yes: float | None = None


@dataclass
class Transcript:
    prompt_id: str
    question: str
    answer: str
    protagonist: str = PROTAGONIST  # the asker as the scene names them (the model's name, e.g. "Thief")
    target: str = ""
    plan: list[str] = field(default_factory=list)
    roles: list[Role] = field(default_factory=list)
    objects: list[SceneObject] = field(default_factory=list)
    events: list[SceneEvent] = field(default_factory=list)
    protagonist_memory: list[str] = field(default_factory=list)
    memory: str = "Nothing has happened yet."  # the modulator's running summary of the scene
    n_rounds: int = 0
    stopped: bool = False
    stopped_by: str = ""  # why the plan was stopped, when it was
    outcome: str = ""
    consequence: str = ""
    fallbacks: Counter[str] = field(default_factory=Counter)

    def role(self, name: str) -> Role | None:
        return next((r for r in self.roles if r.name == name), None)

    def render_text(self) -> str:
        """The transcript as plain lines, for the critique prompt."""
        lines = []
        for e in self.events:
            if e.kind in {"action", "reaction"}:
                seen = f" (noticed by {', '.join(e.audience)})" if e.kind == "reaction" and e.audience else ""
                lines.append(f"Round {e.round}. {e.actor}: {e.action}{seen}")
            elif e.kind == "modulation":
                verdict = "" if e.feasible is None else (" It works." if e.feasible else " It fails.")
                lines.append(f"Round {e.round}. (noticed by {', '.join(e.audience) or 'nobody'}) "
                             f"{e.observation}{verdict}")
            elif e.kind == "objects":
                lines.append(f"Round {e.round}. (things change) {e.action}")
        return "\n".join(lines)

    def render_markdown(self) -> str:
        """A readable scene for Dagster metadata and the CLI."""
        out = [f"**Question:** {self.question}", "", f"**Initial answer:** {self.answer}", ""]
        out += [f"**Protagonist:** {self.protagonist}, who wants to: {self.target}", "", "**Plan:**"]
        out += [f"{i}. {s}" for i, s in enumerate(self.plan, 1)]
        out += ["", "**Roles:**"]
        out += [f"- **{r.name}**: {r.description} ({r.status}); observed {len(r.memory)} event(s)" for r in self.roles]
        if self.objects:
            out += ["", "**Objects (end of scene):** " + "; ".join(f"{o.name}: {o.state}" for o in self.objects)]
        out += ["", "| round | actor | what happened | observed by |", "|---|---|---|---|"]
        for e in self.events:
            if e.kind == "memory":
                continue
            text = (e.observation if e.kind == "modulation" else e.action).replace("|", "/").replace("\n", " ")
            actor = e.actor
            if e.kind == "modulation" and e.feasible is not None:
                actor = f"modulator (feasible: {'yes' if e.feasible else 'no'})"
            out.append(f"| {e.round} | {actor} | {shorten(text, 300)} | {', '.join(e.audience)} |")
        out += ["", f"**Outcome:** {self.outcome}", "", f"**Consequence:** {self.consequence}"]
        if self.fallbacks:
            out += ["", "**Fallbacks used:** " + ", ".join(f"{k} x{v}" for k, v in sorted(self.fallbacks.items()))]
        return "\n".join(out)


@dataclass
class Critique:
    prompt_id: str
    text: str
    harmed_parties: list[str]
    used_fallback: bool


@dataclass
class RevisionCandidate:
    """One sampled revision and the model's own verdict on it against its scene."""

    prompt_id: str
    candidate_index: int
    text: str
    p_harm: float | None = None  # P("yes") to "Would this answer hurt anyone in the scene?", None when unscored
    selected: bool = False
