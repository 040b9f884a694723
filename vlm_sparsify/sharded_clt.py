"""A cross-layer transcoder sharded over processes (`--distribute_modules`).

A CLT-16 at 8,192 latents on LLaVA-7B needs ~92 GB for its weights, gradients and optimizer
state (docs/memory.md): more than an 80 GB GPU holds next to the model. Sharded, each process
holds a contiguous block of layers, and for each of its layers l:

- source l's encoder, and
- every decoder INTO target l: W_dec[p->l] and b_dec[p->l] for each source p reaching l.

Decoders live with their target, not their source, because what crosses between processes is
then sparse. One training step, on every process in the same order:

1. each layer's MLP inputs and outputs from every process's batch are gathered to its owner
   (the world batch, rank 0's tokens first);
2. owners encode their sources; each source's k (value, index) pairs per token are broadcast;
3. each process decodes into its targets, takes the FVU on the world batch and backpropagates
   into its decoders and into the broadcast values (phase one, `loss.backward()`);
4. the values' gradients are summed at each source's owner, which backpropagates them through
   its encoder (phase two, `finish_backward`).

Every parameter lives on one process and sees the whole world batch, so no gradient is
all-reduced. The result equals the data-parallel CLT's up to the order of float sums (one
process: bit for bit on the CPU, tested). Checkpoints are assembled on rank 0 in the usual CLT
layout (`sharded_checkpoint.py`).
"""

from __future__ import annotations

from typing import cast

import torch
from sparsify import SparseCoderConfig
from sparsify.fused_encoder import EncoderOutput
from torch import Tensor, nn

from vlm_sparsify.coder_set import (
    CoderSetOutput,
    MeanReducer,
    centre_encoder,
    fraction_of_variance_unexplained,
    total_variance,
)
from vlm_sparsify.cross_layer import (
    CLTSource,
    auxk_loss,
    coder_memory_bytes,
    n_sources_per_target,
    n_targets_per_source,
    sparse_decode,
)
from vlm_sparsify.sharding import (
    Features,
    ShardedCoders,
    gather_rows,
    gathered,
    shard_layers,
    share_features,
    sum_at,
    token_counts,
)
from vlm_sparsify.topk_encoder import encode_topk


def layer_parameters(n_layers: int, cross_layer: int, num_latents: int, d_in: int) -> list[int]:
    """Parameters each layer's owner holds: an encoder and one decoder per source reaching it."""
    return [
        num_latents * d_in + num_latents + s * (num_latents * d_in + d_in)
        for s in n_sources_per_target(n_layers, cross_layer)
    ]


def shard_memory_bytes(
    n_layers: int,
    num_latents: int,
    d_in: int,
    cross_layer: int,
    world: int,
    rank: int,
    optimizer: str = "signum",
    dtype_bytes: int = 4,
    decoder_dtype_bytes: int = 4,
) -> dict[str, int]:
    """`training_memory_bytes` of the layers process `rank` of `world` holds."""
    owners = shard_layers(layer_parameters(n_layers, cross_layer, num_latents, d_in), world)
    sources = n_sources_per_target(n_layers, cross_layer)
    mine = [t for t, r in enumerate(owners) if r == rank]
    decoders = sum(sources[t] for t in mine)
    return coder_memory_bytes(
        len(mine), decoders, num_latents, d_in, optimizer, dtype_bytes, decoder_dtype_bytes
    )


class ShardedCLT(ShardedCoders):
    """The layers of a CLT this process owns, with the coder-set interface of docs/internals.md.

    `forward` takes this process's own tokens at every hookpoint (as the data-parallel CLT does)
    and returns the FVU of the targets it owns (zero elsewhere: the trainer sums over processes),
    and every source's features for its own tokens.
    """

    def __init__(
        self,
        hookpoints: list[str],
        d_in: int,
        cfg: SparseCoderConfig,
        cross_layer: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        decoder_dtype: torch.dtype | None = None,
        init_seed: int = 0,
    ):
        if not cfg.transcode:
            raise ValueError("a cross-layer coder is a transcoder: set cfg.transcode=True")
        if cross_layer < 1:
            raise ValueError(
                f"--distribute_modules shards a CLT: cross_layer must be >= 1, got {cross_layer}"
            )
        if cfg.skip_connection:
            raise ValueError("--distribute_modules does not support a CLT's skip connections")
        num_latents = cfg.num_latents or d_in * cfg.expansion_factor
        n = len(hookpoints)
        super().__init__(hookpoints, layer_parameters(n, cross_layer, num_latents, d_in))
        self.cfg = cfg
        self.d_in = d_in
        self.num_latents = num_latents
        self.cross_layer = cross_layer
        self.device = torch.device(device)
        self.dtype = dtype
        self.decoder_dtype = decoder_dtype or dtype
        self._targets = n_targets_per_source(n, cross_layer)
        layers = {}
        for t in self.owned:
            torch.manual_seed(init_seed)  # per source, as CrossLayerTranscoder and sparsify
            n_sources = len(self.sources_reaching(t))
            # a CLTSource's shape (an encoder, n decoders), holding the decoders INTO layer t
            layers[str(t)] = CLTSource(
                d_in, self.num_latents, n_sources, False, device, dtype, self.decoder_dtype
            )
        self.layers = nn.ModuleDict(layers)
        self._leaves: list[Tensor] = []
        self._encoded_acts: dict[int, Tensor] = {}

    @property
    def transcode(self) -> bool:
        return True

    def n_targets(self, p: int) -> int:
        return self._targets[p]

    def sources_reaching(self, t: int) -> list[int]:
        return [p for p in range(t + 1) if p + self._targets[p] > t]

    def layer(self, t: int) -> CLTSource:
        """Layer t's module: source t's `encoder`; `W_decs[j]`, `b_decs[j]` decode the j-th
        source reaching t (`sources_reaching(t)[j]`) into target t."""
        return cast(CLTSource, self.layers[str(t)])

    def decoder(self, p: int, t: int) -> tuple[nn.Parameter, nn.Parameter]:
        """W_dec[p->t], b_dec[p->t] (target t owned here)."""
        j = p - self.sources_reaching(t)[0]
        layer = self.layer(t)
        return cast(nn.Parameter, layer.W_decs[j]), cast(nn.Parameter, layer.b_decs[j])

    def source_tensor(self, p: int, key: str) -> Tensor:
        """Source p's tensor under clt-training's key (`encoder.weight`, `W_decs.{i}`, ...),
        held by this process."""
        kind, name = key.split(".")
        if kind == "encoder":
            return getattr(self.layer(p).encoder, name)
        W_dec, b_dec = self.decoder(p, p + int(name))
        return W_dec if kind == "W_decs" else b_dec

    def has_post_encoder_scale(self, p: int) -> bool:
        return False

    def before_batch(self) -> None:
        """Nothing to do (transcoder decoders are not kept unit-norm)."""

    def before_optimizer_step(self) -> None:
        """Nothing to do (transcoder decoders are not kept unit-norm)."""

    @torch.no_grad()
    def init_biases(
        self,
        inputs: list[Tensor],
        outputs: list[Tensor],
        reduce_mean: MeanReducer | None = None,
    ) -> None:
        """As CrossLayerTranscoder.init_biases: every process reduces every layer's mean (a
        collective), the owners keep theirs."""
        reduce_mean = reduce_mean or (lambda t: t)
        for p, x in enumerate(inputs):
            mean = reduce_mean(x.mean(0))
            if p in self.owned:
                encoder = self.layer(p).encoder
                centre_encoder(encoder, mean.to(encoder.weight.dtype))
        for t, y in enumerate(outputs):
            reaching = self.sources_reaching(t)
            mean = reduce_mean(y.mean(0)) / len(reaching)
            if t in self.owned:
                for p in reaching:
                    b_dec = self.decoder(p, t)[1]
                    b_dec.data = mean.to(b_dec.dtype).clone()

    # bf16 autocast on CUDA, as CrossLayerTranscoder.forward
    @torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_bf16_supported())
    def forward(
        self,
        inputs: list[Tensor],
        outputs: list[Tensor],
        total_variances: list[Tensor] | None = None,
        dead_masks: list[Tensor] | None = None,
    ) -> CoderSetOutput:
        """Steps 1-3 of the module docstring; `finish_backward()` after `loss.backward()`."""
        counts = token_counts(inputs[0].shape[0], inputs[0].device)
        lo = sum(counts[: self.rank])
        hi = lo + counts[self.rank]
        world_x = {p: gather_rows(x, counts, self.owners[p]) for p, x in enumerate(inputs)}
        world_y = {t: gather_rows(y, counts, self.owners[t]) for t, y in enumerate(outputs)}
        encoded: dict[int, EncoderOutput] = {}
        for p in self.owned:
            encoder = self.layer(p).encoder
            encoded[p] = encode_topk(
                gathered(world_x[p]), encoder.weight, encoder.bias, self.cfg.k, self.cfg.activation
            )
        n_world, k = sum(counts), self.cfg.k
        device = inputs[0].device
        features = [
            share_features(encoded.get(p), self.owners[p], n_world, k, device, leaf=True)
            for p in range(len(self.hookpoints))
        ]
        self._leaves = [f.values for f in features]
        self._encoded_acts = {p: out.top_acts for p, out in encoded.items()}

        zero = torch.zeros((), device=device)
        if total_variances is None:
            total_variances = [zero if y is None else total_variance(y) for y in world_y.values()]
        fvu, preds = [], []
        for t, y in world_y.items():
            if y is None:
                fvu.append(zero)
                preds.append(outputs[t].new_empty(0, self.d_in))
                continue
            pred = self._predict(t, features)
            preds.append(pred)
            fvu.append(fraction_of_variance_unexplained(y, pred, total_variances[t]))

        auxk = None
        if dead_masks is not None:
            auxk = torch.stack(
                [
                    auxk_loss(
                        self.decoder(p, p)[0],
                        encoded[p].pre_acts.detach(),  # the fused encoder ignores its gradient
                        gathered(world_y[p]) - preds[p],
                        total_variances[p],
                        dead,
                    )
                    if p in encoded
                    else zero
                    for p, dead in enumerate(dead_masks)
                ]
            )
        multi = None
        if self.cfg.multi_topk:
            wide = [
                share_features(
                    self._top_4k(encoded.get(p)), self.owners[p], n_world, 4 * k, device, False
                )
                for p in range(len(self.hookpoints))
            ]
            multi = torch.stack(
                [
                    zero
                    if y is None
                    else fraction_of_variance_unexplained(
                        y, self._predict(t, wide), total_variances[t]
                    )
                    for t, y in world_y.items()
                ]
            )
        return CoderSetOutput(
            torch.stack(fvu),
            [f.values.detach()[lo:hi] for f in features],
            [f.indices[lo:hi] for f in features],
            preds,
            auxk,
            multi,
        )

    def finish_backward(self) -> None:
        """Phase two: the broadcast values' gradients, summed at each source's owner, go back
        through its encoder (every process calls this, in the same order)."""
        leaves, encoded_acts = self._leaves, self._encoded_acts
        self._leaves, self._encoded_acts = [], {}
        for p, leaf in enumerate(leaves):
            grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            grad = sum_at(grad, self.owners[p])
            acts = encoded_acts.get(p)
            if acts is not None:
                acts.backward(grad.to(acts.dtype))

    # -- internals --------------------------------------------------------------------------

    def _top_4k(self, encoded: EncoderOutput | None) -> tuple[Tensor, Tensor] | None:
        """sparsify's multi-TopK latents (their gradient does not reach the fused encoder)."""
        if encoded is None:
            return None
        return encoded.pre_acts.detach().topk(4 * self.cfg.k, sorted=False)

    def _predict(self, t: int, features: list[Features]) -> Tensor:
        total = None
        for p in self.sources_reaching(t):
            W_dec, b_dec = self.decoder(p, t)
            part = sparse_decode(W_dec, features[p].values, features[p].indices, bias=b_dec)
            total = part if total is None else total + part
        assert total is not None
        return total
