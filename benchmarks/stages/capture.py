"""`python -m benchmarks BENCH capture --out DIR [flags]`: generate responses, capture features.

Batched greedy generation with the base model, or with a `ReplacementModel` when `--coders RUN`
is given (default mode `error`: the model's own outputs, features captured into `DIR/store/`).
Per batch the store shard is written first, then the response lines (flush + fsync), so a
restart skips exactly the ids present in both and redoes the rest. Under torchrun, rank r
generates items r::world and rank 0 writes everything (one writer per store).
Writes `DIR/responses.jsonl`, `DIR/responses_official.json[l]`, `DIR/store/`, `DIR/capture.json`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from tqdm import tqdm

from benchmarks import outputs
from benchmarks.adapters import (
    Adapter,
    BenchItem,
    absolute_path,
    check_images,
    get_adapter,
    open_image,
)
from benchmarks.stages import check_limit, stage_parser
from benchmarks.store import INDEX, META, VALUE_DTYPES, FeatureStore, StoreMeta, coder_fingerprint
from vlm_sparsify.coder_io import load_coders
from vlm_sparsify.data import BadImageError
from vlm_sparsify.files import read_json
from vlm_sparsify.generation import generate_batch
from vlm_sparsify.loading import DEFAULT_MODEL, load_model_and_processor, portable_model
from vlm_sparsify.recipe import find_recipe, is_recipe_file
from vlm_sparsify.replacement import ReplacementModel
from vlm_sparsify.sharding import init_distributed

# Settings that change what is generated: a resumed capture must keep them.
RESUME_KEYS = ("model", "recipe", "coders", "mode", "max_new_tokens", "dtype", "value_dtype")


@dataclass
class CaptureConfig:
    """Generation and capture settings (the benchmark's data flags come separately)."""

    out: str
    """Output folder (responses, feature store, capture.json)."""
    model: str = DEFAULT_MODEL
    """Model id or folder (default: the shipped tiny easy-VQA LLaVA)."""
    recipe: str | None = None
    """Recipe name or TOML path (default: matched from the model)."""
    coders: str | None = None
    """Coder run folder; without it the base model generates and no features are stored."""
    mode: Literal["open-loop", "error", "off"] = "error"
    """Replacement mode: error reproduces the model exactly, open-loop uses the coders' outputs."""
    limit: int | None = None
    """Only the first N items."""
    batch_size: int = 8
    """Items per generate call (and per store shard)."""
    max_new_tokens: int = 32
    """Greedy decoding length limit (AMBER captions need a few hundred)."""
    device: str | None = None
    """Device (default: cuda if available; under torchrun cuda:LOCAL_RANK)."""
    dtype: str = "auto"
    """Model dtype: auto (bfloat16 on a GPU that has it, else float32), float32, bfloat16, ..."""
    value_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Stored activation dtype."""
    strict: bool = False
    """Fail on a missing or unreadable image instead of skipping it."""


def parse_args(argv: list[str], adapter: Adapter, benchmark: str) -> tuple[CaptureConfig, Any]:
    args = stage_parser(benchmark, "capture", CaptureConfig, data=adapter.Data).parse_args(argv)
    return args.config, args.data


def main(argv: list[str], benchmark: str) -> None:
    adapter = get_adapter(benchmark)
    config, data = parse_args(argv, adapter, benchmark)
    config = with_absolute_paths(config)
    check_limit(config.limit)
    check_options(config)
    try:
        counts = capture(benchmark, adapter, config, data)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"{benchmark} capture: {err}") from err
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if counts is not None:
        print(json.dumps(counts))
        if counts["items"] and not counts["responses"]:
            raise SystemExit(
                f"{benchmark} capture: no item had a readable image ({counts['skipped_image']} "
                "skipped); check --images"
            )


def with_absolute_paths(config: CaptureConfig) -> CaptureConfig:
    """`config` with its local paths (the coders, a model folder, a recipe file) made absolute:
    map, steer and attribute read them from capture.json, maybe from another directory. The
    embedded model is kept as `default` (a moved checkout still finds it)."""
    recipe = config.recipe
    return replace(
        config,
        coders=absolute_path(config.coders),
        model=portable_model(config.model),
        recipe=absolute_path(recipe) if recipe and is_recipe_file(recipe) else recipe,
    )


def _distributed(device: str | None) -> tuple[int, int, str | None]:
    """(rank, world size, device); initialises torch.distributed under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, device
    init_distributed()
    if device is None and torch.cuda.is_available():
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return dist.get_rank(), dist.get_world_size(), device


def rank_batches(todo: Sequence[BenchItem], rank: int, world: int, batch_size: int) -> list[list]:
    """Rank `rank`'s items (todo[rank::world]) in batches; every rank gets the same number of
    batches (the last ones may be empty) so that the per-batch gathers pair up."""
    mine = list(todo[rank::world])
    n_batches = math.ceil(math.ceil(len(todo) / world) / batch_size)
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]


def check_options(config: CaptureConfig) -> None:
    """Options refused before anything loads or capture.json records them (a folder keeps its
    settings): positive counts, and a replacement mode other than the exact `error` only with
    coders (without them the base model generates, and the mode recorded never ran)."""
    for name in ("batch_size", "max_new_tokens"):
        if getattr(config, name) < 1:
            flag = f"--{name.replace('_', '-')}"
            raise ValueError(f"{flag} {getattr(config, name)}: give a positive number")
    if config.mode != "error" and not config.coders:
        raise ValueError(
            f"--mode {config.mode} runs the coders of --coders RUN, and none was given: give "
            "--coders, or leave --mode out to generate with the base model"
        )


def capture(benchmark: str, adapter: Adapter, config: CaptureConfig, data: Any) -> dict | None:
    """Run the capture; returns the counts on the writing rank (None on the others)."""
    rank, world, device = _distributed(config.device)
    recipe = find_recipe(config.recipe, model_id=config.model) if config.recipe else None
    model, processor, recipe = load_model_and_processor(
        config.model, recipe, dtype=config.dtype, device=device
    )
    items = adapter.load_items(data, recipe)[: config.limit]
    if not items:
        raise ValueError("the benchmark data holds no items; check its flags (--help)")
    if len({item.id for item in items}) != len(items):
        raise ValueError("duplicate item ids in the benchmark data; check the question files")
    check_images(items)
    out = Path(config.out)
    replacement = store = None
    if config.coders:
        coders = load_coders(config.coders, device=model.device)
        replacement = ReplacementModel(model, coders, mode=config.mode)
    writer = rank == 0
    done: set[str] = set()
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        _check_resume(out, config, data, benchmark)
        _write_info(out, config, data, recipe.name, world, counts=None, skipped=[])
        if replacement is not None:
            meta = StoreMeta(
                replacement.hookpoints,
                k=replacement.coders.cfg.k,
                num_latents=replacement.num_latents,
                value_dtype=config.value_dtype,
                coders=str(config.coders),
                fingerprint=coder_fingerprint(replacement.coders),
            )
            store = FeatureStore(out / outputs.STORE, meta)
        done = _completed_ids(out, store)
    if world > 1:
        shared = [done]
        dist.broadcast_object_list(shared, src=0)
        done = shared[0]
    todo = [item for item in items if item.id not in done]
    prompts = {item.id: recipe.format_prompt(item.question, processor) for item in todo}
    skipped: list[str] = []
    progress = tqdm(total=len(todo), desc=f"{benchmark} capture", disable=not writer)
    for batch in rank_batches(todo, rank, world, config.batch_size):
        records, samples, missing = _run_batch(
            batch, prompts, model, processor, replacement, config
        )
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, (records, samples, missing))
            records = [r for part in gathered for r in part[0]]
            samples = [s for part in gathered for s in part[1]]
            missing = [m for part in gathered for m in part[2]]
        if writer:
            if store is not None and samples:
                store.append(samples)
            if records:
                outputs.append_lines(
                    out / outputs.RESPONSES, "".join(json.dumps(r) + "\n" for r in records)
                )
            if missing and not skipped:
                tqdm.write(
                    f"{benchmark} capture: skipping items whose image is missing or unreadable "
                    f"(first: {missing[0]}; all in capture.json, skipped_ids; --strict stops)"
                )
            skipped += missing
            progress.update(len(records) + len(missing))
    progress.close()
    if not writer:
        return None
    return _finish(out, adapter, config, data, recipe.name, items, done, skipped, store, world)


def _run_batch(
    batch: list[BenchItem],
    prompts: dict[str, str],
    model: Any,
    processor: Any,
    replacement: ReplacementModel | None,
    config: CaptureConfig,
) -> tuple[list[dict], list[tuple], list[str]]:
    """Response records and store samples of one batch, and the ids skipped for their image."""
    ready, images, missing = [], [], []
    for item in batch:
        try:
            images.append(open_image(item.image))
            ready.append(item)
        except BadImageError as err:
            if config.strict:
                raise ValueError(f"image {item.image} of item {item.id}: {err}") from err
            missing.append(item.id)
    if not ready:
        return [], [], missing
    generations = generate_batch(
        model,
        processor,
        images,
        [prompts[item.id] for item in ready],
        replacement=replacement,
        capture=replacement is not None,
        value_dtype=VALUE_DTYPES[config.value_dtype],
        max_new_tokens=config.max_new_tokens,
    )
    records, samples = [], []
    for item, generation in zip(ready, generations, strict=True):
        records.append(
            {
                "id": item.id,
                "prompt": prompts[item.id],
                "response": generation.response,
                "response_token_ids": generation.tokens,
                "cut": generation.cut,
                **item.fields,
            }
        )
        if generation.sample is not None:
            sample = generation.sample
            samples.append((item.id, sample.indices, sample.values, sample.regions))
    return records, samples, missing


def _check_resume(out: Path, config: CaptureConfig, data: Any, benchmark: str) -> None:
    """A capture into `out` must keep the settings of what is captured there; a capture that
    failed before its first batch was written binds nothing (its store's meta.json goes too)."""
    path = out / outputs.CAPTURE
    if not path.exists():
        return
    index = out / outputs.STORE / INDEX
    if not outputs.read_append_log(out / outputs.RESPONSES) and not (
        index.is_file() and index.read_bytes().strip()
    ):
        (out / outputs.STORE / META).unlink(missing_ok=True)
        return
    before = read_json(path, keys=("settings", "data"))
    outputs.check_benchmark(path, before["data"], benchmark)
    now = {**{key: getattr(config, key) for key in RESUME_KEYS}, "data": asdict(data)}
    # a capture.json of an older version may hold relative paths: read from here, as its run was
    recorded = replace(config, **{key: before["settings"].get(key) for key in RESUME_KEYS})
    was = {
        **{key: getattr(with_absolute_paths(recorded), key) for key in RESUME_KEYS},
        "data": asdict(type(data)(**before["data"])),
    }
    changed = {key: (was[key], now[key]) for key in now if was[key] != now[key]}
    if changed:
        raise ValueError(
            f"{out} was captured with other settings {changed} (before, now); "
            "use a new --out or the same settings"
        )


def _completed_ids(out: Path, store: FeatureStore | None) -> set[str]:
    """Ids with a response line (and a stored sample, with coders); other lines are dropped."""
    path = out / outputs.RESPONSES
    records = outputs.read_append_log(path)
    stored = set(store.ids()) if store is not None else None
    kept = [r for r in records if stored is None or r["id"] in stored]
    if path.exists() and (len(kept) != len(records) or not path.read_text().endswith("\n")):
        outputs.write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return {r["id"] for r in kept}


def _finish(
    out: Path,
    adapter: Adapter,
    config: CaptureConfig,
    data: Any,
    recipe: str,
    items: list[BenchItem],
    done: set[str],
    skipped: list[str],
    store: FeatureStore | None,
    world: int,
) -> dict:
    """Write the official response file and capture.json; return the counts."""
    order = {item.id: i for i, item in enumerate(items)}
    records = sorted(
        outputs.read_append_log(out / outputs.RESPONSES),
        key=lambda r: order.get(r["id"], len(order)),
    )
    adapter.write_official(records, out / adapter.OFFICIAL_FILE)
    counts: dict[str, Any] = {
        "items": len(items),
        "responses": len(records),
        "resumed": len(done),
        "captured": len(records) - len(done),
        "skipped_image": len(skipped),
    }
    # captures before 2026-11-27 have no "cut": unknown, not counted
    counts["cut_at_max_new_tokens"] = sum(bool(r.get("cut")) for r in records)
    # a short answer's score reads its first words, so only cut captions are worth a warning
    is_caption = getattr(adapter, "is_caption", None)
    captions = [r for r in records if is_caption is not None and is_caption(r)]
    if captions:
        cut = [r["id"] for r in captions if r.get("cut")]
        counts["cut_captions"] = len(cut)
        if cut:
            warnings.warn(
                f"{len(cut)} of {len(captions)} captions reached --max-new-tokens "
                f"{config.max_new_tokens} before the model ended them (first: "
                f"{', '.join(cut[:5])}): a cut caption names fewer objects (AMBER's CHAIR, Cover "
                "and Hal, easy-VQA's caption score); for whole captions rerun with a larger "
                "--max-new-tokens and a new --out",
                stacklevel=1,
            )
    if store is not None and store.records():
        counts["bytes_per_active_feature"] = round(store.bytes_per_active_feature(), 4)
    _write_info(out, config, data, recipe, world, counts, skipped)
    return counts


def _write_info(
    out: Path,
    config: CaptureConfig,
    data: Any,
    recipe: str,
    world: int,
    counts: dict | None,
    skipped: list[str],
) -> None:
    """capture.json: settings and data flags (at the start), counts (null until finished)."""
    info = {
        "settings": asdict(config),
        "recipe_used": recipe,
        "data": asdict(data),
        "counts": counts,
        "skipped_ids": skipped,
        "world_size": world,
    }
    outputs.write_json(out / outputs.CAPTURE, info)
