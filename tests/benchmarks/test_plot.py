"""Plot stage: readable PNGs from an analysis with planted GOOD and BAD features."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.stages import analyze, plot
from benchmarks.store import FeatureStore, StoreMeta

LAYERS, LATENTS, K, ROWS = 6, 64, 4, 6


def write_planted_store(out, samples=200, seed=0):
    """Latent 5 + layer fires mostly in GOOD samples, latent 40 + layer mostly in BAD ones."""
    rng = np.random.default_rng(seed)
    hookpoints = [f"model.language_model.layers.{i}.mlp" for i in range(LAYERS)]
    store = FeatureStore(out / "store", StoreMeta(hookpoints, K, LATENTS))
    labels, batch = {"GOOD": [], "BAD": []}, []
    for i in range(samples):
        good = i % 2 == 0
        indices = np.stack([rng.permutation(np.arange(10, 40))[:K] for _ in range(ROWS * LAYERS)])
        indices = indices.reshape(ROWS, LAYERS, K)
        for layer in range(LAYERS):
            if rng.random() < (0.8 if good else 0.2):
                indices[-1, layer, 0] = 5 + layer
            if rng.random() < (0.15 if good else 0.7):
                indices[-2, layer, 0] = 40 + layer
        values = rng.gamma(2.0, 1.0, (ROWS, LAYERS, K)).astype(np.float32)
        regions = {"prompt": [(0, 2)], "response": [(2, ROWS)]}
        batch.append((f"s{i}", torch.from_numpy(indices), torch.from_numpy(values), regions))
        labels["GOOD" if good else "BAD"].append({"id": f"s{i}", "correct": good})
    store.append(batch)
    (out / "classification.json").write_text(json.dumps(labels))


def test_plots_are_valid_images(tmp_path):
    write_planted_store(tmp_path)
    analyze.main(["--out", str(tmp_path), "--target-features", "12"], benchmark="easyvqa")
    result = json.loads((tmp_path / "features.json").read_text())
    planted_good = {(f["layer"], f["feature_idx"]) for f in result["features"]
                    if f["direction"] == "good" and f["significant"]}  # fmt: skip
    assert {(layer, 5 + layer) for layer in range(LAYERS)} <= planted_good

    plot.main(["--out", str(tmp_path)], benchmark="easyvqa")
    names = {
        "top_features.png",
        "features_per_layer.png",
        "activation_heatmap.png",
        "frequency_ratios.png",
        "volcano.png",
    }
    assert {p.name for p in (tmp_path / "plots").iterdir()} == names
    for name in names:
        with Image.open(tmp_path / "plots" / name) as image:
            image.verify()
        with Image.open(tmp_path / "plots" / name) as image:
            width, height = image.size
            assert image.format == "PNG"
            assert 400 <= width <= 3000 and 300 <= height <= 3000, (name, image.size)
            # not a blank canvas
            assert np.asarray(image.convert("L")).std() > 10


def colour_share(path, hex_colour: str) -> float:
    """Share of the image's pixels within a few levels of `hex_colour`."""
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    return float((np.abs(pixels - rgb).max(axis=-1) <= 8).mean())


def test_top_features_keep_direction_colours_when_nothing_is_significant(tmp_path):
    write_planted_store(tmp_path, samples=40)
    analyze.main(["--out", str(tmp_path), "--target-features", "4"], benchmark="easyvqa")
    result = json.loads((tmp_path / "features.json").read_text())
    for feature in result["features"]:
        feature["significant"] = False
    path = plot.plot_top_features(result, tmp_path / "top.png", "t", top=4, dpi=60)
    assert colour_share(path, plot.COLORS["good"]) > 0.01
    assert colour_share(path, plot.COLORS["bad"]) > 0.01
    assert plot.plot_title(result, "x") == "easyvqa [region decision, 16 GOOD / 17 BAD]"


def test_a_truncated_output_file_is_named_in_one_line(tmp_path):
    from benchmarks.__main__ import run

    (tmp_path / "features.json").write_text('{"features": [')  # a stage killed mid-write
    with pytest.raises(SystemExit, match=r"features.json is not valid JSON"):
        run(["easyvqa", "plot", "--out", str(tmp_path)])


def test_plot_before_analyze_is_one_line_prefixed_like_every_stage(tmp_path):
    # "missing .../features.json: run `analyze` first" alone: the other stages say which
    # benchmark and stage spoke (`easyvqa map: missing ...`)
    from benchmarks.__main__ import run

    with pytest.raises(SystemExit, match=r"^easyvqa plot: missing .*features.json: run `analyze`"):
        run(["easyvqa", "plot", "--out", str(tmp_path)])


@pytest.mark.parametrize("top", ["0", "-3"])
def test_a_top_below_one_is_refused_before_anything_is_read(tmp_path, top):
    """`--top -3` drew all but the last 3 features of each direction, titled as the top ones."""
    from benchmarks.__main__ import run

    with pytest.raises(SystemExit, match=f"--top {top}: give a positive number"):
        run(["easyvqa", "plot", "--out", str(tmp_path), "--top", top])


def test_features_ranked_by_attribution_are_shown_by_the_attribution_difference():
    def feature(idx, direction, goodness, badness, attribution_good, attribution_bad):
        return {"layer": 0, "feature_idx": idx, "direction": direction,
                "goodness_score": goodness, "badness_score": badness,
                "attribution_good": attribution_good, "attribution_bad": attribution_bad}  # fmt: skip

    result = {
        "parameters": {"rank_by": "attribution"},
        "features": [
            feature(1, "good", 9.0, 1.0, 0.1, 0.0),
            feature(2, "good", 1.0, 9.0, 0.5, 0.0),  # selected by attribution, not goodness
            feature(3, "bad", 1.0, 9.0, 0.0, 0.1),
            feature(4, "bad", 9.0, 1.0, 0.0, 0.3),
        ],
    }
    assert [f["feature_idx"] for f in plot._top(result, "good", 1)] == [2]
    assert [f["feature_idx"] for f in plot._top(result, "bad", 2)] == [4, 3]
    assert plot.selection_score(result, result["features"][3], "bad") == pytest.approx(0.3)
    assert plot.selection_label(result, "bad") == "attribution_bad - attribution_good"
    result["parameters"]["rank_by"] = "goodness"
    assert [f["feature_idx"] for f in plot._top(result, "good", 1)] == [1]
    assert plot.selection_label(result, "good") == "goodness score"


def test_top_features_bars_are_the_attribution_difference_they_were_ranked_by(monkeypatch):
    def feature(idx, direction, attribution_good, attribution_bad):
        return {"layer": 0, "feature_idx": idx, "direction": direction,
                "goodness_score": 9.0, "badness_score": 9.0,
                "attribution_good": attribution_good, "attribution_bad": attribution_bad}  # fmt: skip

    result = {
        "parameters": {"rank_by": "attribution"},
        "features": [feature(1, "good", 0.5, 0.0), feature(2, "bad", 0.0, 0.25)],
    }
    figures = drawn_figures(monkeypatch)
    plot.plot_top_features(result, None, "t", 5, 60)
    good, bad = figures[0].axes
    assert [bar.get_width() for bar in good.patches] == [0.5]
    assert [bar.get_width() for bar in bad.patches] == [0.25]
    assert bad.get_xlabel() == "attribution_bad - attribution_good"
    plot.pyplot().close(figures[0])


def test_significant_bars_are_solid_and_the_others_hatched():
    assert plot.bar_style({"significant": True}, "bad") == {
        "color": plot.COLORS["bad"], "edgecolor": "black", "hatch": ""
    }  # fmt: skip
    assert plot.bar_style({"significant": False}, "good")["hatch"] == "///"


def test_volcano_marks_significance_by_the_q_value_and_plots_minus_log10_p(monkeypatch):
    # both fire; p 0.01 for each, but only the first survives the FDR (q 0.02 vs 0.2)
    stats = {"good_freq": np.array([0.5, 0.5]), "bad_freq": np.array([0.1, 0.1]),
             "p_value": np.array([0.01, 0.01]), "q_value": np.array([0.02, 0.2])}  # fmt: skip
    result = {"features": [], "parameters": {"fdr": 0.05, "eps": 0.01}}
    figures = drawn_figures(monkeypatch)
    plot.plot_volcano(result, stats, None, "t", 60)
    rest, significant = figures[0].axes[0].collections[:2]
    assert len(rest.get_offsets()) == len(significant.get_offsets()) == 1
    assert significant.get_offsets()[0, 1] == pytest.approx(2.0)  # -log10 0.01
    assert rest.get_offsets()[0, 1] == pytest.approx(2.0)
    plot.pyplot().close(figures[0])


def test_heatmap_leaves_the_activation_of_a_group_where_the_feature_never_fires_blank():
    features = [
        {"good_freq": 0.5, "bad_freq": 0.0, "good_avg_activation": 2.0, "bad_avg_activation": 0.0}
    ]
    freq, act = plot.heatmap_cells(features)
    assert freq.tolist() == [[0.5, 0.0]]
    assert act[0, 0] == 2.0 and np.isnan(act[0, 1])


def sign(x: np.ndarray) -> np.ndarray:
    """np.sign, 0 within rounding of 0 (equal rates)."""
    return np.where(np.abs(x) < 1e-9, 0.0, np.sign(x))


def drawn_figures(monkeypatch) -> list:
    """Figures the plot functions draw, kept open instead of saved."""
    figures: list = []
    monkeypatch.setattr(plot, "_save", lambda fig, path, dpi: figures.append(fig) or path)
    return figures


@pytest.mark.parametrize("n_good, n_bad", [(60, 5), (5, 60), (3, 3)])
def test_volcano_and_frequency_ratios_put_every_feature_on_the_side_it_fires_more_in(
    monkeypatch, n_good, n_bad
):
    # every (good fired, bad fired) count; e.g. 1 of 60 GOOD and 0 of 5 BAD is a GOOD feature
    fired = [(g, b) for g in range(n_good + 1) for b in range(n_bad + 1) if g or b]
    good_freq = np.array([[g / n_good for g, _ in fired]])
    bad_freq = np.array([[b / n_bad for _, b in fired]])
    ones = np.ones_like(good_freq)
    stats = {"good_freq": good_freq, "bad_freq": bad_freq, "p_value": ones, "q_value": ones}
    features = [
        {"layer": 0, "feature_idx": i, "good_freq": g, "bad_freq": b, "p_value": 1.0,
         "significant": False, "direction": "good" if g > b else "bad",
         "goodness_score": 1.0, "badness_score": 1.0}
        for i, (g, b) in enumerate(zip(good_freq[0], bad_freq[0], strict=True))
    ]  # fmt: skip
    result = {"total_good_samples": n_good, "total_bad_samples": n_bad, "features": features,
              "parameters": {"fdr": 0.05, "eps": 0.01}}  # fmt: skip
    side = np.sign(good_freq[0] - bad_freq[0])
    figures = drawn_figures(monkeypatch)
    plot.plot_volcano(result, stats, None, "t", 60)
    axes = figures[0].axes[0]
    every = axes.collections[0].get_offsets()[:, 0]  # nothing significant: all in the first
    assert np.isfinite(every).all() and (sign(every) == side).all()
    # the analysis's eps on both sides, as frequency_ratios.png: a rate of 1 against 0 at most
    assert np.abs(every).max() <= np.log2(1.01 / 0.01) + 1e-9
    expected = np.log2((good_freq[0] + 0.01) / (bad_freq[0] + 0.01))
    np.testing.assert_allclose(np.sort(every), np.sort(expected))
    for collection, direction in zip(axes.collections[2:], ("good", "bad"), strict=True):
        chosen = [i for i, f in enumerate(features) if f["direction"] == direction]
        assert (sign(collection.get_offsets()[:, 0]) == side[chosen]).all()

    plot.plot_frequency_ratios(result, None, "t", len(fired), 60)
    axes = figures[1].axes[0]
    labels = [label.get_text() for label in axes.get_yticklabels()]
    assert len(axes.patches) == len(labels) == len(features)
    for bar in axes.patches:
        feature = int(labels[round(bar.get_y() + bar.get_height() / 2)].split("/F")[1])
        assert sign(np.log(bar.get_width())) == side[feature]
    for figure in figures:
        plot.pyplot().close(figure)


def drawn_layers(monkeypatch, result: dict) -> tuple[list[str], np.ndarray, list[str]]:
    """features_per_layer.png's x labels, stacked bar totals and texts."""
    figures = drawn_figures(monkeypatch)
    plot.plot_features_per_layer(result, None, "t", 60)
    axes = figures[0].axes[0]
    labels = [label.get_text() for label in axes.get_xticklabels()]
    totals = np.zeros(len(labels))
    for bar in axes.patches:
        totals[round(bar.get_x() + bar.get_width() / 2)] += bar.get_height()
    texts = [text.get_text() for text in axes.texts]
    plot.pyplot().close(figures[0])
    return labels, totals, texts


def test_features_per_layer_shows_every_analysed_layer_at_0_where_none_is_selected(monkeypatch):
    features = [{"layer": 3, "direction": "good"}, {"layer": 3, "direction": "bad"},
                {"layer": 7, "direction": "bad"}]  # fmt: skip
    result = {"layers": [1, 3, 5, 7], "features": features}
    labels, totals, texts = drawn_layers(monkeypatch, result)
    assert labels == ["1", "3", "5", "7"] and totals.tolist() == [0, 2, 0, 1] and not texts


def test_features_per_layer_with_nothing_selected_shows_every_layer_and_says_why(
    tmp_path, monkeypatch
):
    write_planted_store(tmp_path, samples=16)
    analyze.main(["--out", str(tmp_path), "--significant-only"], benchmark="easyvqa")
    result = json.loads((tmp_path / "features.json").read_text())
    assert result["features"] == [] and result["layers"] == list(range(LAYERS))
    labels, totals, texts = drawn_layers(monkeypatch, result)
    assert labels == [str(layer) for layer in range(LAYERS)] and not totals.any()
    assert texts == ["no feature selected\nnone is significant at FDR 0.05 (--significant-only)"]
    # the charts of selected features say the same instead of drawing empty axes
    figures = drawn_figures(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. matplotlib's "identical low and high ylims"
        plot.plot_top_features(result, None, "t", 10, 60)
        plot.plot_activation_heatmap(result, None, "t", 10, 60)
        plot.plot_frequency_ratios(result, None, "t", 10, 60)
    for figure in figures:
        (ax,) = figure.axes
        assert not ax.axison and [t.get_text() for t in ax.texts] == texts
        plot.pyplot().close(figure)


@pytest.mark.parametrize("stage", ["plot", "examples"])
def test_a_dpi_below_one_is_refused_before_anything_is_read(tmp_path, stage):
    """examples --dpi 0 ended with matplotlib's 'dpi must be positive' (no flag named) after
    finding every feature's examples and writing its page."""
    from benchmarks.__main__ import run

    with pytest.raises(SystemExit, match="--dpi 0: give a positive resolution"):
        run(["easyvqa", stage, "--out", str(tmp_path), "--dpi", "0"])
