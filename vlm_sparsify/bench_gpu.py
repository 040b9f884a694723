"""The `--gpu` part of `python -m vlm_sparsify.bench`: LLaVA-1.5-7B size, random weights.

Llama-7B text model (32 layers x 4096) + CLIP ViT-L/14-336 vision tower in bf16 (as
`../shared/bench/gpu_anchor_sparsify.py`), batch 8 x 1024 text tokens:
- the plugin's PLT step vs stock sparsify's, alternating step by step (8,192 latents, k=32);
- stock sparsify's PLT alone and our CLT (32 layers x 8,192 latents x cross_layer 16, bf16
  decoders) alone: tokens/s and `torch.cuda.max_memory_allocated` of each, one after the other
  (both together do not fit one GPU; on a GPU with less than ~115 GiB, e.g. an H100, every coder
  is 4,096 latents wide: `fit_to_memory`); the CLT again with sparsify's encoder backward
  (`topk_encoder.TRITON_WEIGHT_GRADIENT` off: what the Triton weight gradient saves);
- replacement-model (CLT) greedy generation vs the base model (576 image tokens + prompt), with
  the default decoder (`auto`: hybrid here) with and without CUDA graphs of decoding steps, in
  error mode, and with the Triton decoder and the fused `embedding_bag` decoders alone (each
  split into the prefill's ratio and the later tokens');
- the multimodal pipeline (easy-VQA images resized to 336 px by the processor in DataLoader
  workers) vs the same batches pre-tokenized, feeding the plugin's PLT step;
- `profile`: torch.profiler over one CLT training step and over base and open-loop generation
  (`details.profile`: kernels launched, the ops with the most device time).

Each part runs on its own: one that fails (out of memory, say) is reported under `errors` (and
`bench` exits non-zero after printing the rest), and the next parts still measure.
"""

from __future__ import annotations

import gc
import os
import statistics
from collections.abc import Collection
from dataclasses import asdict, dataclass, replace
from functools import partial
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from vlm_sparsify import topk_encoder
from vlm_sparsify.bench_steps import (
    benchmark_generate,
    kernel_profile,
    make_trainer,
    pipeline_vs_pretokenized,
    plugin_vs_stock_steps,
    sync,
    train_config,
)
from vlm_sparsify.coder_io import whole_coders
from vlm_sparsify.cross_layer import training_memory_bytes
from vlm_sparsify.data import BatchStream, batch_loader, easyvqa_examples, load_rgb
from vlm_sparsify.hookpoints import mlp_hookpoints
from vlm_sparsify.random_models import token_id
from vlm_sparsify.recipe import find_recipe
from vlm_sparsify.replacement import Decoder, Mode, ReplacementModel
from vlm_sparsify.training import build_coders
from vlm_sparsify.triton_decode import runs_on as triton_runs_on

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration

NO_CUDA = (
    "--gpu needs a CUDA device and torch sees none (torch.cuda.is_available() is False); "
    "run `python -m vlm_sparsify.bench` without --gpu for the CPU figures"
)


@dataclass(frozen=True)
class GpuSizes:
    """LLaVA-1.5-7B geometry and the benchmark's repeats (`smoke()`: a tiny CPU check)."""

    hidden: int = 4096
    intermediate: int = 11008
    layers: int = 32
    heads: int = 32
    vocab: int = 32064
    vision_hidden: int = 1024
    vision_intermediate: int = 4096
    vision_layers: int = 24
    vision_heads: int = 16
    image_size: int = 336
    batch_size: int = 8
    ctx: int = 1024
    num_latents: int = 8192
    k: int = 32
    cross_layer: int = 16
    warmup: int = 2
    steps: int = 8
    max_new_tokens: int = 32
    generate_repeats: int = 5
    pipeline_rounds: int = 2
    pipeline_batches: int = 6
    num_workers: int = max(1, min(8, len(os.sched_getaffinity(0)) - 2))

    @classmethod
    def quick(cls) -> GpuSizes:
        return cls(steps=3, generate_repeats=1, max_new_tokens=8, pipeline_rounds=1)

    @classmethod
    def smoke(cls) -> GpuSizes:
        """Same code path at toy size (to check it on a CPU)."""
        return cls(
            hidden=64,
            intermediate=128,
            layers=4,
            heads=2,
            vision_hidden=32,
            vision_intermediate=64,
            vision_layers=2,
            vision_heads=2,
            image_size=56,
            batch_size=2,
            ctx=32,
            num_latents=128,
            k=8,
            cross_layer=2,
            steps=2,
            max_new_tokens=2,
            generate_repeats=1,
            pipeline_rounds=1,
            pipeline_batches=2,
            num_workers=1,
        )


ACTIVATION_BYTES = 16
"""Peak bytes of a CLT training step beyond weights, gradients and optimizer state, per token x
layer x hidden unit: 16 GiB measured on the H200 (113.8 GiB peak at 8 x 1,024 tokens, 32 x
4,096) less the model and `training_memory_bytes`."""


def model_bytes(sizes: GpuSizes) -> int:
    """bf16 bytes of the LLaVA of `sizes` (attention, MLPs, embeddings and LM head; no norms)."""
    h, v = sizes.hidden, sizes.vision_hidden
    text = sizes.layers * (4 * h * h + 3 * h * sizes.intermediate) + 2 * sizes.vocab * h
    vision = sizes.vision_layers * (4 * v * v + 2 * v * sizes.vision_intermediate)
    return 2 * (text + vision)


def training_peak_bytes(sizes: GpuSizes) -> int:
    """Estimated peak GPU memory of the CLT training figure at `sizes` (signum, bf16 decoders)."""
    coders = training_memory_bytes(
        sizes.layers, sizes.num_latents, sizes.hidden, sizes.cross_layer, "signum", 4, 2
    )["total"]
    tokens = sizes.batch_size * sizes.ctx
    return model_bytes(sizes) + coders + ACTIVATION_BYTES * tokens * sizes.layers * sizes.hidden


def fit_to_memory(sizes: GpuSizes, memory_bytes: int) -> GpuSizes:
    """`sizes` with the widest of num_latents, /2, /4 whose CLT training fits `memory_bytes`.

    The CLT-16 at 8,192 latents peaks at ~108 GiB (~114 with sparsify's encoder backward): it
    fits an H200, not an H100 (80 GB), where every coder of the run (stock PLT, plugin PLT, CLT)
    is 4,096 latents wide instead.
    """
    for divisor in (1, 2, 4):
        fitted = replace(sizes, num_latents=sizes.num_latents // divisor)
        if training_peak_bytes(fitted) <= memory_bytes:
            return fitted
    raise SystemExit(
        f"the CLT training figure needs ~{training_peak_bytes(fitted) / 2**30:.0f} GiB even at "
        f"{fitted.num_latents} latents; this GPU has {memory_bytes / 2**30:.0f} GiB"
    )


def build_llava(sizes: GpuSizes, device: torch.device) -> tuple[LlavaForConditionalGeneration, Any]:
    """Random bf16 LLaVA-1.5 of `sizes` and a processor whose image token matches its config."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from vlm_sparsify.tiny.build import CHAT_TEMPLATE, IMAGE, build_tokenizer

    tokenizer = build_tokenizer()
    patch = 14
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": sizes.image_size},
            crop_size={"height": sizes.image_size, "width": sizes.image_size},
        ),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    text = LlamaConfig(
        hidden_size=sizes.hidden,
        intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.heads,
        vocab_size=sizes.vocab,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=sizes.vision_hidden,
        intermediate_size=sizes.vision_intermediate,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
        image_size=sizes.image_size,
        patch_size=patch,
        projection_dim=768,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=token_id(tokenizer, IMAGE),
        image_seq_length=(sizes.image_size // patch) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    default = torch.get_default_dtype()
    # bf16 as the anchor on a GPU; float32 for the toy-size check on a CPU (no autocast there)
    torch.set_default_dtype(torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False), processor


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed_steps(step: Any, warmup: int, steps: int, device: torch.device) -> float:
    """Median seconds of `step()` after `warmup` calls."""
    import time

    times = []
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


PARTS = (
    "plugin-vs-stock",
    "stock",
    "clt",
    "generate",
    "pipeline",
    "profile",
)
"""The parts of `--gpu`, in the order they run (`--parts` picks some; `stock` gives the CLT
figures their ratio, `clt` the generation part its trained CLT; `profile` times nothing, it
records where the time of a CLT training step and of open-loop generation goes)."""


def check_parts(parts: Collection[str]) -> None:
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown --parts {unknown}; choose from {', '.join(PARTS)}")


def measure_at_size(
    sizes: GpuSizes, device: torch.device, log: Any, parts: Collection[str] = PARTS
) -> dict[str, Any]:
    check_parts(parts)
    torch.backends.cuda.matmul.allow_tf32 = True
    model, processor = build_llava(sizes, device)
    hookpoints = mlp_hookpoints(model, find_recipe("llava"))
    bs, tokens = sizes.batch_size, sizes.batch_size * sizes.ctx
    ef = sizes.num_latents // sizes.hidden
    results: dict[str, Any] = {"model": "LLaVA-1.5-7B architecture, random bf16 weights"}
    details: dict[str, Any] = {}

    def note(key: str, value: float) -> None:
        """Record a figure and log it at once (a run cut short keeps what it measured)."""
        results[key] = value
        log(f"[gpu] {key} = {value:.4g}")

    n_batches = sizes.warmup + sizes.steps
    ids = torch.randint(
        0, 32000 if sizes.vocab > 32000 else sizes.vocab, (bs * n_batches, sizes.ctx)
    )
    text_batch = {
        "inputs": {"input_ids": ids[:bs].to(device)},
        "token_mask": torch.ones(bs, sizes.ctx, dtype=torch.bool, device=device),
    }

    errors: dict[str, str] = {}
    state: dict[str, Any] = {}  # what one part hands to the next: stock_tok_s, coders

    def part(key: str, name: str, run: Any) -> None:
        """Run one part of the benchmark; if it fails (say, out of memory) record why, go on."""
        if key not in parts:
            return
        log(f"[gpu] {name} ...")
        try:
            run()
        except Exception as error:  # the other parts still measure; `errors` reports this one
            errors[name] = f"{type(error).__name__}: {error}"
            log(f"[gpu] {name} FAILED: {errors[name]}")
        reset_peak(device)

    def plugin_vs_stock() -> None:
        paired = plugin_vs_stock_steps(model, hookpoints, ids, bs, ef, sizes.k, sizes.warmup)
        note("plugin_vs_stock_plt_step", paired.ratio)
        details["plugin_vs_stock_plt_step"] = paired.summary()
        note("plugin_plt_tok_per_s", tokens / statistics.median(paired.candidate))

    def stock_alone() -> None:
        stock = plugin_vs_stock_steps(
            model, hookpoints, ids, bs, ef, sizes.k, sizes.warmup, with_plugin=False
        )
        state["stock_tok_s"] = tokens / statistics.median(stock.reference)
        note("stock_plt_tok_per_s", state["stock_tok_s"])
        note("stock_plt_peak_gib", peak_gib(device))

    def clt_trainer() -> Any:
        """The CLT-16 trainer of the `clt` and `profile` parts (bf16 decoders)."""
        return make_trainer(
            model,
            hookpoints,
            train_config(bs, ef, sizes.k),
            cross_layer=sizes.cross_layer,
            decoder_dtype=torch.bfloat16,
        )

    def clt_training() -> None:
        """Tokens/s and peak memory of the CLT's training step."""
        clt = clt_trainer()
        step = partial(clt.train_on_batch, text_batch)
        tok_s = tokens / timed_steps(step, sizes.warmup, sizes.steps, device)
        note("clt_peak_gib", peak_gib(device))
        note("clt_tok_per_s", tok_s)
        if "stock_tok_s" in state:
            note("clt_vs_stock_plt_tok_per_s", tok_s / state["stock_tok_s"])
        if device.type == "cuda" and topk_encoder.TRITON_WEIGHT_GRADIENT:
            # the same trainer with sparsify's encoder backward (index_add_): what TopKEncoder's
            # Triton weight gradient saves
            topk_encoder.TRITON_WEIGHT_GRADIENT = False
            try:
                reset_peak(device)
                stock_encoder = tokens / timed_steps(step, sizes.warmup, sizes.steps, device)
            finally:
                topk_encoder.TRITON_WEIGHT_GRADIENT = True
            note("clt_sparsify_encoder_tok_per_s", stock_encoder)
            note("clt_sparsify_encoder_peak_gib", peak_gib(device))
        state["coders"] = clt.coders  # trained a few steps: the replacement model's CLT

    def generation() -> None:
        coders = state.pop("coders", None)
        if coders is None:  # the CLT part failed or was not asked for: the same CLT, untrained
            coders = build_coders(
                hookpoints, sizes.hidden, train_config(bs, ef, sizes.k).sae, sizes.cross_layer,
                device, decoder_dtype=torch.bfloat16,
            )  # fmt: skip
        variants: list[tuple[str, Mode, Decoder, bool]] = [
            # the default: hybrid where triton runs (a CUDA GPU), else fused; decoding steps
            # replayed from CUDA graphs
            ("replacement_vs_base_generate", "open-loop", "auto", True),
            ("replacement_eager_vs_base_generate", "open-loop", "auto", False),
            ("replacement_error_vs_base_generate", "error", "auto", True),
        ]
        if triton_runs:
            variants.append(("replacement_triton_vs_base_generate", "open-loop", "triton", True))
        variants.append(("replacement_fused_vs_base_generate", "open-loop", "fused", True))
        for key, mode, decoder, graphs in variants:
            timing = benchmark_generate(
                model,
                coders,
                gen_inputs,
                mode=mode,
                decoder=decoder,
                cuda_graphs=graphs,
                max_new_tokens=sizes.max_new_tokens,
                repeats=sizes.generate_repeats,
            )
            note(key, timing["ratio"])
            details[key] = timing
        note("replacement_peak_gib", peak_gib(device))

    def pipeline() -> None:
        plt = make_trainer(model, hookpoints, train_config(bs, ef, sizes.k))
        n_examples = bs * sizes.pipeline_batches
        dtype = model.dtype

        class ModelDtypePixels(BatchStream):
            """Pixel values cast to the model's dtype in the worker, as a user's collate would."""

            def make_batch(self, index: int, chunk: list) -> dict[str, Any]:
                batch = super().make_batch(index, chunk)
                if "inputs" in batch:
                    batch["inputs"]["pixel_values"] = batch["inputs"]["pixel_values"].to(dtype)
                return batch

        def stream() -> ModelDtypePixels:
            return ModelDtypePixels(examples, processor, recipe, bs, max_examples=n_examples)

        def make_loader() -> DataLoader:  # the CLI's: pinned batches on a GPU
            return batch_loader(stream(), sizes.num_workers, pin_memory=device.type == "cuda")

        pretokenized = list(islice(stream(), sizes.pipeline_batches))
        paired, wait_share = pipeline_vs_pretokenized(
            plt, make_loader, pretokenized, sizes.pipeline_rounds, device
        )
        note("pipeline_vs_pretokenized", paired.ratio)
        details["pipeline_vs_pretokenized"] = {
            **paired.summary("tok_per_s"),
            "num_workers": sizes.num_workers,
            "loader_wait_share": wait_share,
        }

    def profile() -> None:
        """torch.profiler over one CLT training step, and over the base model's and the
        open-loop replacement's greedy generation (the GPU goals still missed): kernels launched,
        time per op (`details["profile"]`)."""
        clt = clt_trainer()
        step = partial(clt.train_on_batch, text_batch)
        step()  # warm-up
        found: dict[str, Any] = {"clt_step": kernel_profile(step, device, top=40)}
        coders = whole_coders(clt.coders)
        del clt, step  # the optimizer state: the replacement's copies need the room
        coders.requires_grad_(False)
        for param in coders.parameters():
            param.grad = None
        reset_peak(device)
        new_tokens = max(sizes.max_new_tokens, 2)
        gen: dict[str, Any] = dict(
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
        replacement = ReplacementModel(model, coders, mode="open-loop")
        with torch.inference_mode():
            for name, generate in (("base", model.generate), ("open_loop", replacement.generate)):
                generate(**gen_inputs, **gen)  # warm-up
                found[f"{name}_generate"] = kernel_profile(
                    partial(generate, **gen_inputs, **gen), device
                )
        found["new_tokens"] = new_tokens
        details["profile"] = found
        for name in ("clt_step", "base_generate", "open_loop_generate"):
            log(f"[gpu] profile {name}: {found[name]['wall_ms']:.1f} ms wall, "
                f"{found[name]['device_kernels']} device kernels")  # fmt: skip

    examples = easyvqa_examples("train")[: bs * max(sizes.pipeline_batches, 1)]
    recipe = find_recipe("tiny_llava")  # its prompt format is LLaVA-1.5's
    prompts = [recipe.format_prompt(e.question, processor) for e in examples[:bs]]
    images = [load_rgb(e.image) for e in examples[:bs]]
    gen_inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    gen_inputs = {k: v.to(device) for k, v in gen_inputs.items()}
    gen_inputs["pixel_values"] = gen_inputs["pixel_values"].to(model.dtype)

    # our Triton kernels: on a GPU, or on a CPU through Triton's interpreter (make test-triton)
    triton_runs = triton_runs_on(device)
    clt_name = f"CLT {sizes.layers} x {sizes.num_latents} x cross_layer {sizes.cross_layer}"
    reset_peak(device)
    part("plugin-vs-stock", "plugin vs stock PLT step", plugin_vs_stock)
    part("stock", "stock PLT alone", stock_alone)
    part("clt", clt_name, clt_training)
    part("generate", "replacement vs base generate", generation)
    part("pipeline", "multimodal pipeline vs pre-tokenized", pipeline)
    part("profile", "profile of a CLT step and of generation", profile)
    results["details"] = details
    results["settings"] = asdict(sizes)
    if errors:
        results["errors"] = errors
    return results


def run_gpu(quick: bool, log: Any, parts: Collection[str] = PARTS) -> dict[str, Any]:
    check_parts(parts)
    if not torch.cuda.is_available():
        raise SystemExit(NO_CUDA)
    sizes = GpuSizes.quick() if quick else GpuSizes()
    memory = torch.cuda.get_device_properties(0).total_memory
    fitted = fit_to_memory(sizes, memory)
    if fitted != sizes:
        log(f"[gpu] {memory / 2**30:.0f} GiB: every coder at {fitted.num_latents} latents "
            f"(the CLT at {sizes.num_latents} needs ~{training_peak_bytes(sizes) / 2**30:.0f} GiB)")  # fmt: skip
    return measure_at_size(fitted, torch.device("cuda"), log, parts)
