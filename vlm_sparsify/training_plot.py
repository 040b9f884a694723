"""`training.png` beside every checkpoint: how the coders are learning, at a glance.

For researchers without Weights & Biases (or offline, as the default run). Left: FVU per
hookpoint over the steps, smoothed with a moving average over ~5% of the steps (raw FVU jumps
from batch to batch), layers coloured from early (dark) to late (light). Middle: per hookpoint,
the recent FVU and the share of dead latents (the `summary.json` table). Right, for an end-to-end
run: its KL / CE loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Moving average along the first axis over the trailing `window` steps (shorter at the
    start), so the curve starts at the first step."""
    if window <= 1 or len(values) == 0:
        return values
    cumulative = np.cumsum(values, axis=0)
    out = cumulative.copy()
    out[window:] = cumulative[window:] - cumulative[:-window]
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return out / counts.reshape(-1, *([1] * (values.ndim - 1)))


def plot_training(
    summary: list[dict[str, Any]],
    fvu_history: list[list[float]],
    loss_history: list[float],
    path: Path,
    loss_name: str = "",
) -> Path | None:
    """Write the figure to `path` (None: no step yet). `summary`: `Trainer.summary()` rows."""
    if not fvu_history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm
    from matplotlib.colors import BoundaryNorm, ListedColormap

    n = len(summary)
    fvu = np.asarray(fvu_history)
    steps = np.arange(1, len(fvu) + 1)
    window = max(1, len(fvu) // 20)
    panels = 3 if loss_history else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels + 1.0, 3.6))
    colors = cm.viridis(np.linspace(0, 0.9, n))

    ax = axes[0]
    curves = smooth(fvu, window)
    for i in range(n):
        ax.plot(steps, curves[:, i], color=colors[i], linewidth=1.2)
    top = float(np.percentile(curves, 99))
    ax.set_ylim(0, max(top * 1.05, 1e-3))  # the first steps' spikes do not flatten the rest
    ax.set(xlabel="step", ylabel="FVU", title=f"FVU per hookpoint (moving average of {window})")
    ax.grid(alpha=0.3)
    norm = BoundaryNorm(np.arange(-0.5, n + 0.5), n)
    colorbar = fig.colorbar(cm.ScalarMappable(norm, ListedColormap(colors)), ax=ax, pad=0.02)
    colorbar.set_ticks(range(0, n, max(1, n // 8)))
    colorbar.set_label("hookpoint (model order)")

    ax = axes[1]
    x = np.arange(n)
    ax.bar(x - 0.2, [row["fvu"] for row in summary], width=0.4, color="#264653", label="FVU")
    ax.set(xlabel="hookpoint (model order)", ylabel="recent FVU", title="per hookpoint")
    dead = ax.twinx()
    dead.bar(x + 0.2, [row["dead_pct"] for row in summary], width=0.4, color="#e76f51")
    dead.set_ylabel("dead latents %", color="#e76f51")
    dead.set_ylim(0, 100)
    ax.set_xticks(x[:: max(1, n // 8)])
    ax.grid(alpha=0.3, axis="y")

    if loss_history:
        ax = axes[2]
        ax.plot(np.arange(1, len(loss_history) + 1), smooth(np.asarray(loss_history), window))
        ax.set(xlabel="step", ylabel=loss_name.upper(), title=f"end-to-end {loss_name.upper()}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_trainer(trainer: Any, folder: Path, summary: list[dict[str, Any]]) -> Path | None:
    """`training.png` of `trainer` in `folder`."""
    state = trainer.state
    loss_name = trainer.cfg.loss_fn if state.loss_history else ""
    return plot_training(
        summary, state.fvu_history, state.loss_history, folder / "training.png", loss_name
    )
