"""CLT-free steering: a few coder features edited inside the original model, without the coders.

`FeatureSteerer` keeps only what the selected features need and hooks the model's MLPs. At a
source MLP p it computes the selected features' activations from the MLP input, edits them
(scale / add / set / zero, as `vlm_sparsify.interventions`) and adds
`(edited - activation) * W_dec[p->t][f]` to the output of every target MLP t the feature decodes
into. That is exactly what the replacement model in `error` mode adds for the same edit on every
token (the decoder bias and the untouched features cancel), so the steered model is the same.

Which activation a feature has depends on TopK: it is its pre-activation only when that is among
the k largest of the source's latents, which needs every latent's pre-activation. Two modes:

- `exact` (default): keeps the full encoder of each source layer that has a selected feature (the
  top-k needs it) plus the selected decoder rows; equal to the replacement model up to float
  rounding. Size: L x d per source layer + m x d per (feature, target).
- `threshold`: keeps only the selected encoder rows and a JumpReLU threshold per feature,
  f = pre * (pre > threshold), fitted on calibration inputs as the circuit-tracer export does
  (`vlm_sparsify.export.fit_thresholds`); an approximation (a feature fires where TopK would
  mostly select it), with m x d per source instead of L x d.

Edits apply to every token, or with `attach(model, region="decision")` to the decision positions
only (the last prompt token and every response token, `vlm_sparsify.positions`), as an
`Intervention` with that region. Saved as `steerer.safetensors` + `steerer.json`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vlm_sparsify.coder_io import Coders, fsync_tree, source_weights, usual_permissions
from vlm_sparsify.files import read_json
from vlm_sparsify.interventions import OPS, Op, check_op, feature_index, feature_value
from vlm_sparsify.positions import SequencePositions, check_steer_region, decision_rows
from vlm_sparsify.topk_encoder import encode_topk

SteerMode = Literal["exact", "threshold"]
WEIGHTS_FILE = "steerer.safetensors"
CONFIG_FILE = "steerer.json"
_OP_CODES = {op: code for code, op in enumerate(OPS)}
"""Each op's code in a saved steerer's `ops` tensor (the order of `Op`: scale 0 ... zero 3)."""


@dataclass(frozen=True)
class SteeredFeature:
    """One feature of one source hookpoint and its edit."""

    hookpoint: str
    """Source hookpoint (MLP module path from the root model)."""
    feature_idx: int
    """Latent index in that source (>= 0, below its width)."""
    value: float = 1.0
    """Factor (scale), amount (add) or new activation (set), a finite number; ignored by zero."""
    op: Op = "scale"
    """scale, add, set or zero."""

    def __post_init__(self) -> None:
        check_op(self.op)
        # a negative index would silently pick a latent from the end of the weights
        object.__setattr__(self, "feature_idx", feature_index(self.feature_idx))
        object.__setattr__(self, "value", feature_value(self.value))


class FeatureSteerer(nn.Module):
    """Selected features' weights and edits; `attach(model)` steers the original model."""

    def __init__(
        self,
        features: Sequence[SteeredFeature],
        hookpoints: Sequence[str],
        targets: dict[str, list[str]],
        tensors: dict[str, Tensor],
        mode: SteerMode = "exact",
        k: int = 0,
        activation: str = "topk",
    ):
        super().__init__()
        if mode not in ("exact", "threshold"):
            raise ValueError(f"Unknown steering mode '{mode}'; use exact or threshold")
        self.features = list(features)
        self.hookpoints = list(hookpoints)
        """Every hookpoint the steerer touches, in model order."""
        self.targets = dict(targets)
        """Per source hookpoint, the target hookpoints its decoders write into."""
        self.mode, self.k, self.activation = mode, k, activation
        for name, tensor in tensors.items():
            self.register_buffer(name.replace(".", "/"), tensor)
        self._handles: list[Any] = []
        self._pending: dict[str, Tensor] = {}
        self._positions: SequencePositions | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    @torch.no_grad()
    def from_coders(
        cls,
        coders: Coders,
        features: Sequence[SteeredFeature],
        mode: SteerMode = "exact",
        thresholds: Sequence[Tensor] | None = None,
    ) -> FeatureSteerer:
        """Copy the weights `features` need out of `coders`; `thresholds` (per source `[L]`, from
        `export.fit_thresholds`) are required by mode `threshold`."""
        if mode == "threshold" and thresholds is None:
            raise ValueError(
                "mode 'threshold' needs thresholds (vlm_sparsify.export.fit_thresholds)"
            )
        order = list(coders.hookpoints)
        unknown = sorted({f.hookpoint for f in features} - set(order))
        if unknown:
            raise ValueError(f"no coder at hookpoints {unknown}; coders: {order}")
        keys: dict[str, str] = {}
        for hookpoint in order:  # one's weights would silently replace the other's
            other = keys.setdefault(_key(hookpoint), hookpoint)
            if other != hookpoint:
                raise ValueError(
                    f"hookpoints {other} and {hookpoint} have the same buffer name "
                    f"{_key(hookpoint)} (dots read as underscores): FeatureSteerer cannot hold both"
                )
        tensors: dict[str, Tensor] = {}
        targets: dict[str, list[str]] = {}
        ordered: list[SteeredFeature] = []
        for p, hookpoint in enumerate(order):
            chosen = [f for f in features if f.hookpoint == hookpoint]
            if not chosen:
                continue
            ordered += chosen
            index = torch.tensor([f.feature_idx for f in chosen])
            if len(set(index.tolist())) != len(chosen):
                raise ValueError(f"a feature of {hookpoint} is listed twice: {index.tolist()}")
            W_enc, b_enc, W_decs, _ = source_weights(coders, p)
            if int(index.max()) >= len(W_enc):
                raise ValueError(
                    f"feature {int(index.max())} of {hookpoint} is out of range: "
                    f"that coder has {len(W_enc)} latents"
                )
            key = _key(hookpoint)
            tensors[f"{key}.features"] = index
            tensors[f"{key}.values"] = torch.tensor([f.value for f in chosen], dtype=torch.float64)
            tensors[f"{key}.ops"] = torch.tensor([_OP_CODES[f.op] for f in chosen])
            if mode == "exact":
                tensors[f"{key}.encoder_weight"] = W_enc.detach().clone()
                tensors[f"{key}.encoder_bias"] = b_enc.detach().clone()
            else:
                assert thresholds is not None
                tensors[f"{key}.encoder_weight"] = W_enc[index].detach().clone()
                tensors[f"{key}.encoder_bias"] = b_enc[index].detach().clone()
                tensors[f"{key}.threshold"] = thresholds[p][index].detach().clone()
            for i, W_dec in enumerate(W_decs):
                tensors[f"{key}.decoder.{i}"] = W_dec[index].detach().float().clone()
            targets[hookpoint] = order[p : p + len(W_decs)]
        touched = {h for h in targets} | {t for ts in targets.values() for t in ts}
        hookpoints = [h for h in order if h in touched]
        k = coders.cfg.k
        return cls(ordered, hookpoints, targets, tensors, mode, k, coders.cfg.activation)

    # ------------------------------------------------------------------ saving
    def save(self, folder: str | Path) -> Path:
        """Write `steerer.safetensors`, then `steerer.json`, into `folder`, each under a
        temporary name, flushed and renamed; an earlier save's `steerer.json` is removed first, so
        a save killed midway leaves no torn file and no config beside other weights (`load` then
        says the folder holds no steerer)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name.replace("/", "."): t.contiguous() for name, t in self.named_buffers()}
        tmp = folder / f".{WEIGHTS_FILE}.tmp"
        save_file(tensors, str(tmp))
        usual_permissions(tmp)
        fsync_tree(tmp)
        (folder / CONFIG_FILE).unlink(missing_ok=True)
        os.replace(tmp, folder / WEIGHTS_FILE)
        config = {
            "mode": self.mode,
            "k": self.k,
            "activation": self.activation,
            "hookpoints": self.hookpoints,
            "targets": self.targets,
            "features": [asdict(f) for f in self.features],
        }
        tmp = folder / f".{CONFIG_FILE}.tmp"
        tmp.write_text(json.dumps(config, indent=2))
        fsync_tree(tmp)
        os.replace(tmp, folder / CONFIG_FILE)
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> FeatureSteerer:
        folder = Path(folder)
        if not (folder / CONFIG_FILE).exists():
            raise FileNotFoundError(
                f"no {CONFIG_FILE} in {folder}; pass a folder FeatureSteerer.save wrote"
            )
        config = read_json(folder / CONFIG_FILE, keys=())
        tensors = load_file(str(folder / WEIGHTS_FILE), device=str(device))
        features = [SteeredFeature(**f) for f in config["features"]]
        return cls(
            features,
            config["hookpoints"],
            config["targets"],
            tensors,
            config["mode"],
            config["k"],
            config["activation"],
        )

    # ------------------------------------------------------------------ hooks
    def install(self, model: nn.Module, region: str = "all") -> None:
        """Steer `model` at every token (`all`) or at the decision positions (`decision`)."""
        if self._handles:
            raise RuntimeError("this FeatureSteerer is already attached; remove() it first")
        self._positions = None
        try:
            if check_steer_region(region) == "decision":
                self._positions = SequencePositions()
                self._positions.install(model)
                self._handles.append(self._positions)
            for position, hookpoint in enumerate(self.hookpoints):
                module = model.get_submodule(hookpoint)
                hook = partial(self._steer, position, hookpoint)
                self._handles.append(module.register_forward_hook(hook))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles = []

    @contextmanager
    def attach(self, model: nn.Module, region: str = "all") -> Iterator[FeatureSteerer]:
        """Steer `model` until the block exits, at every token or at the decision positions."""
        self.install(model, region)
        try:
            yield self
        finally:
            self.remove()

    def _buffer(self, hookpoint: str, name: str) -> Tensor:
        return self.get_buffer(f"{_key(hookpoint)}/{name}".replace(".", "/"))

    def feature_acts(self, hookpoint: str, x: Tensor) -> Tensor:
        """Activations `[N, m]` of the source's selected features for MLP inputs `x` `[N, d]`."""
        weight = self._buffer(hookpoint, "encoder_weight")
        bias = self._buffer(hookpoint, "encoder_bias")
        x = x.to(weight.dtype)
        if self.mode == "threshold":
            pre = x @ weight.T + bias
            return pre * (pre > self._buffer(hookpoint, "threshold"))
        top_acts, top_indices, _ = encode_topk(x, weight, bias, self.k, self.activation)
        match = top_indices[:, :, None] == self._buffer(hookpoint, "features")
        return (top_acts[:, :, None] * match).sum(1)

    def _edited(self, hookpoint: str, acts: Tensor) -> Tensor:
        ops, values = self._buffer(hookpoint, "ops"), self._buffer(hookpoint, "values")
        values = values.to(acts.dtype)
        edited = torch.where(ops == _OP_CODES["scale"], acts * values, acts + values)
        edited = torch.where(ops == _OP_CODES["set"], values.expand_as(acts), edited)
        return torch.where(ops == _OP_CODES["zero"], torch.zeros_like(acts), edited)

    def _steer(
        self, position: int, hookpoint: str, module: nn.Module, args: tuple, output: Tensor
    ) -> Tensor | None:
        if position == 0:  # each forward starts afresh
            self._pending = {}
        if hookpoint in self.targets:
            x = args[0].reshape(-1, args[0].shape[-1])
            acts = self.feature_acts(hookpoint, x)
            delta = (self._edited(hookpoint, acts) - acts).float()
            if self._positions is not None:
                delta = delta * decision_rows(self._positions, len(delta))
            for i, target in enumerate(self.targets[hookpoint]):
                part = delta @ self._buffer(hookpoint, f"decoder.{i}")
                before = self._pending.get(target)
                self._pending[target] = part if before is None else before + part
        pending = self._pending.pop(hookpoint, None)
        if pending is None:
            return None
        return output + pending.view(output.shape).to(output.dtype)


def _key(hookpoint: str) -> str:
    """Buffer-name prefix of a hookpoint (module paths hold dots, buffer names cannot)."""
    return hookpoint.replace(".", "_")
