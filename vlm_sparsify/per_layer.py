"""Per-layer coders (SAEs or PLTs): one stock `sparsify.SparseCoder` per hookpoint.

Implements the coder-set interface of `docs/internals.md` with one target per source, calling
stock sparsify exactly as `sparsify.Trainer` does, so training here matches training there.
"""

from typing import cast

import torch
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.fused_encoder import EncoderOutput
from torch import Tensor, nn

from vlm_sparsify.coder_set import CoderSetOutput, MeanReducer, centre_encoder, total_variance
from vlm_sparsify.topk_encoder import encode_topk


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
        return self.coder(self.hookpoints.index(hookpoint))

    def coder(self, p: int) -> SparseCoder:
        """Hookpoint p's coder."""
        return cast(SparseCoder, self.coders[p])

    def items(self) -> list[tuple[str, SparseCoder]]:
        return [(hookpoint, self.coder(p)) for p, hookpoint in enumerate(self.hookpoints)]

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
        for x, y, (_, coder) in zip(inputs, outputs, self.items(), strict=True):
            if self.cfg.transcode:
                centre_encoder(coder.encoder, reduce_mean(x.mean(0)).to(coder.dtype))
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
            variance = total_variance(y) if total_variances is None else total_variances[p]
            dead_mask = dead_masks[p] if dead_masks is not None else None
            out = coder(x=x, y=y, dead_mask=dead_mask, total_variance=variance)
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
    def before_batch(self) -> None:
        """sparsify.Trainer's per-batch hook, before the forward: SAEs renormalise their decoder
        rows (once per batch, not per --micro_acc_steps chunk nor in the update check)."""
        if self.cfg.normalize_decoder and not self.cfg.transcode:
            for _, coder in self.items():
                coder.set_decoder_norm_to_unit_norm()

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """sparsify.Trainer's pre-step hook: SAEs keep unit-norm decoder rows."""
        if self.cfg.normalize_decoder and not self.cfg.transcode:
            for _, coder in self.items():
                coder.remove_gradient_parallel_to_decoder_directions()

    def encode(self, p: int, x: Tensor) -> EncoderOutput:
        """Stock `SparseCoder.encode`, with the exact faster top-k outside autograd."""
        coder = self.coder(p)
        cfg = coder.cfg
        if not cfg.transcode:
            x = x - coder.b_dec
        return encode_topk(x, coder.encoder.weight, coder.encoder.bias, cfg.k, cfg.activation)

    def decode(self, p: int, top_acts: Tensor, top_indices: Tensor) -> list[Tensor]:
        return [self.coder(p).decode(top_acts, top_indices)]

    def skip(self, p: int, x: Tensor) -> list[Tensor]:
        """The stock coder's skip connection (`W_skip`), as in `SparseCoder.forward`."""
        W_skip = self.coder(p).W_skip
        return [] if W_skip is None else [x.to(W_skip.dtype) @ W_skip.mT]

    def predict(self, sources: list[EncoderOutput | None], t: int) -> Tensor:
        source = sources[t]
        if source is None:
            raise ValueError(f"target {t} ({self.hookpoints[t]}) needs source {t} encoded")
        return self.decode(t, source.top_acts, source.top_indices)[0]
