"""The evaluation's bar charts: metrics side by side, categories top to bottom, shares on a fixed axis."""

from __future__ import annotations

from pathlib import Path

import pytest

from matrix_assets.evaluation import plots
from matrix_assets.evaluation.stats import exact_rate


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list:
    figures: list = []
    real_save = plots._save

    def keep(fig, path, dpi):  # noqa: ANN001, ANN202
        figures.append(fig.axes[0])
        return real_save(fig, path, dpi)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


SHARES = {"complied": {"base": exact_rate(6, 10), "matrix": exact_rate(3, 10)},
          "refused safe": {"base": exact_rate(1, 10), "matrix": exact_rate(2, 10)}}


def test_metrics_stand_side_by_side_on_a_share_axis(tmp_path: Path, drawn: list) -> None:
    path = plots.plot_base_vs_tuned(SHARES, tmp_path / "bars.png", "base vs tuned", pct=True, ylabel="share")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = drawn[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["complied", "refused safe"]
    assert ax.get_ylim() == (0.0, 1.1) and ax.get_ylabel() == "share"
    assert len(ax.patches) == 4  # two models x two metrics


def test_categories_run_top_to_bottom(tmp_path: Path, drawn: list) -> None:
    plots.plot_per_category(SHARES, tmp_path / "cats.png", "per category", "complied")
    ax = drawn[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["complied", "refused safe"]
    assert ax.get_xlim() == (0.0, 1.15) and ax.get_xlabel() == "complied"
    assert ax.yaxis_inverted()  # the first category on top


def test_no_data_still_writes_a_figure(tmp_path: Path, drawn: list) -> None:
    assert plots.plot_per_category({}, tmp_path / "empty.png", "none", "x").exists()
    assert plots.plot_base_vs_tuned({}, tmp_path / "empty2.png", "none").exists()
    assert not drawn[0].patches
