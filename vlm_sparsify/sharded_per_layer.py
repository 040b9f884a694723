"""Per-layer coders (SAEs, PLTs) sharded over processes (`--distribute_modules`), as sparsify's
own flag does: each process holds the stock `SparseCoder`s of a contiguous block of hookpoints
and trains them on every process's batch.

A step: each hookpoint's activations from every process's batch are gathered to the process
that holds its coder (the world batch, rank 0's tokens first), which runs stock sparsify's
forward and backward on them; nothing else crosses, but each coder's features are broadcast so
that every process reports them for its own tokens (L0, dead latents). No gradient is
all-reduced: each coder lives on one process and its gradient comes from the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from sparsify import SparseCoder, SparseCoderConfig
from torch import Tensor

from vlm_sparsify.coder_set import CoderSetOutput, MeanReducer, centre_encoder, total_variance
from vlm_sparsify.per_layer import PerLayerCoders
from vlm_sparsify.sharding import (
    ShardedCoders,
    gather_rows,
    gathered,
    share_features,
    token_counts,
)


class ShardedPerLayer(ShardedCoders):
    """The per-layer coders of this process's hookpoints (`local`, a `PerLayerCoders`), with
    the coder-set interface of docs/internals.md over all hookpoints."""

    def __init__(
        self,
        hookpoints: list[str],
        d_in: int,
        cfg: SparseCoderConfig,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        init_seed: int = 0,
    ):
        super().__init__(hookpoints, [1] * len(hookpoints))  # equal coders: equal blocks
        self.cfg = cfg
        self.d_in = d_in
        self.device = torch.device(device)
        self.dtype = dtype
        self.local = PerLayerCoders(
            [self.hookpoints[p] for p in self.owned], d_in, cfg, device, dtype, init_seed
        )

    @property
    def transcode(self) -> bool:
        return self.cfg.transcode

    def n_targets(self, p: int) -> int:
        return 1

    def sources_reaching(self, t: int) -> list[int]:
        return [t]

    def coder(self, p: int) -> SparseCoder:
        """Hookpoint p's coder (held here)."""
        return self.local[self.hookpoints[p]]

    @torch.no_grad()
    def init_biases(
        self,
        inputs: list[Tensor],
        outputs: list[Tensor],
        reduce_mean: MeanReducer | None = None,
    ) -> None:
        """`PerLayerCoders.init_biases`: every process reduces every hookpoint's means (a
        collective), the owners keep theirs."""
        reduce_mean = reduce_mean or (lambda t: t)
        for p, (x, y) in enumerate(zip(inputs, outputs, strict=True)):
            x_mean = reduce_mean(x.mean(0)) if self.cfg.transcode else None
            y_mean = reduce_mean(y.mean(0))
            if p not in self.owned:
                continue
            coder = self.coder(p)
            if x_mean is not None:
                centre_encoder(coder.encoder, x_mean.to(coder.dtype))
            coder.b_dec.data = y_mean.to(coder.dtype)

    def forward(
        self,
        inputs: list[Tensor],
        outputs: list[Tensor],
        total_variances: list[Tensor] | None = None,
        dead_masks: list[Tensor] | None = None,
    ) -> CoderSetOutput:
        """Stock sparsify's forward of each owned coder on the world batch; FVU of the owned
        hookpoints (zero elsewhere: the trainer sums over processes)."""
        device = inputs[0].device
        counts = token_counts(inputs[0].shape[0], device)
        lo = sum(counts[: self.rank])
        hi = lo + counts[self.rank]
        world_y = [gather_rows(y, counts, self.owners[p]) for p, y in enumerate(outputs)]
        world_x = (  # an SAE reads what it predicts
            [gather_rows(x, counts, self.owners[p]) for p, x in enumerate(inputs)]
            if self.cfg.transcode
            else world_y
        )
        owned = self.owned

        def pick(values: Sequence[Tensor | None]) -> list[Tensor]:
            """The owned layers' entries (rows gathered here, never None)."""
            return [gathered(values[p]) for p in owned]

        if total_variances is None:
            total_variances = [
                torch.zeros((), device=device) if y is None else total_variance(y) for y in world_y
            ]
        out = self.local(
            pick(world_x),
            pick(world_y),
            pick(total_variances),
            None if dead_masks is None else pick(dead_masks),
        )
        mine = {p: i for i, p in enumerate(owned)}
        zero = torch.zeros((), device=device)
        width = out.latent_indices[0].shape[-1] if owned else self.cfg.k
        n_world = sum(counts)
        features = [
            share_features(
                (out.latent_acts[mine[p]], out.latent_indices[mine[p]]) if p in mine else None,
                self.owners[p],
                n_world,
                width,
                device,
                leaf=False,
            )
            for p in range(len(self.hookpoints))
        ]
        everyone = range(len(self.hookpoints))

        def spread(values: Tensor) -> Tensor:
            """Per-hookpoint figures of the owned coders, zero for the others."""
            return torch.stack([values[mine[p]] if p in mine else zero for p in everyone])

        def spread_optional(values: Tensor | None) -> Tensor | None:
            return None if values is None else spread(values)

        return CoderSetOutput(
            spread(out.fvu),
            [f.values[lo:hi] for f in features],
            [f.indices[lo:hi] for f in features],
            [out.predictions[mine[p]] if p in mine else outputs[p][:0] for p in everyone],
            spread_optional(out.auxk_loss),
            spread_optional(out.multi_topk_fvu),
        )

    @torch.no_grad()
    def before_batch(self) -> None:
        """SAEs renormalise their decoder rows (`PerLayerCoders.before_batch`)."""
        self.local.before_batch()

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """SAEs keep unit-norm decoder rows (`PerLayerCoders.before_optimizer_step`)."""
        self.local.before_optimizer_step()
