"""`python -m benchmarks BENCH attribute --out DIR`: activation x gradient influence per feature.

For every captured sample the model is teacher-forced on its prompt and its own generated
response through the replacement model in error mode (outputs exactly the model's), with the
coders' feature activations as gradient leaves (`ReplacementModel.attribution`). The objective is
the answer's logit difference: summed over response positions, the logit of the generated token
minus the best other token's. A feature's attribution in a sample is activation x gradient,
summed over the tokens of `--region` (default `decision`: the positions whose prediction is a
response token, the last prompt token .. the second-to-last response token). Written to
`DIR/store/attributions.safetensors` in the sparse format `analyze --rank-by attribution` reads
(see docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from benchmarks import outputs
from benchmarks.adapters import get_adapter, open_image
from benchmarks.runs import Run, check_store_coders, load_run, teacher_forced_inputs
from benchmarks.stages import check_limit, parse_stage
from benchmarks.stages.analyze import Region, read_attribution_meta
from vlm_sparsify.capture import REGION_CODE, token_regions
from vlm_sparsify.coder_io import usual_permissions
from vlm_sparsify.replacement import ReplacementModel


@dataclass
class AttributeConfig:
    """Activation x gradient attribution of every stored feature, per sample."""

    out: str
    """Benchmark output folder (after `capture` with coders)."""
    coders: str | None = None
    """Coder run (default: the one capture used)."""
    region: Region = "decision"
    """Tokens whose feature attributions are summed per sample (`decision`: the last prompt
    token and every response token but the last, the positions that predict the response)."""
    limit: int | None = None
    """Only the first N captured samples."""
    device: str | None = None
    """Device (default: cuda if available)."""
    force: bool = False
    """Recompute even when the attributions file is newer than the responses."""


def answer_logit_difference(logits: Tensor, response: Tensor, prompt_length: int) -> Tensor:
    """Sum over response tokens of logit(generated token) - max logit(any other token)."""
    if len(response) == 0:
        return logits.sum() * 0
    rows = logits[0, prompt_length - 1 : prompt_length - 1 + len(response)].float()
    chosen = rows.gather(1, response[:, None]).squeeze(1)
    others = rows.scatter(1, response[:, None], float("-inf")).amax(1)
    return (chosen - others).sum()


def region_rows(
    input_ids: Tensor, prompt_length: int, image_id: int | None, region: Region
) -> Tensor:
    """Boolean [T] of the rows whose attributions count (regions as capture assigns them;
    `decision`: rows prompt_length - 1 .. T - 2, whose next-token logits the objective reads)."""
    if region == "all":
        return torch.ones(input_ids.shape[1], dtype=torch.bool, device=input_ids.device)
    if region == "decision":
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return (positions >= prompt_length - 1) & (positions < input_ids.shape[1] - 1)
    codes = token_regions(
        input_ids,
        None,
        (input_ids.shape[0], input_ids.shape[1]),
        0,
        prompt_length,
        image_id,
        input_ids.device,
    )
    return codes[0] == REGION_CODE[region]


def sample_attributions(
    rm: ReplacementModel, inputs: dict[str, Any], response: Tensor, region: Region
) -> dict[tuple[int, int], float]:
    """{(source position, latent): activation x gradient summed over the region's tokens}."""
    prompt_length = inputs["input_ids"].shape[1] - len(response)
    with torch.enable_grad(), rm.attribution() as leaves:
        logits = rm(**inputs).logits
        objective = answer_logit_difference(logits, response, prompt_length)
        if objective.requires_grad:
            objective.backward()
    rows = region_rows(inputs["input_ids"], prompt_length, rm.image_token_id, region)
    result: dict[tuple[int, int], float] = {}
    for p, acts, indices in leaves:
        if acts.grad is None:
            continue
        values = (acts * acts.grad).detach()[rows].flatten()
        latents = indices[rows].flatten()
        totals = torch.zeros(rm.num_latents, dtype=torch.float64, device=values.device)
        totals.index_add_(0, latents, values.double())
        for latent in totals.nonzero().flatten().tolist():
            result[(p, latent)] = float(totals[latent])
    return result


def write_attributions(path: Path, ids: list[str], per_sample: list[dict], region: str) -> None:
    """The sparse COO file `analyze` reads, written atomically; `region` goes to its metadata."""
    sample, layer, latent, value = [], [], [], []
    for row, entries in enumerate(per_sample):
        for (p, f), v in entries.items():
            sample.append(row)
            layer.append(p)
            latent.append(f)
            value.append(v)
    tensors = {
        "sample": torch.tensor(sample, dtype=torch.int64),
        "layer": torch.tensor(layer, dtype=torch.int64),
        "latent": torch.tensor(latent, dtype=torch.int64),
        "value": torch.tensor(value, dtype=torch.float32),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"ids": json.dumps(ids), "region": region})
    usual_permissions(tmp)
    os.replace(tmp, path)


def attribute(out: Path, benchmark: str, config: AttributeConfig) -> Path:
    path = out / outputs.STORE / outputs.ATTRIBUTIONS
    responses = out / outputs.RESPONSES
    records = outputs.read_append_log(responses)[: config.limit]
    if config.coders:
        check_store_coders(out, config.coders)
    if (
        path.exists()
        and not config.force
        and path.stat().st_mtime >= responses.stat().st_mtime
        and read_attribution_meta(path) == (config.region, [str(r["id"]) for r in records])
    ):
        print(f"attribute: {path} is up to date (--force recomputes)")
        return path
    run: Run = load_run(out, benchmark, config.coders, config.device)
    items = {item.id: item for item in get_adapter(benchmark).load_items(run.data, run.recipe)}
    run.coders.requires_grad_(False)
    rm = ReplacementModel(run.model, run.coders, mode="error")
    ids, per_sample = [], []
    for record in tqdm(records, desc=f"{benchmark} attribute"):
        inputs = teacher_forced_inputs(run, record, open_image(items[record["id"]].image))
        response = torch.tensor(record.get("response_token_ids", []), device=run.model.device)
        ids.append(record["id"])
        per_sample.append(sample_attributions(rm, inputs, response, config.region))
    write_attributions(path, ids, per_sample, config.region)
    print(f"attribute: {len(ids)} samples, region {config.region} -> {path}")
    return path


def main(argv: list[str], benchmark: str) -> None:
    config = parse_stage(argv, benchmark, "attribute", AttributeConfig)
    check_limit(config.limit)
    attribute(Path(config.out), benchmark, config)
