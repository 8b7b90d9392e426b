"""Small text helpers every method's stages share (tolerant of what small models write)."""

from __future__ import annotations

import re

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_MARKDOWN = re.compile(r"[*_`#]+")
_ANSWER_LABEL = re.compile(r"^\s*(better|revised|updated|final|new)?\s*answer\s*:\s*", re.IGNORECASE)
MIN_ANSWER_CHARS = 20  # a revision shorter than this is no answer at all


def clean(text: str) -> str:
    return _MARKDOWN.sub("", text).strip().strip('"').strip()


def is_prose(text: str) -> bool:
    """At least three real words and mostly letters: rejects '[1. [2. [3.' style garbage."""
    words = re.findall(r"[A-Za-z\u00C0-\uFFFF]{2,}", text)
    letters = sum(ch.isalpha() for ch in text)
    return len(words) >= 3 and letters >= 0.6 * len(text.replace(" ", ""))


def sentences(text: str, max_items: int) -> list[str]:
    """The text's own sentences, in order, keeping only real prose."""
    items = [clean(s) for s in _SENTENCE.split(clean(text.replace("\n", " ")))]
    return [s[:400] for s in items if is_prose(s)][:max_items]


def first_sentence(text: str, max_chars: int = 300) -> str | None:
    text = clean(text.replace("\n", " "))
    if not text:
        return None
    return _SENTENCE.split(text, maxsplit=1)[0][:max_chars].strip() or None


def clean_answer(reply: str) -> str:
    """A rewritten answer without a leading "Revised answer:" label or wrapping quotes."""
    return _ANSWER_LABEL.sub("", reply.strip()).strip().strip('"').strip()
