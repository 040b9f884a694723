"""Influence analysis: hand-computed scores, round-robin selection, FDR control, splits."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from scipy.stats import false_discovery_control
from scipy.stats import fisher_exact as scipy_fisher

from benchmarks.influence import (
    FiringCounts,
    benjamini_hochberg,
    feature_scores,
    fisher_exact,
    group_means,
    round_robin,
)
from benchmarks.splits import sample_images, split_ids
from benchmarks.stages import analyze
from benchmarks.store import FeatureStore, SampleRecord, StoreMeta

# Hand-made store: 2 layers, 4 latents, k = 2. Per sample: rows of (layer 0, layer 1) pairs of
# (latents, values); the first row (or rows) is the prompt, the rest the response.
HAND_SAMPLES = {
    "g1": (1, [
        (([0, 1], [1.0, 1.0]), ([2, 3], [1.0, 1.0])),
        (([1, 2], [2.0, 0.5]), ([0, 3], [1.0, 4.0])),
        (([1, 3], [4.0, 1.0]), ([0, 1], [3.0, 2.0])),
    ]),
    "g2": (1, [
        (([2, 3], [1.0, 1.0]), ([1, 2], [1.0, 1.0])),
        (([1, 0], [1.0, 2.0]), ([3, 2], [2.0, 0.5])),
    ]),
    "b1": (1, [
        (([1, 2], [1.0, 1.0]), ([1, 3], [1.0, 1.0])),
        (([2, 3], [1.0, 3.0]), ([0, 2], [0.5, 1.0])),
    ]),
    "b2": (1, [
        (([0, 3], [1.0, 1.0]), ([2, 3], [1.0, 1.0])),
        (([1, 2], [0.5, 2.0]), ([0, 1], [1.0, 1.0])),
        (([2, 0], [4.0, 1.0]), ([0, 3], [2.0, 1.0])),
    ]),
}  # fmt: skip
# Computed by hand from the response rows above: [layer][latent].
HAND = {
    "good_freq": [[0.5, 1.0, 0.5, 0.5], [0.5, 0.5, 0.5, 1.0]],
    "bad_freq": [[0.5, 0.5, 1.0, 0.5], [1.0, 0.5, 0.5, 0.5]],
    "good_avg_activation": [[2.0, 2.0, 0.5, 1.0], [2.0, 2.0, 0.5, 3.0]],
    "bad_avg_activation": [[1.0, 0.5, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]],
}
EPS = 0.01


def write_hand_store(out):
    store = FeatureStore(
        out / "store", StoreMeta([f"layers.{i}.mlp" for i in (4, 7)], k=2, num_latents=4)
    )
    samples = []
    for sample_id, (prompt_rows, rows) in HAND_SAMPLES.items():
        indices = torch.tensor([[pair[0] for pair in row] for row in rows])
        values = torch.tensor([[pair[1] for pair in row] for row in rows])
        regions = {"prompt": [(0, prompt_rows)], "response": [(prompt_rows, len(rows))]}
        samples.append((sample_id, indices, values, regions))
    store.append(samples[:3])
    store.append(samples[3:])
    classification = {"GOOD": [{"id": "g1"}, {"id": "g2"}], "BAD": [{"id": "b1"}, {"id": "b2"}]}
    (out / "classification.json").write_text(json.dumps(classification))


def run_analyze(out, *flags):
    argv = ["--out", str(out), "--held-out-fraction", "0", "--eps", str(EPS), "--region",
            "response", *flags]  # fmt: skip
    analyze.main(argv, benchmark="hand")
    return json.loads((out / "features.json").read_text())


def test_scores_equal_hand_computed_values(tmp_path, capsys):
    write_hand_store(tmp_path)
    result = run_analyze(tmp_path, "--target-features", "3")
    assert "warning: only 2 GOOD and 2 BAD train samples" in capsys.readouterr().out
    stats = np.load(tmp_path / "feature_stats.npz")
    for name, expected in HAND.items():
        np.testing.assert_allclose(stats[name], expected, err_msg=name)
    gf, bf = np.array(HAND["good_freq"]), np.array(HAND["bad_freq"])
    ga, ba = np.array(HAND["good_avg_activation"]), np.array(HAND["bad_avg_activation"])
    np.testing.assert_allclose(stats["goodness_score"], gf / (bf + EPS) * ga)
    np.testing.assert_allclose(stats["badness_score"], bf / (gf + EPS) * ba)
    np.testing.assert_allclose(stats["activation_ratio"], ga / (ba + EPS))
    assert stats["goodness_score"][0, 1] == pytest.approx(1.0 / 0.51 * 2.0)
    # With 2 vs 2 samples nothing can be significant; p-values are scipy's.
    assert stats["p_value"][1, 0] == pytest.approx(scipy_fisher([[1, 1], [2, 0]])[1])

    assert result["total_good_samples"] == 2 and result["total_bad_samples"] == 2
    assert result["total_features_analyzed"] == 8
    picked = [(f["direction"], f["layer"], f["feature_idx"]) for f in result["features"]]
    # good: layer 4 {1: 3.92, 0: 1.96}, layer 7 {3: 5.88, 1: 1.96}; bad: layer 4 {2: 3.92,
    # 3: 2.94}, layer 7 {0: 1.96, 2: 0.98}; round robin: best of each layer (stronger layer
    # first), then again (good's second round: 1.96 each, lower layer first).
    assert picked == [
        ("good", 7, 3), ("good", 4, 1), ("good", 4, 0),
        ("bad", 4, 2), ("bad", 7, 0), ("bad", 4, 3),
    ]  # fmt: skip
    assert result["layer_distribution"] == {"4": 4, "7": 2} and result["layers"] == [4, 7]
    first = result["features"][1]  # layer 4's best good feature
    assert first["hookpoint"] == "layers.4.mlp" and first["feature_idx"] == 1
    assert first["good_avg_activation"] == 2.0 and first["bad_freq"] == 0.5
    assert first["significant"] is False and first["q_value"] >= first["p_value"]
    assert result["split"]["n_held_out"] == 0


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--eps", "-0.5", "--eps -0.5: give a positive share"),
        ("--eps", "0", "--eps 0: give a positive share"),
        ("--fdr", "5", "--fdr 5: give a rate between 0 and 1"),
        ("--target-features", "-3", "--target-features -3: give 0 or more"),
        ("--min-per-layer", "-1", "--min-per-layer -1: give 0 or more"),
        ("--held-out-fraction", "1.5", "--held-out-fraction 1.5: give a share from 0 up to 1"),
    ],
)
def test_bad_analysis_parameters_are_refused_before_any_is_recorded(tmp_path, flag, value, message):
    """A negative eps flips or blows up every ratio; a bad value must not reach features.json,
    whose parameters later runs take as their defaults."""
    write_hand_store(tmp_path)
    with pytest.raises(ValueError, match=message):
        run_analyze(tmp_path, flag, value)
    assert not (tmp_path / "features.json").exists()


def test_region_changes_the_rows_analysed(tmp_path):
    write_hand_store(tmp_path)
    run_analyze(tmp_path, "--region", "all", "--force")
    stats = np.load(tmp_path / "feature_stats.npz")
    # the prompt rows add layer 4 latent 0 to g1 (value 1) and to b2 (value 1, with 1.0 later)
    assert stats["good_freq"][0, 0] == 1.0
    assert stats["good_avg_activation"][0, 0] == pytest.approx((1.0 + 2.0) / 2)
    assert stats["bad_avg_activation"][0, 0] == pytest.approx(1.0)


def test_decision_region_is_the_last_prompt_row_and_the_response_rows(tmp_path):
    record = SampleRecord("s", 0, 10, 17, {"prompt": [(0, 1), (3, 5)], "image": [(1, 3)],
                                            "response": [(5, 7)]})  # fmt: skip
    assert record.rows("decision").tolist() == [4, 5, 6]
    # a response of one token (EOS) stores no response row: only the last prompt row decides
    assert SampleRecord("s", 0, 0, 3, {"prompt": [(0, 3)]}).rows("decision").tolist() == [2]
    # analyze's default: on the hand store (one prompt row) decision covers every row
    write_hand_store(tmp_path)
    argv = ["--out", str(tmp_path), "--held-out-fraction", "0", "--eps", str(EPS)]
    analyze.main(argv, benchmark="hand")
    decision = dict(np.load(tmp_path / "feature_stats.npz"))
    assert (
        json.loads((tmp_path / "features.json").read_text())["parameters"]["region"] == "decision"
    )
    run_analyze(tmp_path, "--region", "all")
    everything = np.load(tmp_path / "feature_stats.npz")
    np.testing.assert_allclose(decision["good_avg_activation"], everything["good_avg_activation"])
    assert decision["good_freq"][0, 0] != HAND["good_freq"][0][0]  # not the response rows alone


def test_up_to_date_output_is_not_recomputed(tmp_path):
    write_hand_store(tmp_path)
    run_analyze(tmp_path)
    target = tmp_path / "features.json"
    os.utime(target, (1e10, 1e10))  # newer than every input
    run_analyze(tmp_path)
    assert target.stat().st_mtime == 1e10
    run_analyze(tmp_path, "--target-features", "1")  # other parameters: recompute
    assert target.stat().st_mtime != 1e10
    assert json.loads(target.read_text())["parameters"]["target_features"] == 1


def test_flags_not_given_keep_the_recorded_parameters(tmp_path, capsys):
    write_hand_store(tmp_path)
    run_analyze(tmp_path, "--target-features", "1", "--eps", "0.5")  # as `all` would
    target = tmp_path / "features.json"
    os.utime(target, (1e10, 1e10))
    analyze.main(["--out", str(tmp_path)], benchmark="hand")  # alone: the same settings
    assert target.stat().st_mtime == 1e10
    assert "target_features=1" in capsys.readouterr().out
    analyze.main(["--out", str(tmp_path), "--target-features", "2"], benchmark="hand")
    parameters = json.loads(target.read_text())["parameters"]
    assert (parameters["target_features"], parameters["eps"]) == (2, 0.5)
    assert parameters["region"] == "response" and parameters["held_out_fraction"] == 0


def test_attribution_ranking(tmp_path):
    write_hand_store(tmp_path)
    # activation x gradient per (sample, layer position, latent); absent entries are 0. Samples
    # g1, g2 are GOOD, b1, b2 BAD. Layer 7 latent 2 supports the answer alike in g1 and b1
    # (pooled mean 0.2, the largest at layer 7, but GOOD - BAD = 0); layer 4 latent 1 supports
    # GOOD answers only (0.2); layer 7 latent 3 too, less (0.1); layer 7 latent 0 and layer 4
    # latent 3 support the BAD answers (0.3, 0.5).
    save_file(
        {
            "sample": np.array([0, 2, 0, 1, 1, 2, 3], dtype=np.int64),
            "layer": np.array([1, 1, 0, 0, 1, 1, 0], dtype=np.int64),
            "latent": np.array([2, 2, 1, 1, 3, 0, 3], dtype=np.int64),
            "value": np.array([0.4, 0.4, 0.2, 0.2, 0.2, 0.6, 1.0], dtype=np.float32),
        },
        str(tmp_path / "store" / "attributions.safetensors"),
        metadata={"ids": json.dumps(["g1", "g2", "b1", "b2"]), "region": "response"},
    )
    result = run_analyze(tmp_path, "--rank-by", "attribution", "--target-features", "1")
    assert result["attribution_region"] == "response"
    with pytest.raises(ValueError, match="attribute --region decision --force"):
        run_analyze(tmp_path, "--rank-by", "attribution", "--region", "decision")
    picked = {(f["direction"], f["layer"], f["feature_idx"]): f for f in result["features"]}
    assert set(picked) == {("good", 4, 1), ("good", 7, 3), ("bad", 4, 3), ("bad", 7, 0)}
    assert picked[("good", 4, 1)]["attribution"] == pytest.approx(0.4 / 4)
    assert picked[("good", 4, 1)]["attribution_good"] == pytest.approx(0.2)
    assert picked[("bad", 7, 0)]["attribution_bad"] == pytest.approx(0.3)
    stats = np.load(tmp_path / "feature_stats.npz")
    assert stats["attribution"][1, 2] == pytest.approx(0.2)  # pooled: it would rank first
    assert stats["attribution_good"][1, 2] == stats["attribution_bad"][1, 2] == pytest.approx(0.2)
    assert stats["attribution_bad"][0, 3] == pytest.approx(0.5)


def test_firing_counts_chunking_does_not_change_results():
    rng = np.random.default_rng(0)
    rows, layers, latents, k = 40, 3, 50, 5
    indices = np.stack([rng.permutation(latents)[:k] for _ in range(rows * layers)]).reshape(
        rows, layers, k
    )
    values = rng.random((rows, layers, k)).astype(np.float32)
    row_sample = np.sort(rng.integers(0, 8, rows))
    groups = np.array([0, 1, 0, 1, 1, 0, 0, 1])
    whole = FiringCounts.zeros(layers, latents)
    whole.add(indices, values, row_sample, groups)
    parts = FiringCounts.zeros(layers, latents)
    for first in (0, 4):
        rows_in = (row_sample >= first) & (row_sample < first + 4)
        parts.add(
            indices[rows_in],
            values[rows_in],
            row_sample[rows_in] - first,
            groups[first : first + 4],
        )
    np.testing.assert_array_equal(whole.fired, parts.fired)
    np.testing.assert_allclose(whole.act_sum, parts.act_sum)
    # brute force for one feature
    layer, latent = 1, int(indices[0, 1, 0])
    fired = np.zeros(2)
    for sample in range(8):
        hits = (indices[row_sample == sample, layer] == latent).any(-1)
        fired[groups[sample]] += hits.any()
    np.testing.assert_array_equal(whole.fired[:, layer, latent], fired)


def test_a_sample_without_rows_still_counts_in_its_group():
    # sample 1 (BAD) has no row in the region: it fires nothing, and bad_freq is 1 / 2, not 1 / 1
    counts = FiringCounts.zeros(1, 3)
    indices = np.array([[[0]], [[0]], [[0]]])
    values = np.ones((3, 1, 1))
    counts.add(indices, values, np.array([0, 2, 3]), np.array([0, 1, 1, 0]))
    np.testing.assert_array_equal(counts.n_samples, [2, 2])
    np.testing.assert_array_equal(counts.fired[:, 0, 0], [2, 1])
    assert feature_scores(counts, eps=1e-6)["bad_freq"][0, 0] == 0.5


def test_group_means_leave_out_samples_of_group_minus_one():
    # samples 0, 1 GOOD, 2 BAD, 3 not counted (-1); entries (sample, layer, latent, value)
    sample, layer = np.array([0, 1, 2, 3]), np.array([0, 0, 1, 0])
    latent, value = np.array([1, 1, 0, 1]), np.array([2.0, 4.0, 5.0, 100.0])
    means = group_means(sample, layer, latent, value, np.array([0, 0, 1, -1]), (2, 2))
    expected = np.zeros((2, 2, 2))
    expected[0, 0, 1] = (2.0 + 4.0) / 2
    expected[1, 1, 0] = 5.0
    np.testing.assert_allclose(means, expected)


def test_zero_valued_topk_slots_do_not_fire():
    # ReLU then top-k: with fewer than k positive pre-activations the remaining slots hold 0 at
    # arbitrary latents (here latent 3 in sample 0 and latents 0, 3 in sample 1)
    from vlm_sparsify.topk_encoder import encode_topk

    weight, bias = torch.eye(4), torch.full((4,), -1.0)
    x = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 2.0, 4.0, 0.0]])
    acts, idx, _ = encode_topk(x, weight, bias, 3, "topk")
    assert (acts == 0).any(), "the encoder no longer stores zero slots: rewrite this test"
    counts = FiringCounts.zeros(1, 4)
    counts.add(idx.numpy()[:, None, :], acts.numpy()[:, None, :], np.arange(2), np.array([0, 1]))
    np.testing.assert_array_equal(counts.fired[:, 0], [[1, 0, 0, 0], [0, 1, 1, 0]])
    np.testing.assert_allclose(counts.act_sum[:, 0], [[2, 0, 0, 0], [0, 1, 3, 0]])
    # a sample whose latent fires on one token and sits in a zero slot on another: the mean is
    # over the firing token alone
    counts = FiringCounts.zeros(1, 4)
    indices = np.array([[[2, 1]], [[2, 3]]])
    values = np.array([[[4.0, 1.0]], [[0.0, 0.0]]])
    counts.add(indices, values, np.array([0, 0]), np.array([0]))
    np.testing.assert_array_equal(counts.fired[0, 0], [0, 1, 1, 0])
    np.testing.assert_allclose(counts.act_sum[0, 0], [0.0, 1.0, 4.0, 0.0])


def test_fisher_and_bh_match_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 31, 300), rng.integers(0, 21, 300)
    a[:10], b[:10] = 15, 10  # symmetric tables (ties in the null distribution)
    expected = [scipy_fisher([[x, 30 - x], [y, 20 - y]])[1] for x, y in zip(a, b, strict=True)]
    p = fisher_exact(a, 30, b, 20)
    np.testing.assert_allclose(p, expected, rtol=1e-9)
    np.testing.assert_allclose(benjamini_hochberg(p), false_discovery_control(p), rtol=1e-12)


def test_fdr_family_is_the_features_that_fire(tmp_path):
    # 200 latents, of which only 0-5 ever fire: BH corrects over those 6, not over 200
    rng = np.random.default_rng(4)
    store = FeatureStore(tmp_path / "store", StoreMeta(["l0"], k=2, num_latents=200))
    samples, labels = [], {"GOOD": [], "BAD": []}
    for i in range(40):
        good = i % 2 == 0
        first = 0 if good and i % 5 < 2 else 1  # latent 0: 8 of 20 GOOD, no BAD
        indices = torch.tensor([[[first, 2 + int(rng.integers(4))]]])
        samples.append((f"s{i}", indices, torch.ones(1, 1, 2), {"response": [(0, 1)]}))
        labels["GOOD" if good else "BAD"].append({"id": f"s{i}"})
    store.append(samples)
    (tmp_path / "classification.json").write_text(json.dumps(labels))
    result = run_analyze(tmp_path)
    stats = np.load(tmp_path / "feature_stats.npz")
    fired = (stats["good_freq"] + stats["bad_freq"])[0] > 0
    assert fired.sum() == 6 and result["features_tested"] == 6
    assert result["total_features_analyzed"] == 200
    np.testing.assert_allclose(
        stats["q_value"][0, fired], false_discovery_control(stats["p_value"][0, fired])
    )
    assert (stats["q_value"][0, ~fired] == 1).all()
    # over all 200 latents latent 0 would not be significant at 0.05 (p * 200 > 0.05 * 1)
    assert stats["p_value"][0, 0] * 200 > 0.05 > stats["q_value"][0, 0]
    assert result["features"][0]["feature_idx"] == 0 and result["features"][0]["significant"]


def test_small_groups_are_named_in_a_warning():
    from benchmarks.stages.analyze import small_groups_warning

    assert small_groups_warning(69, 1).startswith("only 1 BAD train samples (of 69 GOOD / 1 BAD)")
    assert small_groups_warning(9, 9).startswith("only 9 GOOD and 9 BAD")
    assert small_groups_warning(10, 400) is None


def test_round_robin_balances_layers():
    rng = np.random.default_rng(2)
    scores = rng.random((5, 40))
    scores[rng.random((5, 40)) < 0.3] = np.nan
    for target in (1, 7, 23, 50):
        picked = round_robin(scores, target)
        counts = np.bincount([layer for layer, _ in picked], minlength=5)
        assert len(picked) == target
        assert counts.max() - counts.min() <= 1
        for layer in range(5):  # each layer's picks are its best candidates, best first
            mine = [scores[layer, latent] for lay, latent in picked if lay == layer]
            best = np.sort(scores[layer][~np.isnan(scores[layer])])[::-1][: len(mine)]
            np.testing.assert_array_equal(mine, best)


def test_round_robin_gives_a_partial_round_to_the_strongest_layers_not_the_first():
    # 4 layers, target 6: round 2 has room for 2 picks; layers 2 and 3 hold the stronger
    # second candidates, so they get them (in index order they went to layers 0 and 1)
    scores = np.array(
        [[9.0, 1.0, np.nan], [8.0, 2.0, np.nan], [7.0, 6.0, np.nan], [6.5, 5.0, np.nan]]
    )
    picked = round_robin(scores, target=6)
    assert picked == [(0, 0), (1, 0), (2, 0), (3, 0), (2, 1), (3, 1)]
    # equal second candidates: lower layer first
    scores[:, 1] = 3.0
    assert round_robin(scores, target=5)[4] == (0, 1)


def test_round_robin_min_per_layer_and_exhausted_layers():
    scores = np.full((3, 10), np.nan)
    scores[0] = np.arange(10)
    scores[1, :2] = [5.0, 1.0]
    scores[2] = np.arange(10) * 2
    picked = round_robin(scores, target=2, min_per_layer=2)
    assert sorted(picked) == [(0, 8), (0, 9), (1, 0), (1, 1), (2, 8), (2, 9)]
    # layer 1 runs out after 2: the others keep alternating
    counts = np.bincount([layer for layer, _ in round_robin(scores, target=12)], minlength=3)
    assert counts.tolist() == [5, 2, 5]


def null_counts(seed: int, n_good=60, n_bad=80, layers=4, latents=500) -> FiringCounts:
    """Firing independent of the GOOD / BAD label: each feature has its own firing rate."""
    rng = np.random.default_rng(seed)
    rate = rng.uniform(0.02, 0.6, (layers, latents))
    counts = FiringCounts.zeros(layers, latents)
    counts.n_samples[:] = [n_good, n_bad]
    counts.fired[0] = rng.binomial(n_good, rate)
    counts.fired[1] = rng.binomial(n_bad, rate)
    return counts


def test_fdr_controlled_on_null_and_effects_found():
    alpha, runs_with_discoveries, small_p = 0.05, 0, []
    for seed in range(20):
        counts = null_counts(seed)
        p = fisher_exact(counts.fired[0], 60, counts.fired[1], 80)
        runs_with_discoveries += (benjamini_hochberg(p) <= alpha).any()
        small_p.append((p <= alpha).mean())
    # under the complete null the FDR is P(any discovery)
    assert runs_with_discoveries / 20 <= alpha
    # and the p-values are valid but not degenerate (Fisher is conservative)
    assert 0.01 < np.mean(small_p) <= alpha

    counts = null_counts(99)
    counts.fired[0, 0, :50] = 50  # 50 real effects: 50/60 GOOD vs ~rate of BAD
    counts.fired[1, 0, :50] = 10
    q = benjamini_hochberg(fisher_exact(counts.fired[0], 60, counts.fired[1], 80))
    discoveries = q <= alpha
    assert discoveries[0, :50].all()
    false = discoveries.sum() - 50
    assert false / discoveries.sum() <= alpha


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_null_store_has_few_discoveries(tmp_path, seed):
    rng = np.random.default_rng(seed)
    store = FeatureStore(tmp_path / "store", StoreMeta(["l0", "l1"], k=3, num_latents=40))
    samples, labels = [], {"GOOD": [], "BAD": []}
    for i in range(160):
        indices = torch.from_numpy(np.stack([rng.permutation(40)[:3] for _ in range(8)]))
        values = torch.from_numpy(rng.random((4, 2, 3), dtype=np.float32))
        samples.append((f"s{i}", indices.reshape(4, 2, 3), values, {"response": [(0, 4)]}))
        labels["GOOD" if rng.random() < 0.5 else "BAD"].append({"id": f"s{i}"})
    store.append(samples)
    (tmp_path / "classification.json").write_text(json.dumps(labels))
    result = run_analyze(tmp_path, "--fdr", "0.05")
    q = np.load(tmp_path / "feature_stats.npz")["q_value"]
    assert (q <= 0.05).mean() <= 0.05
    assert result["total_good_samples"] + result["total_bad_samples"] == 160


def test_split_is_deterministic_and_order_free():
    ids = [f"q{i}" for i in range(2000)]
    split = split_ids(ids, held_out_fraction=0.25, seed=3)
    assert 0.22 < len(split.held_out) / 2000 < 0.28
    assert set(split.train).isdisjoint(split.held_out)
    again = split_ids(list(reversed(ids)) + ["new"], held_out_fraction=0.25, seed=3)
    assert set(again.held_out) - {"new"} == set(split.held_out)
    assert set(split_ids(ids, 0.25, seed=4).held_out) != set(split.held_out)
    # each side keeps the ids' order
    assert split.train == [i for i in ids if i in set(split.train)]
    assert [i for i in again.train if i != "new"] == [
        i for i in reversed(ids) if i in set(split.train)
    ]
    with pytest.raises(ValueError, match="held_out_fraction must be in"):
        split_ids(ids, held_out_fraction=1.0)


def test_split_by_image_keeps_each_image_on_one_side():
    # 400 images with 1 to 10 questions each (POPE asks one question per image in each of its
    # three splits): the split by sample id would put most images on both sides
    rng = np.random.default_rng(0)
    records = [
        {"id": f"{image}-{question}", "image": f"img{image}.jpg"}
        for image in range(400)
        for question in range(int(rng.integers(1, 11)))
    ]
    ids = [record["id"] for record in records]
    images = sample_images(records)
    split = split_ids(ids, held_out_fraction=0.2, seed=5, groups=images)
    train_images = {images[sample_id] for sample_id in split.train}
    held_out_images = {images[sample_id] for sample_id in split.held_out}
    assert train_images.isdisjoint(held_out_images)
    assert 0.15 < len(split.held_out) / len(ids) < 0.25
    assert 0.15 < len(held_out_images) / 400 < 0.25
    assert split.group_by == "image" and split.n_held_out_groups == len(held_out_images)
    assert split.to_json()["group_by"] == "image"
    by_id = split_ids(ids, held_out_fraction=0.2, seed=5)
    assert by_id.group_by == "sample"
    assert {images[i] for i in by_id.train} & {images[i] for i in by_id.held_out}
    # easy-VQA names its images by number; a record naming none is split on its own
    assert sample_images([{"id": "q1", "image_id": 7}, {"id": "q2"}]) == {"q1": "image_id:7"}
    assert sample_images([{"id": "q0", "image_id": 0}]) == {"q0": "image_id:0"}  # easy-VQA's first
    assert split_ids(["q1", "q2"], 0.5, groups={"q1": "image_id:7"}).group_by == "mixed"


def test_analyze_splits_by_the_images_of_responses_jsonl(tmp_path, capsys):
    rng = np.random.default_rng(3)
    store = FeatureStore(tmp_path / "store", StoreMeta(["l0"], k=2, num_latents=10))
    samples, labels, records = [], {"GOOD": [], "BAD": []}, []
    for i in range(300):
        indices = torch.from_numpy(np.stack([rng.permutation(10)[:2] for _ in range(3)]))
        values = torch.ones(3, 1, 2)
        samples.append((f"s{i}", indices.reshape(3, 1, 2), values, {"response": [(0, 3)]}))
        labels["GOOD" if i % 3 else "BAD"].append({"id": f"s{i}"})
        records.append({"id": f"s{i}", "response": "yes", "image": f"im{i // 6}.jpg"})
    store.append(samples)
    (tmp_path / "classification.json").write_text(json.dumps(labels))
    (tmp_path / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    analyze.main(["--out", str(tmp_path), "--held-out-fraction", "0.5"], benchmark="t")
    result = json.loads((tmp_path / "features.json").read_text())
    split = result["split"]
    held_out = set(split["held_out_ids"])
    # the statistics come from the train samples alone; the held-out counts are by label
    bad = {item["id"] for item in labels["BAD"]}
    assert result["total_bad_samples"] == len(bad - held_out)
    assert result["total_good_samples"] == 300 - len(held_out) - len(bad - held_out)
    assert (split["held_out_bad"], split["held_out_good"]) == (
        len(bad & held_out),
        len(held_out - bad),
    )
    image = {r["id"]: r["image"] for r in records}
    assert split["group_by"] == "image"
    assert 0 < len(held_out) < 300
    assert {image[i] for i in held_out}.isdisjoint(image[i] for i in image if i not in held_out)
    assert split["n_held_out_groups"] == len({image[i] for i in held_out})
    assert split["n_held_out_groups"] >= 20
    assert "warning: the held-out split" not in capsys.readouterr().out
    # fewer than 20 held-out images: steer's intervals would be unreliable, said before it runs
    analyze.main(["--out", str(tmp_path), "--held-out-fraction", "0.2"], benchmark="t")
    held = json.loads((tmp_path / "features.json").read_text())["split"]["n_held_out_groups"]
    assert 2 <= held < 20
    assert f"samples of {held} images: steer's bootstrap intervals from fewer than 20" in (
        capsys.readouterr().out
    )
    # a held-out share too small for this many images: nothing for steer to judge, said so
    analyze.main(["--out", str(tmp_path), "--held-out-fraction", "0.001"], benchmark="t")
    printed = capsys.readouterr().out
    assert (
        "analyze: warning: the held-out split holds 0 samples of 0 image(s): steer would" in printed
    )


def test_features_json_of_an_older_analysis_is_recomputed(tmp_path):
    write_hand_store(tmp_path)
    run_analyze(tmp_path)
    target = tmp_path / "features.json"
    older = json.loads(target.read_text())
    del older["analysis_version"]  # written before the split by image
    target.write_text(json.dumps(older))
    os.utime(target, (1e10, 1e10))
    run_analyze(tmp_path)
    assert json.loads(target.read_text())["analysis_version"] == analyze.ANALYSIS_VERSION


def test_scores_from_counts_guard_empty_groups():
    counts = FiringCounts.zeros(1, 3)
    counts.n_samples[:] = [4, 0]
    counts.fired[0] = [2, 0, 4]
    counts.act_sum[0] = [3.0, 0.0, 2.0]
    stats = feature_scores(counts, eps=0.5)
    np.testing.assert_allclose(stats["good_avg_activation"][0], [1.5, 0.0, 0.5])
    np.testing.assert_allclose(stats["goodness_score"][0], [0.5 / 0.5 * 1.5, 0.0, 1.0 / 0.5 * 0.5])


def test_a_feature_is_selected_for_one_direction_only():
    # feature 1 ties (2 vs 2): it goes to the good list only
    stats = {
        "goodness_score": np.array([[3.0, 2.0, 0.5]]),
        "badness_score": np.array([[1.0, 2.0, 4.0]]),
        "p_value": np.zeros((1, 3)),
        "q_value": np.zeros((1, 3)),
    }
    config = analyze.AnalyzeConfig(out="unused", target_features=3, min_per_layer=0)
    selected = analyze.select_features(stats, config)
    assert selected["good"] == [(0, 0), (0, 1)]
    assert selected["bad"] == [(0, 2)]


def test_significant_only_controls_the_false_discovery_rate_not_the_raw_p_value():
    p = np.array([0.04] * 5 + [0.9] * 95)  # p <= fdr, but q = 0.8
    stats = {
        "goodness_score": np.ones((1, 100)),
        "badness_score": np.zeros((1, 100)),
        "p_value": p[None],
        "q_value": benjamini_hochberg(p)[None],
    }
    config = analyze.AnalyzeConfig(out="unused", significant_only=True, fdr=0.05, min_per_layer=0)
    selected = analyze.select_features(stats, config)
    assert selected == {"good": [], "bad": []}


def test_fisher_matches_scipy_on_large_tables_whose_extreme_probabilities_underflow():
    n = 3000
    a = np.array([0, 1, 1500, 3000, 3000, 1500])
    b = np.array([3000, 2999, 1500, 0, 1, 0])
    expected = [scipy_fisher([[x, n - x], [y, n - y]])[1] for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(fisher_exact(a, n, b, n), expected, rtol=1e-9, atol=1e-300)
    assert fisher_exact(np.array([1500]), 1500, np.array([0]), 1500)[0] == 0.0


@pytest.mark.parametrize(("n1", "n2"), [(30, 20), (20, 30), (5, 40), (12, 12)])
def test_fisher_matches_scipy_on_every_table_whichever_group_is_larger(n1, n2):
    a, b = (g.ravel() for g in np.meshgrid(np.arange(n1 + 1), np.arange(n2 + 1)))
    expected = [scipy_fisher([[x, n1 - x], [y, n2 - y]])[1] for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(fisher_exact(a, n1, b, n2), expected, rtol=1e-9)


def test_attributions_of_part_of_the_train_samples_are_left_out_not_averaged(tmp_path, capsys):
    # `attribute --limit 3` covers g1, g2 and b1 only: a mean over them is not the mean over the
    # train samples that features.json promises (the BAD mean would be b1's value alone).
    write_hand_store(tmp_path)
    save_file(
        {
            "sample": np.array([0, 2], dtype=np.int64),
            "layer": np.array([0, 0], dtype=np.int64),
            "latent": np.array([1, 1], dtype=np.int64),
            "value": np.array([0.4, 0.8], dtype=np.float32),
        },
        str(tmp_path / "store" / "attributions.safetensors"),
        metadata={"ids": json.dumps(["g1", "g2", "b1"]), "region": "response"},
    )
    result = run_analyze(tmp_path)
    assert "lacks 1 of the 4 train samples" in capsys.readouterr().out
    assert result["attribution_region"] is None
    assert not any(key.startswith("attribution") for f in result["features"] for key in f)
    assert "attribution" not in np.load(tmp_path / "feature_stats.npz")


def test_a_train_split_of_one_label_is_refused(tmp_path):
    write_hand_store(tmp_path)
    for label, other in (("GOOD", "BAD"), ("BAD", "GOOD")):
        everyone = [{"id": i} for i in HAND_SAMPLES]
        (tmp_path / "classification.json").write_text(json.dumps({label: everyone, other: []}))
        with pytest.raises(ValueError, match="separating the two needs both"):
            run_analyze(tmp_path, "--force")


def test_analyze_errors_are_one_line_naming_the_benchmark_and_stage(tmp_path):
    # analyze raised its own SystemExit lines, the only stage whose errors did not say which
    # stage spoke ("easyvqa analyze: ..."): inside `all` they read as the previous stage's
    from benchmarks.__main__ import run

    write_hand_store(tmp_path)
    (tmp_path / "classification.json").unlink()
    with pytest.raises(SystemExit, match=r"^easyvqa analyze: missing .*classification.json: "
                       "run `classify` first"):  # fmt: skip
        run(["easyvqa", "analyze", "--out", str(tmp_path)])
    everyone = [{"id": i} for i in HAND_SAMPLES]
    (tmp_path / "classification.json").write_text(json.dumps({"GOOD": everyone, "BAD": []}))
    with pytest.raises(SystemExit, match="^easyvqa analyze: the train split holds .* both"):
        run(["easyvqa", "analyze", "--out", str(tmp_path), "--held-out-fraction", "0"])


def test_significant_means_q_value_at_most_the_fdr():
    stats = {"p_value": np.array([[0.01, 0.01]]), "q_value": np.array([[0.04, 0.2]])}
    features = [
        analyze._feature_json(stats, 0, latent, "good", [4], ["layers.4.mlp"], 0.05)
        for latent in (0, 1)
    ]
    assert [f["significant"] for f in features] == [True, False]


def test_layer_numbers_are_the_last_integer_of_distinct_names():
    assert analyze.layer_numbers(["model.layers.3.mlp", "model.layers.12.mlp"]) == [3, 12]
    assert analyze.layer_numbers(["blocks.0.layers.5", "blocks.1.layers.6"]) == [5, 6]
    # numbers repeated (a vision and a text layer 3) or missing: positions instead
    assert analyze.layer_numbers(["vision.layers.3", "text.layers.3"]) == [0, 1]
    assert analyze.layer_numbers(["mlp", "layers.2.mlp"]) == [0, 1]


def test_pooled_attribution_is_the_mean_over_every_train_sample(tmp_path):
    # three GOOD samples with attribution 1 and one BAD with 5 on (layer 0, latent 2); a fifth
    # sample outside the train split (-1) does not count: pooled = 8 / 4, not (1 + 5) / 2
    path = tmp_path / "attributions.safetensors"
    save_file(
        {
            "sample": np.arange(5, dtype=np.int64),
            "layer": np.zeros(5, dtype=np.int64),
            "latent": np.full(5, 2, dtype=np.int64),
            "value": np.array([1.0, 1.0, 1.0, 5.0, 100.0], dtype=np.float32),
        },
        str(path),
        metadata={"ids": json.dumps(["a", "b", "c", "d", "e"])},
    )
    stats = analyze.attribution_stats(path, {"a": 0, "b": 0, "c": 0, "d": 1}, (1, 3))
    assert stats["attribution_good"][0, 2] == 1.0 and stats["attribution_bad"][0, 2] == 5.0
    assert stats["attribution"][0, 2] == 2.0


def test_analyze_refuses_captured_samples_that_classify_has_not_labelled(tmp_path):
    # capture extended (a larger --limit) after classify: analyze would silently leave the new
    # samples out of both groups
    write_hand_store(tmp_path)
    records = [{"id": sample_id, "response": "yes"} for sample_id in HAND_SAMPLES]
    (tmp_path / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    stale = {"GOOD": [{"id": "g1"}, {"id": "g2"}], "BAD": [{"id": "b1"}]}
    (tmp_path / "classification.json").write_text(json.dumps(stale))
    with pytest.raises(ValueError, match=r"1 of the 4 captured samples have no GOOD / BAD label "
                       r".*\(first: b2\).*run classify --out"):  # fmt: skip
        run_analyze(tmp_path)
    assert not (tmp_path / "features.json").exists()
    # a stored sample without its response line (a capture killed between the two writes, which
    # it redoes) is no captured sample yet: left out, as classify leaves it
    (tmp_path / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:3]))
    result = run_analyze(tmp_path)
    assert (result["total_good_samples"], result["total_bad_samples"]) == (2, 1)
