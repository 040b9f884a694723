"""Decision positions: tracked through generate (with and without a KV cache) and steered there
alike by interventions, the CLT-free steerer and the neuron hooks."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from benchmarks.neuron_map import scale_neurons
from tests.test_clt_free import firing_features
from tests.test_replacement import GREEDY, HOOKPOINTS, batch, make_coders, tiny_llava
from vlm_sparsify.clt_free import FeatureSteerer, SteeredFeature
from vlm_sparsify.interventions import Intervention
from vlm_sparsify.positions import SequencePositions
from vlm_sparsify.replacement import ReplacementModel

PROMPT = 10  # batch()'s padded prompt length


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_llava()


class Recorder:
    """Each forward's decision mask and region codes, read by a hook after `observe`."""

    def __init__(self, model: nn.Module, positions: SequencePositions):
        self.decision: list[Tensor] = []
        self.regions: list[Tensor] = []
        self.positions = positions
        self.handle = model.register_forward_pre_hook(self._read)

    def _read(self, module: nn.Module, args: tuple) -> None:
        self.decision.append(self.positions.decision.clone())
        self.regions.append(self.positions.regions.clone())


@pytest.mark.parametrize("use_cache", [True, False])
def test_decision_positions_through_generate(model: nn.Module, use_cache: bool) -> None:
    positions = SequencePositions(model.config.image_token_id)
    with positions.following(model):
        recorder = Recorder(model, positions)
        tokens = model.generate(**batch(), **GREEDY, use_cache=use_cache)
        recorder.handle.remove()
    steps = tokens.shape[1] - PROMPT
    assert len(recorder.decision) == steps
    for step, decision in enumerate(recorder.decision):
        if use_cache and step > 0:  # one new token per row, each a response token
            assert decision.shape == (2, 1) and decision.all()
            continue
        expected = torch.zeros(2, PROMPT + step, dtype=torch.bool)
        expected[:, PROMPT - 1 :] = True  # the last prompt token and every response token
        assert torch.equal(decision, expected)
    assert "generate" not in model.__dict__  # the wrapper is gone


def test_plain_forward_decides_at_its_last_token_and_never_at_pad(model: nn.Module) -> None:
    inputs = batch()
    inputs["input_ids"] = inputs["input_ids"].flip(1)  # right-padded: row 0 ends in pad
    inputs["attention_mask"] = inputs["attention_mask"].flip(1)
    positions = SequencePositions(model.config.image_token_id)
    with positions.following(model):
        recorder = Recorder(model, positions)
        model(**inputs)
        recorder.handle.remove()
    (decision,) = recorder.decision
    # row 0's last token is pad: its decision position is its last real token (it had none)
    last = PROMPT - 3
    assert decision.tolist() == [
        [False] * last + [True, False, False],
        [False] * (PROMPT - 1) + [True],
    ]


def test_generate_wrappers_come_off_in_any_order(model: nn.Module) -> None:
    first, second = SequencePositions(), SequencePositions()
    first.install(model)
    second.install(model)
    first.remove()
    model.generate(**batch(), **GREEDY)  # still wrapped by the second
    assert second.prompt_length == PROMPT
    assert first.prompt_length == 0
    second.remove()
    assert "generate" not in model.__dict__ and not model._forward_pre_hooks


def decision_edits(model: nn.Module) -> tuple[list[SteeredFeature], list[Intervention]]:
    coders = make_coders("clt")
    firing = firing_features(model, coders)
    latents = firing[1][:2]
    # add: the features need not fire at the decision positions to be steered there
    features = [SteeredFeature(HOOKPOINTS[1], f, 3.0, "add") for f in latents]
    return features, [Intervention("add", tuple(latents), layers=1, value=3.0, region="decision")]


def test_a_plain_forward_is_steered_at_its_last_position_only(model: nn.Module) -> None:
    coders = make_coders("clt")
    features, interventions = decision_edits(model)
    clean = model(**batch()).logits
    rm = ReplacementModel(model, coders, mode="error", interventions=interventions)
    edited = rm(**batch()).logits
    with FeatureSteerer.from_coders(coders, features).attach(model, "decision"):
        steered = model(**batch()).logits
    for logits in (edited, steered):
        assert torch.equal(logits[:, :-1], clean[:, :-1])
        assert (logits[:, -1] - clean[:, -1]).abs().max() > 1e-3
    assert (steered - edited).abs().max() <= 1e-4
    with scale_neurons(model, {HOOKPOINTS[2]: [0, 5, 9]}, 8.0, region="decision"):
        scaled = model(**batch()).logits
    assert torch.equal(scaled[:, :-1], clean[:, :-1])
    assert (scaled[:, -1] - clean[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("use_cache", [True, False])
def test_decision_steering_agrees_across_mechanisms(model: nn.Module, use_cache: bool) -> None:
    """The replacement model's `decision` intervention and the CLT-free steerer steer the same
    generation, with or without a KV cache, and differently from steering every token."""
    coders = make_coders("clt")
    features, interventions = decision_edits(model)
    rm = ReplacementModel(model, coders, mode="error")
    options = {**GREEDY, "use_cache": use_cache}
    with rm.capture():  # a capture alongside changes nothing
        expected = rm.generate(**batch(), **options, interventions=interventions)
    steerer = FeatureSteerer.from_coders(coders, features)
    with steerer.attach(model, "decision"):
        steered = model.generate(**batch(), **options)
    assert torch.equal(steered, expected)
    with steerer.attach(model):
        everywhere = model.generate(**batch(), **options)
    clean = model.generate(**batch(), **options)
    assert not torch.equal(everywhere, clean)
    reference = {}
    for cache in (True, False):
        with steerer.attach(model, "decision"):
            reference[cache] = model.generate(**batch(), **GREEDY, use_cache=cache)
    assert torch.equal(reference[True], reference[False])


def test_neuron_scaling_at_decision_positions_is_the_same_with_and_without_cache(
    model: nn.Module,
) -> None:
    neurons = {HOOKPOINTS[1]: [3, 4, 30], HOOKPOINTS[3]: [1, 2]}
    generations = {}
    for cache in (True, False):
        with scale_neurons(model, neurons, 10.0, region="decision"):
            generations[cache] = model.generate(**batch(), **GREEDY, use_cache=cache)
    assert torch.equal(generations[True], generations[False])
    assert "generate" not in model.__dict__


def test_unknown_steering_region_is_refused(model: nn.Module) -> None:
    steerer = FeatureSteerer.from_coders(make_coders("clt"), decision_edits(model)[0])
    with pytest.raises(ValueError, match="Unknown steering region 'response'"):
        steerer.install(model, "response")
    assert not model._forward_hooks and not model._forward_pre_hooks
    neurons = scale_neurons(model, {HOOKPOINTS[1]: [1]}, 2.0, region="prompt")
    with pytest.raises(ValueError, match="Unknown steering region"), neurons:
        pass
