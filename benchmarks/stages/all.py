"""`python -m benchmarks BENCH all --out DIR [--coders RUN] [--limit N]`: every stage in order.

capture -> score -> classify -> attribute -> analyze -> plot -> examples -> map -> steer, all into
DIR. Without --coders a small cross-layer transcoder is trained first on the model (`python -m
vlm_sparsify` with the settings below) into `DIR/coders`. The benchmark's data flags
(`--questions-dir`, `--images`, `--data-dir`, ...) go to capture; they and the options below are
checked before anything trains. POPE's `--questions FILE` without labels (LLaVA's
llava_pope_test.jsonl) needs `--questions-dir DIR` too: capture runs the file, score and classify
take the labels from the folder.
Each stage skips work already done (capture resumes by sample id, analyze / map when their output
is up to date, steer per condition, training when `DIR/coders` holds the finished CLT; an
interrupted one resumes), so rerunning the command after an interruption continues it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.adapters import check_images, get_adapter
from benchmarks.stages import check_limit, stage_module, stage_parser
from benchmarks.stages.analyze import RankBy, Region
from benchmarks.stages.steer import SteerOp, parse_factors
from vlm_sparsify.__main__ import run as train
from vlm_sparsify.coder_io import RUN_CONFIG_FILE, CheckpointError, load_coders
from vlm_sparsify.files import load_torch, read_json
from vlm_sparsify.loading import DEFAULT_MODEL, pick_dtype
from vlm_sparsify.recipe import find_recipe
from vlm_sparsify.train_state import STATE_FILE


@dataclass
class AllConfig:
    """One command for the whole pipeline of a benchmark (docs/benchmarks.md, "Map, steer, all")."""

    out: str
    """Output folder of every stage."""
    coders: str | None = None
    """Coder run folder; without it a small CLT is trained into OUT/coders."""
    model: str = DEFAULT_MODEL
    """Model id or folder (default: the shipped tiny easy-VQA LLaVA)."""
    recipe: str | None = None
    """Recipe name or TOML path (default: matched from the model)."""
    limit: int | None = 600
    """Benchmark items captured (the tiny model answers most easy-VQA questions right, so a few
    hundred are needed for enough BAD samples)."""
    device: str | None = None
    """Device (default: cuda if available)."""
    dtype: str = "auto"
    """Model dtype for capture."""
    batch_size: int = 16
    """Items per generate call."""
    max_new_tokens: int = 32
    """Greedy decoding length (capture's default, so capture run alone resumes the same run)."""
    train_dataset: str = ""
    """Dataset of that CLT (default: the recipe's; easy-VQA for the tiny model)."""
    train_examples: int = 2000
    """easy-VQA training examples for the CLT trained without --coders."""
    num_latents: int = 512
    """Latents per source of that CLT."""
    k: int = 16
    """Active latents per token of that CLT."""
    cross_layer: int = 4
    """Targets per source of that CLT (>= layers: every later layer)."""
    region: Region = "decision"
    """Token region of attribute and analyze (`decision`: the positions that predict the
    response tokens; see `analyze --region`); steer edits the decision positions with
    `decision`, every token otherwise."""
    target_features: int = 8
    """Features selected per direction (analyze)."""
    rank_by: RankBy = "goodness"
    """analyze's ranking: goodness (the seed's frequency x activation score) or attribution
    (activation x gradient of the answer's logit difference, mean over GOOD minus over BAD)."""
    factors: str = "0,0.5,2,4"
    """Steering factors (with --steer-op scale, map uses the largest as its amplification
    factor)."""
    map_top_k: int = 10
    """Neurons map keeps per target layer for each direction (map's --top-k; steer's neuron
    control then draws as many among the rest: lower it for a model with few MLP neurons)."""
    steer_op: SteerOp = "scale"
    """steer's --op: scale the selected features, or clamp them to the factor times their
    typical activation (features only: the neurons conditions are left out)."""
    bootstrap: int = 1000
    """Bootstrap resamples (steer)."""
    seed: int = 0
    """Seed of the split, the random control and the bootstrap."""


def main(argv: list[str], benchmark: str) -> None:
    adapter = get_adapter(benchmark)
    args = stage_parser(benchmark, "all", AllConfig, data=adapter.Data).parse_args(argv)
    config: AllConfig = args.config
    check_options(config)  # before hours of training, not after
    data, label_flags = split_labels(adapter, args.data, config.limit)
    check_items(adapter, data, config)
    run_all(config, benchmark, data_flags(data), label_flags)


def split_labels(adapter: Any, data: Any, limit: int | None) -> tuple[Any, list[str]]:
    """Capture's data, and the flags score and classify need to find the labels (POPE given a
    question file without labels and its label files: `adapter.split_labels`)."""
    split = getattr(adapter, "split_labels", None)
    return split(data, limit) if split else (data, [])


def data_flags(data: Any) -> list[str]:
    """The benchmark's data flags (`--questions-dir DIR`, ...) for capture."""
    flags = []
    for name, value in asdict(data).items():
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


POSITIVE = (
    "batch_size",
    "max_new_tokens",
    "train_examples",
    "k",
    "target_features",
    "map_top_k",
    "bootstrap",
)
"""Options whose stage (or training) fails on zero or less."""


def check_options(config: AllConfig) -> None:
    """The options the stages would reject after training: the factors, the dtype, the counts."""
    largest = max(parse_factors(config.factors))
    if config.steer_op == "scale" and largest == 1:  # map's --factor: 1 would scale nothing
        raise ValueError(
            f"--factors {config.factors!r}: map checks its neurons with the largest, 1 scales "
            "nothing; add a factor other than 1 (e.g. 0,0.5,2,4)"
        )
    pick_dtype(config.dtype, torch.device("cpu"))
    check_limit(config.limit)
    for name in POSITIVE:
        if getattr(config, name) < 1:
            flag = f"--{name.replace('_', '-')}"
            raise ValueError(f"{flag} {getattr(config, name)}: give a positive number")
    if config.cross_layer < 0:
        raise ValueError(f"--cross-layer {config.cross_layer}: give 0 (per-layer) or more")
    if config.num_latents and config.k > config.num_latents:
        raise ValueError(f"--k {config.k} exceeds --num-latents {config.num_latents}")


def check_items(adapter: Any, data: Any, config: AllConfig) -> None:
    """The items capture will read, and their first images, exist."""
    recipe = find_recipe(config.recipe, model_id=config.model)
    items = adapter.load_items(data, recipe)[: config.limit]
    if not items:
        raise ValueError("the benchmark data holds no items; check its flags (--help)")
    check_images(items)


def run_all(
    config: AllConfig,
    benchmark: str,
    extra_capture: list[str] | None = None,
    label_flags: list[str] | None = None,
) -> None:
    """Run every stage; `extra_capture` adds the benchmark's data flags to capture, `label_flags`
    the label files to score and classify."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    coders = config.coders or str(train_coders(config, out / "coders"))
    device = ["--device", config.device] if config.device else []
    recipe = ["--recipe", config.recipe] if config.recipe else []
    limit = ["--limit", str(config.limit)] if config.limit else []
    factors = parse_factors(config.factors)
    steer_region = "decision" if config.region == "decision" else "all"  # steer's two regions
    # map checks its neurons at the factor steer scales them by; clamp steers no neurons
    map_factor = ["--factor", str(max(factors))] if config.steer_op == "scale" else []
    stages = [
        ("capture", ["--model", config.model, *recipe, "--coders", coders, *limit, *device,
                     "--dtype", config.dtype, "--batch-size", str(config.batch_size),
                     "--max-new-tokens", str(config.max_new_tokens), *(extra_capture or [])]),
        ("score", [*(label_flags or [])]),
        ("classify", [*(label_flags or [])]),
        ("attribute", ["--coders", coders, "--region", config.region, *device]),
        ("analyze", ["--region", config.region, "--target-features", str(config.target_features),
                     "--split-seed", str(config.seed), "--rank-by", config.rank_by]),
        ("plot", []),
        ("examples", []),
        ("map", ["--coders", coders, *map_factor, "--top-k", str(config.map_top_k), *device,
                 "--seed", str(config.seed)]),
        ("steer", ["--coders", coders, "--factors", config.factors, *device,
                   "--bootstrap", str(config.bootstrap), "--seed", str(config.seed),
                   "--batch-size", str(config.batch_size), "--region", steer_region,
                   "--op", config.steer_op]),
    ]  # fmt: skip
    for stage, argv in stages:
        start = time.perf_counter()
        print(f"== {benchmark} {stage}", flush=True)
        stage_module(benchmark, stage).main(["--out", str(out), *argv], benchmark=benchmark)
        print(f"== {stage}: {time.perf_counter() - start:.1f} s", flush=True)


TRAIN_BATCH = 16
TRAIN_SAVE_EVERY = 50  # steps: the default 2,000 examples are 125


def check_trained_settings(config: AllConfig, run_dir: Path) -> None:
    """The CLT in `run_dir` has the shape asked for: one of another --num-latents, --k or
    --cross-layer would be taken as it is (finished) by every later stage."""
    path = run_dir / RUN_CONFIG_FILE
    saved = read_json(path, keys=()) if path.is_file() else {}
    sae = saved.get("sae", {})
    asked = {
        "--num-latents": (config.num_latents, sae.get("num_latents")),
        "--k": (config.k, sae.get("k")),
        "--cross-layer": (config.cross_layer, saved.get("cross_layer")),
    }
    differ = [f"{flag} {now} (trained: {was})" for flag, (now, was) in asked.items()
              if was is not None and now != was]  # fmt: skip
    if differ:
        raise ValueError(
            f"{run_dir} holds a CLT trained with other settings: {'; '.join(differ)}; pass the "
            "trained values, or another --out (or --coders RUN for coders of your own)"
        )


def train_coders(config: AllConfig, run_dir: Path) -> Path:
    """A small CLT on the model's own dataset, unless `run_dir` already holds it trained; an
    interrupted training resumes."""
    resume = False
    try:
        load_coders(run_dir)
        check_trained_settings(config, run_dir)
        state = load_torch(run_dir / STATE_FILE)
        if state["global_step"] >= math.ceil(config.train_examples / TRAIN_BATCH):
            print(f"== coders: {run_dir} exists, not retrained")
            return run_dir
        resume = True
    except (FileNotFoundError, CheckpointError):
        pass
    start = time.perf_counter()
    print(f"== {'resuming' if resume else 'training'} a CLT in {run_dir}", flush=True)
    argv = [
        config.model, *([config.train_dataset] if config.train_dataset else []), "--save_dir", str(run_dir.parent), "--run_name", run_dir.name,
        "--transcode", "true", "--cross_layer", str(config.cross_layer),
        "--num_latents", str(config.num_latents), "--k", str(config.k),
        "--max_examples", str(config.train_examples), "--batch_size", str(TRAIN_BATCH),
        "--num_workers", "0", "--log_to_wandb", "false", "--lr", "2e-3",
        "--save_every", str(TRAIN_SAVE_EVERY),  # sparsify's 1000 steps: no checkpoint to resume
        *(["--recipe", config.recipe] if config.recipe else []),
        *(["--device", config.device] if config.device else []),
        *(["--resume", "true"] if resume else []),
    ]  # fmt: skip
    train(argv)
    print(f"== training: {time.perf_counter() - start:.1f} s", flush=True)
    return run_dir
