"""Train the tiny easy-VQA LLaVA from scratch on the easy-VQA TRAIN split only.

Steps are separate functions: examples -> token tensors (`encode_examples`), images -> pixel
tensor (`load_pixels`), curriculum sampling (`sample_batch`), loss on answer tokens
(`answer_loss`), and the loop (`train`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

from vlm_sparsify.tiny.build import TinyShape, build_model, build_processor
from vlm_sparsify.tiny.easyvqa_data import (
    Example,
    captions,
    counterfactuals,
    image_paths,
    prompt_for,
    questions,
)

IGNORE = -100


@dataclass
class TrainConfig:
    """Training settings of `python -m vlm_sparsify.tiny`."""

    out: str = "tiny_easyvqa_llava"
    """Folder to save the model and processor to (`save_pretrained`)."""
    seed: int = 0
    """Seed of the weights' initialisation and of the batch sampling."""
    steps: int = 3000
    """Optimizer steps."""
    batch_size: int = 256
    """Examples per step."""
    lr: float = 3e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay to a tenth of the peak)."""
    warmup: int = 100
    """Warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    curriculum_steps: int = 1000
    """First steps train only on questions the image alone answers (colour, shape, captions)."""
    counterfactual: bool = False
    """Add each yes/no question with its colour/shape swapped and its answer flipped (balances
    yes/no; off for the shipped model: with it, two lr 3e-3 runs reached only 0.70 and 0.51
    test yes/no accuracy, see docs/tiny_model.md)."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu` or `cuda`."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""
    save_every: int = 0
    """Also save to `out` every N steps (0: only at the end), so a killed run leaves a model."""


@dataclass
class EncodedExamples:
    """Right-padded token tensors of examples; `labels` keep only the answer and `</s>`."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    image_index: Tensor
    is_yes_no: Tensor


def encode_examples(
    tokenizer: PreTrainedTokenizerFast,
    examples: list[Example],
    image_ids: list[int],
    num_image_tokens: int,
) -> EncodedExamples:
    """Tokenize `prompt answer</s>` exactly as the processor would (one token per patch)."""
    expand = tokenizer.image_token * num_image_tokens
    prompts = [prompt_for(e.question).replace(tokenizer.image_token, expand) for e in examples]
    answers = [f" {e.answer}{tokenizer.eos_token}" for e in examples]
    prompt_ids = tokenizer(prompts)["input_ids"]
    full_ids = tokenizer([p + a for p, a in zip(prompts, answers, strict=True)])["input_ids"]
    length = max(len(ids) for ids in full_ids)
    input_ids = torch.full((len(examples), length), tokenizer.pad_token_id)
    labels = torch.full((len(examples), length), IGNORE)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (prompt, full) in enumerate(zip(prompt_ids, full_ids, strict=True)):
        input_ids[row, : len(full)] = torch.tensor(full)
        attention_mask[row, : len(full)] = 1
        labels[row, len(prompt) : len(full)] = torch.tensor(full[len(prompt) :])
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    return EncodedExamples(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        image_index=torch.tensor([position[e.image_id] for e in examples]),
        is_yes_no=torch.tensor([e.kind == "yes/no" for e in examples]),
    )


def load_pixels(processor: LlavaProcessor, paths: list[str], chunk: int = 500) -> Tensor:
    """All images through the processor's image transform, once: [N, 3, H, W]."""
    parts = []
    for start in range(0, len(paths), chunk):
        images = [Image.open(p).convert("RGB") for p in paths[start : start + chunk]]
        parts.append(processor.image_processor(images, return_tensors="pt")["pixel_values"])
    return torch.cat(parts)


def training_examples(counterfactual: bool = False) -> tuple[list[Example], list[int]]:
    """Train-split questions, captions (and flipped questions), and the train image ids."""
    examples = list(questions("train")) + list(captions("train"))
    if counterfactual:
        examples += counterfactuals("train")
    return examples, sorted(image_paths("train"))


def sample_batch(
    generator: torch.Generator, data: EncodedExamples, step: int, config: TrainConfig
) -> Tensor:
    """Row indices of one batch; during the curriculum only image-dependent open questions."""
    pool = torch.arange(len(data.input_ids))
    if step < config.curriculum_steps:
        pool = pool[~data.is_yes_no]
    return pool[torch.randint(len(pool), (config.batch_size,), generator=generator)]


def answer_loss(
    model: LlavaForConditionalGeneration,
    data: EncodedExamples,
    pixels: Tensor,
    rows: Tensor,
    on_device: EncodedExamples | None = None,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy on the answer tokens, and whether each row's first answer token is right.

    `rows` index `data` (on the CPU); `on_device` is `data` already moved to the model's device
    (`to_device`), so a GPU step copies only the row indices (pinned, asynchronously) instead of
    every batch tensor through pageable memory, which waits for the GPU at each copy.
    """
    device = model.device
    length = int(data.attention_mask[rows].sum(1).max())  # from the CPU copy: no device sync
    source = on_device if on_device is not None else data
    index = rows
    if device.type == "cuda":
        index = rows.pin_memory().to(device, non_blocking=True)
    mask = source.attention_mask[index, :length].to(device)
    logits = model(
        input_ids=source.input_ids[index, :length].to(device),
        attention_mask=mask,
        pixel_values=pixels[source.image_index[index].to(pixels.device)],
    ).logits
    targets = source.labels[index, 1:length].to(device)
    predicted = logits[:, :-1]
    loss = F.cross_entropy(predicted.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
    first = (targets != IGNORE).int().argmax(1)
    rows_range = torch.arange(len(rows), device=device)
    correct = predicted[rows_range, first].argmax(-1) == targets[rows_range, first]
    return loss, correct


def to_device(data: EncodedExamples, device: torch.device) -> EncodedExamples:
    return EncodedExamples(**{k: v.to(device) for k, v in vars(data).items()})


def lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(config: TrainConfig, shape: TinyShape = TinyShape()) -> LlavaForConditionalGeneration:
    """Train from scratch and save model + processor to `config.out`."""
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    processor = build_processor(shape)
    # transformers wraps PreTrainedModel.to with functools.wraps, whose type binds no `self`
    model = build_model(shape).to(device)  # type: ignore[arg-type]
    examples, image_ids = training_examples(config.counterfactual)
    paths = image_paths("train")
    pixels = load_pixels(processor, [paths[i] for i in image_ids]).to(device)
    data = encode_examples(processor.tokenizer, examples, image_ids, shape.num_image_tokens)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.lr,
        weight_decay=config.weight_decay,
        betas=(0.9, 0.98),
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    generator = torch.Generator().manual_seed(config.seed)
    on_device = to_device(data, device)
    model.train()
    start = time.perf_counter()
    # (correct, is yes/no) of the last ~2,000 rows, kept on the device: read every 50 steps
    recent: deque[tuple[Tensor, Tensor]] = deque(maxlen=max(1, 2000 // config.batch_size))
    progress = tqdm(range(config.steps), desc="tiny llava", mininterval=5)
    record: dict[str, Any] = {
        "config": asdict(config),
        "shape": asdict(shape),
        "device": str(device),
    }
    for step in progress:
        rows = sample_batch(generator, data, step, config)
        loss, correct = answer_loss(model, data, pixels, rows, on_device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        recent.append((correct, data.is_yes_no[rows]))
        if step % 50 == 0 or step == config.steps - 1:
            # First-answer-token accuracy over the last ~2,000 yes/no and other (open, caption) rows
            hits = torch.cat([c for c, _ in recent]).cpu()
            yes_no = torch.cat([y for _, y in recent])
            progress.set_postfix(
                loss=f"{loss.item():.3f}",
                yes_no=f"{hits[yes_no].float().mean().nan_to_num().item():.3f}",
                other=f"{hits[~yes_no].float().mean().nan_to_num().item():.3f}",
            )
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            partial = {**record, "steps_done": step + 1}
            partial["train_seconds"] = round(time.perf_counter() - start)
            save_atomically(model, processor, partial, Path(config.out))
    record["steps_done"] = config.steps
    record["train_seconds"] = round(time.perf_counter() - start)
    model.eval()
    save_atomically(model, processor, record, Path(config.out))
    return model


def save_atomically(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    record: dict,
    out: Path,
) -> None:
    """Write model, processor and `training.json` to a sibling folder, then swap it in."""
    tmp, old = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
