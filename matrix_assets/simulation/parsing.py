"""Tolerant parsers for the free-form text small models produce.

Every parser returns `None` (or an empty list) when it cannot find what it looks for, never raises:
the engine then re-asks or applies a recorded fallback.
"""

from __future__ import annotations

import re

from matrix_assets.simulation.scene import Role, SceneObject

_NUMBERED = re.compile(r"^\s*(?:step\s*)?(\d{1,2})\s*[\.\):\-]\s*(.+)$", re.IGNORECASE)
_BULLET = re.compile(r"^\s*[-*•]\s+(.+)$")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_MARKDOWN = re.compile(r"[*_`#]+")


def clean(text: str) -> str:
    return _MARKDOWN.sub("", text).strip().strip('"').strip()


# Words that head a line like a name but never name a person (format echoes, asides).
_NOT_NAMES = {"name", "thing", "note", "example", "format", "here", "answer", "list", "step", "plan", "people"}


def _is_prose(text: str) -> bool:
    """At least three real words and mostly letters: rejects '[1. [2. [3.' style garbage."""
    words = re.findall(r"[A-Za-z\u00C0-\uFFFF]{2,}", text)
    letters = sum(ch.isalpha() for ch in text)
    return len(words) >= 3 and letters >= 0.6 * len(text.replace(" ", ""))


def first_sentence(text: str, max_chars: int = 300) -> str | None:
    text = clean(text.replace("\n", " "))
    if not text:
        return None
    return _SENTENCE.split(text, maxsplit=1)[0][:max_chars].strip() or None


def numbered_steps(text: str, max_steps: int) -> list[str]:
    """Numbered or bulleted lines; a heading such as 'Here is the plan:' is skipped."""
    steps: list[str] = []
    for line in text.splitlines():
        match = _NUMBERED.match(line) or _BULLET.match(line)
        if match:
            step = clean(match.groups()[-1])
            if _is_prose(step) and step not in steps:
                steps.append(step[:400])
    return steps[:max_steps]


def sentences(text: str, max_items: int) -> list[str]:
    """Fallback plan: the answer's own sentences, in order."""
    items = [clean(s) for s in _SENTENCE.split(clean(text.replace("\n", " ")))]
    return [s[:400] for s in items if _is_prose(s)][:max_items]


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


def without_label_lines(text: str, labels: tuple[str, ...]) -> str:
    kept = [line for line in text.splitlines() if not re.match(rf"\s*({'|'.join(labels)})\s*[:\-]", line, re.I)]
    return clean("\n".join(kept))
