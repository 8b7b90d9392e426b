"""Imports go one way: Dagster wiring on top, the store below it, the domain (methods, training, evaluation) below
that, the model backends and leaf helpers at the bottom. Checked on every import statement of the package,
function-level ones included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "matrix_assets"

# For each layer (a module prefix), the project modules it must never import.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "matrix_assets.llm": ("matrix_assets.store", "matrix_assets.defs", "matrix_assets.methods",
                          "matrix_assets.evaluation", "matrix_assets.training", "matrix_assets.cli", "dagster"),
    "matrix_assets.templates": ("matrix_assets.store", "matrix_assets.defs", "matrix_assets.methods", "dagster"),
    "matrix_assets.embeddings": ("matrix_assets.store", "matrix_assets.defs", "matrix_assets.methods", "dagster"),
    "matrix_assets.data": ("matrix_assets.store", "matrix_assets.defs", "matrix_assets.methods", "dagster"),
    # The training-data path never sees the evaluation's judges.
    "matrix_assets.methods": ("matrix_assets.store", "matrix_assets.defs", "matrix_assets.evaluation",
                              "matrix_assets.cli", "dagster"),
    # A method carries its trainer, so methods import training and never the other way round.
    "matrix_assets.training": ("matrix_assets.store", "matrix_assets.defs", "matrix_assets.evaluation",
                               "matrix_assets.methods", "matrix_assets.cli", "dagster"),
    # The records methods, training and the store share: a leaf.
    "matrix_assets.records": ("matrix_assets", "dagster"),
    "matrix_assets.evaluation": ("matrix_assets.store", "matrix_assets.defs", "matrix_assets.training",
                                 "matrix_assets.cli", "dagster"),
    "matrix_assets.store": ("matrix_assets.defs", "matrix_assets.evaluation", "matrix_assets.training",
                            "matrix_assets.cli", "dagster"),
    "matrix_assets.profiles": ("matrix_assets.store", "matrix_assets.defs", "matrix_assets.cli", "dagster"),
}
# Only the store writes SQL: no other module may import SQLAlchemy.
SQL_OWNER = "matrix_assets.store"


def _modules() -> dict[str, set[str]]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
                if node.module == "matrix_assets":  # from matrix_assets import profiles
                    imported |= {f"matrix_assets.{alias.name}" for alias in node.names}
        out[name] = imported
    return out


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_imports_go_one_way() -> None:
    problems = []
    for module, imported in _modules().items():
        for layer, forbidden in FORBIDDEN.items():
            if _within(module, layer):
                problems += [f"{module} imports {name}" for name in sorted(imported)
                             for bad in forbidden if _within(name, bad)]
    assert not problems, "\n".join(problems)


def _layer(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_the_layers_import_each_other_without_cycles() -> None:
    """Between the package's top-level modules (llm, methods, training, store, ...) the imports form a DAG."""
    graph: dict[str, set[str]] = {}
    for module, imported in _modules().items():
        graph.setdefault(_layer(module), set()).update(
            _layer(name) for name in imported if name.startswith("matrix_assets.") and _layer(name) != _layer(module))
    assert graph["matrix_assets.methods"] and graph["matrix_assets.defs"]  # the scan found the imports
    state: dict[str, str] = {}

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*path, node, nxt]
            if nxt not in state and (found := cycle_from(nxt, [*path, node])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := cycle_from(start, [])):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_only_the_store_speaks_sql() -> None:
    offenders = [m for m, imported in _modules().items()
                 if any(_within(i, "sqlalchemy") for i in imported) and not _within(m, SQL_OWNER)]
    assert offenders == []


def test_every_method_is_one_folder_with_its_prompts() -> None:
    from matrix_assets.methods import registry

    for name, method in registry().items():
        folder = PACKAGE / "methods" / name
        assert (folder / "__init__.py").exists(), name
        for stage in method.stages:
            assert stage.run.__module__.startswith(f"matrix_assets.methods.{name}"), (name, stage.name)


def test_no_sql_outside_the_store() -> None:
    """The store owns every query: no other module calls `query`, `scalar` or `upsert`, or holds SQL text."""
    import re

    sql = re.compile(r"\b(SELECT|INSERT INTO|UPDATE \w+ SET|DELETE FROM)\b")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.is_relative_to(PACKAGE / "store"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in {"query", "scalar", "upsert"}:
                offenders.append(f"{path.name}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and sql.search(node.value):
                offenders.append(f"{path.name}:{node.lineno} SQL text")
    assert offenders == []


def test_the_store_knows_no_method() -> None:
    """The store speaks SQL for every method alike: it may import the shared method interface (`methods.base`),
    never a method's package, whose own records go through the generic record calls."""
    methods = {p.name for p in (PACKAGE / "methods").iterdir() if (p / "__init__.py").exists()}
    assert {"matrix", "stable_alignment", "cai"} <= methods  # the scan sees the method packages
    problems = [f"{module} imports {name}" for module, imported in _modules().items() if _within(module, SQL_OWNER)
                for name in sorted(imported) for method in methods if _within(name, f"matrix_assets.methods.{method}")]
    assert not problems, "\n".join(problems)
