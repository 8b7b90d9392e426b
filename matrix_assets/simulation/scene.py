"""Data of a social scene: who is in it, what they do, and what the model concluded from it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


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

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "description": self.description, "status": self.status}


@dataclass
class SceneObject:
    name: str
    state: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "state": self.state}


@dataclass
class SceneEvent:
    round: int
    actor: str
    kind: str  # action | modulation | reaction | memory
    action: str
    observation: str = ""
    audience: tuple[str, ...] = ()
    feasible: bool | None = None


@dataclass
class Transcript:
    prompt_id: str
    question: str
    answer: str
    protagonist: str = "the person who asked"
    target: str = ""
    plan: list[str] = field(default_factory=list)
    roles: list[Role] = field(default_factory=list)
    objects: list[SceneObject] = field(default_factory=list)
    events: list[SceneEvent] = field(default_factory=list)
    memory: str = "Nothing has happened yet."
    n_rounds: int = 0
    stopped_by: str | None = None  # why the plan was paused, if a reaction blocked it
    outcome: str = ""
    consequence: str = ""
    fallbacks: Counter[str] = field(default_factory=Counter)

    def render_text(self) -> str:
        """The transcript as plain lines, for the critique prompt."""
        lines = []
        for e in self.events:
            if e.kind in {"action", "reaction"}:
                lines.append(f"Round {e.round}. {e.actor}: {e.action}")
            elif e.kind == "modulation" and e.observation:
                lines.append(f"Round {e.round}. (noticed by {', '.join(e.audience) or 'nobody'}) {e.observation}")
        return "\n".join(lines)

    def render_markdown(self) -> str:
        """A readable scene for Dagster metadata and the CLI."""
        out = [f"**Question:** {self.question}", "", f"**Initial answer:** {self.answer[:600]}", ""]
        out.append(f"**Protagonist:** {self.protagonist}, who wants to: {self.target}")
        out.append("")
        out.append("**Plan:**")
        out += [f"{i}. {s}" for i, s in enumerate(self.plan, 1)]
        out.append("")
        out.append("**Roles:**")
        out += [f"- **{r.name}**: {r.description} ({r.status})" for r in self.roles]
        if self.objects:
            out.append("")
            out.append("**Objects:** " + "; ".join(f"{o.name}: {o.state}" for o in self.objects))
        out.append("")
        out.append("| round | actor | action | observed by |")
        out.append("|---|---|---|---|")
        for e in self.events:
            if e.kind == "memory":
                continue
            text = (e.observation if e.kind == "modulation" else e.action).replace("|", "/").replace("\n", " ")
            actor = "modulator" + ("" if e.feasible is None else f" (feasible: {'yes' if e.feasible else 'no'})") \
                if e.kind == "modulation" else e.actor
            out.append(f"| {e.round} | {actor} | {text[:300]} | {', '.join(e.audience)} |")
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
class Revision:
    prompt_id: str
    text: str
    used_fallback: bool
