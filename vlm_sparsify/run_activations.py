"""MLP activations of a training run's own model and dataset (for export calibration).

Reads the run's `config.json` to reload the same model, recipe and dataset it trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from vlm_sparsify.data import BatchStream, open_examples
from vlm_sparsify.loading import load_model_and_processor
from vlm_sparsify.recipe import run_recipe
from vlm_sparsify.training import collect_activations


def run_config(run_dir: Path) -> dict:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no config.json (not a vlm_sparsify run?); pass the model and data "
            "explicitly instead"
        )
    return json.loads(path.read_text())


@torch.no_grad()
def run_activations(
    run_dir: Path,
    hookpoints: list[str],
    num_examples: int = 64,
    batch_size: int = 8,
    device: str | None = None,
    skip_examples: int = 0,
) -> tuple[list[Tensor], list[Tensor]]:
    """MLP inputs and outputs [N, d] per hookpoint over `num_examples` examples of the run's data.

    `skip_examples` starts further into the stream, e.g. past what the run trained on.
    """
    config = run_config(run_dir)
    recipe = run_recipe(run_dir, config.get("recipe"), config["model"])
    model, processor, recipe = load_model_and_processor(
        config["model"], recipe, dtype="float32", device=device
    )
    examples = open_examples(
        config.get("dataset") or recipe.dataset.path,
        recipe,
        split=config.get("split") or None,
        shuffle_seed=config.get("shuffle_seed", 42),
    )
    stream = BatchStream(
        examples,
        processor,
        recipe,
        batch_size=batch_size,
        ctx_len=config.get("ctx_len", 2048),
        tokens=config.get("tokens", "all"),
        start_batch=skip_examples // batch_size,
        max_examples=skip_examples + num_examples,
    )
    inputs: list[list[Tensor]] = [[] for _ in hookpoints]
    outputs: list[list[Tensor]] = [[] for _ in hookpoints]
    for batch in stream:
        if "inputs" not in batch:
            continue
        model_inputs = {k: v.to(model.device) for k, v in batch["inputs"].items()}
        xs, ys = collect_activations(
            model, hookpoints, model_inputs, batch["token_mask"].to(model.device)
        )
        for p, (x, y) in enumerate(zip(xs, ys, strict=True)):
            inputs[p].append(x.float().cpu())
            outputs[p].append(y.float().cpu())
    return [torch.cat(x) for x in inputs], [torch.cat(y) for y in outputs]
