"""MLP activations of a training run's own model and dataset (for export calibration).

Reads the run's `config.json` to reload the same model (and revision), recipe and dataset (split,
streaming, `--data_args`, shuffle seed) it trained on, and its training positions (`--tokens`,
`--exclude_tokens`, `--ctx_len`). `trust_remote_code` is never taken from the file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from vlm_sparsify.coder_io import RUN_CONFIG_FILE
from vlm_sparsify.data import BatchStream, open_examples, parse_data_args
from vlm_sparsify.fidelity import check_hookpoints
from vlm_sparsify.files import read_json
from vlm_sparsify.loading import load_model_and_processor, resolve_model
from vlm_sparsify.recipe import run_recipe
from vlm_sparsify.training import collect_activations


def run_config(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no config.json (not a vlm_sparsify run?), which names the model and "
            "data to calibrate on; pass --calibration ACTS.safetensors (inputs.<hookpoint> "
            "[N, d]: MLP inputs of the model the coders were trained on) instead"
        )
    return read_json(path, keys=())


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
    model_id = resolve_model(config["model"])
    recipe = run_recipe(run_dir, config.get("recipe"), model_id)
    model, processor, recipe = load_model_and_processor(
        model_id, recipe, dtype="float32", device=device, revision=config.get("revision")
    )
    check_hookpoints(
        model,
        hookpoints,
        model_id,
        fix="or another transformers version, where module paths differ; pass --calibration "
        "ACTS.safetensors with activations of the model they were trained on",
    )
    examples = open_examples(
        config.get("dataset") or recipe.dataset.path,
        recipe,
        split=config.get("split") or None,
        streaming=config.get("streaming", False),
        shuffle_seed=config.get("shuffle_seed", 42),
        **parse_data_args(config.get("data_args") or ""),
    )
    stream = BatchStream(
        examples,
        processor,
        recipe,
        batch_size=batch_size,
        ctx_len=config.get("ctx_len", 2048),
        max_positions=getattr(model.config.get_text_config(), "max_position_embeddings", None),
        tokens=config.get("tokens", "all"),
        exclude_tokens=tuple(config.get("exclude_tokens") or ()),
        start_example=skip_examples,
        max_examples=skip_examples + num_examples,
    )
    inputs: list[list[Tensor]] = [[] for _ in hookpoints]
    outputs: list[list[Tensor]] = [[] for _ in hookpoints]
    progress = tqdm(total=num_examples, desc="calibration", unit="example")
    for batch in stream:
        if "inputs" not in batch:  # every image of the batch unreadable
            progress.update(batch["n_examples"])
            continue
        model_inputs = {k: v.to(model.device) for k, v in batch["inputs"].items()}
        xs, ys = collect_activations(
            model, hookpoints, model_inputs, batch["token_mask"].to(model.device)
        )
        for p, (x, y) in enumerate(zip(xs, ys, strict=True)):
            inputs[p].append(x.float().cpu())
            outputs[p].append(y.float().cpu())
        progress.update(batch["n_examples"])
    progress.close()
    return [torch.cat(x) for x in inputs], [torch.cat(y) for y in outputs]
