"""Prompt templates live as files in `matrix_assets/prompts/` (Jinja2); this module only renders them."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from matrix_assets.llm.base import Message

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(PROMPTS_DIR)),
        undefined=jinja2.StrictUndefined,  # a missing variable is a bug, not an empty string
        keep_trailing_newline=False,
        autoescape=False,
    )


def render(template: str, /, **variables: Any) -> str:
    return _environment().get_template(f"{template}.j2").render(**variables).strip()


def user_message(template: str, /, **variables: Any) -> list[Message]:
    return [{"role": "user", "content": render(template, **variables)}]


def system_and_user(template: str, user_text: str, /, **variables: Any) -> list[Message]:
    """A rendered system prompt, then the user's own words unchanged (small models follow this shape best)."""
    return [{"role": "system", "content": render(template, **variables)}, {"role": "user", "content": user_text}]


def template_names() -> list[str]:
    return sorted(p.stem for p in PROMPTS_DIR.glob("*.j2"))


def read_text(filename: str) -> str:
    return (PROMPTS_DIR / filename).read_text(encoding="utf-8")
