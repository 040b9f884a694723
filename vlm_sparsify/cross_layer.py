"""The cross-layer transcoder (CLT): each source layer writes to itself and the next layers.

Source p encodes its MLP input x_p with sparsify's fused TopK encoder into features f_p; the MLP
output of target t is predicted as  y_t ~ sum over sources p reaching t of  W_dec[p->t] f_p + b[p->t].
Decoding is sparse (sparsify's `decoder_impl`: Triton on GPU, `embedding_bag` on CPU) so a step
costs about what a per-layer transcoder step costs. Each source is a `CLTSource` whose state_dict
is EleutherAI/clt-training's untied layout.
"""

import contextlib
import warnings
from typing import cast

import torch
from sparsify import SparseCoderConfig
from sparsify.fused_encoder import EncoderOutput
from sparsify.utils import decoder_impl
from torch import Tensor, nn

from vlm_sparsify.coder_set import (
    CoderSetOutput,
    MeanReducer,
    centre_encoder,
    fraction_of_variance_unexplained,
    total_variance,
)
from vlm_sparsify.topk_encoder import encode_topk


def n_targets_per_source(num_hookpoints: int, cross_layer: int) -> list[int]:
    """Targets of each source: min(cross_layer, H - p); 0 means per-layer (1 target each)."""
    if cross_layer < 0:
        raise ValueError(f"cross_layer must be >= 0, got {cross_layer}")
    reach = cross_layer or 1
    return [min(reach, num_hookpoints - p) for p in range(num_hookpoints)]


def n_sources_per_target(num_hookpoints: int, cross_layer: int) -> list[int]:
    """How many sources write into each target hookpoint."""
    counts = [0] * num_hookpoints
    for p, n in enumerate(n_targets_per_source(num_hookpoints, cross_layer)):
        for t in range(p, p + n):
            counts[t] += 1
    return counts


class CLTSource(nn.Module):
    """One source hookpoint: its encoder and its decoders into targets p, p+1, ..., p+n-1.

    State-dict keys are clt-training's untied layout: `encoder.weight` [L, d], `encoder.bias` [L],
    `W_decs.{i}` [L, d], `b_decs.{i}` [d], optional `W_skips.{i}` [d, d]. `post_encs.{i}` /
    `post_enc_scales.{i}` (per-target activation offsets / scales) exist only when loaded from a
    clt-training checkpoint that trained them.
    """

    def __init__(
        self,
        d_in: int,
        num_latents: int,
        n_targets: int,
        skip_connection: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        decoder_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        decoder_dtype = decoder_dtype or dtype
        self.encoder = nn.Linear(d_in, num_latents, device=device, dtype=dtype)
        self.encoder.bias.data.zero_()

        def zeros(*shape: int, dtype: torch.dtype = dtype) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, device=device, dtype=dtype))

        # Transcoder decoders start at zero, as in sparsify
        self.W_decs = nn.ParameterList(
            [zeros(num_latents, d_in, dtype=decoder_dtype) for _ in range(n_targets)]
        )
        self.b_decs = nn.ParameterList([zeros(d_in) for _ in range(n_targets)])
        self.W_skips = (
            nn.ParameterList([zeros(d_in, d_in) for _ in range(n_targets)])
            if skip_connection
            else None
        )
        self.post_encs: nn.ParameterList | None = None
        self.post_enc_scales: nn.ParameterList | None = None

    @property
    def n_targets(self) -> int:
        return len(self.W_decs)

    def add_post_encoder(self, scales: bool) -> None:
        """Add clt-training's per-target activation offsets (and scales) before loading them."""
        like = self.encoder.bias
        self.post_encs = nn.ParameterList(
            [nn.Parameter(torch.zeros_like(like)) for _ in range(self.n_targets)]
        )
        if scales:
            self.post_enc_scales = nn.ParameterList(
                [nn.Parameter(torch.zeros_like(like)) for _ in range(self.n_targets)]
            )

    def target_acts(self, i: int, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """The activations target i decodes (clt-training's post-encoder offset and scale)."""
        if self.post_encs is None:
            return top_acts
        acts = top_acts + self.post_encs[i][top_indices] * (top_acts > 0)
        if self.post_enc_scales is not None:
            acts = acts * self.post_enc_scales[i][top_indices]
        return acts

    def decode_target(self, i: int, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """Contribution to target i (hookpoint p+i), decoder bias included, as float32."""
        W_dec = self.W_decs[i]
        acts = self.target_acts(i, top_acts, top_indices).to(W_dec.dtype)
        # one kernel for the cast to float32 and the bias (type promotion; the same values)
        return torch.add(decoder_impl(top_indices, acts, W_dec.mT), self.b_decs[i].float())

    def decode(
        self, top_acts: Tensor, top_indices: Tensor, embedding_bag: bool = False, bias: bool = True
    ) -> list[Tensor]:
        """Contribution to each of the n_targets targets, decoder bias included if `bias`.

        On a GPU each target goes through sparsify's Triton decoder (training), or torch's
        embedding_bag with `embedding_bag` (`CLTInference`'s per-target sources); on the CPU
        sparsify's decoder is torch's embedding_bag (`sparse_decode`, bit-identical to
        `decode_target`).
        """
        return [
            sparse_decode(
                W_dec,
                self.target_acts(i, top_acts, top_indices),
                top_indices,
                embedding_bag,
                b_dec if bias else None,
            )
            for i, (W_dec, b_dec) in enumerate(zip(self.W_decs, self.b_decs, strict=True))
        ]


def sparse_decode(
    W_dec: Tensor,
    values: Tensor,
    indices: Tensor,
    embedding_bag: bool = False,
    bias: Tensor | None = None,
) -> Tensor:
    """sum_j values[:, j] * W_dec[indices[:, j]] (+ bias) as float32: sparsify's Triton decoder
    on a GPU unless `embedding_bag`, else torch's embedding_bag (what sparsify uses on the CPU).
    With a bias, the cast to float32 and the addition are one kernel (type promotion: the same
    values as casting first; with bf16 decoders a [tokens, d] float32 pass less per decoder)."""
    acts = values.to(W_dec.dtype)
    if indices.device.type != "cpu" and not embedding_bag:
        decoded = decoder_impl(indices, acts, W_dec.mT)
    else:
        rows, k = indices.shape
        offsets = torch.arange(0, rows * k, k, dtype=indices.dtype, device=indices.device)
        decoded = torch.embedding_bag(
            W_dec, indices.reshape(-1), offsets, False, 0, False, acts.reshape(-1), False
        )[0]
    return decoded.float() if bias is None else torch.add(decoded, bias.float())


def auxk_loss(
    W_dec: Tensor, pre_acts: Tensor, residual: Tensor, total_variance: Tensor, dead: Tensor
) -> Tensor:
    """sparsify's AuxK for a source: its top dead latents (k_aux = d / 2) predict its layer's
    residual through its own-layer decoder `W_dec`, scaled down when few latents are dead."""
    num_dead = int(dead.sum())
    if num_dead == 0:
        return residual.new_tensor(0.0)
    k_aux = residual.shape[-1] // 2
    scale = min(num_dead / k_aux, 1.0)
    masked = torch.where(dead[None], pre_acts, -torch.inf)
    aux_acts, aux_indices = masked.topk(min(k_aux, num_dead), sorted=False)
    e_hat = decoder_impl(aux_indices, aux_acts.to(W_dec.dtype), W_dec.mT)
    return scale * (e_hat - residual.detach()).pow(2).sum() / total_variance


class CrossLayerTranscoder(nn.Module):
    """A CLT over `hookpoints` (in model order) with the coder-set interface of docs/internals.md."""

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
        super().__init__()
        if not cfg.transcode:
            raise ValueError("a cross-layer coder is a transcoder: set cfg.transcode=True")
        if cross_layer < 1:
            raise ValueError(f"cross_layer must be >= 1 for a CLT, got {cross_layer}")
        self.hookpoints = list(hookpoints)
        self.cfg = cfg
        self.d_in = d_in
        self.num_latents = cfg.num_latents or d_in * cfg.expansion_factor
        self.cross_layer = cross_layer
        sources = []
        for n in n_targets_per_source(len(self.hookpoints), cross_layer):
            # Seeded per source like sparsify.Trainer, so source p's encoder matches a PLT's
            torch.manual_seed(init_seed)
            sources.append(
                CLTSource(
                    d_in, self.num_latents, n, cfg.skip_connection, device, dtype, decoder_dtype
                )
            )
        self.sources = nn.ModuleList(sources)

    def __getitem__(self, hookpoint: str) -> CLTSource:
        return self.source(self.hookpoints.index(hookpoint))

    def source(self, p: int) -> CLTSource:
        """Source p's module."""
        return cast(CLTSource, self.sources[p])

    def source_modules(self) -> list[CLTSource]:
        """Every source's module, in model order."""
        return [self.source(p) for p in range(len(self.sources))]

    def items(self) -> list[tuple[str, CLTSource]]:
        return [(hookpoint, self.source(p)) for p, hookpoint in enumerate(self.hookpoints)]

    @property
    def transcode(self) -> bool:
        return True

    def n_targets(self, p: int) -> int:
        return self.source(p).n_targets

    def sources_reaching(self, t: int) -> list[int]:
        return [p for p in range(t + 1) if p + self.n_targets(p) > t]

    def has_post_encoder_scale(self, p: int) -> bool:
        return self.source(p).post_enc_scales is not None

    @torch.no_grad()
    def init_biases(
        self,
        inputs: list[Tensor],
        outputs: list[Tensor],
        reduce_mean: MeanReducer | None = None,
    ) -> None:
        """Centre each encoder on its input mean; the target means split evenly over sources."""
        reduce_mean = reduce_mean or (lambda t: t)
        for x, (_, source) in zip(inputs, self.items(), strict=True):
            centre_encoder(source.encoder, reduce_mean(x.mean(0)).to(source.encoder.weight.dtype))
        for t, y in enumerate(outputs):
            reaching = self.sources_reaching(t)
            mean = reduce_mean(y.mean(0)) / len(reaching)
            for p in reaching:
                b_dec = self.source(p).b_decs[t - p]
                b_dec.data = mean.to(b_dec.dtype).clone()  # each source owns its bias

    def before_batch(self) -> None:
        """Nothing to do (transcoder decoders are not kept unit-norm); same interface as PLTs."""

    def before_optimizer_step(self) -> None:
        """Nothing to do (transcoder decoders are not kept unit-norm); same interface as PLTs."""

    def encode(self, p: int, x: Tensor) -> EncoderOutput:
        """TopK features of source p (a transcoder: no decoder-bias subtraction)."""
        encoder = self.source(p).encoder
        return encode_topk(x, encoder.weight, encoder.bias, self.cfg.k, self.cfg.activation)

    def decode(self, p: int, top_acts: Tensor, top_indices: Tensor) -> list[Tensor]:
        """Contribution of source p to targets p .. p+n_targets(p)-1 (bias of p->t included).

        On a GPU sparsify's Triton decoder; on the CPU torch's embedding_bag (sparsify's there)."""
        return self.source(p).decode(top_acts, top_indices)

    def skip(self, p: int, x: Tensor) -> list[Tensor]:
        """Skip-connection terms of source p into its targets (empty without skip_connection)."""
        W_skips = self.source(p).W_skips
        return [] if W_skips is None else [x.to(W.dtype) @ W.mT for W in W_skips]

    def predict(
        self, sources: list[EncoderOutput | None], t: int, inputs: list[Tensor] | None = None
    ) -> Tensor:
        """Prediction of target t: the sum over every source reaching it."""
        total = None
        for p in self.sources_reaching(t):
            source = sources[p]
            if source is None:
                raise ValueError(f"target {t} ({self.hookpoints[t]}) needs source {p} encoded")
            i = t - p
            part = self.source(p).decode_target(i, source.top_acts, source.top_indices)
            if inputs is not None and self.cfg.skip_connection:
                part = part + self.skip(p, inputs[p])[i]
            total = part if total is None else total + part
        assert total is not None
        return total

    # bf16 autocast on CUDA, as sparsify's SparseCoder.forward
    @torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_bf16_supported())
    def forward(
        self,
        inputs: list[Tensor],
        outputs: list[Tensor],
        total_variances: list[Tensor] | None = None,
        dead_masks: list[Tensor] | None = None,
    ) -> CoderSetOutput:
        """Encode every source, decode into all its targets, FVU per target (loss = fvu.sum()).

        `total_variances` are the FVU denominators per target (default: of these outputs).
        `dead_masks` (per source, [latents] bool) add sparsify's AuxK loss per source, on its own
        layer's residual (`auxk_loss`); `cfg.multi_topk` adds the FVU of decoding each source's
        top 4k latents into all its targets (`multi_topk_fvu`). With cross_layer 1 both equal
        stock sparsify's PLT terms.
        """
        predictions: list[Tensor | None] = [None] * len(self.hookpoints)
        acts, indices, pre_acts = [], [], []
        for p, x in enumerate(inputs):
            top_acts, top_indices, pre = self.encode(p, x)
            acts.append(top_acts)
            indices.append(top_indices)
            pre_acts.append(pre)
            parts = self.decode(p, top_acts, top_indices)
            for i, skip in enumerate(self.skip(p, x)):
                parts[i] = parts[i] + skip
            for i, part in enumerate(parts):
                prev = predictions[p + i]
                predictions[p + i] = part if prev is None else prev + part
        preds = [pred for pred in predictions if pred is not None]
        variances = total_variances or [total_variance(y) for y in outputs]
        fvu = torch.stack(
            [
                fraction_of_variance_unexplained(y, y_hat, var)
                for y, y_hat, var in zip(outputs, preds, variances, strict=True)
            ]
        )
        auxk = None
        if dead_masks is not None:
            auxk = torch.stack(
                [
                    auxk_loss(
                        self.source(p).W_decs[0],
                        pre_acts[p],
                        outputs[p] - preds[p],
                        variances[p],
                        dead,
                    )
                    for p, dead in enumerate(dead_masks)
                ]
            )
        multi = None
        if self.cfg.multi_topk:
            multi = self._multi_topk_fvu(pre_acts, outputs, variances)
        return CoderSetOutput(fvu, acts, indices, preds, auxk, multi)

    def _multi_topk_fvu(
        self, pre_acts: list[Tensor], outputs: list[Tensor], variances: list[Tensor]
    ) -> Tensor:
        """FVU per target when every source decodes its top 4k latents (no skip, as sparsify)."""
        totals: list[Tensor | None] = [None] * len(self.hookpoints)
        for p, pre in enumerate(pre_acts):
            top_acts, top_indices = pre.topk(4 * self.cfg.k, sorted=False)
            for i, part in enumerate(self.decode(p, top_acts, top_indices)):
                prev = totals[p + i]
                totals[p + i] = part if prev is None else prev + part
        return torch.stack(
            [
                fraction_of_variance_unexplained(y, y_hat, var)
                for y, y_hat, var in zip(outputs, totals, variances, strict=True)
                if y_hat is not None
            ]
        )

    def memory_bytes(self, optimizer: str = "signum") -> dict[str, int]:
        """Bytes of this CLT's weights, gradients and optimizer state while training."""
        return training_memory_bytes(
            len(self.hookpoints),
            self.num_latents,
            self.d_in,
            self.cross_layer,
            optimizer,
            self.source(0).encoder.weight.element_size(),
            self.source(0).W_decs[0].element_size(),
        )


OPTIMIZER_STATE_COPIES = {"signum": 1, "adam": 2}
"""Full-size state tensors per parameter, in the parameter's dtype: signum = SignSGD (no state)
under schedule-free averaging (`ScheduleFreeSignSGD`: one buffer `z`); adam = exp_avg +
exp_avg_sq."""


def training_memory_bytes(
    n_layers: int,
    num_latents: int,
    d_in: int,
    cross_layer: int,
    optimizer: str = "signum",
    dtype_bytes: int = 4,
    decoder_dtype_bytes: int = 4,
) -> dict[str, int]:
    """Bytes of CLT weights, gradients and optimizer state (docs/memory.md has the model)."""
    pairs = sum(n_targets_per_source(n_layers, cross_layer))
    return coder_memory_bytes(
        n_layers, pairs, num_latents, d_in, optimizer, dtype_bytes, decoder_dtype_bytes
    )


def coder_memory_bytes(
    encoders: int,
    decoders: int,
    num_latents: int,
    d_in: int,
    optimizer: str = "signum",
    dtype_bytes: int = 4,
    decoder_dtype_bytes: int = 4,
) -> dict[str, int]:
    """Bytes of `encoders` encoders and `decoders` decoders (with their biases) while
    training: weights, gradients (same dtypes) and optimizer state."""
    if optimizer not in OPTIMIZER_STATE_COPIES:
        raise ValueError(f"Unknown optimizer '{optimizer}'; known: {list(OPTIMIZER_STATE_COPIES)}")
    decoder_weights = decoders * num_latents * d_in * decoder_dtype_bytes
    rest = (encoders * (num_latents * d_in + num_latents) + decoders * d_in) * dtype_bytes
    weights = decoder_weights + rest
    return {
        "decoder_weights": decoder_weights,
        "weights": weights,
        "gradients": weights,
        "optimizer": OPTIMIZER_STATE_COPIES[optimizer] * weights,
        "total": (2 + OPTIMIZER_STATE_COPIES[optimizer]) * weights,
    }


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device, or the memory Linux reports available for a CPU one (None
    where neither is known: no limit is checked)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


def check_training_fits(
    needed: dict[str, int], free_bytes: int, optimizer: str, decoder_dtype_bytes: int = 4
) -> None:
    """Stop before building a CLT whose weights, gradients and optimizer state (`needed`, from
    `training_memory_bytes`) exceed `free_bytes`; warn when they leave under 10% of it for the
    activations."""
    total = needed["total"]
    if total <= 0.9 * free_bytes:
        return
    gib = 2**30
    message = (
        f"this CLT needs ~{total / gib:.1f} GiB for its weights, gradients and {optimizer} state "
        f"(decoders {needed['decoder_weights'] / gib:.1f} GiB of weights) and the device has "
        f"{free_bytes / gib:.1f} GiB free with the model loaded"
    )
    halve = "--decoder_dtype bfloat16 halves the decoders, " if decoder_dtype_bytes > 2 else ""
    advice = (
        f"{halve}a smaller --cross_layer or fewer latents (--expansion_factor / --num_latents) "
        "shrink them, and torchrun with --distribute_modules shares the CLT's layers out over "
        "the GPUs (docs/memory.md)"
    )
    if total > free_bytes:
        raise SystemExit(f"error: {message}: it cannot fit. {advice}")
    warnings.warn(f"{message}: little room is left for activations. {advice}", stacklevel=2)
