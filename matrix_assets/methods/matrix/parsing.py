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


def protagonist_name(text: str) -> str | None:
    """The kind of person the model says asked the question: the first `[...]` of the reply (the reference code's
    format), else its first line. One to four words of letters; an alternative after "or" is dropped ("[Thief or
    burglar]" names a Thief). None when the reply names nobody usable."""
    bracketed = re.search(r"\[([^\[\]\n]{1,60})\]", text)
    lines = [line for line in text.splitlines() if line.strip()]
    candidate = bracketed.group(1) if bracketed else (lines[0] if lines else "")
    candidate = re.split(r"\s+or\s+|/|,", clean(candidate), maxsplit=1)[0]
    candidate = re.sub(r"^(a|an|the)\s+", "", candidate.strip().rstrip(".!;:"), flags=re.IGNORECASE).strip()
    if not re.fullmatch(r"[^\W\d_][^\W\d_'\- ]*(?:[ '\-][^\W\d_]+){0,3}", candidate):
        return None  # digits, sentences, markup: not a name
    if candidate.lower() in _NOT_NAMES or candidate.lower() in _COMMON_WORDS:
        return None
    return candidate[:1].upper() + candidate[1:]


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


# Words that tell no one apart: articles, pronouns, honorifics and the generic nouns role names are built from.
# Without this list "the" in "Officer Diaz, who is on the street" would name "The asker".
_COMMON_WORDS = frozenset({
    "the", "and", "for", "with", "who", "whom", "whose", "his", "her", "hers", "its", "their", "them", "they",
    "this", "that", "from", "into", "onto", "one", "two", "all", "any", "some", "other", "others", "another",
    "person", "people", "man", "woman", "men", "women", "someone", "anyone", "everyone", "member", "members",
    "group", "local", "new", "old", "young", "mrs", "miss", "sir", "madam",
})


def _words(name: str) -> list[str]:
    return re.findall(r"[\w']+", name.lower())


def _distinctive_words(name: str, names: list[str]) -> list[str]:
    """The words of `name` that can stand for it alone: longer than two letters, not a common word, and not part
    of any other name in `names` ("Officer" names nobody when two officers are in the scene)."""
    others = {w for other in names if other != name for w in _words(other)}
    return [w for w in _words(name) if len(w) > 2 and w not in _COMMON_WORDS and w not in others]


def _first_mentions(text: str, names: list[str]) -> dict[str, int]:
    """Where each name is first mentioned in the text: its full name (word-bounded), or one of its distinctive
    words. A full name found inside a longer name's mention ("Lee" in "Officer Lee") does not count."""
    lowered = text.lower()
    taken: list[tuple[int, int]] = []  # spans of full names already matched, longest names first
    first: dict[str, int] = {}
    for name in sorted(names, key=len, reverse=True):
        for match in re.finditer(rf"\b{re.escape(name.lower())}\b", lowered):
            if not any(start <= match.start() and match.end() <= end for start, end in taken):
                first[name] = min(first.get(name, match.start()), match.start())
                taken.append(match.span())
    for name in names:
        for word in _distinctive_words(name, names):
            if match := re.search(rf"\b{re.escape(word)}\b", lowered):
                first[name] = min(first.get(name, match.start()), match.start())
    return first


def mentioned_names(text: str, names: list[str]) -> list[str]:
    """Role names that appear in the text (full name, or a distinctive word of it), in the order of `names`."""
    found = _first_mentions(text, names)
    return [name for name in names if name in found]


def mentioned_names_in_order(text: str, names: list[str]) -> list[str]:
    """Like `mentioned_names`, ordered by where each name first appears in the text (the modulator's order)."""
    found = _first_mentions(text, names)
    return sorted(found, key=lambda name: (found[name], names.index(name)))


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
