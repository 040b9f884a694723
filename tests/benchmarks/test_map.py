"""Feature -> MLP neuron mapping: projection math with known answers, co-activation, the check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from benchmarks.neuron_map import (
    CoactivationStats,
    coactivation,
    contribution,
    direction_cosine,
    output_change,
    projection_weights,
    random_neurons,
    top_neurons,
)

# d = 2 dimensions, 3 neurons: columns e0, e1, e0 + e1
DOWN = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])


def test_cosine_projection_of_a_hand_built_decoder() -> None:
    weights = projection_weights(torch.tensor([1.0, 1.0]), DOWN, "cosine")
    assert torch.allclose(weights, torch.tensor([2**-0.5, 2**-0.5, 1.0]))
    assert top_neurons(weights, 2) == [2, 0]  # ties broken by index


def test_least_squares_projection_is_the_minimum_norm_solution() -> None:
    # W W^T = [[2, 1], [1, 2]]; c = W^T (W W^T)^-1 [1, 1] = [1/3, 1/3, 2/3]
    weights = projection_weights(torch.tensor([1.0, 1.0]), DOWN, "lstsq")
    assert torch.allclose(weights, torch.tensor([1 / 3, 1 / 3, 2 / 3]), atol=1e-6)
    assert torch.allclose(DOWN @ weights, torch.tensor([1.0, 1.0]), atol=1e-6)
    with pytest.raises(ValueError, match="Unknown projection"):
        projection_weights(torch.ones(2), DOWN, "dot")  # type: ignore[arg-type]


def test_coactivation_is_pearson_and_streams_exactly() -> None:
    rng = np.random.default_rng(0)
    feature = np.maximum(rng.normal(size=200), 0)
    neurons = np.stack(
        [feature * 2 + rng.normal(size=200) * 0.1, rng.normal(size=200), np.ones(200)], 1
    )
    corr = coactivation(torch.tensor(feature), torch.tensor(neurons))
    assert corr[0] == pytest.approx(np.corrcoef(feature, neurons[:, 0])[0, 1], abs=1e-6)
    assert corr[1] == pytest.approx(np.corrcoef(feature, neurons[:, 1])[0, 1], abs=1e-6)
    assert corr[0] > 0.99 and corr[2] == 0.0  # a constant neuron has no correlation
    stats = CoactivationStats.zeros(1, 3)
    for chunk in np.array_split(np.arange(200), 7):
        stats.add(torch.tensor(feature[chunk, None]), torch.tensor(neurons[chunk]))
    assert torch.allclose(stats.correlation()[0], corr, atol=1e-6)
    firing = feature > 0
    assert stats.mean_when_firing()[0, 1] == pytest.approx(neurons[firing, 1].mean(), abs=1e-6)


def test_contribution_is_mean_firing_activation_along_the_decoder() -> None:
    # mean activations where the feature fires: [2, -1, 0.5]; unit decoder [1, 0]
    got = contribution(torch.tensor([3.0, 0.0]), DOWN, torch.tensor([2.0, -1.0, 0.5]))
    assert torch.allclose(got, torch.tensor([2.0, 0.0, 0.5]))


def gated_mlp() -> LlamaMLP:
    """d 4, 8 neurons; neuron 0 reads x0 through gate and up (positive for x0 > 0) and writes
    along the decoder direction `[1, 1, 0, 0]`."""
    torch.manual_seed(0)
    mlp = LlamaMLP(
        LlamaConfig(hidden_size=4, intermediate_size=8, num_attention_heads=1, hidden_act="silu")
    )
    with torch.no_grad():
        mlp.gate_proj.weight[0] = torch.tensor([1.0, 0, 0, 0])
        mlp.up_proj.weight[0] = torch.tensor([1.0, 0, 0, 0])
        mlp.down_proj.weight[:, 0] = torch.tensor([1.0, 1.0, 0, 0])
    return mlp


def test_amplifying_the_mapped_neuron_moves_the_output_along_the_decoder() -> None:
    mlp = gated_mlp()
    x = torch.randn(32, 4)
    x[:, 0] = x[:, 0].abs() + 1.0
    decoder = torch.tensor([1.0, 1.0, 0.0, 0.0])
    top = output_change(mlp, x, [0], 4.0)
    assert direction_cosine(top, decoder) == pytest.approx(1.0, abs=1e-5)
    # scaling down moves it the other way
    assert direction_cosine(output_change(mlp, x, [0], 0.5), decoder) == pytest.approx(
        -1.0, abs=1e-5
    )
    randoms = [
        direction_cosine(output_change(mlp, x, random_neurons(8, 1, [0], s), 4.0), decoder)
        for s in range(5)
    ]
    assert max(randoms) < 0.99
    assert torch.equal(output_change(mlp, x, [0], 1.0), torch.zeros(32, 4))


def test_random_neurons_are_seeded_distinct_and_exclude() -> None:
    picks = random_neurons(20, 5, [0, 1, 2], seed=3)
    assert picks == random_neurons(20, 5, [0, 1, 2], seed=3)
    assert len(set(picks)) == 5 and not set(picks) & {0, 1, 2}
    assert picks != random_neurons(20, 5, [0, 1, 2], seed=4)
    # too few left: an error, not a smaller random set compared as if it were as large
    assert sorted(random_neurons(6, 2, [0, 1, 2, 3], seed=0)) == [4, 5]
    with pytest.raises(ValueError, match="3 random neurons: only 2 of 6 are not excluded") as err:
        random_neurons(6, 3, [0, 1, 2, 3], seed=0)
    # `all` takes no --top-k: the way out names the stages to rerun (a tiny model's 64 neurons)
    assert "rerun `map` with a lower --top-k, then `steer`" in str(err.value)
    assert "`steer --kinds features,control,clt_free`" in str(err.value)


def test_a_feature_that_never_fires_falls_back_to_the_neurons_overall_mean():
    from benchmarks.neuron_map import CoactivationStats

    features = torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, 0.0]])  # feature 1 never fires
    neurons = torch.tensor([[1.0, -2.0], [3.0, 4.0], [5.0, 0.0]])
    stats = CoactivationStats.zeros(2, 2)
    stats.add(features, neurons)
    # feature 0: the mean of rows 0 and 2; feature 1: the mean over all three tokens
    expected = torch.tensor([[3.0, -1.0], [3.0, 2.0 / 3.0]])
    torch.testing.assert_close(stats.mean_when_firing(), expected)


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--samples", "0"), ("--samples", "-60"), ("--top-k", "0"), ("--verify-tokens", "0"),
     ("--random-sets", "0")],
)  # fmt: skip
def test_counts_below_one_are_refused_before_anything_is_read(tmp_path, flag, value):
    """`--samples -60` silently mapped on all but the last 60 train samples, `--top-k 0` wrote a
    map of no neurons, `--samples 0` and `--verify-tokens 0` failed after the model loaded."""
    from benchmarks.__main__ import run

    with pytest.raises(SystemExit, match=f"{flag} {value}: give a positive number"):
        run(["easyvqa", "map", "--out", str(tmp_path / "nothing"), flag, value])


@pytest.mark.parametrize("value", ["1", "nan", "inf"])
def test_a_factor_the_check_cannot_measure_is_refused(tmp_path, value):
    """`--factor 1` scales nothing and `nan` / `inf` give no finite change: the check wrote
    cosines of 0.0 (and `"amplification_factor": NaN`) as if it had measured them."""
    from benchmarks.__main__ import run

    with pytest.raises(SystemExit, match=f"--factor {value}: give a finite factor other than 1"):
        run(["easyvqa", "map", "--out", str(tmp_path / "nothing"), "--factor", value])


def test_top_neurons_rank_by_signed_score_and_scaling_reaches_every_listed_neuron() -> None:
    # a large negative score (a neuron that writes against the decoder) is not a top neuron
    assert top_neurons(torch.tensor([0.1, -5.0, 2.0, 2.0]), 3) == [2, 3, 0]
    mlp = gated_mlp()
    x = torch.randn(6, 4)
    with torch.no_grad():
        acts = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        expected = acts[:, [1, 5]] @ mlp.down_proj.weight[:, [1, 5]].T  # zeroing them removes this
    torch.testing.assert_close(output_change(mlp, x, [5, 1], 0.0), -expected)


def test_scaling_at_the_decision_positions_leaves_the_other_tokens_alone() -> None:
    from torch import nn

    from benchmarks.neuron_map import scale_neurons

    class Root(nn.Module):  # a root model whose forward names its input_ids, as a VLM's does
        def __init__(self) -> None:
            super().__init__()
            self.mlp = gated_mlp()

        def forward(self, input_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return self.mlp(x)

    root, x = Root(), torch.randn(1, 4, 4)
    x[..., 0] = x[..., 0].abs() + 1.0  # neuron 0 active on every token
    with torch.no_grad():
        clean = root(input_ids=torch.zeros(1, 4, dtype=torch.long), x=x)
        with scale_neurons(root, {"mlp": [0]}, 0.0, "decision"):
            steered = root(input_ids=torch.zeros(1, 4, dtype=torch.long), x=x)
    # a 4-token prompt: only its last token is a decision position
    torch.testing.assert_close(steered[:, :3], clean[:, :3])
    assert not torch.allclose(steered[:, 3], clean[:, 3])


def test_an_mlp_without_down_proj_is_refused_naming_it() -> None:
    from benchmarks.neuron_map import down_projection

    class GatedMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down_proj = nn.Linear(8, 4)

    class GPT2StyleMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_proj = nn.Linear(8, 4)

    model = nn.ModuleDict({"gated": GatedMLP(), "gpt2": GPT2StyleMLP()})
    assert down_projection(model, "gated") is model["gated"].down_proj
    with pytest.raises(ValueError, match=r"MLP at gpt2 \(GPT2StyleMLP\) has no down_proj"):
        down_projection(model, "gpt2")
