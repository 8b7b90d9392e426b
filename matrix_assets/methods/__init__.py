"""The alignment methods, one package each. A package that defines `METHOD` (a `methods.base.Method`) is a
method: the registry finds it, and the Dagster assets and checks, jobs, CLI choices, MLflow tags, training loss and
evaluation columns follow from it. Adding one means adding a folder (its module, its prompt files, its objective if
it brings a new loss) and its tests: here, or as a package of its own named by `MATRIX_METHOD_PACKAGES` or
registered under the `matrix_assets.methods` entry-point group (tests/fixtures/plugin_methods shows one)."""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path

from matrix_assets.methods.base import Method
from matrix_assets.settings import method_packages

ENTRY_POINT_GROUP = "matrix_assets.methods"


@lru_cache(maxsize=1)
def registry() -> dict[str, Method]:
    """Every method, in its declared order: this package's, then the entry points', then `MATRIX_METHOD_PACKAGES`'s
    (`registry.cache_clear()` after changing that variable in a running process)."""
    modules = [f"{__name__}.{info.name}" for info in pkgutil.iter_modules([str(Path(__file__).parent)]) if info.ispkg]
    modules += [ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)]
    modules += method_packages()
    found: dict[str, Method] = {}
    for module_name in modules:
        method = getattr(importlib.import_module(module_name), "METHOD", None)
        if not isinstance(method, Method):
            if not module_name.startswith(f"{__name__}."):
                raise ValueError(f"{module_name} defines no METHOD (a matrix_assets.methods.base.Method)")
            continue
        folder = module_name.rsplit(".", 1)[-1]
        if method.name != folder:
            raise ValueError(f"method {method.name!r} must live in a package of the same name, not {folder!r}")
        if method.name in found:
            raise ValueError(f"two methods are named {method.name!r} ({module_name} and another)")
        found[method.name] = method
    return {m.name: m for m in sorted(found.values(), key=lambda m: (m.order, m.name))}


def method_names() -> list[str]:
    return list(registry())
