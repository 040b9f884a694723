"""`python -m benchmarks BENCH map --out DIR [--coders RUN]`: selected features -> MLP neurons.

For each feature of `DIR/features.json` and each target layer t its decoder writes into, the MLP
neurons that match it (`benchmarks/neuron_map.py`): the projection of its decoder vector
W_dec[p->t][f] on each column of `down_proj.weight` (`--projection cosine` or `lstsq`), the
co-activation (Pearson correlation over tokens of the feature's activation with each neuron's
activation act_fn(gate) * up), and the contribution along the decoder where the feature fires.
Neurons are ranked by `--rank-by` (default `contribution`). Data: the model is teacher-forced
over `--samples` train samples of the run (prompt + the response it generated).

Every mapping is checked on the model: scaling the top neurons of target t by `--factor` at the
`down_proj` input changes that MLP's output; `cosine_top` is the cosine of that change (summed over
the tokens where the feature fires) with the decoder vector (sign of factor - 1), `cosine_random`
the mean over `--random-sets` sets of as many random neurons.

Writes `DIR/neuron_map.json`: a list of `{"feature": {layer, feature_idx, hookpoint, direction},
"targets": [{target_layer, target_hookpoint, top_mlp_neurons: [{neuron_idx, weight,
coactivation, contribution}], verification: {cosine_top, cosine_random, random_sets, tokens}}],
"amplification_factor"}`, and `DIR/neuron_map_info.json` (parameters and summary).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm import tqdm

from benchmarks import outputs
from benchmarks.adapters import get_adapter, open_image
from benchmarks.neuron_map import (
    CoactivationStats,
    contribution,
    direction_cosine,
    down_projection,
    output_change,
    projection_weights,
    random_neurons,
    top_neurons,
)
from benchmarks.runs import load_run, read_features, teacher_forced_inputs
from benchmarks.stages import parse_stage
from benchmarks.stages.analyze import layer_numbers
from vlm_sparsify.coder_io import Coders, source_weights
from vlm_sparsify.files import read_json

INFO = "neuron_map_info.json"


@dataclass
class MapConfig:
    """Map the selected features onto MLP neurons and check the map on the model."""

    out: str
    """Output folder of the benchmark run (holds features.json, responses.jsonl)."""
    coders: str | None = None
    """Coder run folder (default: the one capture used)."""
    factor: float = 4.0
    """Amplification factor recorded as `amplification_factor` and used by the check."""
    top_k: int = 10
    """Neurons kept per target layer."""
    projection: Literal["cosine", "lstsq"] = "cosine"
    """`weight`: cosine of decoder vector and down_proj column, or min-norm least-squares
    coefficients."""
    rank_by: Literal["contribution", "projection", "coactivation"] = "contribution"
    """Neuron ranking."""
    samples: int = 64
    """Train samples teacher-forced for co-activation."""
    verify_tokens: int = 4096
    """MLP inputs kept per layer for the check."""
    random_sets: int = 5
    """Random neuron sets per check."""
    seed: int = 0
    """Seed of the random neuron sets."""
    device: str | None = None
    """Device (default: cuda if available)."""
    force: bool = False
    """Recompute even when neuron_map.json is up to date."""


def check_config(config: MapConfig) -> None:
    """Counts below 1 (a negative --samples would slice from the end of the train samples), and
    a --factor the check cannot measure with (1 changes nothing; NaN and inf no finite change)."""
    for flag, value in (("--samples", config.samples), ("--top-k", config.top_k),
                        ("--verify-tokens", config.verify_tokens),
                        ("--random-sets", config.random_sets)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{flag} {value}: give a positive number")
    if not math.isfinite(config.factor) or config.factor == 1:
        raise ValueError(
            f"--factor {config.factor:g}: give a finite factor other than 1 (the check scales the "
            "mapped neurons by it and measures the MLP output's change), e.g. 4"
        )


def main(argv: list[str], benchmark: str) -> None:
    config = parse_stage(argv, benchmark, "map", MapConfig)
    check_config(config)
    out = Path(config.out)
    if not config.force and _up_to_date(out, config):
        print(f"map: {out / outputs.NEURON_MAP} is up to date (--force to recompute)")
        return
    start = time.perf_counter()
    try:
        entries, info = neuron_map(out, config, benchmark)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"{benchmark} map: {err}") from err
    # the map last: a kill between the two leaves it older than features.json, so it is redone
    outputs.write_json(out / INFO, info)
    outputs.write_json(out / outputs.NEURON_MAP, entries)
    summary = info["summary"]
    print(
        f"map: {len(entries)} features, {summary['targets']} (feature, target) pairs; mean cosine "
        f"with the decoder: top neurons {summary['mean_cosine_top']:.3f}, random "
        f"{summary['mean_cosine_random']:.3f}; {time.perf_counter() - start:.1f} s -> "
        f"{out / outputs.NEURON_MAP}"
    )


class MLPTaps:
    """Forward hooks that keep each hookpoint's MLP input and down_proj input (neuron acts)."""

    def __init__(self, model: Any, hookpoints: list[str]):
        self.mlp_inputs: dict[str, Tensor] = {}
        self.neuron_acts: dict[str, Tensor] = {}
        self.handles = []
        for hookpoint in hookpoints:
            down = down_projection(model, hookpoint)
            mlp = model.get_submodule(hookpoint)
            self.handles.append(
                mlp.register_forward_pre_hook(self._keep(self.mlp_inputs, hookpoint))
            )
            self.handles.append(
                down.register_forward_pre_hook(self._keep(self.neuron_acts, hookpoint))
            )

    @staticmethod
    def _keep(into: dict[str, Tensor], hookpoint: str):
        def hook(module: Any, args: tuple) -> None:
            into[hookpoint] = args[0].detach().reshape(-1, args[0].shape[-1]).float()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def selected_feature_acts(coders: Coders, p: int, x: Tensor, latents: list[int]) -> Tensor:
    """Activations `[N, m]` of `latents` of source p (0 where not in the top-k)."""
    top_acts, top_indices, _ = coders.encode(p, x.to(next(coders.parameters()).dtype))
    match = top_indices[:, :, None] == torch.tensor(latents, device=x.device)
    return (top_acts[:, :, None].float() * match).sum(1)


@torch.no_grad()
def neuron_map(out: Path, config: MapConfig, benchmark: str) -> tuple[list[dict], dict]:
    result = read_features(out)
    features = result["features"]
    if not features:
        raise ValueError(f"{out / outputs.FEATURES} selects no features")
    run = load_run(out, benchmark, config.coders, config.device)
    coders, hookpoints = run.coders, list(run.coders.hookpoints)
    if not getattr(coders, "transcode", True):
        raise ValueError(
            "map relates transcoder features (read from the MLP input) to the MLP's neurons; "
            "these coders are SAEs, which read the MLP output: train with --transcode"
        )
    layers = layer_numbers(hookpoints)
    sources = [hookpoints.index(f["hookpoint"]) for f in features]
    reach = [list(range(p, p + coders.n_targets(p))) for p in sources]
    reaching = {t: [j for j, ts in enumerate(reach) if t in ts] for t in range(len(hookpoints))}
    n_neurons = down_projection(run.model, hookpoints[0]).in_features
    stats = {t: CoactivationStats.zeros(len(js), n_neurons) for t, js in reaching.items() if js}
    kept_x: dict[int, list[Tensor]] = {t: [] for t in stats}
    kept_f: dict[int, list[Tensor]] = {t: [] for t in stats}

    held_out = set(result.get("split", {}).get("held_out_ids", []))
    records = [
        r for r in outputs.read_append_log(out / outputs.RESPONSES) if r["id"] not in held_out
    ]
    records = records[: config.samples]
    items = {item.id: item for item in get_adapter(benchmark).load_items(run.data, run.recipe)}
    taps = MLPTaps(run.model, hookpoints)
    try:
        for record in tqdm(records, desc=f"{benchmark} map"):
            run.model(**teacher_forced_inputs(run, record, open_image(items[record["id"]].image)))
            acts = torch.zeros(len(taps.mlp_inputs[hookpoints[0]]), len(features))
            for p in sorted(set(sources)):
                columns = [j for j, s in enumerate(sources) if s == p]
                latents = [features[j]["feature_idx"] for j in columns]
                x = taps.mlp_inputs[hookpoints[p]]
                acts[:, columns] = selected_feature_acts(coders, p, x, latents).cpu()
            for t, js in reaching.items():
                if not js:
                    continue
                stats[t].add(acts[:, js], taps.neuron_acts[hookpoints[t]])
                if sum(len(x) for x in kept_x[t]) < config.verify_tokens:
                    kept_x[t].append(taps.mlp_inputs[hookpoints[t]])
                    kept_f[t].append(acts[:, js])
    finally:
        taps.remove()

    correlations = {t: s.correlation() for t, s in stats.items()}
    firing_means = {t: s.mean_when_firing() for t, s in stats.items()}
    entries, cosines_top, cosines_random = [], [], []
    for j, feature in enumerate(features):
        p, latent = sources[j], feature["feature_idx"]
        _, _, W_decs, _ = source_weights(coders, p)
        targets = []
        for t in reach[j]:
            column = reaching[t].index(j)
            mlp = run.model.get_submodule(hookpoints[t])
            down = down_projection(run.model, hookpoints[t]).weight.detach().float().cpu()
            decoder = W_decs[t - p][latent].detach().float().cpu()
            weight = projection_weights(decoder, down, config.projection)
            coact = correlations[t][column]
            contrib = contribution(decoder, down, firing_means[t][column])
            score = {"contribution": contrib, "projection": weight, "coactivation": coact}
            top = top_neurons(score[config.rank_by], config.top_k)
            x = torch.cat(kept_x[t])[: config.verify_tokens]
            fired = torch.cat(kept_f[t])[: config.verify_tokens, column] > 0
            rows = x[fired] if fired.any() else x
            check = verify(
                mlp, rows, decoder, top, n_neurons, config, seed=config.seed + 1000 * j + t
            )
            cosines_top.append(check["cosine_top"])
            cosines_random.append(check["cosine_random"])
            targets.append(
                {
                    "target_layer": layers[t],
                    "target_hookpoint": hookpoints[t],
                    "top_mlp_neurons": [
                        {
                            "neuron_idx": n,
                            "weight": float(weight[n]),
                            "coactivation": float(coact[n]),
                            "contribution": float(contrib[n]),
                        }
                        for n in top
                    ],
                    "verification": {
                        **check,
                        "tokens": len(rows),
                        "feature_fired": bool(fired.any()),
                    },
                }
            )
        entries.append(
            {
                "feature": {
                    key: feature[key] for key in ("layer", "feature_idx", "hookpoint", "direction")
                },
                "targets": targets,
                "amplification_factor": config.factor,
            }
        )
    info = {
        "parameters": _parameters(config),
        "coders": run.coders_path,  # the parameters' `coders` is None when capture's are used
        "samples": len(records),
        "tokens": next(iter(stats.values())).n_tokens if stats else 0,
        "summary": {
            "targets": len(cosines_top),
            "mean_cosine_top": sum(cosines_top) / max(len(cosines_top), 1),
            "mean_cosine_random": sum(cosines_random) / max(len(cosines_random), 1),
            "top_beats_random": sum(
                a > b for a, b in zip(cosines_top, cosines_random, strict=True)
            ),
        },
    }
    return entries, info


def verify(
    mlp: Any,
    rows: Tensor,
    decoder: Tensor,
    top: list[int],
    n_neurons: int,
    config: MapConfig,
    seed: int,
) -> dict[str, float]:
    """Cosine of the MLP output change with the decoder vector: top neurons vs random ones."""
    device, dtype = mlp.down_proj.weight.device, mlp.down_proj.weight.dtype
    inputs = rows.to(device, dtype)
    sign = 1.0 if config.factor >= 1 else -1.0

    def cosine(neurons: list[int]) -> float:
        delta = output_change(mlp, inputs, neurons, config.factor).float().cpu()
        return direction_cosine(delta, sign * decoder)

    randoms = [
        cosine(random_neurons(n_neurons, len(top), top, seed + r))
        for r in range(config.random_sets)
    ]
    return {
        "cosine_top": cosine(top),
        "cosine_random": sum(randoms) / max(len(randoms), 1),
        "random_sets": config.random_sets,
    }


def _parameters(config: MapConfig) -> dict:
    return {k: v for k, v in asdict(config).items() if k not in ("out", "force", "device")}


def _up_to_date(out: Path, config: MapConfig) -> bool:
    target, info, features = out / outputs.NEURON_MAP, out / INFO, out / outputs.FEATURES
    if not (target.exists() and info.exists() and features.exists()):
        return False
    if target.stat().st_mtime <= features.stat().st_mtime:
        return False
    return read_json(info, keys=()).get("parameters") == _parameters(config)
