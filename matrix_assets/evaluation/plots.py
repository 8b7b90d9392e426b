"""Matplotlib charts for base-vs-tuned evaluation reports.

matplotlib is imported lazily inside each function, so importing this module is
cheap. Figures are rendered with the non-interactive Agg backend by attaching a
``FigureCanvasAgg`` to a standalone ``matplotlib.figure.Figure``; pyplot and the
process-wide backend are never touched, so this is safe in workers/threads and
does not interfere with other matplotlib users in the same process.

All functions create the parent directory of ``path``, save a PNG at
:data:`DEFAULT_DPI` and return the path as a :class:`~pathlib.Path`. The PNG's
pixel size is ``figsize * dpi`` (no tight bounding box), so it is predictable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matrix_assets.evaluation.stats import Rate as Estimate  # anything with value, ci_low, ci_high, n

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["DEFAULT_DPI", "plot_base_vs_tuned", "plot_per_category", "plot_loss_curve"]

DEFAULT_DPI: int = 120


# --------------------------------------------------------------------------- helpers


def _new_figure(figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    return fig, ax


def _save(fig: Figure, path: str | os.PathLike[str], dpi: int) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    return out


def _isnan(x: float) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _labels_in_order(groups: Mapping[str, Mapping[str, Estimate]]) -> list[str]:
    """Inner keys (model labels) in order of first appearance."""
    seen: dict[str, None] = {}
    for inner in groups.values():
        for label in inner:
            seen.setdefault(label, None)
    return list(seen)


def _draw_bars(
    ax: Axes,
    groups: Mapping[str, Mapping[str, Estimate]],
    labels: Sequence[str],
    *,
    horizontal: bool,
    pct: bool,
) -> None:
    """Draw one bar per (group, label) with CI error bars and value annotations.

    A label missing from a group leaves a gap; a NaN estimate is an empty slot
    annotated ``n/a``; a NaN CI bound draws no error bar on that side.
    """
    import numpy as np

    n_groups = len(groups)
    centres = np.arange(n_groups, dtype=float)
    thickness = 0.8 / len(labels)
    err_kw = {"fmt": "none", "ecolor": "0.2", "elinewidth": 1.0, "capsize": 3}
    for i, (label, color) in enumerate(zip(labels, _colors(len(labels)))):
        pos, vals, lo_err, hi_err, na_pos = [], [], [], [], []
        for j, inner in enumerate(groups.values()):
            est = inner.get(label)
            p = float(centres[j] - 0.4 + thickness * (i + 0.5))
            if est is None:
                continue
            if _isnan(est.value):
                na_pos.append(p)
                continue
            pos.append(p)
            vals.append(est.value)
            lo_err.append(0.0 if _isnan(est.ci_low) else max(0.0, est.value - est.ci_low))
            hi_err.append(0.0 if _isnan(est.ci_high) else max(0.0, est.ci_high - est.value))

        if horizontal:
            ax.barh(pos, vals, thickness, label=label, color=color)
            if pos:
                ax.errorbar(vals, pos, xerr=[lo_err, hi_err], **err_kw)
        else:
            ax.bar(pos, vals, thickness, label=label, color=color)
            if pos:
                ax.errorbar(pos, vals, yerr=[lo_err, hi_err], **err_kw)

        texts = [(p, v + up, f"{100 * v:.0f}%" if pct else f"{v:.2f}")
                 for p, v, up in zip(pos, vals, hi_err)]  # fmt: skip
        texts += [(p, 0.0, "n/a") for p in na_pos]
        for p, tip, text in texts:
            if horizontal:
                ax.annotate(text, (tip, p), xytext=(3, 0), textcoords="offset points",
                            ha="left", va="center", fontsize=8)  # fmt: skip
            else:
                ax.annotate(text, (p, tip), xytext=(0, 3), textcoords="offset points",
                            ha="center", va="bottom", fontsize=8)  # fmt: skip

    # Fix the category axis so empty slots (missing / n/a) keep their place.
    if horizontal:
        ax.set_ylim(-0.5, n_groups - 0.5)
    else:
        ax.set_xlim(-0.5, n_groups - 0.5)


def _legend(fig: Figure, n_labels: int) -> None:
    fig.legend(loc="outside lower center", ncols=min(n_labels, 6), frameon=False)


def _unit_interval(groups: Mapping[str, Mapping[str, Estimate]]) -> bool:
    """True when every finite value/bound lies in [0, 1] (rates / shares)."""
    vals = [
        x
        for inner in groups.values()
        for est in inner.values()
        for x in (est.value, est.ci_low, est.ci_high)
        if not _isnan(x)
    ]
    return bool(vals) and all(0.0 <= x <= 1.0 for x in vals)


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, fontsize=14)
    ax.set_xticks([])
    ax.set_yticks([])


# --------------------------------------------------------------------------- public


def plot_base_vs_tuned(
    summary: Mapping[str, Mapping[str, Estimate]],
    path: str | os.PathLike[str],
    title: str,
    *,
    pct: bool = False,
    ylabel: str = "",
    figsize: tuple[float, float] | None = None,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Grouped vertical bar chart: one group per metric, one bar per model label.

    ``summary`` maps metric name -> {model label -> :class:`Estimate`}, e.g.
    ``{"refusal rate": {"base": e1, "tuned": e2}, ...}``. Bars show ``value`` with
    asymmetric error bars from ``[ci_low, ci_high]`` and the value written above
    each bar (as a percentage with ``pct``). A missing label in a group leaves a
    gap; a NaN estimate is drawn as an empty bar annotated ``n/a``. When all
    numbers lie in ``[0, 1]`` the y axis is fixed to ``[0, 1.1]``.

    Default ``figsize`` is ``(max(6, 1.8 * n_metrics + 2), 4.5)`` inches.
    """
    if figsize is None:
        figsize = (max(6.0, 1.8 * len(summary) + 2.0), 4.5)
    return _grouped_bars(summary, path, title, ylabel, horizontal=False, pct=pct, figsize=figsize, dpi=dpi)


def plot_per_category(
    rows: Mapping[str, Mapping[str, Estimate]],
    path: str | os.PathLike[str],
    title: str,
    metric_label: str,
    *,
    pct: bool = False,
    figsize: tuple[float, float] | None = None,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Horizontal grouped bar chart of one metric per category.

    ``rows`` maps category -> {model label -> :class:`Estimate`}. Categories are
    listed top-to-bottom in the mapping's order, one bar per model label with CI
    error bars and the value written at the end of each bar. ``metric_label``
    labels the x axis. Default ``figsize`` is
    ``(8, max(3, 0.35 * n_categories * n_labels + 1.5))`` inches.
    """
    if figsize is None:
        figsize = (8.0, max(3.0, 0.35 * len(rows) * max(1, len(_labels_in_order(rows))) + 1.5))
    return _grouped_bars(rows, path, title, metric_label, horizontal=True, pct=pct, figsize=figsize, dpi=dpi)


def _grouped_bars(groups: Mapping[str, Mapping[str, Estimate]], path: str | os.PathLike[str], title: str,
                  value_label: str, *, horizontal: bool, pct: bool, figsize: tuple[float, float], dpi: int) -> Path:
    """One group of bars per key of `groups` (metrics side by side, or categories top to bottom), one bar per
    model label; the value axis fixed to [0, 1.1] (1.15 lying down) when every number is a share."""
    import numpy as np

    names, labels = list(groups), _labels_in_order(groups)
    fig, ax = _new_figure(figsize)
    ax.set_title(title)
    if not names or not labels:
        _no_data(ax)
        return _save(fig, path, dpi)

    positions = np.arange(len(names), dtype=float)
    _draw_bars(ax, groups, labels, horizontal=horizontal, pct=pct)
    value_axis = ax.xaxis if horizontal else ax.yaxis
    if horizontal:
        ax.set_yticks(positions, names)
        ax.invert_yaxis()  # first category on top
    else:
        ax.set_xticks(positions, names)
    if _unit_interval(groups):
        (ax.set_xlim if horizontal else ax.set_ylim)(0.0, 1.15 if horizontal else 1.1)
        if pct:
            from matplotlib.ticker import PercentFormatter

            value_axis.set_major_formatter(PercentFormatter(xmax=1.0))
    else:
        ax.margins(**{"x" if horizontal else "y": 0.15})
    if value_label:
        (ax.set_xlabel if horizontal else ax.set_ylabel)(value_label)
    ax.grid(axis="x" if horizontal else "y", alpha=0.3)
    ax.set_axisbelow(True)
    _legend(fig, len(labels))
    return _save(fig, path, dpi)


def plot_loss_curve(
    steps: Sequence[int],
    losses: Sequence[float],
    path: str | os.PathLike[str],
    *,
    title: str = "Training loss",
    smooth_window: int | None = None,
    figsize: tuple[float, float] = (7.0, 4.0),
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Line plot of training loss against step.

    Raw losses are drawn as a thin line with markers; when there are at least 20
    points (or ``smooth_window`` is given and > 1) a centred moving average is
    overlaid. Non-finite losses are skipped by the smoothing and leave gaps in the
    raw line. Empty input writes a "no data" figure. Raises ``ValueError`` if
    ``steps`` and ``losses`` differ in length.
    """
    import numpy as np

    s = np.asarray(list(steps), dtype=float)
    v = np.asarray(list(losses), dtype=float)
    if s.shape != v.shape:
        raise ValueError(f"steps and losses differ in length: {s.size} vs {v.size}")

    fig, ax = _new_figure(figsize)
    ax.set_title(title)
    if s.size == 0:
        _no_data(ax)
        return _save(fig, path, dpi)

    ax.plot(s, v, lw=1.0, marker="o" if s.size <= 50 else None, ms=3, alpha=0.6, label="loss")
    window = smooth_window if smooth_window is not None else (max(2, s.size // 10) if s.size >= 20 else 0)
    if window and window > 1 and s.size >= window:
        finite = np.isfinite(v)
        vv = np.where(finite, v, 0.0)
        kernel = np.ones(window)
        num = np.convolve(vv, kernel, mode="same")
        den = np.convolve(finite.astype(float), kernel, mode="same")
        smooth = np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)
        ax.plot(s, smooth, lw=2.0, label=f"moving avg ({window})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", frameon=False)
    return _save(fig, path, dpi)
