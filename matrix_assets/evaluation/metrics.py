"""Metric helpers for base-vs-tuned evaluation.

Everything here is plain Python + numpy so it can be unit-tested without a GPU,
torch or Dagster.

* :class:`Estimate` - a point estimate with a confidence interval and sample size.
* :func:`bootstrap_mean` - percentile-bootstrap CI for the mean of a sample
  (use it on 0/1 indicators to get a rate, e.g. a refusal rate).
* :func:`pairwise_outcome` - combine the two order-swapped LLM-judge verdicts of a
  pairwise comparison into ``"win"`` / ``"tie"`` / ``"loss"`` for the tuned model.
* :func:`win_tie_loss` - shares of wins / ties / losses with bootstrap CIs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "OUTCOMES",
    "Estimate",
    "bootstrap_mean",
    "pairwise_outcome",
    "win_tie_loss",
]

#: The possible results of :func:`pairwise_outcome`, from the tuned model's view.
OUTCOMES: tuple[str, str, str] = ("win", "tie", "loss")

# Rows of bootstrap resamples drawn at once; bounds memory to ~chunk * n indices.
_MAX_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a confidence interval ``[ci_low, ci_high]`` over ``n`` items."""

    value: float
    ci_low: float
    ci_high: float
    n: int

    def format(self, pct: bool = False) -> str:
        """Render as ``"0.42 [0.30, 0.55] (n=40)"`` or, with ``pct``, ``"42% [30, 55] (n=40)"``.

        NaN values (e.g. an empty sample) render as ``"nan"``.
        """
        if pct:
            return (
                f"{_fmt(self.value, pct=True)}% "
                f"[{_fmt(self.ci_low, pct=True)}, {_fmt(self.ci_high, pct=True)}] (n={self.n})"
            )
        return f"{_fmt(self.value)} [{_fmt(self.ci_low)}, {_fmt(self.ci_high)}] (n={self.n})"

    def __str__(self) -> str:
        return self.format()


def _fmt(x: float, *, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    if pct:
        return f"{100.0 * x:.0f}"
    return f"{x:.2f}"


def bootstrap_mean(
    values: Sequence[float],
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Mean of ``values`` with a percentile-bootstrap confidence interval.

    Resamples ``values`` with replacement ``n_resamples`` times using
    ``numpy.random.default_rng(seed)`` (so results are deterministic for a given
    seed) and takes the ``(1-confidence)/2`` and ``(1+confidence)/2`` quantiles of
    the resampled means.

    Edge cases:

    * ``n == 0`` -> ``Estimate(nan, nan, nan, 0)``.
    * ``n == 1`` (or all values equal) -> the interval collapses to the value.

    Raises ``ValueError`` for a non-positive ``n_resamples``, a ``confidence``
    outside ``(0, 1)``, or non-finite values.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")

    arr = np.asarray(list(values), dtype=float).ravel()
    n = int(arr.size)
    if n == 0:
        nan = float("nan")
        return Estimate(nan, nan, nan, 0)
    if not np.all(np.isfinite(arr)):
        raise ValueError("bootstrap_mean: values must be finite numbers")

    mean = float(arr.mean())
    if n == 1 or float(np.ptp(arr)) == 0.0:
        # A single value, or all values identical: every resample has the same mean.
        return Estimate(mean, mean, mean, n)

    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_CHUNK_ELEMENTS // n)
    means = np.empty(n_resamples, dtype=float)
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = arr[idx].mean(axis=1)

    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return Estimate(mean, float(lo), float(hi), n)


_TUNED_FIRST = {"a": "tuned", "b": "base"}  # first order: A = tuned, B = base
_TUNED_SECOND = {"a": "base", "b": "tuned"}  # swapped order: A = base, B = tuned
_NO_PREFERENCE = {"tie", "unknown"}


def _preferred(verdict: str, mapping: dict[str, str]) -> str | None:
    if not isinstance(verdict, str):
        raise TypeError(f"judge verdict must be a string, got {type(verdict).__name__}")
    v = verdict.strip().lower()
    if v in mapping:
        return mapping[v]
    if v in _NO_PREFERENCE:
        return None
    raise ValueError(f"unexpected judge verdict {verdict!r}; expected 'A', 'B', 'tie' or 'unknown'")


def pairwise_outcome(first_order_winner: str, swapped_order_winner: str) -> str:
    """Combine two order-swapped pairwise judge verdicts into one outcome for the tuned model.

    The judge compares the tuned and the base answer twice, to cancel position bias:

    * first order: answer ``A`` = tuned, answer ``B`` = base;
    * swapped order: answer ``A`` = base, answer ``B`` = tuned.

    Each verdict is ``"A"``, ``"B"``, ``"tie"`` or ``"unknown"`` (judge output that
    could not be parsed); matching is case-insensitive and ignores surrounding
    whitespace. Any other value raises ``ValueError``.

    Returns

    * ``"win"``  - both verdicts prefer the tuned answer (``"A"`` then ``"B"``);
    * ``"loss"`` - both verdicts prefer the base answer (``"B"`` then ``"A"``);
    * ``"tie"``  - anything else: the verdicts disagree (including a judge that
      always picks the same position, e.g. ``"A"``/``"A"``), or at least one of
      them is ``"tie"``/``"unknown"``.

    Truth table (first, swapped -> outcome)::

        A,A -> tie   A,B -> win   A,tie/unknown -> tie
        B,A -> loss  B,B -> tie   B,tie/unknown -> tie
        tie/unknown, anything -> tie
    """
    first = _preferred(first_order_winner, _TUNED_FIRST)
    second = _preferred(swapped_order_winner, _TUNED_SECOND)
    if first is not None and first == second:
        return "win" if first == "tuned" else "loss"
    return "tie"


def win_tie_loss(
    outcomes: Sequence[str],
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Estimate]:
    """Shares of ``"win"``, ``"tie"`` and ``"loss"`` in ``outcomes`` with bootstrap CIs.

    Returns ``{"win": Estimate, "tie": Estimate, "loss": Estimate}``; each share is
    the bootstrap mean of the 0/1 indicator for that outcome (see
    :func:`bootstrap_mean` for the keyword arguments). The three point values sum
    to 1 for a non-empty input; an empty input gives NaN estimates with ``n=0``.
    Outcomes are matched case-insensitively; anything not in :data:`OUTCOMES`
    raises ``ValueError``.
    """
    normalized = [str(o).strip().lower() for o in outcomes]
    bad = sorted({o for o in normalized if o not in OUTCOMES})
    if bad:
        raise ValueError(f"unexpected outcomes {bad}; expected one of {OUTCOMES}")
    return {
        label: bootstrap_mean(
            [1.0 if o == label else 0.0 for o in normalized],
            n_resamples=n_resamples,
            confidence=confidence,
            seed=seed,
        )
        for label in OUTCOMES
    }
