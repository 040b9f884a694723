"""`python -m benchmarks BENCH plot --out DIR`: PNG charts of `DIR/features.json`.

Writes to `DIR/plots/`: top_features.png (the best selected features by the key analyze selected them on),
features_per_layer.png, activation_heatmap.png (GOOD vs BAD frequency and activation of the
selected features), frequency_ratios.png (log scale) and, from `DIR/feature_stats.npz`,
volcano.png (frequency ratio against Fisher p-value for every feature that fires).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from benchmarks import outputs
from benchmarks.stages import parse_stage
from vlm_sparsify.files import read_json

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from numpy.typing import ArrayLike

COLORS = {"good": "#2a9d8f", "bad": "#e76f51"}
SCORE = {"good": "goodness_score", "bad": "badness_score"}


@dataclass
class PlotConfig:
    """PNG charts of features.json into OUT/plots/."""

    out: str
    """Output folder of the benchmark run (holds features.json)."""
    top: int = 20
    """Features shown per direction in the bar charts and the heatmap."""
    dpi: int = 120
    """Resolution of the PNGs."""


def main(argv: list[str], benchmark: str) -> None:
    config = parse_stage(argv, benchmark, "plot", PlotConfig)
    if config.top < 1:  # a negative one would slice from the end of the lists
        raise ValueError(f"--top {config.top}: give a positive number of features")
    if config.dpi < 1:
        raise ValueError(f"--dpi {config.dpi}: give a positive resolution, e.g. 120")
    out = Path(config.out)
    source = out / outputs.FEATURES
    if not source.exists():
        raise FileNotFoundError(f"missing {source}: run `analyze` first")
    result = read_json(source, keys=("features", "total_good_samples", "total_bad_samples"))
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    title = plot_title(result, benchmark)
    written = [
        plot_top_features(result, plots / "top_features.png", title, config.top, config.dpi),
        plot_features_per_layer(result, plots / "features_per_layer.png", title, config.dpi),
        plot_activation_heatmap(
            result, plots / "activation_heatmap.png", title, config.top, config.dpi
        ),
        plot_frequency_ratios(
            result, plots / "frequency_ratios.png", title, config.top, config.dpi
        ),
    ]
    stats = out / outputs.FEATURE_STATS
    if stats.exists():
        written.append(
            plot_volcano(result, np.load(stats), plots / "volcano.png", title, config.dpi)
        )
    print(f"plot: {len(written)} charts -> {plots}")


def plot_title(result: dict, benchmark: str) -> str:
    """Dataset, analysed region and the GOOD / BAD train samples behind every statistic."""
    region = result.get("parameters", {}).get("region", "?")
    good, bad = result["total_good_samples"], result["total_bad_samples"]
    return f"{result.get('dataset', benchmark)} [region {region}, {good} GOOD / {bad} BAD]"


def feature_label(feature: dict) -> str:
    return f"L{feature['layer']}/F{feature['feature_idx']}"


def bar_style(feature: dict, direction: str) -> dict:
    """The direction's colour always; significance as a black edge and no hatch, else hatched."""
    if feature.get("significant"):
        return {"color": COLORS[direction], "edgecolor": "black", "hatch": ""}
    return {"color": COLORS[direction], "edgecolor": "white", "hatch": "///"}


def _ranks_by_attribution(result: dict) -> bool:
    return result.get("parameters", {}).get("rank_by") == "attribution"


def selection_score(result: dict, feature: dict, direction: str) -> float:
    """What `analyze` selected the feature by: its goodness / badness score, or with `--rank-by
    attribution` attribution_good - attribution_bad (good) and its negative (bad)."""
    if _ranks_by_attribution(result):
        difference = feature["attribution_good"] - feature["attribution_bad"]
        return difference if direction == "good" else -difference
    return feature[SCORE[direction]]


def selection_label(result: dict, direction: str) -> str:
    if _ranks_by_attribution(result):
        first, second = ("good", "bad") if direction == "good" else ("bad", "good")
        return f"attribution_{first} - attribution_{second}"
    return SCORE[direction].replace("_", " ")


def _top(result: dict, direction: str, n: int) -> list[dict]:
    features = [f for f in result["features"] if f.get("direction", "good") == direction]
    return sorted(features, key=lambda f: -selection_score(result, f, direction))[:n]


def _directions(result: dict) -> list[str]:
    present = {f.get("direction", "good") for f in result["features"]}
    return [d for d in ("good", "bad") if d in present] or ["good"]


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend (files only, no display needed), imported when a
    chart is first drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Figure, path: Path, dpi: int) -> Path:
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return path


def plot_top_features(result: dict, path: Path, title: str, top: int, dpi: int) -> Path:
    directions = _directions(result)
    rows = max(len(_top(result, d, top)) for d in directions)
    if not rows:
        return _nothing_selected(result, f"{title}: top selected features", path, dpi)
    fig, axes = pyplot().subplots(
        1,
        len(directions),
        figsize=(6 * len(directions), 1.2 + 0.28 * max(rows, 3)),
        squeeze=False,
        layout="constrained",
    )
    for ax, direction in zip(axes[0], directions, strict=True):
        features = _top(result, direction, top)[::-1]
        labels = [feature_label(f) + (" *" if f.get("significant") else "") for f in features]
        bars = ax.barh(labels, [selection_score(result, f, direction) for f in features])
        for bar, feature in zip(bars, features, strict=True):
            style = bar_style(feature, direction)
            bar.set_facecolor(style["color"])
            bar.set_hatch(style["hatch"])
            bar.set_edgecolor(style["edgecolor"])
        ax.set_xlabel(selection_label(result, direction))
        significant = sum(bool(f.get("significant")) for f in features)
        ax.set_title(
            f"top {len(features)} {direction.upper()} features, {significant} significant\n"
            "(* and solid: significant at the FDR; hatched: not)",
            fontsize=10,
        )
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(f"{title}: features ranked as analyze selected them")
    return _save(fig, path, dpi)


def layer_counts(result: dict) -> tuple[list[int], dict[str, np.ndarray]]:
    """Every analysed layer (features.json's `layers`; in one written before analysis version 6,
    the layers of the selected features) and the selected features per layer of each direction,
    0 where none was selected."""
    layers = result.get("layers", sorted({f["layer"] for f in result["features"]}))
    counts = {}
    for direction in _directions(result):
        chosen = [f["layer"] for f in result["features"] if f.get("direction", "good") == direction]
        counts[direction] = np.array([chosen.count(layer) for layer in layers])
    return layers, counts


def plot_features_per_layer(result: dict, path: Path, title: str, dpi: int) -> Path:
    layers, counts = layer_counts(result)
    fig, ax = pyplot().subplots(figsize=(max(6.0, 0.3 * len(layers) + 2), 4))
    bottom = np.zeros(len(layers))
    for direction, count in counts.items():
        ax.bar([str(layer) for layer in layers], count, bottom=bottom, color=COLORS[direction],
               label=f"{direction.upper()} features")  # fmt: skip
        bottom += count
    ax.set_xlabel("layer")
    ax.set_ylabel("selected features")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, max(bottom.max(initial=0.0), 1.0) * 1.25)  # headroom for the legend
    ax.set_title(f"{title}: selected features per layer ({len(result['features'])} in all)")
    if result["features"]:
        ax.legend(loc="upper right", ncol=2)
    else:
        _say_nothing_selected(ax, result)
    if len(layers) > 20:
        ax.tick_params(axis="x", labelsize=7, rotation=90)
    return _save(fig, path, dpi)


def _say_nothing_selected(ax: Any, result: dict) -> None:
    """A note across `ax` that the analysis selected no feature, and why if known."""
    parameters = result.get("parameters", {})
    reason = (
        f"\nnone is significant at FDR {parameters.get('fdr', 0.05):g} (--significant-only)"
        if parameters.get("significant_only")
        else ""
    )
    ax.text(0.5, 0.5, f"no feature selected{reason}", transform=ax.transAxes,
            ha="center", va="center")  # fmt: skip


def _nothing_selected(result: dict, title: str, path: Path, dpi: int) -> Path:
    """A chart of selected features when there are none: the note alone, no empty axes."""
    fig, ax = pyplot().subplots(figsize=(6, 2))
    ax.set_axis_off()
    _say_nothing_selected(ax, result)
    ax.set_title(title)
    return _save(fig, path, dpi)


def heatmap_cells(features: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """[n, 2] GOOD / BAD firing frequencies and mean activations when firing; the mean is NaN
    where the feature never fires in the group (undefined, not an activation of 0)."""
    freq = np.array([[f["good_freq"], f["bad_freq"]] for f in features]).reshape(-1, 2)
    act = np.array([[f["good_avg_activation"], f["bad_avg_activation"]] for f in features])
    return freq, np.where(freq > 0, act.reshape(-1, 2), np.nan)


def plot_activation_heatmap(result: dict, path: Path, title: str, top: int, dpi: int) -> Path:
    features = [f for d in _directions(result) for f in _top(result, d, top)]
    if not features:
        return _nothing_selected(result, f"{title}: GOOD vs BAD samples", path, dpi)
    labels = [f"{feature_label(f)} ({f.get('direction', 'good')})" for f in features]
    freq, act = heatmap_cells(features)
    act_max = max(np.nanmax(act, initial=0.0), 1e-9)
    fig, axes = pyplot().subplots(
        1, 2, figsize=(8, 1.5 + 0.3 * max(len(features), 3)), layout="constrained"
    )
    panels = (
        (freq, "firing frequency (share of samples)", "Blues", 0.0, 1.0),
        (act, "mean activation when firing (-: never fires)", "Oranges", 0.0, act_max),
    )
    for ax, (data, name, cmap, vmin, vmax) in zip(axes, panels, strict=True):
        image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_xticks([0, 1], ["GOOD", "BAD"])
        ax.set_yticks(range(len(labels)), labels if ax is axes[0] else [""] * len(labels))
        ax.tick_params(axis="y", labelsize=8)
        ax.set_title(name, fontsize=10)
        for (row, col), value in np.ndenumerate(data):
            dark = value > vmin + 0.6 * (vmax - vmin)
            text = "-" if np.isnan(value) else f"{value:.2g}"
            ax.text(col, row, text, ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")  # fmt: skip
        fig.colorbar(image, ax=ax, fraction=0.08)
    fig.suptitle(f"{title}: GOOD vs BAD samples, top selected features")
    return _save(fig, path, dpi)


def plot_frequency_ratios(result: dict, path: Path, title: str, top: int, dpi: int) -> Path:
    eps = result.get("parameters", {}).get("eps", 0.01)
    features = [f for d in _directions(result) for f in _top(result, d, top)]
    if not features:
        return _nothing_selected(result, f"{title}: firing frequency ratio", path, dpi)
    # eps on both sides keeps features that never fire in one group finite and symmetric
    ratios = 2.0 ** frequency_log_ratio(
        [f["good_freq"] for f in features], [f["bad_freq"] for f in features], eps
    )
    order = np.argsort(ratios, kind="stable")
    fig, ax = pyplot().subplots(figsize=(7, 1.2 + 0.28 * max(len(features), 3)))
    ax.barh(
        [feature_label(features[i]) for i in order],
        [ratios[i] for i in order],
        color=[COLORS[features[i].get("direction", "good")] for i in order],
    )
    ax.set_xscale("log")
    decades = np.log10(max(ratios, default=10.0) / min(ratios, default=0.1))
    subs = (1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel(
        f"(good_freq + eps) / (bad_freq + eps), eps = {eps:g}   (log scale; 1 = no difference)"
    )
    ax.set_title(f"{title}: firing frequency ratio of the selected features")
    ax.tick_params(axis="y", labelsize=8)
    handles = [pyplot().Rectangle((0, 0), 1, 1, color=COLORS[d]) for d in _directions(result)]
    ax.legend(handles, [f"{d.upper()} feature" for d in _directions(result)], loc="lower right")
    return _save(fig, path, dpi)


def frequency_log_ratio(good_freq: ArrayLike, bad_freq: ArrayLike, eps: float) -> np.ndarray:
    """log2((good_freq + eps) / (bad_freq + eps)): the analysis's eps on both sides keeps the
    sign of good_freq - bad_freq and bounds it by log2((1 + eps) / eps); frequency_ratios.png's
    bars and volcano.png's x are this ratio."""
    good_freq, bad_freq = np.asarray(good_freq, float), np.asarray(bad_freq, float)
    return np.log2((good_freq + eps) / (bad_freq + eps))


def plot_volcano(
    result: dict, stats: np.lib.npyio.NpzFile, path: Path, title: str, dpi: int
) -> Path:
    fires = (stats["good_freq"] > 0) | (stats["bad_freq"] > 0)
    eps = result.get("parameters", {}).get("eps", 0.01)
    log_ratio = frequency_log_ratio(stats["good_freq"][fires], stats["bad_freq"][fires], eps)
    p = np.maximum(stats["p_value"][fires], 1e-300)
    significant = stats["q_value"][fires] <= result["parameters"].get("fdr", 0.05)
    fig, ax = pyplot().subplots(figsize=(7, 5))
    ax.scatter(log_ratio[~significant], -np.log10(p[~significant]), s=4, color="#b0b0b0",
               label=f"not significant ({(~significant).sum()})", rasterized=True)  # fmt: skip
    ax.scatter(log_ratio[significant], -np.log10(p[significant]), s=8, color="#264653",
               label=f"significant at FDR ({significant.sum()})")  # fmt: skip
    for direction in _directions(result):
        chosen = [f for f in result["features"] if f.get("direction", "good") == direction]
        x = frequency_log_ratio(
            [f["good_freq"] for f in chosen], [f["bad_freq"] for f in chosen], eps
        )
        y = [-np.log10(max(f["p_value"], 1e-300)) for f in chosen]
        ax.scatter(x, y, s=28, facecolors="none", edgecolors=COLORS[direction],
                   label=f"selected {direction.upper()} ({len(chosen)})")  # fmt: skip
    ax.axvline(0.0, color="black", linewidth=0.6)
    ax.set_xlabel(
        "log2 firing frequency ratio, GOOD / BAD\n"
        f"(both rates + eps = {eps:g}, as frequency_ratios.png; sign = GOOD - BAD)"
    )
    ax.set_ylabel("-log10 p (Fisher's exact test)")
    ax.set_title(f"{title}: {fires.sum()} features that fire")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _save(fig, path, dpi)
