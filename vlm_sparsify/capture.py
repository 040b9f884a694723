"""Sparse per-token capture of coder features, with token regions (image / prompt / response).

Per forward and source layer the replacement model hands over the encoder's top-k
(indices, values); they are kept compact on the device while the model runs (no host sync) and
assembled on request into per-sample `[T, S, k]` arrays in the feature store's format
(docs/internals.md, "Feature store"), pad positions dropped. A `generate` call is one sequence
seen over several forwards: its first forward holds the prompt, later forwards the new tokens
(with a KV cache) or the whole sequence again (without one: later rows overwrite earlier ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

REGIONS = ("pad", "image", "prompt", "response")
"""Token region codes: region `name` has code `REGIONS.index(name)`; pad tokens are 0."""

REGION_CODE = {name: code for code, name in enumerate(REGIONS)}

Regions = dict[str, list[tuple[int, int]]]


def token_regions(
    input_ids: Tensor | None,
    attention_mask: Tensor | None,
    shape: tuple[int, int],
    past: int,
    prompt_length: int,
    image_token_id: int | None,
    device: torch.device,
) -> Tensor:
    """Region code `[B, n]` (int8) of the n tokens at positions past .. past+n-1 of each row.

    Positions at or after `prompt_length` are the response; earlier ones are image tokens
    (`input_ids == image_token_id`), pad (attention mask 0) or prompt text.
    """
    batch, n = shape
    positions = torch.arange(past, past + n, device=device)
    codes = torch.where(
        positions >= prompt_length, REGION_CODE["response"], REGION_CODE["prompt"]
    ).to(torch.int8)
    codes = codes.expand(batch, n)
    if input_ids is not None and image_token_id is not None:
        codes = codes.masked_fill(input_ids == image_token_id, REGION_CODE["image"])
    if attention_mask is not None and attention_mask.ndim == 2:
        codes = codes.masked_fill(attention_mask[:, past : past + n] == 0, REGION_CODE["pad"])
    return codes


def region_ranges(codes: Tensor) -> Regions:
    """Runs of equal region code in a 1-D tensor, as `{region: [(start, stop), ...]}`."""
    values: list[int] = codes.tolist()
    ranges: Regions = {name: [] for name in REGIONS[1:]}
    start = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            if values[start] != REGION_CODE["pad"]:
                ranges[REGIONS[values[start]]].append((start, i))
            start = i
    return ranges


def captured_index_dtype(num_latents: int) -> torch.dtype:
    """The dtype of captured indices in memory: int16 when every index fits it as a signed
    value (num_latents <= 32768), else int32. (The feature store reinterprets int16 as uint16
    on disk and so keeps 16 bits up to 65,536 latents: `benchmarks.store.StoreMeta`.)"""
    return torch.int16 if num_latents <= 32768 else torch.int32


class CapturedSample(NamedTuple):
    """One sample's features: rows are its non-pad tokens in order."""

    token_ids: Tensor
    """[T] int64 (0 where the forward had no input_ids)."""

    indices: Tensor
    """[T, S, k] active latent indices, int16 (num_latents <= 32768) or int32."""

    values: Tensor
    """[T, S, k] their activations in the capture's value dtype."""

    regions: Regions
    """Token ranges per region (image / prompt / response), relative to row 0."""


@dataclass
class _Chunk:
    past: int
    token_ids: Tensor | None
    regions: Tensor
    indices: list[Tensor | None]
    values: list[Tensor | None]


@dataclass
class _Sequence:
    chunks: list[_Chunk] = field(default_factory=list)
    stops: list[int] | None = None
    """Per row: positions at or after this are dropped (the response ended)."""


class FeatureCapture:
    """Collects sparse features forward by forward; `pop_samples()` assembles them."""

    def __init__(self, num_sources: int, num_latents: int, value_dtype: torch.dtype):
        self.num_sources = num_sources
        self.index_dtype = captured_index_dtype(num_latents)
        self.value_dtype = value_dtype
        self._sequences: list[_Sequence] = []
        self._in_forward = False

    def start_sequence(self) -> None:
        """A new batch of sequences begins (a forward without past, or a `generate`)."""
        self._sequences.append(_Sequence())

    def start_forward(self, past: int, token_ids: Tensor | None, regions: Tensor) -> None:
        """A forward of the current sequences begins: `past` positions already seen, these
        tokens (None with inputs_embeds) and their region codes `[B, n]`."""
        if not self._sequences:
            self.start_sequence()
        none: list[Tensor | None] = [None] * self.num_sources
        self._sequences[-1].chunks.append(_Chunk(past, token_ids, regions, none, list(none)))
        self._in_forward = True

    def end_forward(self) -> None:
        """The current forward ended: a coder that runs before the next `start_forward` is
        refused (it would write into this forward's rows)."""
        self._in_forward = False

    def record(self, source: int, top_acts: Tensor, top_indices: Tensor) -> None:
        """Keep source `source`'s top-k `[B * n, k]` of the current forward."""
        if not self._in_forward:
            raise RuntimeError(
                "capture follows forwards of the root model (its input_ids give the token "
                "regions): a coder ran outside one (a submodule such as the language model called "
                "alone, or a forward without input_ids or inputs_embeds); call the root model"
            )
        chunk = self._sequences[-1].chunks[-1]
        shape = (*chunk.regions.shape, top_indices.shape[-1])
        chunk.indices[source] = top_indices.detach().to(self.index_dtype).view(shape)
        chunk.values[source] = top_acts.detach().to(self.value_dtype).view(shape)

    def end_sequence(self, stops: list[int]) -> None:
        """Drop the last sequence's rows at or after `stops[b]` (e.g. from the EOS on)."""
        self._sequences[-1].stops = stops

    def pop_samples(self) -> list[CapturedSample]:
        """Every captured sample, in order (one per batch row per sequence); then forget them."""
        samples = [s for seq in self._sequences for s in self._assemble(seq)]
        self._sequences = []
        return samples

    def _assemble(self, sequence: _Sequence) -> list[CapturedSample]:
        if not sequence.chunks:
            return []
        batch = sequence.chunks[0].regions.shape[0]
        length = max(c.past + c.regions.shape[1] for c in sequence.chunks)
        k = next((i.shape[-1] for i in sequence.chunks[0].indices if i is not None), 0)
        indices = torch.zeros(batch, length, self.num_sources, k, dtype=self.index_dtype)
        values = torch.zeros(batch, length, self.num_sources, k, dtype=self.value_dtype)
        codes = torch.zeros(batch, length, dtype=torch.int8)
        token_ids = torch.zeros(batch, length, dtype=torch.long)
        for chunk in sequence.chunks:
            span = slice(chunk.past, chunk.past + chunk.regions.shape[1])
            codes[:, span] = chunk.regions.cpu()
            if chunk.token_ids is not None:
                token_ids[:, span] = chunk.token_ids.cpu()
            for s in range(self.num_sources):
                chunk_indices, chunk_values = chunk.indices[s], chunk.values[s]
                if chunk_indices is None or chunk_values is None:
                    raise RuntimeError(f"source {s} recorded nothing in a forward; hooks missing?")
                indices[:, span, s] = chunk_indices.cpu()
                values[:, span, s] = chunk_values.cpu()
        if sequence.stops is not None:
            after = torch.arange(length) >= torch.tensor(sequence.stops)[:, None]
            codes = codes.masked_fill(after, REGION_CODE["pad"])
        samples = []
        for b in range(batch):
            keep = codes[b] != REGION_CODE["pad"]
            samples.append(
                CapturedSample(
                    token_ids[b, keep],
                    indices[b, keep],
                    values[b, keep],
                    region_ranges(codes[b, keep]),
                )
            )
        return samples
