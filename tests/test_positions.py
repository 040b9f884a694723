"""Decision positions: tracked through generate (with and without a KV cache) and steered there
alike by interventions, the CLT-free steerer and the neuron hooks."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from benchmarks.neuron_map import scale_neurons
from tests.test_clt_free import firing_features
from tests.test_replacement import GREEDY, HOOKPOINTS, batch, make_coders, tiny_llava
from vlm_sparsify.capture import REGION_CODE
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


def test_a_forward_without_attention_mask_decides_at_its_last_token() -> None:
    positions = SequencePositions()
    assert positions.length is None  # before any forward
    positions.observe(nn.Module(), (), {"input_ids": torch.ones(2, 4, dtype=torch.long)})
    assert positions.decision.tolist() == [[False, False, False, True]] * 2


def test_a_step_with_a_cache_outside_generate_continues_the_sequence() -> None:
    positions, module = SequencePositions(), nn.Module()
    positions.observe(
        module, (), {"input_ids": torch.ones(1, 3), "attention_mask": torch.ones(1, 3)}
    )
    assert positions.new_sequence and positions.decision.tolist() == [[False, False, True]]
    assert positions.length == 3
    positions.observe(
        module, (), {"input_ids": torch.ones(1, 1), "attention_mask": torch.ones(1, 4)}
    )
    assert not positions.new_sequence and (positions.past, positions.prompt_length) == (3, 3)
    assert positions.length == 1  # a decoding step (what CUDA graphs of the replacement need)
    assert positions.regions.tolist() == [[REGION_CODE["response"]]]


class CachedPromptModel(nn.Module):
    """A model whose `generate` finds its first 3 prompt positions in a cache already: its first
    forward feeds the last 2 only (as HF generate does with a reused prompt cache)."""

    def __init__(self, positions: SequencePositions):
        super().__init__()
        self.positions = positions

    def forward(self, **kwargs) -> None:
        return None

    def generate(self, attention_mask: Tensor, **tokens: Tensor) -> tuple[int, list]:
        ((name, prompt),) = tokens.items()
        self(**{name: prompt[:, 3:]}, attention_mask=attention_mask)
        return self.positions.prompt_length, self.positions.regions.tolist()


@pytest.mark.parametrize("name", ["input_ids", "inputs_embeds"])
def test_inside_generate_the_prompt_is_what_generate_was_given(name: str) -> None:
    positions = SequencePositions()
    model = CachedPromptModel(positions)
    prompt = torch.ones(1, 5, dtype=torch.long) if name == "input_ids" else torch.ones(1, 5, 8)
    with positions.following(model):
        length, regions = model.generate(attention_mask=torch.ones(1, 5), **{name: prompt})
    assert (length, regions) == (5, [[REGION_CODE["prompt"]] * 2])


def test_a_generate_wrapped_on_the_instance_is_restored_on_exit() -> None:
    positions = SequencePositions()
    model = CachedPromptModel(positions)
    own = model.__dict__["generate"] = lambda **kwargs: "own"
    with positions.following(model):
        assert model.generate is not own
    assert model.generate is own


def test_the_4d_mask_of_an_additive_float_mask_marks_pads_and_keeps_the_past() -> None:
    from vlm_sparsify.positions import _mask_of_4d

    blocked = torch.finfo(torch.float32).min
    # two new tokens after 3 cached positions; the second does not attend to itself: a pad
    mask = torch.tensor([[0.0, 0.0, 0.0, 0.0, blocked], [0.0, 0.0, 0.0, blocked, blocked]])
    assert _mask_of_4d(mask[None, None], past=3, n=2).tolist() == [[1, 1, 1, 1, 0]]


def test_a_hook_with_fewer_rows_than_the_forward_is_told_so() -> None:
    from vlm_sparsify.positions import decision_rows

    positions = SequencePositions()
    positions.observe(nn.Module(), (), {"input_ids": torch.ones(2, 4, dtype=torch.long)})
    assert decision_rows(positions, 8).flatten().tolist() == [0.0, 0.0, 0.0, 1.0] * 2
    with pytest.raises(ValueError, match="a hook saw 4 token rows where the forward had 8"):
        decision_rows(positions, 4)
