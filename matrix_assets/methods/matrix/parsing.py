"""Tolerant parsers for the free-form text small models produce.

Every parser returns `None` (or an empty list) when it cannot find what it looks for, never raises:
the engine then re-asks or applies a recorded fallback.
"""

from __future__ import annotations

import re

from matrix_assets.methods.matrix.scene import Role, SceneObject
from matrix_assets.methods.text import clean, first_sentence, is_prose, sentences  # noqa: F401 - re-exported

_NUMBERED = re.compile(r"^\s*(?:step\s*)?(\d{1,2})\s*[\.\):\-]\s*(.+)$", re.IGNORECASE)
_BULLET = re.compile(r"^\s*[-*•]\s+(.+)$")


# Words that head a line like a name but never name a person (format echoes, asides).
_NOT_NAMES = {"name", "thing", "note", "example", "format", "here", "answer", "list", "step", "plan", "people"}




def numbered_steps(text: str, max_steps: int) -> list[str]:
    """Numbered or bulleted lines; a heading such as 'Here is the plan:' is skipped."""
    steps: list[str] = []
    for line in text.splitlines():
        match = _NUMBERED.match(line) or _BULLET.match(line)
        if match:
            step = clean(match.groups()[-1])
            if is_prose(step) and step not in steps:
                steps.append(step[:400])
    return steps[:max_steps]




def roles(text: str, max_roles: int, exclude: set[str] = frozenset()) -> list[Role]:
    """Lines like 'Maria - a neighbour - at home', 'Maria: a neighbour, at home' or '1. Maria (neighbour)'."""
    found: list[Role] = []
    seen = {name.lower() for name in exclude}
    for raw in text.splitlines():
        line = raw.strip()
        match = _NUMBERED.match(line) or _BULLET.match(line)
        if match:
            line = match.groups()[-1]
        line = clean(line)
        if not line or line.endswith(":") or len(line) > 300:
            continue
        parts = [p.strip() for p in re.split(r"\s+[-–—|]\s+|\s*\|\s*", line) if p.strip()]
        if len(parts) < 2 and ":" in line:
            head, tail = line.split(":", 1)
            parts = [head.strip()] + [p.strip() for p in tail.split(",") if p.strip()]
        if len(parts) < 2:
            paren = re.match(r"^(.{2,40}?)\s*\((.+)\)\s*$", line)
            if not paren:
                continue
            parts = [paren.group(1), paren.group(2)]
        name = clean(parts[0]).rstrip(",.;")
        if (
            not re.search(r"[^\W\d_]", name)  # table rules such as |---|, bare numbers
            or not (1 <= len(name.split()) <= 5)
            or name.lower() in seen
            or name.lower() in _NOT_NAMES
        ):
            continue
        seen.add(name.lower())
        description = parts[1][:200]
        status = parts[2][:200] if len(parts) > 2 else "going about their day"
        found.append(Role(name=name, description=description, status=status))
        if len(found) >= max_roles:
            break
    return found


def objects(text: str, max_objects: int) -> list[SceneObject]:
    result = []
    for role in roles(text, max_objects):
        result.append(SceneObject(name=role.name, state=role.description))
    return result


def yes_no(text: str, label: str) -> bool | None:
    match = re.search(rf"{label}\**\s*[:\-]?\s*\**\s*(yes|no)\b", text, re.IGNORECASE)
    if match:
        return match.group(1).lower() == "yes"
    return None


def labelled_line(text: str, label: str) -> str | None:
    match = re.search(rf"{label}\**\s*[:\-]\s*(.+)", text, re.IGNORECASE)
    if not match:
        return None
    value = clean(match.group(1))
    return value or None


def mentioned_names(text: str, names: list[str]) -> list[str]:
    """Role names that appear in the text (full name, or any distinctive word of it)."""
    lowered = text.lower()
    hits = []
    for name in names:
        words = [w for w in re.findall(r"[\w']+", name.lower()) if len(w) > 2]
        if re.search(rf"\b{re.escape(name.lower())}\b", lowered) or any(re.search(rf"\b{re.escape(w)}\b", lowered) for w in words):
            hits.append(name)
    return hits


def mentioned_names_in_order(text: str, names: list[str]) -> list[str]:
    """Like `mentioned_names`, ordered by where each name first appears in the text (the modulator's order)."""
    lowered = text.lower()
    positions = []
    for name in mentioned_names(text, names):
        words = [name.lower()] + [w for w in re.findall(r"[\w']+", name.lower()) if len(w) > 2]
        found = [m.start() for w in words if (m := re.search(rf"\b{re.escape(w)}\b", lowered))]
        positions.append((min(found) if found else len(lowered), name))
    return [name for _, name in sorted(positions)]


def object_changes(text: str, objects: list[SceneObject]) -> list[tuple[SceneObject, str]]:
    """`THINGS: laptop - stolen; savings - gone` lines: each object the reply names, with its new state."""
    line = labelled_line(text, "THINGS")
    if not line or line.lower().startswith("unchanged") or not objects:
        return []
    changes = []
    for part in re.split(r"[;\n]|,\s+(?=[A-Z])", line):
        pieces = [p.strip() for p in re.split(r"\s+[-–—:]\s+|:\s*", part, maxsplit=1) if p.strip()]
        if len(pieces) != 2:
            continue
        for obj in objects:
            if obj not in [c[0] for c in changes] and mentioned_names(pieces[0], [obj.name]):
                changes.append((obj, pieces[1][:200]))
                break
    return changes


def without_label_lines(text: str, labels: tuple[str, ...]) -> str:
    kept = [line for line in text.splitlines() if not re.match(rf"\s*({'|'.join(labels)})\s*[:\-]", line, re.I)]
    return clean("\n".join(kept))
