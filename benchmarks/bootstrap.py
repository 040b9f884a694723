"""Paired bootstrap confidence intervals for a metric delta between two conditions.

Both conditions answer the same samples, so the samples are resampled together (one set of
indices for both), which keeps the pairing: the interval reflects the spread of the per-sample
differences, not of each condition's own scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Delta:
    """Mean of `treated - baseline` per-sample scores with a percentile bootstrap interval."""

    delta: float
    low: float
    high: float
    n: int

    def to_json(self) -> dict:
        return {"delta": self.delta, "ci_low": self.low, "ci_high": self.high, "n": self.n}


def paired_bootstrap(
    baseline: Sequence[float],
    treated: Sequence[float],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Delta:
    """Delta of the mean score, `treated - baseline`, and its percentile interval."""
    base, other = np.asarray(baseline, dtype=np.float64), np.asarray(treated, dtype=np.float64)
    if base.shape != other.shape or base.ndim != 1:
        raise ValueError(f"paired scores need equal 1-D shapes, got {base.shape} and {other.shape}")
    if len(base) == 0:
        return Delta(0.0, 0.0, 0.0, 0)
    differences = other - base
    rng = np.random.default_rng(seed)
    resamples = rng.integers(0, len(differences), size=(n_resamples, len(differences)))
    means = differences[resamples].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Delta(float(differences.mean()), float(low), float(high), len(differences))
