"""The math of mapping a coder feature onto MLP neurons, and of checking the map on the model.

A gated MLP writes `down_proj(a)` with neuron activations `a = act_fn(gate(x)) * up(x)` (the
input of `down_proj`), so neuron n writes along the column `W_down[:, n]`. A feature writes along
its decoder vector `w = W_dec[p->t][f]` into target t. Three views of which neurons match:

- `projection_weights`: `cosine` = cos(w, W_down[:, n]) (scale-free, one number per neuron), or
  `lstsq` = the minimum-norm coefficients c with W_down c = w (how much of each column rebuilds w;
  with more neurons than dimensions the solution is not unique, so this is one choice of many).
- `coactivation`: Pearson correlation over tokens between the feature's activation (0 where it is
  not in the top-k) and each neuron's activation.
- `contribution`: mean activation of the neuron on the tokens where the feature fires, times the
  projection of its column on w's unit vector: what the neuron adds along w there, so scaling it
  up moves the output along w (positive) or against it (negative).

`scale_neurons` is the matching intervention on the original model (scale chosen neurons at the
`down_proj` input); `direction_cosine` measures how well an output change follows w.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from vlm_sparsify.positions import SequencePositions, check_steer_region, decision_rows

Projection = Literal["cosine", "lstsq"]


def down_projection(model: nn.Module, hookpoint: str) -> nn.Linear:
    """The `down_proj` of the MLP at `hookpoint`: its input is the neuron activations, its weight
    columns their output directions. An MLP without one (GPT-2's `c_proj`, LFM2's `w2`) is
    refused in one line: map and neuron steering know the gated MLPs' layout only."""
    mlp = model.get_submodule(hookpoint)
    down = getattr(mlp, "down_proj", None)
    if not isinstance(down, nn.Linear):
        raise ValueError(
            f"the MLP at {hookpoint} ({type(mlp).__name__}) has no down_proj Linear layer, where "
            "map reads its neuron activations and output directions (every shipped recipe's "
            "MLP has one); map and neuron steering do not support this model"
        )
    return down


def projection_weights(
    decoder: Tensor, down_weight: Tensor, method: Projection = "cosine"
) -> Tensor:
    """Per neuron, how well its output column matches the decoder vector `[d]`; `down_weight`
    is `down_proj.weight` `[d, n_neurons]`. Returns `[n_neurons]`."""
    decoder, down_weight = decoder.double(), down_weight.double()
    match method:
        case "cosine":
            norms = down_weight.norm(dim=0) * decoder.norm()
            return ((decoder @ down_weight) / norms.clamp_min(1e-12)).float()
        case "lstsq":
            return (torch.linalg.pinv(down_weight) @ decoder).float()
        case other:
            raise ValueError(f"Unknown projection '{other}'; use cosine or lstsq")


@dataclass
class CoactivationStats:
    """Streaming float64 sums over tokens for m features against n neurons."""

    n_tokens: int
    sum_f: Tensor
    sum_f2: Tensor
    sum_a: Tensor
    sum_a2: Tensor
    sum_fa: Tensor
    fired: Tensor
    sum_a_fired: Tensor

    @classmethod
    def zeros(cls, n_features: int, n_neurons: int) -> CoactivationStats:
        def z(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=torch.float64)

        m, n = n_features, n_neurons
        return cls(0, z(m), z(m), z(n), z(n), z(m, n), z(m), z(m, n))

    def add(self, feature_acts: Tensor, neuron_acts: Tensor) -> None:
        """Add tokens: `feature_acts` `[T, m]` (0 where not active), `neuron_acts` `[T, n]`."""
        f, a = feature_acts.double().cpu(), neuron_acts.double().cpu()
        firing = (f > 0).double()
        self.n_tokens += len(f)
        self.sum_f += f.sum(0)
        self.sum_f2 += (f * f).sum(0)
        self.sum_a += a.sum(0)
        self.sum_a2 += (a * a).sum(0)
        self.sum_fa += f.T @ a
        self.fired += firing.sum(0)
        self.sum_a_fired += firing.T @ a

    def correlation(self) -> Tensor:
        """Pearson correlation `[m, n]`; 0 where a feature or a neuron is constant."""
        n = max(self.n_tokens, 1)
        cov = self.sum_fa / n - torch.outer(self.sum_f, self.sum_a) / n**2
        var_f = (self.sum_f2 / n - (self.sum_f / n) ** 2).clamp_min(0)
        var_a = (self.sum_a2 / n - (self.sum_a / n) ** 2).clamp_min(0)
        scale = torch.outer(var_f, var_a).sqrt()
        return torch.where(scale > 1e-300, cov / scale.clamp_min(1e-300), 0.0).float()

    def mean_when_firing(self) -> Tensor:
        """Mean neuron activation over the tokens where each feature fires `[m, n]` (over all
        tokens for a feature that never fires)."""
        overall = self.sum_a / max(self.n_tokens, 1)
        fired = self.fired[:, None]
        return torch.where(fired > 0, self.sum_a_fired / fired.clamp_min(1), overall).float()


def coactivation(feature_acts: Tensor, neuron_acts: Tensor) -> Tensor:
    """Pearson correlation over tokens of `feature_acts` `[T]` with each column of `neuron_acts`
    `[T, n]`; 0 where either is constant."""
    stats = CoactivationStats.zeros(1, neuron_acts.shape[1])
    stats.add(feature_acts[:, None], neuron_acts)
    return stats.correlation()[0]


def contribution(decoder: Tensor, down_weight: Tensor, mean_when_firing: Tensor) -> Tensor:
    """Each neuron's mean activation where the feature fires (`[n]`, see `CoactivationStats`)
    times its column's projection on the decoder's unit vector: `[n]`."""
    unit = decoder.double() / decoder.double().norm().clamp_min(1e-12)
    return (mean_when_firing.double() * (unit @ down_weight.double())).float()


def top_neurons(score: Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, best first (ties broken by index)."""
    order = sorted(range(len(score)), key=lambda n: (-float(score[n]), n))
    return order[:k]


def random_neurons(n_neurons: int, k: int, exclude: Sequence[int], seed: int) -> list[int]:
    """k distinct neurons not in `exclude`, drawn with a seeded generator."""
    allowed = torch.tensor(sorted(set(range(n_neurons)) - set(exclude)), dtype=torch.long)
    if len(allowed) < k:
        raise ValueError(
            f"{k} random neurons: only {len(allowed)} of {n_neurons} are not excluded "
            "(map fewer neurons: rerun `map` with a lower --top-k, then `steer` (in `all`: "
            "--map-top-k); or leave the "
            "neurons conditions out: `steer --kinds features,control,clt_free`)"
        )
    generator = torch.Generator().manual_seed(seed)
    return allowed[torch.randperm(len(allowed), generator=generator)[:k]].tolist()


def direction_cosine(delta: Tensor, direction: Tensor) -> float:
    """Cosine between the summed output change `delta` `[T, d]` (or `[d]`) and `direction`."""
    total = delta.double().reshape(-1, delta.shape[-1]).sum(0)
    denominator = total.norm() * direction.double().norm()
    return float(total @ direction.double() / denominator) if denominator > 0 else 0.0


def _scaling_hook(index: Tensor, factor: float, positions: SequencePositions | None):
    def hook(module: nn.Module, args: tuple) -> tuple:
        acts = args[0].clone()
        scale: Tensor | float = factor
        if positions is not None:  # factor at the decision positions, 1 elsewhere
            rows = decision_rows(positions, acts[..., 0].numel())
            scale = (1 + (factor - 1) * rows).view(*acts.shape[:-1], 1).to(acts.dtype)
        acts[..., index] = acts[..., index] * scale
        return (acts, *args[1:])

    return hook


@contextmanager
def scale_neurons(
    model: nn.Module, neurons: Mapping[str, Sequence[int]], factor: float, region: str = "all"
) -> Iterator[None]:
    """Multiply the listed neuron activations (the input of `<mlp>.down_proj`) by `factor` while
    the block runs, at every token (`all`) or at the decision positions of `model`'s forwards
    (`decision`: the last prompt token and every response token); `neurons` maps MLP module
    paths ("" = `model` itself) to neuron indices."""
    handles: list = []
    positions = None
    try:
        if check_steer_region(region) == "decision":
            positions = SequencePositions()
            positions.install(model)
            handles.append(positions)
        for path, indices in neurons.items():
            if not indices:
                continue
            down = down_projection(model, path)
            index = torch.tensor(sorted(set(indices)), device=down.get_parameter("weight").device)
            hook = _scaling_hook(index, factor, positions)
            handles.append(down.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()


@torch.no_grad()
def output_change(mlp: nn.Module, inputs: Tensor, neurons: Sequence[int], factor: float) -> Tensor:
    """`mlp(inputs)` with `neurons` scaled by `factor`, minus `mlp(inputs)`: `[T, d]`."""
    clean = mlp(inputs)
    with scale_neurons(mlp, {"": neurons}, factor):
        steered = mlp(inputs)
    return steered - clean
