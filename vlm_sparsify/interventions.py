"""Feature interventions: scale, add, set or zero features before they are decoded.

An intervention edits the sparse features f_p of a source hookpoint p before the coder decodes
them, so one change reaches every target layer p .. p + n_targets(p) - 1. Features that are not
in the top-k can be added or set: they are appended as extra (index, value) columns.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, cast, get_args

import numpy as np
import torch
from torch import Tensor

from vlm_sparsify.capture import REGION_CODE

Op = Literal["scale", "add", "set", "zero"]
OPS: tuple[Op, ...] = get_args(Op)


def check_op(op: str) -> None:
    """An edit is one of OPS (for the interventions and the CLT-free steerer alike)."""
    if op not in OPS:
        raise ValueError(f"Unknown intervention op '{op}'; use {', '.join(OPS[:-1])} or {OPS[-1]}")


EDIT_REGIONS = ("image", "prompt", "response", "decision", "all")


@dataclass(frozen=True)
class Intervention:
    """One edit of some features of some source layers on some token regions.

    Indices and values may be Python, NumPy or 0-d / 1-d torch numbers (e.g. from `topk`).
    """

    op: Op
    """`scale` (f *= value), `add` (f += value), `set` (f = value) or `zero` (f = 0)."""

    features: int | Sequence[int]
    """Latent index or indices to edit (distinct, >= 0)."""

    layers: int | str | Sequence[int | str] | None = None
    """Source hookpoints: positions among the coder set's hookpoints or hookpoint names; None = all."""

    region: str | Sequence[str] = "all"
    """Token region(s) edited: `image`, `prompt`, `response`, `decision` (the last prompt token
    and every response token: the positions that predict the response), or `all`."""

    value: float | Sequence[float] | None = None
    """Factor (scale), amount (add) or new activation (set), one per feature or one for all
    (finite numbers); required by those three, not given for `zero`."""

    def __post_init__(self) -> None:
        check_op(self.op)
        features = tuple(_index(f, "feature") for f in _items(self.features))
        if len(set(features)) != len(features) or not features:
            raise ValueError(f"features must be distinct and non-empty, got {features}")
        object.__setattr__(self, "features", features)
        if self.layers is not None:
            layers = tuple(
                layer if isinstance(layer, str) else _index(layer, "source layer")
                for layer in _items(self.layers, strings=True)
            )
            if not layers:
                raise ValueError("layers is empty: give source layers, or None for all of them")
            object.__setattr__(self, "layers", layers[0] if len(layers) == 1 else layers)
        regions = tuple(_items(self.region, strings=True))
        unknown = [r for r in regions if r not in EDIT_REGIONS]
        if not regions:
            raise ValueError(f"region is empty: give {', '.join(EDIT_REGIONS)}")
        if unknown:
            raise ValueError(f"Unknown token region(s) {unknown}; use {', '.join(EDIT_REGIONS)}")
        object.__setattr__(self, "region", regions[0] if len(regions) == 1 else regions)
        if self.op == "zero":
            if self.value is not None:
                raise ValueError(f"a zero intervention takes no value, got {self.value!r}")
            object.__setattr__(self, "value", 0.0)
            return
        if self.value is None:
            raise ValueError(f"an intervention op={self.op!r} needs a value")
        values = tuple(_number(v) for v in _items(self.value))
        if len(values) not in (1, len(features)):
            raise ValueError(f"give one value or one per feature ({len(features)}), got {values}")
        object.__setattr__(self, "value", values[0] if len(values) == 1 else values)

    @property
    def feature_indices(self) -> tuple[int, ...]:
        """`features` as `__post_init__` stores them: distinct ints, at least one."""
        return cast(tuple[int, ...], self.features)

    def source_positions(self, hookpoints: Sequence[str]) -> list[int]:
        """Positions of the source hookpoints this intervention edits."""
        if self.layers is None:
            return list(range(len(hookpoints)))
        layers = self.layers if isinstance(self.layers, tuple) else (self.layers,)
        positions = []
        for layer in layers:
            if isinstance(layer, str):
                if layer not in hookpoints:
                    raise ValueError(f"no coder at hookpoint '{layer}'; coders: {list(hookpoints)}")
                positions.append(hookpoints.index(layer))
            elif 0 <= layer < len(hookpoints):
                positions.append(layer)
            else:
                raise ValueError(
                    f"source layer {layer} out of range 0..{len(hookpoints) - 1}: integer layers "
                    f"are positions among the coders' hookpoints {list(hookpoints)}, not model "
                    "layer numbers (or give a hookpoint name)"
                )
        return sorted(set(positions))

    @property
    def regional(self) -> bool:
        """Whether the intervention edits some tokens only (it needs their regions)."""
        regions = (self.region,) if isinstance(self.region, str) else self.region
        return "all" not in regions

    def region_codes(self) -> tuple[int, ...] | None:
        """Region codes edited (`decision` aside), or None for every token."""
        if not self.regional:
            return None
        regions = (self.region,) if isinstance(self.region, str) else self.region
        return tuple(REGION_CODE[r] for r in regions if r != "decision")

    @property
    def at_decision(self) -> bool:
        """Whether the decision positions are among the tokens edited (besides region_codes)."""
        return self.regional and "decision" in _items(self.region, strings=True)


def _items(x: Any, strings: bool = False) -> list[Any]:
    """A scalar (a string too, with `strings`) as a one-item list; a sequence or tensor as a list."""
    if isinstance(x, Tensor | np.ndarray):
        return x.reshape(-1).tolist()
    if (strings and isinstance(x, str)) or isinstance(x, int | float | np.number):
        return [x]
    if isinstance(x, Iterable) and not isinstance(x, str):
        return list(x)
    return [x]


def feature_index(x: Any) -> int:
    """A latent index as an int (Python, NumPy or 0-d / 1-element torch integer, >= 0)."""
    items = _items(x)
    return _index(items[0] if len(items) == 1 else x, "feature")


def feature_value(x: Any) -> float:
    """An edit's value as a float (a finite Python, NumPy or 0-d / 1-element torch number)."""
    items = _items(x)
    return _number(items[0] if len(items) == 1 else x)


def _index(x: Any, what: str) -> int:
    if isinstance(x, bool | np.bool_) or not isinstance(x, int | np.integer):
        raise ValueError(f"{what} indices are integers, got {x!r}")
    if x < 0:
        raise ValueError(f"{what} indices are >= 0, got {x}")
    return int(x)


def _number(x: Any) -> float:
    if isinstance(x, bool | np.bool_) or not isinstance(x, int | float | np.number):
        raise ValueError(f"intervention values are numbers, got {x!r}")
    if not math.isfinite(x):
        raise ValueError(f"intervention values are finite numbers, got {x!r}")
    return float(x)


@lru_cache(maxsize=1024)
def _as_tensors(
    intervention: Intervention, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Features, value(s) and region codes on the device, made once (no copy per forward)."""
    codes = intervention.region_codes()
    return (
        torch.tensor(intervention.features, device=device),
        torch.tensor(intervention.value, dtype=dtype, device=device),
        None if codes is None else torch.tensor(codes, dtype=torch.int8, device=device),
    )


def apply_interventions(
    interventions: Sequence[Intervention],
    top_acts: Tensor,
    top_indices: Tensor,
    token_regions: Tensor | None,
    decision: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Edit sparse features `[N, k]`; returns `[N, k + extra]` when features were added or set.

    `token_regions` `[N]` holds each token's region code (`capture.REGION_CODE`) and `decision`
    `[N]` whether it is a decision position (`positions.SequencePositions`); they may be None
    when every intervention edits all tokens (a region-limited one then raises).
    """
    for intervention in interventions:
        features, value, codes = _as_tensors(intervention, top_acts.device, top_acts.dtype)
        rows = None
        if codes is not None:
            if token_regions is None:
                raise ValueError(
                    f"{intervention} edits some token regions, but this forward's regions are "
                    "unknown (a submodule such as the language model called alone, or a forward "
                    "without input_ids or inputs_embeds): call the root model"
                )
            rows = torch.isin(token_regions, codes)
            if intervention.at_decision:
                if decision is None:
                    raise ValueError(f"{intervention} needs the decision positions; none given")
                rows = rows | decision
            rows = rows[:, None]
        # [N, k, m]: which of the k active slots holds which edited feature
        match = top_indices[:, :, None] == features
        if intervention.op in ("scale", "zero"):
            hit = match.any(-1)
            hit = hit if rows is None else hit & rows
            if intervention.op == "zero":
                top_acts = top_acts.masked_fill(hit, 0.0)
            else:
                factor = (match * value).sum(-1) if value.ndim else value
                top_acts = torch.where(hit, top_acts * factor, top_acts)
            continue
        # add / set: the feature's current value moves to an appended slot (0 if inactive)
        current = (top_acts[:, :, None] * match).sum(1)
        new = current + value if intervention.op == "add" else value.expand_as(current)
        hit = match.any(-1)
        if rows is not None:
            new = torch.where(rows, new, 0.0)
            hit = hit & rows
        top_acts = torch.cat([top_acts.masked_fill(hit, 0.0), new], dim=1)
        top_indices = torch.cat([top_indices, features.expand(len(top_indices), -1)], dim=1)
    return top_acts, top_indices
