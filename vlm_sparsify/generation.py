"""Batched greedy generation, with the base model or a ReplacementModel.

`generate_batch` is what the benchmark stages `capture` and `steer` and `python -m
vlm_sparsify.ask` share: one batch of (image, prompt) pairs, left
padded, decoded greedily; through a `ReplacementModel` when given (with optional interventions
for this call), whose sparse features are captured when asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from vlm_sparsify.capture import CapturedSample
from vlm_sparsify.interventions import Intervention
from vlm_sparsify.replacement import ReplacementModel


@dataclass(frozen=True)
class Generation:
    """One generated response."""

    response: str
    """Decoded text of the new tokens (special tokens skipped, stripped, as LLaVA's eval does)."""
    tokens: list[int]
    """The generated token ids up to and including the first EOS (pads dropped)."""
    sample: CapturedSample | None
    """Its features (rows: prompt tokens without pads, then the fed response tokens), when
    captured."""
    cut: bool = False
    """The response reached `max_new_tokens` before the model ended it (no EOS)."""


@torch.inference_mode()
def generate_batch(
    model: Any,
    processor: Any,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    *,
    replacement: ReplacementModel | None = None,
    interventions: Sequence[Intervention] = (),
    capture: bool = False,
    value_dtype: torch.dtype = torch.bfloat16,
    max_new_tokens: int = 32,
) -> list[Generation]:
    """Greedy responses to `prompts[i]` about `images[i]` (prompts already in the model's format).

    `replacement` must wrap `model`; `interventions` apply to this call only; `capture` records
    the replacement model's features per sample (values in `value_dtype`).
    """
    if (capture or interventions) and replacement is None:
        raise ValueError("capture and interventions need a ReplacementModel (pass --coders)")
    # one image per prompt, nested: Gemma 3's processor reads a flat list as every image for
    # every prompt (and refuses it); the others give the same batch either way
    inputs = processor(
        images=[[image] for image in images], text=list(prompts), return_tensors="pt",
        padding=True, padding_side="left",
    ).to(model.device)  # fmt: skip
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    tokenizer = processor.tokenizer
    settings = dict(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    samples: list[CapturedSample | None] = [None] * len(prompts)
    if replacement is None:
        output = model.generate(**inputs, **settings)
    elif capture:
        with replacement.capture(value_dtype) as features:
            output = replacement.generate(**inputs, **settings, interventions=interventions)
        samples = list(features.pop_samples())
    else:
        output = replacement.generate(**inputs, **settings, interventions=interventions)
    new_tokens = output[:, inputs["input_ids"].shape[1] :].cpu()
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    eos = _eos_ids(model)
    generations = []
    for text, row, sample in zip(texts, new_tokens, samples, strict=True):
        tokens = _until_eos(row.tolist(), eos)
        cut = not (tokens and tokens[-1] in eos)  # generate stops early only once all rows end
        generations.append(Generation(text.strip(), tokens, sample, cut))
    return generations


def _eos_ids(model: Any) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """A row up to its first EOS; rows pad only after it, so the rest is all generated."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens
