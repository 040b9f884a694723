"""Paired bootstrap confidence intervals for a metric delta between two conditions.

Both conditions answer the same samples, so the samples are resampled together (one set of
indices for both), which keeps the pairing: the interval reflects the spread of the per-sample
differences, not of each condition's own scores. With `groups` (each sample's image) whole groups
are resampled (a cluster bootstrap): samples of one image are not independent, and resampling
them one by one would give too narrow an interval when a few images hold many samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FEW_GROUPS = 20
"""Below this many resampled groups (held-out images) percentile intervals are unreliable: too
narrow, and they move with the seed; steer and analyze warn."""


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
    groups: Sequence[str] | None = None,
) -> Delta:
    """Delta of the mean score, `treated - baseline`, and its percentile interval; `groups` (one
    key per sample, e.g. its image) resamples whole groups instead of samples."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (0.95: 95%), got {confidence}")
    base, other = np.asarray(baseline, dtype=np.float64), np.asarray(treated, dtype=np.float64)
    if base.shape != other.shape or base.ndim != 1:
        raise ValueError(f"paired scores need equal 1-D shapes, got {base.shape} and {other.shape}")
    if len(base) == 0:
        return Delta(0.0, 0.0, 0.0, 0)
    differences = other - base
    if groups is None:  # every sample its own group
        codes = np.arange(len(differences))
    else:
        if len(groups) != len(differences):
            raise ValueError(f"{len(groups)} group keys for {len(differences)} samples")
        first: dict[str, int] = {}  # groups numbered in order of first appearance
        codes = np.array([first.setdefault(str(g), len(first)) for g in groups])
    sums = np.bincount(codes, weights=differences)
    counts = np.bincount(codes).astype(np.float64)
    rng = np.random.default_rng(seed)
    resamples = rng.integers(0, len(sums), size=(n_resamples, len(sums)))
    means = sums[resamples].sum(axis=1) / counts[resamples].sum(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Delta(float(differences.mean()), float(low), float(high), len(differences))
