"""FeatureSteerer on the original model equals the replacement model's error-mode steering."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.test_replacement import GREEDY, HOOKPOINTS, batch, make_coders, tiny_llava
from vlm_sparsify.clt_free import FeatureSteerer, SteeredFeature
from vlm_sparsify.export import fit_thresholds
from vlm_sparsify.interventions import Intervention
from vlm_sparsify.replacement import ReplacementModel


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_llava()


def firing_features(model: nn.Module, coders: nn.Module) -> dict[int, list[int]]:
    """Per source, three latents that are in the top-k on some token of the batch."""
    rm = ReplacementModel(model, coders, mode="off")
    with rm.capture() as capture:
        rm(**batch())
    samples = capture.pop_samples()
    indices = torch.cat([s.indices for s in samples]).long()  # [T, S, k]
    return {p: torch.unique(indices[:, p]).tolist()[:3] for p in range(indices.shape[1])}


def steering(firing: dict[int, list[int]]) -> tuple[list[SteeredFeature], list[Intervention]]:
    """Amplify, suppress, add and zero features of sources 0, 1, 2 and 3, both ways."""
    edits = [(0, "scale", 4.0), (1, "scale", 0.0), (2, "add", 1.5), (3, "zero", 0.0)]
    features, interventions = [], []
    for p, op, value in edits:
        latents = firing[p][:2]
        features += [SteeredFeature(HOOKPOINTS[p], f, value, op) for f in latents]
        given = {} if op == "zero" else {"value": value}
        interventions.append(Intervention(op, tuple(latents), layers=p, **given))
    return features, interventions


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_steered_logits_equal_error_mode_replacement(model: nn.Module, kind: str) -> None:
    coders = make_coders(kind)
    features, interventions = steering(firing_features(model, coders))
    rm = ReplacementModel(model, coders, mode="error", interventions=interventions)
    expected = rm(**batch()).logits
    steerer = FeatureSteerer.from_coders(coders, features)
    with steerer.attach(model):
        steered = model(**batch()).logits
    clean = model(**batch()).logits
    assert (expected - clean).abs().max() > 1e-2  # the edits do something
    assert (steered - expected).abs().max() <= 1e-4


def test_steered_generation_equals_replacement(model: nn.Module) -> None:
    coders = make_coders("clt")
    features, interventions = steering(firing_features(model, coders))
    rm = ReplacementModel(model, coders, mode="error")
    expected = rm.generate(**batch(), **GREEDY, interventions=interventions)
    with FeatureSteerer.from_coders(coders, features).attach(model):
        steered = model.generate(**batch(), **GREEDY)
    assert torch.equal(steered, expected)


def test_save_load_round_trip_keeps_only_selected_decoders(model: nn.Module, tmp_path) -> None:
    coders = make_coders("clt")
    features, _ = steering(firing_features(model, coders))
    steerer = FeatureSteerer.from_coders(coders, features)
    steerer.save(tmp_path)
    loaded = FeatureSteerer.load(tmp_path)
    assert loaded.features == steerer.features
    assert loaded.targets == steerer.targets
    # source 0 of a 4-layer CLT decodes into all 4 layers; 2 features each
    assert loaded._buffer(HOOKPOINTS[0], "decoder.3").shape == (2, 32)
    assert loaded.hookpoints == HOOKPOINTS
    with steerer.attach(model):
        before = model(**batch()).logits
    with loaded.attach(model):
        after = model(**batch()).logits
    assert torch.equal(before, after)


def test_a_save_that_dies_midway_leaves_no_config_beside_other_weights(
    model: nn.Module, tmp_path, monkeypatch
) -> None:
    import vlm_sparsify.clt_free as clt_free

    coders = make_coders("clt")
    features, _ = steering(firing_features(model, coders))
    FeatureSteerer.from_coders(coders, features).save(tmp_path)
    fewer = FeatureSteerer.from_coders(coders, features[:1])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(clt_free.json, "dumps", killed)  # dies after the weights, before the config
    with pytest.raises(KeyboardInterrupt):
        fewer.save(tmp_path)
    monkeypatch.undo()
    # the first save's config would describe two features over the second save's weights
    with pytest.raises(FileNotFoundError, match="no steerer.json"):
        FeatureSteerer.load(tmp_path)
    fewer.save(tmp_path)
    assert FeatureSteerer.load(tmp_path).features == fewer.features
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "steerer.json", "steerer.safetensors"
    ]  # fmt: skip


def test_threshold_mode_is_jumprelu_on_the_selected_rows() -> None:
    coders = make_coders("clt")
    torch.manual_seed(0)
    inputs = [torch.randn(64, 32) for _ in HOOKPOINTS]
    thresholds = fit_thresholds(coders, inputs)
    features = [SteeredFeature(HOOKPOINTS[1], 5, 2.0), SteeredFeature(HOOKPOINTS[1], 9, 2.0)]
    steerer = FeatureSteerer.from_coders(coders, features, "threshold", thresholds)
    assert steerer._buffer(HOOKPOINTS[1], "encoder_weight").shape == (2, 32)
    encoder = coders.sources[1].encoder
    pre = inputs[1] @ encoder.weight[[5, 9]].T + encoder.bias[[5, 9]]
    expected = pre * (pre > thresholds[1][[5, 9]])
    assert torch.allclose(steerer.feature_acts(HOOKPOINTS[1], inputs[1]), expected)
    assert (expected > 0).any()


def test_an_unknown_steering_op_is_named():
    with pytest.raises(ValueError, match="Unknown intervention op 'double'; use scale, add, set"):
        SteeredFeature("model.language_model.layers.0.mlp", 3, 2.0, op="double")  # type: ignore[arg-type]


def test_feature_indices_and_values_are_checked():
    """A negative index would steer a latent from the end of the weights (torch indexing); an
    index past the width would fail deep in the copy; NaN would make the steered outputs NaN."""
    hookpoint = "model.language_model.layers.0.mlp"
    with pytest.raises(ValueError, match="feature indices are >= 0, got -1"):
        SteeredFeature(hookpoint, -1, 2.0, op="add")
    with pytest.raises(ValueError, match="finite"):
        SteeredFeature(hookpoint, 3, float("nan"), op="set")
    steered = SteeredFeature(hookpoint, torch.tensor(3), torch.tensor(2.0))
    assert (type(steered.feature_idx), type(steered.value)) == (int, float)  # saved as JSON
    coders = make_coders("clt")
    with pytest.raises(ValueError, match=f"feature 64 of {hookpoint} is out of range"):
        FeatureSteerer.from_coders(coders, [SteeredFeature(hookpoint, 64, op="add")])


def test_hookpoints_whose_buffer_names_collide_are_refused() -> None:
    """Buffer names read a hookpoint's dots as underscores: `a.b_c` and `a_b.c` would share
    theirs, and one source would steer with the other's weights."""
    from sparsify import SparseCoderConfig

    from vlm_sparsify.training import build_coders

    cfg = SparseCoderConfig(num_latents=16, k=4, transcode=True)
    coders = build_coders(["a.b_c", "a_b.c"], 8, cfg, cross_layer=2, device=torch.device("cpu"))
    features = [SteeredFeature("a.b_c", 1, 2.0), SteeredFeature("a_b.c", 2, 2.0)]
    with pytest.raises(ValueError, match="hookpoints a.b_c and a_b.c have the same buffer name"):
        FeatureSteerer.from_coders(coders, features)
