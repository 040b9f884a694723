"""Feature edits on sparse top-k features, checked against a dense edit done by hand."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from vlm_sparsify.capture import REGION_CODE, region_ranges
from vlm_sparsify.interventions import Intervention, apply_interventions

LATENTS = 10
HOOKPOINTS = ["model.language_model.layers.0.mlp", "model.language_model.layers.1.mlp"]


def sparse_features() -> tuple[Tensor, Tensor]:
    """Three tokens, k = 2: token 0 has features 1, 4; token 1 has 4, 7; token 2 has 2, 3."""
    indices = torch.tensor([[1, 4], [4, 7], [2, 3]])
    acts = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    return acts, indices


def dense(acts: Tensor, indices: Tensor) -> Tensor:
    """Dense [N, L] features; duplicate indices add up, as the sparse decoder sums them."""
    return torch.zeros(len(acts), LATENTS).scatter_add(1, indices, acts)


REGIONS = torch.tensor([REGION_CODE["image"], REGION_CODE["prompt"], REGION_CODE["response"]])


@pytest.mark.parametrize(
    "intervention,edit",
    [
        (Intervention("zero", features=4), lambda f: f.index_fill(1, torch.tensor([4]), 0.0)),
        (
            Intervention("scale", features=(4, 2), value=3.0),
            lambda f: f * torch.tensor([1, 1, 3, 1, 3, 1, 1, 1, 1, 1.0]),
        ),
        (
            Intervention("scale", features=(4, 7), value=(2.0, -1.0)),
            lambda f: f * torch.tensor([1, 1, 1, 1, 2, 1, 1, -1, 1, 1.0]),
        ),
        (
            Intervention("add", features=(4, 9), value=0.5),
            lambda f: f + torch.tensor([0, 0, 0, 0, 0.5, 0, 0, 0, 0, 0.5]),
        ),
        (
            Intervention("set", features=(1, 8), value=(7.0, 8.0)),
            lambda f: f.index_copy(
                1, torch.tensor([1, 8]), torch.tensor([[7.0, 8.0]]).expand(3, 2)
            ),
        ),
    ],
)
def test_edits_match_the_dense_edit(intervention: Intervention, edit) -> None:
    acts, indices = sparse_features()
    new_acts, new_indices = apply_interventions([intervention], acts, indices, REGIONS)
    torch.testing.assert_close(dense(new_acts, new_indices), edit(dense(acts, indices)))


def test_adding_an_inactive_feature_appends_it() -> None:
    acts, indices = sparse_features()
    new_acts, new_indices = apply_interventions(
        [Intervention("add", features=9, value=2.5)], acts, indices, None
    )
    assert new_indices.shape == (3, 3)
    assert torch.equal(new_indices[:, 2], torch.tensor([9, 9, 9]))
    torch.testing.assert_close(new_acts[:, 2], torch.full((3,), 2.5))
    torch.testing.assert_close(new_acts[:, :2], acts)


def test_region_limits_the_edit_to_its_tokens() -> None:
    acts, indices = sparse_features()
    for region, row in (("image", 0), ("prompt", 1), ("response", 2)):
        edit = Intervention("add", features=(4, 2), region=region, value=10.0)
        new_acts, new_indices = apply_interventions([edit], acts, indices, REGIONS)
        change = dense(new_acts, new_indices) - dense(acts, indices)
        expected = torch.zeros(3, LATENTS)
        expected[row, [4, 2]] = 10.0
        torch.testing.assert_close(change, expected)


@pytest.mark.parametrize(
    ("op", "value", "factor"), [("zero", None, 0.0), ("scale", 3.0, 3.0)], ids=["zero", "scale"]
)
def test_a_regional_scale_or_zero_leaves_other_tokens_alone(op, value, factor) -> None:
    acts, indices = sparse_features()
    for region, row in (("image", 0), ("prompt", 1), ("response", 2)):
        edit = Intervention(op, features=(4, 2), region=region, value=value)
        new_acts, new_indices = apply_interventions([edit], acts, indices, REGIONS)
        expected = dense(acts, indices)
        expected[row, [4, 2]] *= factor
        torch.testing.assert_close(dense(new_acts, new_indices), expected)


def test_all_among_other_regions_edits_every_token() -> None:
    acts, indices = sparse_features()
    edit = Intervention("zero", features=4, region=("image", "all"))
    assert not edit.regional and edit.region_codes() is None
    new_acts, new_indices = apply_interventions([edit], acts, indices, None)
    assert dense(new_acts, new_indices)[:, 4].tolist() == [0.0, 0.0, 0.0]


def test_decision_region_follows_the_decision_mask_and_joins_other_regions() -> None:
    acts, indices = sparse_features()
    decision = torch.tensor([False, True, True])  # the last prompt token and a response token
    for region, rows in (("decision", [1, 2]), (("image", "decision"), [0, 1, 2])):
        edit = Intervention("add", features=4, region=region, value=10.0)
        new_acts, new_indices = apply_interventions([edit], acts, indices, REGIONS, decision)
        change = dense(new_acts, new_indices) - dense(acts, indices)
        assert change[:, 4].tolist() == [10.0 if row in rows else 0.0 for row in range(3)]
    with pytest.raises(ValueError, match="needs the decision positions"):
        apply_interventions([Intervention("zero", 4, region="decision")], acts, indices, REGIONS)


def test_edits_compose_in_order() -> None:
    acts, indices = sparse_features()
    edits = [
        Intervention("add", features=9, value=1.0),
        Intervention("scale", features=9, value=4.0),
    ]
    new_acts, new_indices = apply_interventions(edits, acts, indices, None)
    assert dense(new_acts, new_indices)[:, 9].tolist() == [4.0, 4.0, 4.0]


def test_layers_resolve_by_position_and_hookpoint() -> None:
    assert Intervention("zero", features=1).source_positions(HOOKPOINTS) == [0, 1]
    by_name = Intervention("zero", features=1, layers=(HOOKPOINTS[1], 0))
    assert by_name.source_positions(HOOKPOINTS) == [0, 1]
    with pytest.raises(ValueError, match="no coder at hookpoint 'model.layers.1.mlp'"):
        Intervention("zero", features=1, layers="model.layers.1.mlp").source_positions(HOOKPOINTS)
    with pytest.raises(ValueError, match="source layer 5 out of range 0..1: integer layers are "):
        Intervention("zero", features=1, layers=5).source_positions(HOOKPOINTS)
    with pytest.raises(ValueError, match="source layer 2 out of range 0..1"):
        Intervention("zero", features=1, layers=2).source_positions(HOOKPOINTS)


def test_invalid_interventions_are_rejected() -> None:
    with pytest.raises(ValueError, match="Unknown intervention op 'double'"):
        Intervention("double", features=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown token region"):
        Intervention("zero", features=1, region="caption")
    with pytest.raises(ValueError, match="distinct"):
        Intervention("zero", features=(1, 1))
    with pytest.raises(ValueError, match="one value or one per feature"):
        Intervention("set", features=(1, 2, 3), value=(1.0, 2.0))
    with pytest.raises(ValueError, match="one value or one per feature"):
        Intervention("scale", features=(1, 2), value=())
    with pytest.raises(ValueError, match="indices are >= 0, got -1"):
        Intervention("zero", features=-1)
    with pytest.raises(ValueError, match="indices are integers, got True"):
        Intervention("zero", features=True)
    with pytest.raises(ValueError, match="layers is empty"):
        Intervention("zero", features=1, layers=[])
    with pytest.raises(ValueError, match="region is empty"):
        Intervention("zero", features=1, region=[])
    with pytest.raises(ValueError, match="a zero intervention takes no value"):
        Intervention("zero", features=1, value=2.0)
    with pytest.raises(ValueError, match="an intervention op='add' needs a value"):
        Intervention("add", features=1)


def test_region_ranges_are_runs_without_pads() -> None:
    pad, image, prompt, response = (REGION_CODE[n] for n in ("pad", "image", "prompt", "response"))
    codes = torch.tensor([pad, prompt, image, image, prompt, response, response], dtype=torch.int8)
    assert region_ranges(codes) == {
        "image": [(2, 4)],
        "prompt": [(1, 2), (4, 5)],
        "response": [(5, 7)],
    }


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), (1.0, float("nan"))])
def test_non_finite_values_are_rejected(value) -> None:
    """A NaN or infinite value would turn every edited token's output into NaN or inf."""
    with pytest.raises(ValueError, match="finite"):
        Intervention("set", features=(1, 2), value=value)
