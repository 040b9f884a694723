"""Per-layer coders (SAEs or PLTs): one stock `sparsify.SparseCoder` per hookpoint.

Implements the coder-set interface of `docs/internals.md` with one target per source, calling
stock sparsify exactly as `sparsify.Trainer` does, so training here matches training there.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.fused_encoder import EncoderOutput
from torch import Tensor, nn

from .topk_encoder import encode_topk

MeanReducer = Callable[[Tensor], Tensor]
"""Averages a tensor over data-parallel ranks (identity on one process)."""


class CoderSetOutput(NamedTuple):
    """What a coder set returns for one batch; the loss is `fvu.sum()`."""

    fvu: Tensor
    """Fraction of variance unexplained per target hookpoint, shape [H]."""

    latent_acts: list[Tensor]
    """Per source: the k active latent values, [N, k]."""

    latent_indices: list[Tensor]
    """Per source: the k active latent indices, [N, k]."""

    predictions: list[Tensor]
    """Per target: the predicted module output, [N, d]."""

    auxk_loss: Tensor | None = None
    """Per source: sparsify's AuxK loss of its dead latents, [H] (None without dead masks)."""

    multi_topk_fvu: Tensor | None = None
    """Per target: FVU when decoding the top 4k latents, [H] (None unless `cfg.multi_topk`)."""


def fraction_of_variance_unexplained(
    y: Tensor, y_hat: Tensor, total_variance: Tensor | None = None
) -> Tensor:
    """sparsify's FVU: ||y - y_hat||^2 / sum (y - mean y)^2 (or the given denominator)."""
    if total_variance is None:
        total_variance = (y - y.mean(0)).pow(2).sum()
    return (y - y_hat).pow(2).sum() / total_variance


class PerLayerCoders(nn.Module):
    """One `sparsify.SparseCoder` per hookpoint; an SAE when `cfg.transcode` is False."""

    def __init__(
        self,
        hookpoints: list[str],
        d_in: int,
        cfg: SparseCoderConfig,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        init_seed: int = 0,
    ):
        super().__init__()
        self.hookpoints = list(hookpoints)
        self.cfg = cfg
        coders = []
        for _ in self.hookpoints:
            # sparsify.Trainer seeds before building each coder; same init here
            torch.manual_seed(init_seed)
            coders.append(SparseCoder(d_in, cfg, device, dtype=dtype))
        self.coders = nn.ModuleList(coders)

    @classmethod
    def from_coders(cls, coders: dict[str, SparseCoder]) -> "PerLayerCoders":
        """Wrap already built (e.g. loaded) coders, keeping the dict's order."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.hookpoints = list(coders)
        self.cfg = next(iter(coders.values())).cfg
        self.coders = nn.ModuleList(coders.values())
        return self

    def __getitem__(self, hookpoint: str) -> SparseCoder:
        return self.coders[self.hookpoints.index(hookpoint)]  # type: ignore[return-value]

    def items(self) -> list[tuple[str, SparseCoder]]:
        return list(zip(self.hookpoints, self.coders, strict=True))  # type: ignore[arg-type]

    @property
    def transcode(self) -> bool:
        return self.cfg.transcode

    def n_targets(self, p: int) -> int:
        return 1

    def sources_reaching(self, t: int) -> list[int]:
        return [t]

    @torch.no_grad()
    def init_biases(
        self,
        inputs: list[Tensor],
        outputs: list[Tensor],
        reduce_mean: MeanReducer | None = None,
    ) -> None:
        """sparsify.Trainer's step-0 init: centre the encoder (transcoders), b_dec = mean(y)."""
        reduce_mean = reduce_mean or (lambda t: t)
        for x, y, coder in zip(inputs, outputs, self.coders, strict=True):
            if self.cfg.transcode:
                mean = reduce_mean(x.mean(0)).to(coder.dtype)
                coder.encoder.bias.data = -mean @ coder.encoder.weight.data.T
            coder.b_dec.data = reduce_mean(y.mean(0)).to(coder.dtype)

    def forward(
        self,
        inputs: list[Tensor],
        outputs: list[Tensor],
        total_variances: list[Tensor] | None = None,
        dead_masks: list[Tensor] | None = None,
    ) -> CoderSetOutput:
        """Stock `SparseCoder.forward(x, y)` per hookpoint (an SAE reads and predicts y).

        `total_variances` are the FVU denominators per target (default: of these outputs; the
        trainer passes the whole batch's when it chunks or runs data parallel). `dead_masks`
        (per source, [latents] bool) turn on sparsify's AuxK loss. With `cfg.multi_topk` the
        returned latents are the top 4k, as stock sparsify returns them.
        """
        fvus, acts, indices, predictions, auxk, multi = [], [], [], [], [], []
        for p, (x, y, coder) in enumerate(zip(inputs, outputs, self.coders, strict=True)):
            if not self.cfg.transcode:
                x = y
                if self.cfg.normalize_decoder:
                    coder.set_decoder_norm_to_unit_norm()
            total_variance = (
                (y - y.mean(0)).pow(2).sum() if total_variances is None else total_variances[p]
            )
            dead_mask = dead_masks[p] if dead_masks is not None else None
            out = coder(x=x, y=y, dead_mask=dead_mask, total_variance=total_variance)
            fvus.append(out.fvu)
            acts.append(out.latent_acts)
            indices.append(out.latent_indices)
            predictions.append(out.sae_out)
            auxk.append(out.auxk_loss)
            multi.append(out.multi_topk_fvu)
        return CoderSetOutput(
            torch.stack(fvus),
            acts,
            indices,
            predictions,
            torch.stack(auxk) if dead_masks is not None else None,
            torch.stack(multi) if self.cfg.multi_topk else None,
        )

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """sparsify.Trainer's pre-step hook: SAEs keep unit-norm decoder rows."""
        if self.cfg.normalize_decoder and not self.cfg.transcode:
            for coder in self.coders:
                coder.remove_gradient_parallel_to_decoder_directions()  # type: ignore[operator]

    def encode(self, p: int, x: Tensor) -> EncoderOutput:
        """Stock `SparseCoder.encode`, with the exact faster top-k outside autograd."""
        coder = self.coders[p]
        cfg = coder.cfg
        if not cfg.transcode:
            x = x - coder.b_dec
        return encode_topk(x, coder.encoder.weight, coder.encoder.bias, cfg.k, cfg.activation)

    def decode(self, p: int, top_acts: Tensor, top_indices: Tensor) -> list[Tensor]:
        return [self.coders[p].decode(top_acts, top_indices)]  # type: ignore[operator]

    def skip(self, p: int, x: Tensor) -> list[Tensor]:
        """The stock coder's skip connection (`W_skip`), as in `SparseCoder.forward`."""
        W_skip = self.coders[p].W_skip
        return [] if W_skip is None else [x.to(W_skip.dtype) @ W_skip.mT]

    def predict(self, sources: list[EncoderOutput | None], t: int) -> Tensor:
        source = sources[t]
        if source is None:
            raise ValueError(f"target {t} ({self.hookpoints[t]}) needs source {t} encoded")
        return self.decode(t, source.top_acts, source.top_indices)[0]
