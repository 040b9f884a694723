"""Feature influence statistics: pure, vectorised functions on arrays.

Shapes: S source layers, L latents per layer, G sample groups (0 = GOOD, 1 = BAD).
Definitions (docs/benchmarks.md, "Influence analysis"):

- freq: share of the group's samples where the feature fires (activation > 0) at least once in
  the region (stored zero-valued top-k slots are not firing);
- avg_activation: mean, over the samples where it fires, of the sample's mean activation over
  its firing tokens (each sample weighs the same, however long its region is);
- goodness = good_freq / (bad_freq + eps) * good_avg; badness = bad_freq / (good_freq + eps) * bad_avg;
- frequency_ratio = good_freq / (bad_freq + eps); activation_ratio = good_avg / (bad_avg + eps);
- p_value: two-sided Fisher's exact test on [[good fired, good not], [bad fired, bad not]];
  q_value: Benjamini-Hochberg adjusted p-values over the features that fire in at least one
  analysed sample (a feature that never fires has p = 1 whatever the labels; it is not tested and
  gets q = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln

GOOD, BAD = 0, 1


@dataclass
class FiringCounts:
    """Sufficient statistics of the firing of every (layer, latent) per group."""

    n_samples: np.ndarray
    """[G] samples per group."""
    fired: np.ndarray
    """[G, S, L] samples where the feature fires at least once in the region."""
    act_sum: np.ndarray
    """[G, S, L] sum over those samples of the per-sample mean activation."""

    @classmethod
    def zeros(cls, num_layers: int, num_latents: int, num_groups: int = 2) -> FiringCounts:
        return cls(
            np.zeros(num_groups, dtype=np.int64),
            np.zeros((num_groups, num_layers, num_latents), dtype=np.int64),
            np.zeros((num_groups, num_layers, num_latents), dtype=np.float64),
        )

    def add(
        self,
        indices: np.ndarray,
        values: np.ndarray,
        row_sample: np.ndarray,
        sample_group: np.ndarray,
    ) -> None:
        """Add a chunk of C samples.

        indices, values: [R, S, k] active latents and their activations of the chunk's rows; only
        values > 0 count: a TopK coder (ReLU, then top-k) stores zero-valued slots with arbitrary
        indices when fewer than k pre-activations are positive, and those latents did not fire;
        row_sample: [R] which sample (0..C-1) each row belongs to;
        sample_group: [C] the group of each sample (samples with no row still count).
        Works layer by layer on dense C x L bins: keep C x L near 10^5 so they stay in cache.
        """
        num_groups, num_layers, num_latents = self.fired.shape
        chunk = len(sample_group)
        self.n_samples += np.bincount(sample_group, minlength=num_groups)
        row_offset = (row_sample.astype(np.int64) * num_latents)[:, None]
        membership = (sample_group[None, :] == np.arange(num_groups)[:, None]).astype(np.float64)
        for layer in range(num_layers):
            layer_values = values[:, layer, :]
            positive = layer_values > 0
            keys = (indices[:, layer, :] + row_offset)[positive]
            bins = chunk * num_latents
            tokens = np.bincount(keys, minlength=bins).reshape(chunk, num_latents)
            sums = np.bincount(keys, weights=layer_values[positive], minlength=bins)
            means = sums.reshape(chunk, num_latents) / np.maximum(tokens, 1)
            # group sums over the chunk's samples as [G, C] @ [C, L] products
            self.fired[:, layer] += np.rint(membership @ (tokens > 0)).astype(np.int64)
            self.act_sum[:, layer] += membership @ means


def feature_scores(counts: FiringCounts, eps: float) -> dict[str, np.ndarray]:
    """Frequencies, activations, goodness / badness and their ratios, each [S, L]."""
    n_good, n_bad = (max(int(n), 1) for n in counts.n_samples[:2])
    good_fired, bad_fired = counts.fired[GOOD], counts.fired[BAD]
    good_freq, bad_freq = good_fired / n_good, bad_fired / n_bad
    good_avg = np.divide(
        counts.act_sum[GOOD], good_fired, out=np.zeros(good_fired.shape), where=good_fired > 0
    )
    bad_avg = np.divide(
        counts.act_sum[BAD], bad_fired, out=np.zeros(bad_fired.shape), where=bad_fired > 0
    )
    frequency_ratio = good_freq / (bad_freq + eps)
    return {
        "good_freq": good_freq,
        "bad_freq": bad_freq,
        "good_avg_activation": good_avg,
        "bad_avg_activation": bad_avg,
        "goodness_score": frequency_ratio * good_avg,
        "badness_score": bad_freq / (good_freq + eps) * bad_avg,
        "frequency_ratio": frequency_ratio,
        "activation_ratio": good_avg / (bad_avg + eps),
    }


def fisher_exact(a: np.ndarray, n1: int, b: np.ndarray, n2: int) -> np.ndarray:
    """Two-sided Fisher's exact p-values of the tables [[a, n1 - a], [b, n2 - b]].

    Equal to `scipy.stats.fisher_exact` (same relative tolerance 1e-7 on table probabilities),
    vectorised: the group sizes are shared, so the null distribution depends only on a + b;
    it is computed once per distinct a + b.
    """
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    total = n1 + n2
    fired = a + b
    p_values = np.ones(a.shape)
    for m in np.unique(fired):
        lo, hi = max(0, m - n2), min(m, n1)
        x = np.arange(lo, hi + 1)
        log_pmf = _log_comb(m, x) + _log_comb(total - m, n1 - x) - _log_comb(total, n1)
        pmf = np.exp(log_pmf - log_pmf.max())
        pmf /= pmf.sum()
        ordered = np.sort(pmf)
        cumulative = np.cumsum(ordered)
        at = np.searchsorted(ordered, pmf * (1 + 1e-7), side="right") - 1
        table_p = np.minimum(cumulative[at], 1.0)
        members = fired == m
        p_values[members] = table_p[a[members] - lo]
    return p_values


def _log_comb(n: int | np.ndarray, r: int | np.ndarray) -> np.ndarray:
    return gammaln(np.add(n, 1)) - gammaln(np.add(r, 1)) - gammaln(np.subtract(n, r) + 1)


def benjamini_hochberg(p_values: np.ndarray, tested: np.ndarray | None = None) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), same shape as `p_values`.

    With `tested` (a bool mask of that shape) only those p-values form the family (m = their
    count); the others get q = 1.
    """
    if tested is not None:
        q_tested = np.ones(np.shape(p_values))
        mask = np.asarray(tested, dtype=bool)
        q_tested[mask] = benjamini_hochberg(np.asarray(p_values)[mask])
        return q_tested
    flat = np.asarray(p_values, dtype=np.float64).ravel()
    m = flat.size
    order = np.argsort(flat, kind="stable")
    scaled = flat[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(scaled[::-1])[::-1]
    q_values = np.empty(m)
    q_values[order] = np.minimum(adjusted, 1.0)
    return q_values.reshape(np.shape(p_values))


def round_robin(scores: np.ndarray, target: int, min_per_layer: int = 0) -> list[tuple[int, int]]:
    """Pick (layer, latent) pairs: each layer's best remaining candidate in turn.

    scores: [S, L]; NaN marks a non-candidate. Round r gives every layer with more than r
    candidates its r-th best, the layers in order of that candidate's score (so the last,
    partial round goes to the layers whose next candidate is strongest, not to the first
    layers); rounds stop once `target` are picked, except that the first `min_per_layer` rounds
    always complete (so the minimum wins over the target). Hence layer counts differ by at most
    one while every layer still has candidates. Ties: lower index first (latents within a layer,
    layers within a round).
    """
    orders = []
    for layer_scores in scores:
        candidates = np.flatnonzero(~np.isnan(layer_scores))
        orders.append(candidates[np.argsort(-layer_scores[candidates], kind="stable")])
    selected: list[tuple[int, int]] = []
    for rank in range(max((len(order) for order in orders), default=0)):
        if len(selected) >= target and rank >= min_per_layer:
            break
        present = [layer for layer, order in enumerate(orders) if rank < len(order)]
        present.sort(key=lambda layer: -scores[layer, orders[layer][rank]])  # stable: ties by index
        for layer in present:
            if rank < min_per_layer or len(selected) < target:
                selected.append((layer, int(orders[layer][rank])))
    return selected


def group_means(
    sample: np.ndarray,
    layer: np.ndarray,
    latent: np.ndarray,
    value: np.ndarray,
    sample_group: np.ndarray,
    shape: tuple[int, int],
) -> np.ndarray:
    """[G, S, L] mean over each group's samples of a sparse per-(sample, layer, latent) value.

    sample_group[i] is the group of sample i (-1: not counted); absent entries count as 0.
    """
    num_groups = int(sample_group.max(initial=-1)) + 1
    num_groups = max(num_groups, 2)
    width = shape[0] * shape[1]
    group = sample_group[sample]
    kept = group >= 0
    keys = group[kept] * width + layer[kept] * shape[1] + latent[kept]
    sums = np.bincount(keys, weights=value[kept], minlength=num_groups * width)
    sizes = np.bincount(sample_group[sample_group >= 0], minlength=num_groups)
    return sums.reshape(num_groups, *shape) / np.maximum(sizes, 1)[:, None, None]
