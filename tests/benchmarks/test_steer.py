"""Steering: paired bootstrap intervals, the random-feature control, and a tiny run end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from sparsify import SparseCoderConfig

from benchmarks.__main__ import run
from benchmarks.bootstrap import Delta, paired_bootstrap
from benchmarks.stages.steer import (
    SteerConfig,
    conditions,
    few_images_warning,
    interventions_for,
    mapped_neurons,
    measured_points,
    neuron_controls,
    random_control,
    random_neuron_control,
    typical_activation,
)
from tests.conftest import random_clt
from vlm_sparsify.coder_io import save_coders
from vlm_sparsify.hookpoints import mlp_hookpoints
from vlm_sparsify.training import build_coders


def test_paired_bootstrap_covers_the_true_delta_with_the_normal_width() -> None:
    rng = np.random.default_rng(0)
    baseline = (rng.random(400) < 0.5).astype(float)
    treated = baseline.copy()
    zeros = np.flatnonzero(baseline == 0)
    treated[zeros[: len(zeros) // 5]] = 1.0  # a fifth of the wrong answers become right
    true_delta = (treated - baseline).mean()
    result = paired_bootstrap(baseline, treated, n_resamples=2000, seed=1)
    assert result.delta == pytest.approx(true_delta)
    assert result.low < true_delta < result.high
    normal_width = 2 * 1.96 * (treated - baseline).std() / np.sqrt(400)
    assert 0.8 * normal_width < result.high - result.low < 1.2 * normal_width
    assert result == paired_bootstrap(baseline, treated, n_resamples=2000, seed=1)
    # pairing: identical conditions have a zero-width interval at 0
    same = paired_bootstrap(baseline, baseline, n_resamples=200)
    assert (same.delta, same.low, same.high) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="equal 1-D"):
        paired_bootstrap([1.0, 0.0], [1.0])


def test_bootstrap_by_image_resamples_whole_images() -> None:
    """40 images of 10 samples whose change is the same within an image: the samples are 40
    independent draws, not 400, so the interval is about sqrt(10) times as wide."""
    rng = np.random.default_rng(0)
    per_image = (rng.random(40) < 0.3).astype(float)
    differences = np.repeat(per_image, 10)
    images = [f"img{i // 10}" for i in range(400)]
    baseline = np.zeros(400)
    by_sample = paired_bootstrap(baseline, differences, n_resamples=2000, seed=1)
    by_image = paired_bootstrap(baseline, differences, n_resamples=2000, seed=1, groups=images)
    assert by_image.delta == by_sample.delta == pytest.approx(per_image.mean())
    ratio = (by_image.high - by_image.low) / (by_sample.high - by_sample.low)
    assert 2.5 < ratio < 4.0
    normal_width = 2 * 1.96 * per_image.std() / np.sqrt(40)
    assert 0.8 * normal_width < by_image.high - by_image.low < 1.2 * normal_width
    assert by_image.n == by_sample.n == 400  # samples, not images
    # one sample per image is the sample-level bootstrap, draw for draw
    assert paired_bootstrap(baseline, differences, 500, groups=[str(i) for i in range(400)]) == (
        paired_bootstrap(baseline, differences, 500)
    )
    with pytest.raises(ValueError, match="3 group keys for 400 samples"):
        paired_bootstrap(baseline, differences, groups=images[:3])


def test_random_control_keeps_count_and_layers_and_avoids_the_features() -> None:
    features = [
        {"layer": 0, "hookpoint": "h0", "source": 0, "feature_idx": 3, "direction": "good"},
        {"layer": 0, "hookpoint": "h0", "source": 0, "feature_idx": 4, "direction": "good"},
        {"layer": 2, "hookpoint": "h2", "source": 1, "feature_idx": 3, "direction": "good"},
    ]
    frequency = np.zeros((2, 50))
    frequency[0, [3, 4, 10, 11, 12]] = 0.5
    frequency[1, 20:30] = 0.5
    control = random_control(features, 50, seed=0, frequency=frequency, nearest=10)
    assert [c["hookpoint"] for c in control] == ["h0", "h0", "h2"]
    assert [c["layer"] for c in control] == [0, 0, 2]
    assert {control[0]["feature_idx"], control[1]["feature_idx"]} <= {10, 11, 12}
    assert control[0]["feature_idx"] != control[1]["feature_idx"]
    assert 20 <= control[2]["feature_idx"] < 30
    assert control == random_control(features, 50, seed=0, frequency=frequency, nearest=10)
    assert control != random_control(features, 50, seed=5, frequency=frequency, nearest=10)
    without = random_control(features, 50, seed=0)
    assert all(c["feature_idx"] not in (3, 4) for c in without[:2])
    [first, second] = interventions_for(control, 2.0)
    assert first.layers == "h0" and len(first.features) == 2 and first.value == 2.0


def test_clamping_sets_each_feature_to_the_factor_times_its_typical_activation() -> None:
    features = [
        {"hookpoint": "h0", "feature_idx": 3, "reference": 2.0},
        {"hookpoint": "h1", "feature_idx": 5, "reference": 0.5},
        {"hookpoint": "h0", "feature_idx": 9, "reference": 4.0},
    ]
    first, second = interventions_for(features, 3.0, "all", op="clamp")
    assert (first.op, first.layers, first.features, first.value) == (
        "set",
        "h0",
        (3, 9),
        (6.0, 12.0),
    )
    assert (second.op, second.layers, second.features, second.value) == ("set", "h1", (5,), 1.5)
    assert first.region == "all"
    [scaled, _] = interventions_for(features, 3.0)  # the default still scales
    assert (scaled.op, scaled.value) == ("scale", 3.0)


def test_clamp_conditions_leave_the_neurons_out_and_have_names_of_their_own() -> None:
    by_direction = {"good": [{"hookpoint": "h0", "feature_idx": 1}], "bad": []}
    names = [c.name for c in conditions(SteerConfig(out="o", factors="0,2"), by_direction)]
    assert "good-neurons-x2" in names and "good-features-x0" in names
    clamp = conditions(SteerConfig(out="o", factors="0,2", op="clamp"), by_direction)
    assert [c.name for c in clamp] == ["baseline"] + [
        f"good-{kind}-clamp{factor}"
        for factor in (0, 2)
        for kind in ("features", "control", "clt_free")
    ]
    assert {c.op for c in clamp[1:]} == {"clamp"}


def test_typical_activation_weighs_good_and_bad_averages_by_the_samples_fired_in(
    tmp_path: Path,
) -> None:
    # 10 GOOD, 30 BAD samples; latent 0 fired in 5 GOOD (mean 2.0) and 15 BAD (mean 4.0):
    # (5 * 2 + 15 * 4) / 20 = 3.5; latent 1 only in GOOD; latent 2 never
    stats = {
        "good_freq": np.array([[0.5, 0.2, 0.0]]),
        "bad_freq": np.array([[0.5, 0.0, 0.0]]),
        "good_avg_activation": np.array([[2.0, 7.0, 0.0]]),
        "bad_avg_activation": np.array([[4.0, 0.0, 0.0]]),
    }
    with pytest.raises(FileNotFoundError, match="--op clamp .*feature_stats.npz.* run `analyze`"):
        typical_activation(tmp_path)
    np.savez(tmp_path / "feature_stats.npz", **stats)
    (tmp_path / "features.json").write_text(
        json.dumps({"features": [], "total_good_samples": 10, "total_bad_samples": 30})
    )
    assert typical_activation(tmp_path) == pytest.approx(np.array([[3.5, 7.0, 0.0]]))


def test_random_control_is_matched_on_firing_frequency() -> None:
    # layer 0: latents 0-199 fire with frequency latent / 200; the selected features are a rare
    # one (latent 7, 0.035) and a frequent one (latent 190, 0.95)
    frequency = np.stack([np.arange(200) / 200, np.zeros(200)])
    features = [
        {"layer": 0, "hookpoint": "h0", "source": 0, "feature_idx": 7, "direction": "good"},
        {"layer": 0, "hookpoint": "h0", "source": 0, "feature_idx": 190, "direction": "bad"},
    ]
    drawn = {0: set(), 1: set()}
    for seed in range(20):
        control = random_control(features, 200, seed=seed, frequency=frequency, nearest=5)
        for i, (feature, chosen) in enumerate(zip(features, control, strict=True)):
            target = frequency[0, feature["feature_idx"]]
            assert abs(chosen["frequency"] - target) <= 3 / 200  # among the 5 nearest: +-3
            assert chosen["feature_frequency"] == target
            assert chosen["frequency"] == frequency[0, chosen["feature_idx"]]
            assert chosen["feature_idx"] not in (7, 190)
            drawn[i].add(chosen["feature_idx"])
    assert len(drawn[0]) > 1 and len(drawn[1]) > 1  # still random among the nearest
    # latent 0 never fired: never a control, though as near to latent 1 (0.005) as latent 2 is
    rare = [{**features[0], "feature_idx": 1}]
    assert random_control(rare, 200, seed=0, frequency=frequency, nearest=1)[0]["feature_idx"] == 2


def test_steering_plot_points_are_measured_factors_only() -> None:
    def row(factor: float, delta: float) -> dict:
        return {"factor": factor, "delta_vs_baseline":
                {"delta": delta, "ci_low": delta - 0.1, "ci_high": delta + 0.2}}  # fmt: skip

    xs, ys, low, high = measured_points([row(0.0, -0.3), row(4.0, 0.1)], [0.0, 2.0, 4.0])
    assert xs == [0.0, 2.0] and ys == [-0.3, 0.1]  # no point at the unmeasured x2, none at x1
    assert low == pytest.approx([0.1, 0.1]) and high == pytest.approx([0.2, 0.2])


def test_random_neuron_control_matches_counts_per_mlp_and_avoids_the_mapped() -> None:
    mapped = {"mlp.0": [1, 2, 3], "mlp.1": [7]}
    sizes = {"mlp.0": 6, "mlp.1": 40}
    control = random_neuron_control(mapped, sizes, seed=0)
    assert {h: len(n) for h, n in control.items()} == {"mlp.0": 3, "mlp.1": 1}
    assert control["mlp.0"] == [0, 4, 5]  # the only 3 of 6 neurons left
    assert 7 not in control["mlp.1"]
    assert control == random_neuron_control(mapped, sizes, seed=0)
    draws = {tuple(random_neuron_control(mapped, sizes, seed)["mlp.1"]) for seed in range(10)}
    assert len(draws) > 5


GREEDY = ["--batch-size", "4", "--max-new-tokens", "4", "--device", "cpu", "--dtype", "float32"]


def test_steer_end_to_end_on_a_tiny_run(
    tmp_path: Path, tiny_llava, tiny_llava_dir, llava_recipe, capsys
):
    coders = random_clt(tiny_llava[0], llava_recipe)
    hookpoints = list(coders.hookpoints)
    coders_dir = save_coders(coders, tmp_path / "coders")
    out = tmp_path / "out"
    run(["easyvqa", "capture", "--out", str(out), "--model", str(tiny_llava_dir), "--coders",
         str(coders_dir), "--kinds", "yesno", "--limit", "6", *GREEDY])  # fmt: skip
    run(["easyvqa", "classify", "--out", str(out)])
    ids = [json.loads(line)["id"] for line in (out / "responses.jsonl").read_text().splitlines()]
    features = [
        {"layer": 0, "feature_idx": 1, "hookpoint": hookpoints[0], "direction": "good"},
        {"layer": 1, "feature_idx": 2, "hookpoint": hookpoints[1], "direction": "good"},
        {"layer": 0, "feature_idx": 5, "hookpoint": hookpoints[0], "direction": "bad"},
    ]
    split = {"held_out_ids": ids[:4]}  # map uses the other 2 as train samples
    (out / "features.json").write_text(json.dumps({"features": features, "split": split}))
    run(
        [
            "easyvqa",
            "map",
            "--out",
            str(out),
            "--top-k",
            "3",
            "--random-sets",
            "2",
            "--device",
            "cpu",
        ]
    )
    neuron_map = json.loads((out / "neuron_map.json").read_text())
    assert len(neuron_map) == 3 and neuron_map[0]["amplification_factor"] == 4.0
    # a CLT with cross_layer 2: source 0 writes into layers 0 and 1
    assert [t["target_layer"] for t in neuron_map[0]["targets"]] == [0, 1]
    assert len(neuron_map[0]["targets"][0]["top_mlp_neurons"]) == 3
    assert -1 <= neuron_map[0]["targets"][0]["verification"]["cosine_top"] <= 1
    # a progress bar over the train samples it teacher-forces, as attribute has (none before)
    assert re.search(r"easyvqa map: 100%.* 2/2 ", capsys.readouterr().err)

    capsys.readouterr()
    run(["easyvqa", "steer", "--out", str(out), "--factors", "0,3", "--bootstrap", "50",
         "--device", "cpu", "--batch-size", "4"])  # fmt: skip
    # a progress bar over every condition's held-out samples: 21 conditions x 4 samples
    printed = capsys.readouterr()
    assert re.search(r"easyvqa steer: 100%.* 84/84 ", printed.err)
    report = json.loads((out / "steering.json").read_text())
    assert report["baseline"]["n"] == 4 and report["held_out_samples"] == 4
    # intervals resample the held-out images (easy-VQA records name their image_id)
    images = {json.loads(line)["image_id"] for line in (out / "responses.jsonl").open()
              if json.loads(line)["id"] in ids[:4]}  # fmt: skip
    assert report["bootstrap"]["groups"] == len(images) and report["bootstrap"]["resampled"]
    assert len(images) < 20 and report["bootstrap"]["warning"] == few_images_warning(len(images))
    assert f"warning: {report['bootstrap']['warning']}\n" in printed.out
    names = {
        row["name"]
        for kind in ("features", "control", "neurons", "neurons_control", "clt_free")
        for row in report[kind]
    }
    assert {"good-features-x3", "good-control-x3", "bad-features-x0", "good-clt_free-x0",
            "good-neurons-x0", "good-neurons_control-x0"} <= names  # fmt: skip
    for direction in ("good", "bad"):  # the same number of random neurons, none of the mapped
        mapped = mapped_neurons(neuron_map, direction)
        control = report["control_neurons"][direction]
        assert {h: len(n) for h, n in control.items()} == {h: len(n) for h, n in mapped.items()}
        assert all(not set(control[h]) & set(mapped[h]) for h in mapped)
    assert all("delta_vs_control" in row for row in report["neurons"])
    assert report["feature_region"] is None and report["steer_region"] == "decision"
    assert len(report["control_features"]["good"]) == 2
    for row in report["clt_free"]:  # the CLT-free module answers exactly as the replacement
        assert row["same_responses_as_features"] == 1.0
    for row in report["features"]:
        d = row["delta_vs_baseline"]
        assert d["ci_low"] <= d["delta"] <= d["ci_high"] and "delta_vs_control" in row
    assert "yes/no" in report["baseline"]["official"]
    assert (out / "plots" / "steering.png").stat().st_size > 10_000

    # a rerun generates no condition again
    written = {p: p.stat().st_mtime_ns for p in (out / "steer").glob("*/responses.jsonl")}
    run(["easyvqa", "steer", "--out", str(out), "--factors", "0,3", "--bootstrap", "50",
         "--device", "cpu", "--batch-size", "4"])  # fmt: skip
    assert written and {p: p.stat().st_mtime_ns for p in written} == written
    # steering every token instead: the steered conditions again, the baseline kept
    run(["easyvqa", "steer", "--out", str(out), "--factors", "3", "--bootstrap", "50",
         "--device", "cpu", "--batch-size", "4", "--region", "all", "--kinds", "features",
         "--directions", "good"])  # fmt: skip
    baseline = out / "steer" / "baseline" / "responses.jsonl"
    steered = out / "steer" / "good-features-x3" / "responses.jsonl"
    assert baseline.stat().st_mtime_ns == written[baseline]
    assert steered.stat().st_mtime_ns != written[steered]
    assert json.loads((out / "steering.json").read_text())["steer_region"] == "all"
    # a scale condition records no op: folders written before --op existed are kept
    assert "op" not in json.loads(
        (out / "steer" / "good-features-x3" / "condition.json").read_text()
    )

    # --op clamp: each feature set to 3 x its typical activation (feature_stats.npz) at the
    # decision tokens; the neurons conditions are left out; a report of its own
    num_latents = 64
    typical = np.stack([1.0 + np.arange(num_latents) / 8, 0.5 + np.arange(num_latents) / 16])
    np.savez(out / "feature_stats.npz", good_freq=np.full((2, num_latents), 0.5),
             bad_freq=np.zeros((2, num_latents)), good_avg_activation=typical,
             bad_avg_activation=np.zeros((2, num_latents)))  # fmt: skip
    totals = {"total_good_samples": 2, "total_bad_samples": 0}
    (out / "features.json").write_text(json.dumps({"features": features, "split": split, **totals}))
    scale_report = (out / "steering.json").read_text()
    capsys.readouterr()
    run(["easyvqa", "steer", "--out", str(out), "--op", "clamp", "--factors", "3",
         "--directions", "good", "--bootstrap", "50", "--device", "cpu", "--batch-size", "4"])  # fmt: skip
    assert "--op clamp steers features only; leaving out neurons, neurons_control" in (
        capsys.readouterr().out
    )
    clamp = json.loads((out / "steering_clamp.json").read_text())
    assert clamp["op"] == "clamp" and clamp["neurons"] == [] and clamp["control_neurons"] == {}
    assert [row["name"] for kind in ("features", "control", "clt_free") for row in clamp[kind]] == [
        "good-features-clamp3", "good-control-clamp3", "good-clt_free-clamp3"
    ]  # fmt: skip
    expected = [float(typical[0, 1]), float(typical[1, 2])]  # features (layer 0, 1), (layer 1, 2)
    assert [f["reference"] for f in clamp["clamped_features"]["good"]] == expected
    spec = json.loads((out / "steer" / "good-features-clamp3" / "condition.json").read_text())
    assert spec["op"] == "clamp" and spec["values"] == pytest.approx([3 * r for r in expected])
    for chosen in clamp["control_features"]["good"]:  # its own typical activation
        assert chosen["reference"] == typical[chosen["layer"], chosen["feature_idx"]]
    # the CLT-free module sets the same features to the same values in the original model
    assert clamp["clt_free"][0]["same_responses_as_features"] == 1.0
    assert clamp["features"][0]["changed_responses"] > 0  # clamping moves the answers
    assert (out / "steering.json").read_text() == scale_report
    assert (out / "plots" / "steering_clamp.png").stat().st_size > 10_000
    assert baseline.stat().st_mtime_ns == written[baseline]
    # coders other than the store's are refused: its feature indices are not theirs
    with torch.no_grad():
        coders.sources[0].encoder.bias.add_(0.01)
    other = save_coders(coders, tmp_path / "other")
    with pytest.raises(SystemExit, match="not the coders the feature store was captured with"):
        run(["easyvqa", "map", "--out", str(out), "--coders", str(other), "--device", "cpu"])
    # held-out ids that are no item of the data steer loads (flags changed since capture)
    (out / "features.json").write_text(
        json.dumps({"features": features, "split": {"held_out_ids": ["caption-nothing"]}, **totals})
    )
    with pytest.raises(SystemExit, match="none of the 1 held-out ids .* is an item of the data"):
        run(["easyvqa", "steer", "--out", str(out), "--kinds", "features", "--device", "cpu"])


def test_bad_steer_flags_fail_before_anything_is_read(tmp_path: Path) -> None:
    for flag, value in (("--kinds", "feature"), ("--directions", "up"), ("--factors", "2,x"),
                        ("--factors", "2,inf"), ("--factors", "nan"), ("--factors", "0,2,2.0")):  # fmt: skip
        with pytest.raises(SystemExit, match=f"{flag} '{value}'"):
            run(["easyvqa", "steer", "--out", str(tmp_path / "nothing"), flag, value])
    # a repeated name would be generated, counted and read back twice
    for flag, value in (("--kinds", "features,control,features"), ("--directions", "bad,bad")):
        with pytest.raises(SystemExit, match=f"{flag} '{value}': (features|bad) given twice"):
            run(["easyvqa", "steer", "--out", str(tmp_path / "nothing"), flag, value])
    with pytest.raises(SystemExit, match="Unknown steering region 'response'"):
        run(["easyvqa", "steer", "--out", str(tmp_path / "nothing"), "--region", "response"])
    with pytest.raises(SystemExit, match="--limit 0: give a positive number"):
        run(["easyvqa", "steer", "--out", str(tmp_path / "nothing"), "--limit", "0"])
    # found after hours of generation otherwise, when the intervals are computed
    with pytest.raises(SystemExit, match="--confidence 95: give a share between 0 and 1"):
        run(["easyvqa", "steer", "--out", str(tmp_path / "nothing"), "--confidence", "95"])
    with pytest.raises(SystemExit, match="--bootstrap 0: give a positive number"):
        run(["easyvqa", "steer", "--out", str(tmp_path / "nothing"), "--bootstrap", "0"])
    with pytest.raises(SystemExit, match="--batch-size 0: give a positive number"):
        run(["easyvqa", "steer", "--out", str(tmp_path / "nothing"), "--batch-size", "0"])
    with pytest.raises(SystemExit, match="--op clamp steers features only, and --kinds 'neurons'"):
        run(["easyvqa", "steer", "--out", str(tmp_path / "nothing"), "--op", "clamp", "--kinds",
             "neurons"])  # fmt: skip


def test_bootstrap_refuses_no_resamples_and_a_confidence_outside_0_1() -> None:
    with pytest.raises(ValueError, match="n_resamples must be positive, got 0"):
        paired_bootstrap([0.0, 1.0], [1.0, 1.0], n_resamples=0)
    for confidence in (0.0, 1.0, 95.0):
        with pytest.raises(ValueError, match="confidence must be between 0 and 1"):
            paired_bootstrap([0.0, 1.0], [1.0, 1.0], confidence=confidence)


def test_bootstrap_by_image_weighs_each_resampled_image_by_its_samples() -> None:
    """One image of 100 samples that all improve and 99 single-sample images that do not: every
    resample is a set of 0/1 differences, so its mean (pooled over the samples of the resampled
    images, not a mean of image means) lies in [0, 1]."""
    differences = np.concatenate([np.ones(100), np.zeros(99)])
    images = ["big"] * 100 + [f"img{i}" for i in range(99)]
    result = paired_bootstrap(np.zeros(199), differences, n_resamples=2000, groups=images)
    assert result.delta == pytest.approx(100 / 199)
    assert 0.0 <= result.low <= result.delta <= result.high <= 1.0


def test_bootstrap_groups_need_not_be_contiguous() -> None:
    """Samples of one image may come in any order: interleaving them (the same first appearance
    of each image) gives the same draws as listing them image by image."""
    interleaved = paired_bootstrap(
        np.zeros(5), [1.0, 0.0, 1.0, 0.0, 0.0], n_resamples=300, groups=["x", "y", "x", "y", "y"]
    )
    contiguous = paired_bootstrap(
        np.zeros(5), [1.0, 1.0, 0.0, 0.0, 0.0], n_resamples=300, groups=["x", "x", "y", "y", "y"]
    )
    assert interleaved == contiguous


def test_bootstrap_draws_every_sample_and_follows_its_seed() -> None:
    differences = np.zeros(10)
    differences[-1] = 1.0  # only the last sample changes: some resamples must hold it
    result = paired_bootstrap(np.zeros(10), differences, n_resamples=2000)
    assert result.high > 0.0
    spread = np.random.default_rng(0).normal(size=50)
    assert paired_bootstrap(np.zeros(50), spread, 200, seed=1) != paired_bootstrap(
        np.zeros(50), spread, 200, seed=2
    )
    assert paired_bootstrap([], []) == Delta(0.0, 0.0, 0.0, 0)


def test_the_bootstrap_interval_has_its_nominal_quantiles():
    rng = np.random.default_rng(0)
    diff = rng.normal(0.1, 1.0, 2000)
    result = paired_bootstrap(np.zeros(2000), diff, n_resamples=4000, seed=3, confidence=0.95)
    half = 1.96 * diff.std() / np.sqrt(2000)  # the normal interval: the bootstrap's within 8%
    assert result.low == pytest.approx(diff.mean() - half, abs=0.08 * half)
    assert result.high == pytest.approx(diff.mean() + half, abs=0.08 * half)


def test_the_table_says_when_its_intervals_rest_on_one_image():
    from benchmarks.stages.steer import KINDS, format_table

    report = {
        "benchmark": "easyvqa",
        "held_out_samples": 3,
        "baseline": {"good_rate": 0.5, "n": 3},
        "bootstrap": {"confidence": 0.95, "groups": 1},
        **{kind: [] for kind in KINDS},
    }
    assert "over 1 images\nwarning: one image: the intervals say nothing" in format_table(report)
    report["bootstrap"]["groups"] = 3
    assert "one image" not in format_table(report)
    assert "warning: only 3 images: percentile intervals from fewer than 20" in format_table(report)
    report["bootstrap"]["groups"] = 20
    assert "warning" not in format_table(report)


def test_the_control_is_matched_on_the_share_of_all_analysed_samples_it_fires_in(
    tmp_path: Path,
) -> None:
    """90 GOOD and 10 BAD samples: a bad feature firing in every BAD sample and no GOOD one fires
    in 10% of the samples; a latent firing in every GOOD sample and no BAD one fires in 90%, and
    must not stand for it, though good_freq + bad_freq is 1.0 for both."""
    from benchmarks.stages.steer import _firing_frequency

    good_freq, bad_freq = np.zeros((1, 6)), np.zeros((1, 6))
    good_freq[0] = [0.0, 1.0, 0.1, 0.0, 0.5, 0.0]
    bad_freq[0] = [1.0, 0.0, 0.1, 0.0, 0.5, 0.0]
    np.savez(tmp_path / "feature_stats.npz", good_freq=good_freq, bad_freq=bad_freq)
    analysed = {"total_good_samples": 90, "total_bad_samples": 10, "features": []}
    (tmp_path / "features.json").write_text(json.dumps(analysed))
    frequency = _firing_frequency(tmp_path)
    np.testing.assert_allclose(frequency, [[0.1, 0.9, 0.1, 0.0, 0.5, 0.0]])
    feature = {"layer": 0, "hookpoint": "h0", "source": 0, "feature_idx": 0, "direction": "bad"}
    [control] = random_control([feature], 6, seed=0, frequency=frequency, nearest=1)
    assert control["feature_idx"] == 2 and control["frequency"] == pytest.approx(0.1)


def test_a_control_never_holds_a_feature_selected_for_either_direction() -> None:
    """The latents nearest in frequency to the good feature are the bad features: its control
    must not be one of them (the good control would steer a bad feature)."""
    from benchmarks.stages.steer import feature_controls

    frequency = np.full((1, 40), 0.05)
    frequency[0, [3, 10, 11]] = 0.5
    frequency[0, 20:25] = 0.4
    feature = {"layer": 0, "hookpoint": "h0", "source": 0, "direction": "good"}
    selected = {
        "good": [{**feature, "feature_idx": 3}],
        "bad": [{**feature, "feature_idx": 10, "direction": "bad"},
                {**feature, "feature_idx": 11, "direction": "bad"}],
    }  # fmt: skip
    for seed in range(20):
        control = feature_controls(selected, 40, seed, frequency, nearest=2)
        assert 20 <= control["good"][0]["feature_idx"] < 25
        assert {c["feature_idx"] for c in control["bad"]} <= set(range(20, 25))
    assert feature_controls(selected, 40, 0, frequency) == feature_controls(
        selected, 40, 0, frequency
    )


def test_a_neuron_control_never_holds_a_neuron_mapped_for_either_direction() -> None:
    mapped = {"good": {"mlp.0": [1, 2, 3]}, "bad": {"mlp.0": [4, 5, 6, 7]}}
    for seed in range(20):
        control = random_neuron_control(mapped["good"], {"mlp.0": 12}, seed, exclude=mapped["bad"])
        assert len(control["mlp.0"]) == 3
        assert set(control["mlp.0"]) <= {0, 8, 9, 10, 11}


def test_neuron_controls_are_drawn_only_when_their_condition_is_steered() -> None:
    """A tiny model's MLP has too few unmapped neurons for a random control: steering without
    the neurons conditions (--kinds, or --op clamp) must not need one."""
    mapped = {"good": {"mlp.0": [0, 1, 2]}, "bad": {"mlp.0": [3, 4]}}
    sizes = {"mlp.0": 6}  # 1 neuron left for 3 + 2 controls
    with pytest.raises(ValueError, match="3 random neurons: only 1 of 6 are not excluded"):
        neuron_controls(SteerConfig(out="o"), mapped, sizes, ["good", "bad"])
    for config in (
        SteerConfig(out="o", kinds="features,control,clt_free"),
        SteerConfig(out="o", kinds="neurons"),
        SteerConfig(out="o", op="clamp"),
    ):
        assert neuron_controls(config, mapped, sizes, ["good", "bad"]) == {}
    control = neuron_controls(SteerConfig(out="o"), mapped, {"mlp.0": 9}, ["bad"])
    assert list(control) == ["bad"] and len(control["bad"]["mlp.0"]) == 2
    assert set(control["bad"]["mlp.0"]) <= {5, 6, 7, 8}


def test_a_neuron_map_of_other_features_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    """analyze run again after map selects other features: the neurons conditions would steer
    the neurons of the old ones, under the new features' name."""
    feature = {"layer": 0, "feature_idx": 1, "hookpoint": "h0", "direction": "good"}
    analysed = {"features": [feature], "split": {"held_out_ids": ["a"]}}
    (tmp_path / "features.json").write_text(json.dumps(analysed))
    old = [{"feature": {**feature, "feature_idx": 7}, "targets": [], "amplification_factor": 4}]
    (tmp_path / "neuron_map.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="neuron_map.json maps other features than"):
        run(["easyvqa", "steer", "--out", str(tmp_path)])
    # --op clamp leaves the neurons conditions out: the old map is not read, capture.json is
    np.savez(tmp_path / "feature_stats.npz", **{
        name: np.ones((1, 8)) for name in
        ("good_freq", "bad_freq", "good_avg_activation", "bad_avg_activation")})  # fmt: skip
    totals = {"total_good_samples": 1, "total_bad_samples": 1}
    (tmp_path / "features.json").write_text(json.dumps({**analysed, **totals}))
    with pytest.raises(SystemExit, match="capture.json"):
        run(["easyvqa", "steer", "--out", str(tmp_path), "--op", "clamp"])


def test_held_out_items_refuses_none_and_notes_the_missing(tmp_path: Path, capsys) -> None:
    from types import SimpleNamespace

    from benchmarks.stages.steer import held_out_items

    items = [SimpleNamespace(id=name) for name in ("a", "b", "c")]
    assert [i.id for i in held_out_items(items, ["c", "a"], tmp_path)] == ["a", "c"]
    assert capsys.readouterr().out == ""
    assert [i.id for i in held_out_items(items, ["b", "x", "y"], tmp_path)] == ["b"]
    assert "2 of the 3 held-out ids" in capsys.readouterr().out
    with pytest.raises(ValueError, match="none of the 2 held-out ids"):
        held_out_items(items, ["x", "y"], tmp_path)


def test_steer_scores_a_llava_question_file_capture_with_classify_s_label_files(tmp_path: Path):
    """A POPE capture of LLaVA's question file has no labels: each condition's official metrics
    need the label files classify took the labels from (recorded in its rules)."""
    from benchmarks.adapters import Rules
    from benchmarks.stages.steer import _official_metrics

    labels = tmp_path / "labels"
    labels.mkdir()
    rows = [{"question_id": i, "image": f"COCO_{i}.jpg", "text": "Is there a dog?", "label": label}
            for i, label in ((1, "yes"), (2, "no"))]  # fmt: skip
    (labels / "coco_pope_random.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    llava = [{**r, "question_id": 10_000_000 + r["question_id"], "category": "random"}
             for r in rows]  # fmt: skip
    for row in llava:
        del row["label"]
    (tmp_path / "llava_pope_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in llava))
    out, folder = tmp_path / "out", tmp_path / "out" / "steer" / "baseline"
    folder.mkdir(parents=True)
    data = {"questions_dir": None, "questions": str(tmp_path / "llava_pope_test.jsonl"),
            "images": ".", "splits": "random"}  # fmt: skip
    (out / "capture.json").write_text(json.dumps({"settings": {}, "data": data}))
    official = [{"question_id": r["question_id"], "split": "random", "image": r["image"],
                 "response": "Yes"} for r in llava]  # fmt: skip
    for name in ("responses_official.jsonl", "responses.jsonl"):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in official))
    metrics = _official_metrics("pope", folder, out, Rules(questions_dir=str(labels)))
    assert metrics["random"]["n"] == 2 and metrics["random"]["accuracy"] == 0.5
    assert "no label" in _official_metrics("pope", folder, out, Rules())["error"]


def test_a_map_killed_between_its_two_files_is_redone(
    tmp_path: Path, tiny_llava, tiny_llava_dir, llava_recipe, monkeypatch, capsys
):
    # neuron_map.json was written before neuron_map_info.json: a kill between them left a new
    # map beside the previous run's info, which the next map took as up to date
    import os

    import benchmarks.stages.map as map_stage

    model, _ = tiny_llava
    hookpoints = mlp_hookpoints(model, llava_recipe)
    cfg = SparseCoderConfig(num_latents=16, k=4, transcode=True)
    coders = build_coders(hookpoints, model.config.text_config.hidden_size, cfg, cross_layer=1,
                          device=torch.device("cpu"))  # fmt: skip
    coders_dir = save_coders(coders, tmp_path / "coders")
    out = tmp_path / "out"
    run(["easyvqa", "capture", "--out", str(out), "--model", str(tiny_llava_dir), "--coders",
         str(coders_dir), "--kinds", "yesno", "--limit", "3", *GREEDY])  # fmt: skip
    ids = [json.loads(line)["id"] for line in (out / "responses.jsonl").read_text().splitlines()]

    def analyzed(n_features: int, when: float) -> None:
        features = [{"layer": 0, "feature_idx": i, "hookpoint": hookpoints[0],
                     "direction": "good"} for i in range(n_features)]  # fmt: skip
        path = out / "features.json"
        path.write_text(json.dumps({"features": features, "split": {"held_out_ids": ids[:1]}}))
        os.utime(path, (when, when))

    command = ["easyvqa", "map", "--out", str(out), "--top-k", "2", "--random-sets", "1",
               "--samples", "2", "--verify-tokens", "8", "--device", "cpu"]  # fmt: skip
    analyzed(1, 1e9)
    run(command)
    for name in ("neuron_map.json", "neuron_map_info.json"):  # as if mapped long ago
        os.utime(out / name, (1.2e9, 1.2e9))
    analyzed(2, 1.5e9)  # then analyze ran again
    write_json = map_stage.outputs.write_json
    calls = []

    def killed_at_the_second(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        write_json(path, data)

    with monkeypatch.context() as patch:
        patch.setattr(map_stage.outputs, "write_json", killed_at_the_second)
        with pytest.raises(KeyboardInterrupt):
            run(command)
    capsys.readouterr()
    run(command)
    assert "up to date" not in capsys.readouterr().out
    info = json.loads((out / "neuron_map_info.json").read_text())
    assert info["summary"]["targets"] == 2 == len(json.loads((out / "neuron_map.json").read_text()))
    # no --coders: the info names the coders capture used, not None
    assert info["parameters"]["coders"] is None and info["coders"] == str(coders_dir)


def test_report_rates_deltas_and_changed_responses_by_hand() -> None:
    """`_report` on made-up verdicts: four held-out samples, a and b of one image."""
    from benchmarks.stages.steer import Condition, SteerConfig, _report

    def entry(name: str, kind: str, good: list[int], responses: str) -> dict:
        return {
            "condition": Condition(name, kind, "good" if name != "baseline" else "", 2.0),
            "responses": dict(zip("abcd", responses, strict=True)),
            "good": dict(zip("abcd", map(float, good), strict=True)),
            "official": None,
            "n_features": 2,
        }

    generated = {
        "baseline": entry("baseline", "baseline", [1, 0, 0, 1], "ynny"),
        "good-features-x2": entry("good-features-x2", "features", [1, 1, 1, 1], "yyyy"),
        "good-control-x2": entry("good-control-x2", "control", [1, 0, 1, 1], "ynyy"),
        "good-clt_free-x2": entry("good-clt_free-x2", "clt_free", [1, 1, 1, 0], "yyyn"),
    }
    config = SteerConfig(out="unused", factors="2", bootstrap=200)
    images = {"a": "image:1.jpg", "b": "image:1.jpg", "c": "image:2.jpg", "d": "image:3.jpg"}
    report = _report(generated, config, "t", 4, {}, images)
    assert report["baseline"]["good_rate"] == 0.5 and report["bootstrap"]["groups"] == 3
    features, control = report["features"][0], report["control"][0]
    assert (features["good_rate"], control["good_rate"]) == (1.0, 0.75)
    assert (features["changed_responses"], control["changed_responses"]) == (2, 1)
    assert features["delta_vs_baseline"]["delta"] == pytest.approx(0.5)
    assert features["delta_vs_control"]["delta"] == pytest.approx(0.25)
    assert control["delta_vs_baseline"]["delta"] == pytest.approx(0.25)
    assert "delta_vs_control" not in control
    assert report["clt_free"][0]["same_responses_as_features"] == 0.75
    # the intervals resample whole images: with a, b and c of one image, two images to draw
    three = {"a": "image:1.jpg", "b": "image:1.jpg", "c": "image:1.jpg", "d": "image:2.jpg"}
    grouped = _report(generated, config, "t", 4, {}, three)["features"][0]["delta_vs_baseline"]
    assert (grouped["ci_low"], grouped["ci_high"]) == (0.0, pytest.approx(2 / 3))
    assert features["delta_vs_baseline"]["ci_high"] == 1.0  # three images: c drawn three times


def test_mapped_neurons_are_those_of_the_direction_s_features() -> None:
    def entry(direction: str, hookpoint: str, neurons: list[int]) -> dict:
        top = [{"neuron_idx": n} for n in neurons]
        return {"feature": {"direction": direction},
                "targets": [{"target_hookpoint": hookpoint, "top_mlp_neurons": top}]}  # fmt: skip

    neuron_map = [
        entry("good", "mlp0", [3, 1]),
        entry("bad", "mlp0", [7]),
        entry("good", "mlp1", [2]),
    ]
    assert mapped_neurons(neuron_map, "good") == {"mlp0": [1, 3], "mlp1": [2]}
    assert mapped_neurons(neuron_map, "bad") == {"mlp0": [7]}


def test_few_images_warning_below_twenty_images() -> None:
    assert "one image" in few_images_warning(1)
    assert "only 19 images" in few_images_warning(19)
    assert few_images_warning(20) is None


def test_the_control_condition_steers_the_control_features() -> None:
    from benchmarks.stages.steer import Condition, _setup

    features = {"good": [{"hookpoint": "h0", "feature_idx": 3}]}
    control = {"good": [{"hookpoint": "h0", "feature_idx": 9}]}
    spec = {}
    for kind in ("features", "control"):
        setup = _setup(
            Condition(f"good-{kind}-x2", kind, "good", 2.0), None, "replacement", features,
            control, {}, {}, "decision",
        )  # fmt: skip
        assert setup.replacement == "replacement"
        spec[kind] = (setup.spec["features"], setup.interventions[0].features)
    assert spec == {"features": ([("h0", 3)], (3,)), "control": ([("h0", 9)], (9,))}


def test_a_clamp_condition_records_the_values_it_sets_so_new_ones_generate_it_again(
    tiny_llava, llava_recipe
) -> None:
    """A clamp condition's folder is reused only for the same clamped values: the typical
    activations move when analyze runs again on other samples, with the same features."""
    from types import SimpleNamespace

    from benchmarks.stages.steer import Condition, _setup

    coders = random_clt(tiny_llava[0], llava_recipe)
    run = SimpleNamespace(coders=coders)
    hookpoint = coders.hookpoints[0]
    for kind in ("features", "clt_free"):
        values = []
        for reference in (1.5, 2.5):
            features = {
                "good": [{"hookpoint": hookpoint, "feature_idx": 3, "reference": reference}]
            }
            setup = _setup(
                Condition(f"good-{kind}-clamp2", kind, "good", 2.0, "clamp"), run, None,
                features, {}, {}, {}, "decision",
            )  # fmt: skip
            values.append(setup.spec.get("values"))
        assert values == [[3.0], [5.0]], kind
