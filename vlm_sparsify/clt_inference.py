"""A CLT's weights laid out for inference: each source decodes into all its targets in one call.

During training a CLT source keeps one decoder per target (clt-training's layout, sparsify's
kernels, one gradient each). Outside training, source p's n decoders are one sparse product with
the `[M, n * d]` matrix of its decoders side by side, so torch's `embedding_bag` decodes all its
targets in one launch instead of n. On a GPU a decoding step is launch-bound: a CLT-16 over 32
layers has 392 decoders, each several small kernels per generated token. The wide copies cost the
decoders' memory once more (`nbytes`); each is taken at its source's first decode, so capturing
features alone (no decoding) takes none.

With `kernel="triton"` a source decodes straight into its targets' pending sums
(`decode_into`, `vlm_sparsify.triton_decode`: decode, bias and accumulation in one launch that
keeps a column block of the wide matrix in L2 while every row reads it); it needs Triton and a
GPU (or `TRITON_INTERPRET=1`).

On CUDA the encoders are copied in bf16, the dtype the training step computes them in (autocast,
as sparsify's `SparseCoder.forward`): half the bytes a decoding step reads, and tensor-core
matmuls in the prefill. On the CPU the encoders are the CLT's own (no copy).

The copies are taken once; `current()` says whether the CLT's weights have changed since (a
training step, `load_state_dict`, `.to()`), so the user of the copies can take them again.
"""

from __future__ import annotations

from typing import Literal

import torch
from sparsify.fused_encoder import EncoderOutput
from torch import Tensor

from vlm_sparsify.cross_layer import CrossLayerTranscoder
from vlm_sparsify.topk_encoder import encode_topk

Kernel = Literal["embedding_bag", "triton"]


def _weights_key(clt: CrossLayerTranscoder) -> tuple[tuple[int, int], ...]:
    """Storage address and in-place version of every weight: changes when any weight changes."""
    return tuple((param.data_ptr(), param._version) for param in clt.parameters())


def _encoder_dtype(weight: Tensor) -> torch.dtype:
    """The dtype the copies hold the encoders in: bf16 on CUDA (training's autocast dtype), else
    the encoder's own (no copy)."""
    return torch.bfloat16 if weight.is_cuda and torch.cuda.is_bf16_supported() else weight.dtype


class CLTInference:
    """Inference copies of `clt`'s weights: `encode(p, x)` and `decode(p, ...)` -> `[N, n, d]`."""

    def __init__(self, clt: CrossLayerTranscoder, kernel: Kernel = "embedding_bag"):
        match kernel:
            case "embedding_bag":
                pass
            case "triton":
                from vlm_sparsify.triton_decode import check_available

                check_available(clt.source(0).encoder.weight.device)
            case other:
                raise ValueError(
                    f"Unknown CLT inference kernel '{other}'; use embedding_bag or triton"
                )
        self.kernel: Kernel = kernel
        self.clt = clt
        self._key = _weights_key(clt)
        self.encoder_dtype = _encoder_dtype(clt.source(0).encoder.weight)
        self.encoders = [
            (
                source.encoder.weight.detach().to(self.encoder_dtype),
                source.encoder.bias.detach().to(self.encoder_dtype),
            )
            for source in clt.source_modules()
        ]
        self._offset_cache: dict[tuple, Tensor] = {}
        # read once: module attribute lookups cost more than a decoding step's tensor work
        self.n_targets = [source.n_targets for source in clt.source_modules()]
        self._k, self._activation = clt.cfg.k, clt.cfg.activation
        # per-target activation offsets make a source's decode non-linear in its activations
        self._direct = [kernel == "triton" and s.post_encs is None for s in clt.source_modules()]
        self._target_biases: Tensor | None = None
        self.decoders: dict[int, tuple[Tensor, Tensor] | None] = {}
        """Per source, once it has decoded: (wide decoders [M, n * d], biases [n * d] float32),
        or None for a source with clt-training's per-target activation offsets (each target
        decodes its own activations, so it decodes target by target)."""

    @property
    def nbytes(self) -> int:
        """Bytes these copies hold beyond the CLT's own weights."""
        total = sum(w.nbytes + b.nbytes for w, b in filter(None, self.decoders.values()))
        if self._target_biases is not None:
            total += self._target_biases.nbytes
        if self.encoder_dtype != self.clt.source(0).encoder.weight.dtype:
            total += sum(w.nbytes + b.nbytes for w, b in self.encoders)
        return total

    @staticmethod
    def copy_nbytes(clt: CrossLayerTranscoder) -> int:
        """What the copies of `clt` take once every source has decoded and the target biases
        are summed (`nbytes` then)."""
        total = len(clt.hookpoints) * clt.d_in * 4 + sum(
            W.nbytes + b.numel() * 4  # biases are copied in float32
            for s in clt.source_modules()
            if s.post_encs is None  # decoded target by target: not copied
            for W, b in zip(s.W_decs, s.b_decs, strict=True)
        )
        weight = clt.source(0).encoder.weight
        dtype = _encoder_dtype(weight)
        if dtype != weight.dtype:
            encoders = sum(
                s.encoder.weight.numel() + s.encoder.bias.numel() for s in clt.source_modules()
            )
            total += encoders * dtype.itemsize
        return total

    def current(self) -> bool:
        """Whether the CLT's weights are still the ones copied."""
        return _weights_key(self.clt) == self._key

    def encode(self, p: int, x: Tensor) -> EncoderOutput:
        """Source p's TopK features of x `[N, d]` (the CLT's `encode`, in the encoder dtype)."""
        weight, bias = self.encoders[p]
        return encode_topk(x.to(weight.dtype), weight, bias, self._k, self._activation)

    def decode(self, p: int, top_acts: Tensor, top_indices: Tensor, bias: bool = True) -> Tensor:
        """Source p's contributions to its n targets, biases included if `bias`: `[N, n, d]`
        (float32 with the biases; without, the decoders' dtype).

        Equals `torch.stack(clt.decode(p, top_acts, top_indices), 1)`.
        """
        if p not in self.decoders:
            self.decoders[p] = self._wide(p)
        decoders = self.decoders[p]
        if decoders is None:
            source = self.clt.source(p)
            parts = source.decode(top_acts, top_indices, embedding_bag=True, bias=bias)
            return torch.stack(parts, 1)
        wide, biases = decoders
        rows, k = top_indices.shape
        acts = top_acts.to(wide.dtype).reshape(-1)
        # torch.embedding_bag directly (F.embedding_bag's checks and offsets cost more than
        # the decode itself at a decoding step's few rows); mode 0 = sum
        bags = torch.embedding_bag(
            wide,
            top_indices.reshape(-1),
            self._offsets(rows, k, top_indices),
            False,
            0,
            False,
            acts,
        )[0]
        if bias:  # one kernel for the cast to float32 and the bias (type promotion)
            bags = torch.add(bags, biases)
        return bags.view(rows, self.n_targets[p], -1)

    def target_biases(self) -> Tensor:
        """`[H, d]` float32: row t is the sum of the decoder biases of every source reaching
        target t (what the decoded parts add up to without their biases: `decode(bias=False)`)."""
        if self._target_biases is None:
            clt = self.clt
            totals = torch.zeros(
                len(clt.hookpoints), clt.d_in, device=clt.source(0).encoder.weight.device
            )
            for p, source in enumerate(clt.source_modules()):
                for i, b_dec in enumerate(source.b_decs):
                    totals[p + i] += b_dec.detach().float()
            self._target_biases = totals
        return self._target_biases

    def direct(self, p: int) -> bool:
        """Whether source p decodes with `decode_into` (the Triton kernel; not with per-target
        activation offsets, which make the decode non-linear in the activations)."""
        return self._direct[p]

    def decode_into(
        self,
        p: int,
        top_acts: Tensor,
        top_indices: Tensor,
        out: Tensor,
        first: int,
        count: int,
        bias: bool = True,
    ) -> None:
        """Add source p's contributions to its targets first .. first + count - 1 (counted from
        p), with their biases if `bias`, to `out` `[N, count * d]` float32 (in place)."""
        from vlm_sparsify.triton_decode import decode_accumulate

        if p not in self.decoders:
            self.decoders[p] = self._wide(p)
        decoders = self.decoders[p]
        assert decoders is not None, "decode_into needs direct(p)"
        wide, biases = decoders
        d = self.clt.d_in
        columns = slice(first * d, (first + count) * d)
        decode_accumulate(
            out, top_indices, top_acts, wide[:, columns], biases[columns] if bias else None
        )

    kept_offset_rows = 256
    """`_offsets` of at most this many rows (decoding steps) are kept for good: a CUDA graph of a
    decoding step (`vlm_sparsify.decode_graphs`) reads them at a fixed address."""

    def _offsets(self, rows: int, k: int, like: Tensor) -> Tensor:
        """Start of each row's bag in the flattened `[rows * k]` indices (kept per shape: every
        small one, `kept_offset_rows`, and the last larger one)."""
        key = (rows, k, like.dtype, like.device)
        offsets = self._offset_cache.get(key)
        if offsets is None:
            offsets = torch.arange(0, rows * k, k, dtype=like.dtype, device=like.device)
            if rows > self.kept_offset_rows:  # a prefill's: one at a time, the last one
                cache = self._offset_cache.items()
                self._offset_cache = {s: o for s, o in cache if s[0] <= self.kept_offset_rows}
            self._offset_cache[key] = offsets
        return offsets

    @torch.no_grad()
    def _wide(self, p: int) -> tuple[Tensor, Tensor] | None:
        source = self.clt.source(p)
        if source.post_encs is not None:
            return None
        wide = torch.cat([W.detach() for W in source.W_decs], dim=1)
        return wide, torch.cat([b.detach() for b in source.b_decs]).float()
