"""Prompt templates live as files (Jinja2); this leaf module only finds and renders them.

Shared templates (the plain question, the judges) are in `matrix_assets/prompts/NAME.j2`; each alignment
method keeps its own in `matrix_assets/methods/METHOD/prompts/NAME.j2`, rendered as `"METHOD/NAME"`. Adding a
method therefore adds a folder, never an entry here.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from matrix_assets.llm.base import Message

PACKAGE_DIR = Path(__file__).resolve().parent
PROMPTS_DIR = PACKAGE_DIR / "prompts"
METHODS_DIR = PACKAGE_DIR / "methods"


def _method_prompt_dirs() -> dict[str, Path]:
    return {d.parent.name: d for d in sorted(METHODS_DIR.glob("*/prompts")) if d.is_dir()}


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    loader = jinja2.ChoiceLoader([
        jinja2.FileSystemLoader(str(PROMPTS_DIR)),
        jinja2.PrefixLoader({name: jinja2.FileSystemLoader(str(d)) for name, d in _method_prompt_dirs().items()}),
    ])
    return jinja2.Environment(
        loader=loader,
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


def read_text(name: str) -> str:
    """A non-template prompt file (a list of principles, a roster): `"FILE"` or `"METHOD/FILE"`."""
    method, _, filename = name.rpartition("/")
    folder = _method_prompt_dirs()[method] if method else PROMPTS_DIR
    return (folder / filename).read_text(encoding="utf-8")
