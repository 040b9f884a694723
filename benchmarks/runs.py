"""The model, processor and coders a benchmark output folder was captured with, and teacher
forcing of its samples (prompt + generated response) for the stages that re-run them
(`map`, `steer`, `attribute`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks import outputs
from benchmarks.adapters import get_adapter
from benchmarks.store import FeatureStore, StoreMeta, coder_fingerprint
from vlm_sparsify.coder_io import Coders, load_coders
from vlm_sparsify.data import TOKEN_KEYS
from vlm_sparsify.files import read_json
from vlm_sparsify.loading import load_model_and_processor, resolve_model
from vlm_sparsify.recipe import find_recipe


@dataclass
class Run:
    """The model, processor and coders of a benchmark output folder."""

    model: Any
    processor: Any
    coders: Coders
    recipe: Any
    settings: dict
    data: Any
    coders_path: str
    """The coders' run folder: `--coders`, else the one capture used."""


def load_run(out: Path, benchmark: str, coders: str | None, device: str | None) -> Run:
    """Model and coders as `capture` used them (capture.json), `coders` overriding."""
    info = outputs.capture_info(out, benchmark)
    settings = info["settings"]
    mode = settings.get("mode", "error")
    if mode != "error":
        warnings.warn(
            f"{out} was captured with --mode {mode}: its stored features and GOOD / BAD labels "
            "are the replacement's, while attribute, map and steer run the original model "
            "(error mode: the original stream and answers); capture with --mode error to "
            "compare like with like",
            stacklevel=2,
        )
    meta = FeatureStore(Path(out) / outputs.STORE).meta  # none: captured without coders
    coders = coders or settings.get("coders")
    recipe = capture_recipe(info)
    model, processor, recipe = load_model_and_processor(
        settings["model"], recipe, dtype=settings.get("dtype", "auto"), device=device
    )
    coder_set = load_coders(coders, device=model.device)
    _check_coders(coder_set, coders, meta)
    data = get_adapter(benchmark).Data(**info["data"])
    return Run(model, processor, coder_set, recipe, settings, data, str(coders))


def capture_recipe(info: dict) -> Any:
    """The recipe a capture used: its `--recipe` (name or file), else the one capture matched
    from the model and recorded by name (`recipe_used`; capture.json files without it: matched
    from the model again)."""
    settings = info["settings"]
    name = settings.get("recipe") or info.get("recipe_used")
    return find_recipe(name, model_id=resolve_model(settings["model"]))


def check_store_coders(out: Path, coders: str) -> None:
    """`--coders` given to a stage that may have nothing to do: still refused when they are not
    the store's (their feature indices would name other features)."""
    _check_coders(load_coders(coders), coders, FeatureStore(Path(out) / outputs.STORE).meta)


def _check_coders(coders: Coders, where: str, meta: StoreMeta) -> None:
    """The coders must be those the store was captured with (its feature indices are theirs)."""
    shape = (
        list(coders.hookpoints),
        coders.cfg.k,
        max(s.encoder.out_features for _, s in coders.items()),
    )
    differs = shape != (meta.hookpoints, meta.k, meta.num_latents)
    if differs or (meta.fingerprint and coder_fingerprint(coders) != meta.fingerprint):
        raise ValueError(
            f"--coders {where} are not the coders the feature store was captured with "
            f"({meta.coders}): its feature indices would name other features; leave --coders "
            "out, or capture again with these coders"
        )


def read_features(out: Path) -> dict:
    path = out / outputs.FEATURES
    if not path.exists():
        raise FileNotFoundError(f"missing {path}: run `analyze` first")
    return read_json(path, keys=("features",))


def teacher_forced_inputs(run: Run, record: dict, image: Any) -> dict[str, Tensor]:
    """Prompt + generated response tokens of one sample, as one unpadded model input.

    Every processor output goes to the model, as in capture (Qwen's image_grid_thw, Idefics3's
    pixel_attention_mask, LLaVA-NeXT's image_sizes); its per-token keys (`data.TOKEN_KEYS`) go
    on over the response as generation extends them: attended, text (Gemma 3's token type and
    Qwen's mm_token_type 0), in PaliGemma's causal suffix (its token type 1).
    """
    inputs = dict(run.processor(images=[image], text=[record["prompt"]], return_tensors="pt"))
    inputs.pop("labels", None)  # PaliGemma's processor adds them: the model would compute a loss
    response = torch.tensor([record.get("response_token_ids", [])], dtype=torch.long)
    suffix_type = 1 if run.recipe.prompt.answer_as_suffix else 0
    fills = {
        "input_ids": response,
        "attention_mask": torch.ones_like(response),
        "token_type_ids": torch.full_like(response, suffix_type),
    }
    for key in TOKEN_KEYS:
        if key in inputs:
            fill = fills.get(key, torch.zeros_like(response)).to(inputs[key].dtype)
            inputs[key] = torch.cat([inputs[key], fill], dim=1)
    return {
        key: value.to(run.model.device, run.model.dtype if value.is_floating_point() else None)
        for key, value in inputs.items()
    }
