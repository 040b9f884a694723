"""Accuracy of a tiny easy-VQA LLaVA on a split, by greedy generation (optionally blank images).

`python -m vlm_sparsify.tiny.evaluate [MODEL_DIR] [--split test] [--blank] [--limit N]` prints
`{kind: {"accuracy", "n"}}` for yes/no, open and caption examples (`--limit`: the first N of
each kind).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from vlm_sparsify.tiny.easyvqa_data import (
    Example,
    Split,
    captions,
    image_paths,
    prompt_for,
    questions,
)

SHIPPED = Path(__file__).parent / "easyvqa_llava"
BLANK_GREY = (128, 128, 128)


def load_tiny(path: str | Path = SHIPPED) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    return model, LlavaProcessor.from_pretrained(path)


@torch.no_grad()
def answer(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    images: list[Image.Image],
    prompts: list[str],
    max_new_tokens: int = 8,
) -> list[str]:
    """Greedy responses, one per (image, prompt); left padding as the processor saves it."""
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    inputs = inputs.to(model.device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [r.strip() for r in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def is_correct(example: Example, response: str) -> bool:
    return response.strip().lower() == example.answer


def evaluate(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    split: Split = "test",
    blank: bool = False,
    limit: int | None = None,
    batch_size: int = 256,
) -> dict[str, dict[str, float]]:
    """Exact-match accuracy and count per kind (yes/no, open, caption) over the split's examples
    (the first `limit` of each kind: the split lists every question before any caption)."""
    by_kind: dict[str, list[Example]] = defaultdict(list)
    for example in [*questions(split), *captions(split)]:
        by_kind[example.kind].append(example)
    examples = [e for kind in sorted(by_kind) for e in by_kind[kind][:limit]]
    paths = image_paths(split)
    hits: dict[str, list[bool]] = defaultdict(list)
    for start in tqdm(range(0, len(examples), batch_size), desc=f"evaluate {split}"):
        batch = examples[start : start + batch_size]
        images = [
            Image.new("RGB", (64, 64), BLANK_GREY) if blank else Image.open(paths[e.image_id])
            for e in batch
        ]
        responses = answer(model, processor, images, [prompt_for(e.question) for e in batch])
        for example, response in zip(batch, responses, strict=True):
            hits[example.kind].append(is_correct(example, response))
    return {kind: {"accuracy": sum(v) / len(v), "n": len(v)} for kind, v in sorted(hits.items())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vlm_sparsify.tiny.evaluate", description=__doc__
    )
    parser.add_argument("model", nargs="?", default=str(SHIPPED))
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--blank", action="store_true", help="grey images instead of the real ones")
    parser.add_argument(
        "--limit", type=int, default=None, help="at most this many examples of each kind"
    )
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:  # a negative one would slice from the end
        parser.error(f"--limit {args.limit}: give a positive number of examples, or leave it out")
    model, processor = load_tiny(args.model)
    print(json.dumps(evaluate(model, processor, args.split, args.blank, args.limit), indent=2))


if __name__ == "__main__":
    main()
