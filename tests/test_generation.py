"""Batched greedy generation (`generate_batch`), across model families."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlm_sparsify.generation import generate_batch
from vlm_sparsify.random_models import build_tiny
from vlm_sparsify.recipe import find_recipe


@pytest.mark.parametrize("family", ["gemma3", "llava", "qwen2_vl"])
def test_a_batch_of_two_images_generates_one_answer_per_prompt(family):
    # Gemma 3's processor refused a flat list of images for a batch of prompts
    recipe = find_recipe(family)
    model, processor = build_tiny(recipe)
    images = [Image.new("RGB", (40, 30), (200, 0, 0)), Image.new("RGB", (30, 50), (0, 200, 0))]
    prompts = [recipe.format_prompt(q, processor) for q in ("what is it?", "and this one, here?")]
    torch.manual_seed(0)
    batch = generate_batch(model, processor, images, prompts, max_new_tokens=3)
    assert len(batch) == 2 and all(1 <= len(g.tokens) <= 3 for g in batch)
    # each row as generated alone (float32, left padding masked): the same tokens
    for image, prompt, together in zip(images, prompts, batch, strict=True):
        [alone] = generate_batch(model, processor, [image], [prompt], max_new_tokens=3)
        assert alone.tokens == together.tokens


def test_a_row_ends_at_its_first_eos_kept():
    from vlm_sparsify.generation import _until_eos

    assert _until_eos([5, 2, 7, 0, 0], {2, 7}) == [5, 2]  # the EOS stays: the response ended
    assert _until_eos([5, 6, 8], {2}) == [5, 6, 8]  # no EOS: cut at max_new_tokens
