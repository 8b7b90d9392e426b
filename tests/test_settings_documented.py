"""Every `MATRIX_*` environment variable the package, its scripts or its Dagster instance reads is documented in
the README's variable table (a variable read but documented nowhere is a setting nobody can find)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LITERAL = re.compile(r"\bMATRIX_[A-Z0-9_]*[A-Z0-9]\b")
PREFIXED = re.compile(r"\{prefix\}([A-Z0-9_]+)")  # llm_from_env reads MATRIX_ and MATRIX_JUDGE_ + the same suffixes


def _sources() -> list[Path]:
    return [*(ROOT / "matrix_assets").rglob("*.py"), *(ROOT / "scripts").glob("*.sh"), ROOT / "dagster.yaml"]


def variables_read(paths: list[Path] | None = None) -> tuple[set[str], set[str]]:
    literal, suffixes = set(), set()
    for path in paths if paths is not None else _sources():
        text = path.read_text(encoding="utf-8")
        literal.update(LITERAL.findall(text))
        suffixes.update(PREFIXED.findall(text))
    return literal, suffixes


def documented() -> tuple[set[str], str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(MATRIX_[A-Z0-9_*]+)` \|(.*)$", readme, flags=re.MULTILINE)
    judge_row = next((rest for name, rest in rows if name == "MATRIX_JUDGE_*"), "")
    return {name for name, _ in rows}, judge_row


def test_every_matrix_variable_read_is_in_the_readme_table() -> None:
    literal, suffixes = variables_read()
    assert suffixes, "llm_from_env's prefixed variables were not found: the scan is broken"
    names, judge_row = documented()
    expected = (literal | {f"MATRIX_{s}" for s in suffixes}) - {"MATRIX_JUDGE"}
    missing = sorted(v for v in expected if v not in names and not v.startswith("MATRIX_JUDGE_"))
    assert not missing, f"read but not in the README's variable table: {missing}"
    judge_missing = sorted(s for s in suffixes if f"`{s}`" not in judge_row)
    assert not judge_missing, f"MATRIX_JUDGE_ suffixes not listed in the README's MATRIX_JUDGE_* row: {judge_missing}"


def test_the_scan_finds_a_variable_it_has_not_seen(tmp_path: Path) -> None:
    """The check can fail: a module reading an undocumented variable is caught."""
    module = tmp_path / "reader.py"
    module.write_text('import os\nos.environ.get("MATRIX_NOT_DOCUMENTED_ANYWHERE")\n', encoding="utf-8")
    literal, _ = variables_read([*_sources(), module])
    names, _ = documented()
    assert "MATRIX_NOT_DOCUMENTED_ANYWHERE" in literal - names
