"""`python -m vlm_sparsify.fidelity RUN --plot PATH`: the fidelity report as one figure.

Left: FVU of each layer's prediction in the replacement's own stream, overall and per token
region. Middle: the FVU of the MLP outputs summed over layers 0..T (how the errors add up in the
residual stream) with the errors' coherence on a second axis (1: uncorrelated errors). Right:
top-1 agreement with the original model and KL, overall and per region.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REGION_COLORS = {"all": "#264653", "image": "#2a9d8f", "prompt": "#e9c46a", "answer": "#e76f51"}


def _series(values: dict[str, float | None]) -> tuple[list[int], list[float]]:
    """Layer positions and values of a {hookpoint: value} mapping, skipping missing values."""
    points = [(i, v) for i, v in enumerate(values.values()) if v is not None]
    return [i for i, _ in points], [v for _, v in points]


def plot_fidelity(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    regions = list(result["fvu_by_region"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    ax = axes[0]
    for name in ("all", *regions):
        values = result["fvu"] if name == "all" else result["fvu_by_region"][name]
        ax.plot(*_series(values), marker="o", ms=3, label=name, color=REGION_COLORS.get(name))
    ax.set(xlabel="layer (hookpoint order)", ylabel="FVU", title="FVU per layer")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    ax = axes[1]
    ax.plot(*_series(result["fvu_cumulative"]), marker="o", ms=3, color="#264653")
    ax.set(xlabel="layer T", ylabel="FVU of layers 0..T summed", title="errors in the stream")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    coherence = ax.twinx()
    coherence.plot(*_series(result["error_coherence"]), ls="--", color="#e76f51")
    coherence.axhline(1.0, color="#e76f51", lw=0.6, alpha=0.5)
    coherence.set_ylabel("error coherence (dashed)", color="#e76f51")

    ax = axes[2]
    names = ["all", *regions]
    top1 = [result["top1_agreement"], *result["top1_agreement_by_region"].values()]
    kl = [result["kl"], *result["kl_by_region"].values()]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [100 * (v or 0) for v in top1], width=0.4, color="#264653")
    ax.set(ylabel="top-1 agreement %", ylim=(0, 100), title=f"{result['mode']} vs the original")
    ax.set_xticks(list(x), names)
    ax.grid(alpha=0.3, axis="y")
    twin = ax.twinx()
    twin.bar([i + 0.2 for i in x], [v or 0 for v in kl], width=0.4, color="#e76f51")
    twin.set_ylabel("KL (nats / token)", color="#e76f51")
    fig.suptitle(f"{result.get('run', '')}: {result['examples']} held-out examples", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
