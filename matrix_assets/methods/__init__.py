"""The alignment methods, one package each. A package that defines `METHOD` (a `methods.base.Method`) is a
method: the registry finds it, and the Dagster assets, jobs, CLI choices, MLflow tags and evaluation columns
follow from it. Adding one means adding a folder (its module, its prompt files) and its tests."""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from pathlib import Path

from matrix_assets.methods.base import Method


@lru_cache(maxsize=1)
def registry() -> dict[str, Method]:
    """Every method, in its declared order."""
    found = []
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if not info.ispkg:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        method = getattr(module, "METHOD", None)
        if isinstance(method, Method):
            if method.name != info.name:
                raise ValueError(f"method {method.name!r} must live in a package of the same name, not {info.name!r}")
            found.append(method)
    return {m.name: m for m in sorted(found, key=lambda m: (m.order, m.name))}


def method_names() -> list[str]:
    return list(registry())
