"""The CPU part of `python -m vlm_sparsify.bench`: every figure on the tiny default model."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from vlm_sparsify.bench_steps import (
    Paired,
    alternate_steps,
    benchmark_generate,
    make_trainer,
    pipeline_vs_pretokenized,
    plugin_vs_stock_steps,
    sharded_vs_data_parallel,
    train_config,
)
from vlm_sparsify.coder_io import Coders
from vlm_sparsify.cross_layer import CrossLayerTranscoder
from vlm_sparsify.data import BatchStream, Example, batch_loader, easyvqa_examples, load_rgb
from vlm_sparsify.hookpoints import mlp_hookpoints
from vlm_sparsify.loading import DEFAULT_MODEL, load_model_and_processor
from vlm_sparsify.recipe import Recipe, find_recipe
from vlm_sparsify.replacement import Mode, ReplacementModel
from vlm_sparsify.topk_encoder import topk_rows

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class CpuSizes:
    """Sizes and repeats of the CPU run (`quick()` for the smoke run)."""

    batch_size: int = 8
    text_tokens: int = 48
    expansion_factor: int = 8
    k: int = 32
    stock_rounds: int = 8
    steps_per_round: int = 14
    clt_steps: int = 40
    generate_batch: int = 4
    max_new_tokens: int = 16
    generate_repeats: int = 15
    topk_pairs: int = 60
    store_samples: int = 32
    analyze_samples: int = 1000
    pipeline_rounds: int = 6
    pipeline_batches: int = 10
    num_workers: int = 1
    sharded_steps: int = 12

    @classmethod
    def quick(cls) -> CpuSizes:
        return cls(
            stock_rounds=2,
            steps_per_round=4,
            clt_steps=3,
            max_new_tokens=4,
            generate_repeats=2,
            topk_pairs=4,
            store_samples=8,
            analyze_samples=16,
            pipeline_rounds=2,
            pipeline_batches=3,
            sharded_steps=2,
        )


def load_bench_model() -> tuple[PreTrainedModel, Any, Recipe, str]:
    """The shipped tiny easy-VQA LLaVA; until it exists, a random model of its architecture."""
    recipe = find_recipe("tiny_llava")
    if (Path(DEFAULT_MODEL) / "config.json").is_file():
        model, processor, _ = load_model_and_processor(
            DEFAULT_MODEL, recipe, dtype="float32", device="cpu"
        )
        return model, processor, recipe, f"shipped tiny easy-VQA LLaVA ({DEFAULT_MODEL})"
    from vlm_sparsify.tiny.build import build_model, build_processor

    torch.manual_seed(0)
    model = build_model().eval().requires_grad_(False)
    note = (
        f"random weights with the shipped tiny LLaVA's architecture (no model in {DEFAULT_MODEL} "
        "yet); timings do not depend on the weights"
    )
    return model, build_processor(), recipe, note


def easyvqa_batch(
    examples: list[Example], processor: Any, recipe: Recipe, model: PreTrainedModel
) -> dict[str, Any]:
    """One training batch (image + question + answer) through the real pipeline."""
    stream = BatchStream(
        examples,
        processor,
        recipe,
        batch_size=len(examples),
        max_positions=model.config.get_text_config().max_position_embeddings,
    )
    return next(iter(stream))


def generation_inputs(
    examples: list[Example], processor: Any, recipe: Recipe
) -> dict[str, torch.Tensor]:
    """Left-padded image + prompt inputs for greedy generation."""
    images = [load_rgb(e.image) for e in examples]
    prompts = [recipe.format_prompt(e.question, processor) for e in examples]
    return dict(processor(images=images, text=prompts, return_tensors="pt", padding=True))


def pruned_vs_torch_topk(rows: int, latents: int, k: int, pairs: int) -> Paired:
    """`topk_rows` vs `torch.topk(sorted=False)` on the same ReLU'd Gaussian rows, interleaved.

    16 different inputs are cycled: on one input repeated, the branch predictor learns torch's
    selection and flatters it.
    """
    generator = torch.Generator().manual_seed(rows)
    inputs = [torch.randn(rows, latents, generator=generator).relu_() for _ in range(16)]
    paired = Paired()
    for i in range(pairs + 2):
        x = inputs[i % len(inputs)]
        start = time.perf_counter()
        topk_rows(x, k)
        middle = time.perf_counter()
        x.topk(k, dim=-1, sorted=False)
        if i >= 2:
            paired.candidate.append(middle - start)
            paired.reference.append(time.perf_counter() - middle)
    return paired


def store_bytes_per_active(
    model: nn.Module,
    coders: Coders,
    examples: list[Example],
    processor: Any,
    recipe: Recipe,
    batch_size: int,
    max_new_tokens: int,
) -> float:
    """Capture features while generating (base model, capture on) into a FeatureStore."""
    from benchmarks.store import FeatureStore, StoreMeta

    replacement = ReplacementModel(model, coders, mode="off")
    meta = StoreMeta(list(coders.hookpoints), coders.cfg.k, replacement.num_latents)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        store = FeatureStore(Path(tmp) / "store", meta)
        for first in range(0, len(examples), batch_size):
            chunk = examples[first : first + batch_size]
            with replacement.capture() as features:
                # model inputs (typed Any: a tensor could not fill `interventions`)
                inputs: dict[str, Any] = generation_inputs(chunk, processor, recipe)
                replacement.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                )
                samples = features.pop_samples()
            store.append(
                (e.id, s.indices, s.values, s.regions) for e, s in zip(chunk, samples, strict=True)
            )
        return store.bytes_per_active_feature()


def run_cpu(sizes: CpuSizes, log: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    device = torch.device("cpu")
    model, processor, recipe, source = load_bench_model()
    log(f"model: {source}")
    hookpoints = mlp_hookpoints(model, recipe)
    need = max(sizes.store_samples, 64, sizes.batch_size * sizes.pipeline_batches)
    examples = easyvqa_examples("train")[:need]
    results: dict[str, Any] = {"model": source, "hookpoints": len(hookpoints)}
    details: dict[str, Any] = {}
    bs, ef, k = sizes.batch_size, sizes.expansion_factor, sizes.k

    # (a) plugin vs stock sparsify, text-only batches
    vocab = model.config.get_text_config().vocab_size
    n_batches = sizes.steps_per_round + 2
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (bs * n_batches, sizes.text_tokens), generator=generator)
    log("(a) plugin vs stock PLT step ...")
    paired = sum(
        (
            plugin_vs_stock_steps(model, hookpoints, ids, bs, ef, k)
            for _ in range(sizes.stock_rounds)
        ),
        start=Paired(),
    )
    results["plugin_vs_stock_plt_step"] = paired.ratio
    details["plugin_vs_stock_plt_step"] = paired.summary()

    # (b) CLT (all layers) vs PLT, multimodal batch
    log("(b) CLT vs PLT step ...")
    batch = easyvqa_batch(examples[:bs], processor, recipe, model)
    plt = make_trainer(model, hookpoints, train_config(bs, ef, k))
    clt = make_trainer(model, hookpoints, train_config(bs, ef, k), cross_layer=len(hookpoints))
    paired = alternate_steps(
        lambda: clt.train_on_batch(batch),
        lambda: plt.train_on_batch(batch),
        sizes.clt_steps,
        warmup=2,
        device=device,
    )
    results["clt_vs_plt_step"] = paired.ratio
    details["clt_vs_plt_step"] = {**paired.summary(), "tokens": int(batch["token_mask"].sum())}

    # (b2) the same kind of CLT sharded over two processes vs data parallel over two
    log("(b2) CLT step sharded over 2 gloo processes vs data parallel ...")
    d_in = model.config.get_text_config().hidden_size
    shard = dict(layers=len(hookpoints), d=d_in, latents=ef * d_in, k=k, tokens=512)
    paired = sharded_vs_data_parallel(**shard, steps=sizes.sharded_steps)
    results["clt_sharded_vs_data_parallel_step"] = paired.ratio
    details["clt_sharded_vs_data_parallel_step"] = {**paired.summary(), **shard}

    # (c, d) generation: replacement (CLT) vs base; capture on vs off
    log("(c) replacement vs base generate ...")
    inputs = generation_inputs(examples[: sizes.generate_batch], processor, recipe)
    clt_coders = clt.coders
    if not isinstance(clt_coders, CrossLayerTranscoder):  # built without `distribute`
        raise TypeError(f"expected a CrossLayerTranscoder, got {type(clt_coders).__name__}")
    generations: tuple[tuple[str, Mode, bool], ...] = (
        ("replacement_vs_base_generate", "open-loop", False),
        ("replacement_error_vs_base_generate", "error", False),
        ("capture_vs_base_generate", "off", True),
        ("replacement_capture_vs_base_generate", "open-loop", True),
    )
    for key, mode, capture in generations:
        timing = benchmark_generate(
            model,
            clt_coders,
            inputs,
            mode=mode,
            capture=capture,
            max_new_tokens=sizes.max_new_tokens,
            repeats=sizes.generate_repeats,
        )
        results[key] = timing["ratio"]
        details[key] = timing

    # (c') the encoder's top-k alone, at the prefill's and a decoding step's row counts
    latents = clt_coders.num_latents
    for key, rows in (
        ("topk_pruned_vs_torch_prefill", inputs["input_ids"].numel()),
        ("topk_pruned_vs_torch_decode", sizes.generate_batch),
    ):
        paired = pruned_vs_torch_topk(rows, latents, k, sizes.topk_pairs)
        results[key] = paired.ratio
        details[key] = {**paired.summary(), "rows": rows, "latents": latents, "k": k}

    # (e) bytes per stored active feature, from a real capture
    log("(e) feature store bytes ...")
    results["store_bytes_per_active"] = store_bytes_per_active(
        model,
        clt_coders,
        examples[: sizes.store_samples],
        processor,
        recipe,
        sizes.generate_batch,
        sizes.max_new_tokens,
    )

    # (f) analyze on synthetic stores: LLaVA-7B scale and tiny-model scale
    from benchmarks.bench_analyze import bench_analyze

    log(f"(f) analyze, {sizes.analyze_samples} samples at 7B scale ...")
    big = bench_analyze(samples=sizes.analyze_samples)
    results["analyze_7b_s"] = big["analyze_s"]
    details["analyze_7b"] = {"samples": sizes.analyze_samples, **big}
    tiny = bench_analyze(samples=64, tokens=32, layers=len(hookpoints), latents=ef * 128, k=k)
    results["analyze_tiny_s"] = tiny["analyze_s"]
    details["analyze_tiny"] = {"samples": 64, **tiny}

    # (g) multimodal pipeline vs pre-tokenized batches, same PLT step
    log("(g) multimodal pipeline vs pre-tokenized ...")
    max_positions = model.config.get_text_config().max_position_embeddings
    n_examples = bs * sizes.pipeline_batches

    def make_loader() -> DataLoader:
        stream = BatchStream(
            examples, processor, recipe, bs, max_positions=max_positions, max_examples=n_examples
        )
        return batch_loader(stream, sizes.num_workers)

    stream = BatchStream(examples, processor, recipe, bs, max_positions=max_positions)
    start = time.perf_counter()
    stream.make_batch(0, examples[:bs])
    details["pipeline_make_batch_s"] = time.perf_counter() - start
    pretokenized = list(
        islice(
            BatchStream(examples, processor, recipe, bs, max_positions=max_positions),
            sizes.pipeline_batches,
        )
    )
    paired, wait_share = pipeline_vs_pretokenized(
        plt, make_loader, pretokenized, sizes.pipeline_rounds, device
    )
    results["pipeline_vs_pretokenized"] = paired.ratio
    details["pipeline_vs_pretokenized"] = {
        **paired.summary("tok_per_s"),
        "num_workers": sizes.num_workers,
        "loader_wait_share": wait_share,
    }
    results["details"] = details
    return results
