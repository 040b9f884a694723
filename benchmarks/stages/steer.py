"""`python -m benchmarks BENCH steer --out DIR`: does steering the selected features move the metric?

Reruns the benchmark on the HELD-OUT samples of `DIR/features.json` (never used to select the
features) under these conditions, each direction (`good` features, `bad` features) at each factor
of `--factors`, applied as `--op` says: `scale` (the default; 0 = zero the features, 0.5 = halve,
2 / 4 = amplify) or `clamp` (set each feature to the factor times its typical activation, its mean
activation when it fires in the analysed samples, at every steered token, whether it fired there
or not: a feature that rarely fires at the steered tokens can only be steered this way):

- `features`: the replacement model in error mode, the direction's features edited at their
  source (every target layer follows);
- `control`: as many random features (never one selected for either direction), each from the
  same source layer as the one it stands for and matched on firing frequency (drawn, seeded, among the few latents that fired in the analysed
  samples with the frequency closest to its own; not on activation size or decoder norm), edited
  the same way;
- `neurons`: the original model with the direction's mapped MLP neurons (`DIR/neuron_map.json`)
  scaled at the `down_proj` input (`--op scale` only: neurons have no recorded typical activation);
- `neurons_control`: as many random neurons per target MLP as `neurons` scales there, drawn
  (seeded) among those neither direction maps, scaled the same way (`--op scale` only);
- `clt_free`: the original model with a `FeatureSteerer` (exact mode) for the same features and
  factor: it should answer as `features` does, without the coders;

against the `baseline` (the original model). Every condition edits the token positions of
`--region`: `decision` (default; the last prompt token and every response token, the positions
`analyze` selects features on by default) or `all`.
Each condition is scored with the benchmark's official scorer (`score --out` on its own folder)
and per sample GOOD / BAD with the rules of `DIR/classification.json`; the reported metric is the
GOOD rate, whose delta to the baseline (and, for `features` / `neurons`, to its random control at
the same factor) gets a paired bootstrap interval that resamples whole images (the held-out split
is by image, and one image's samples are not independent).
Writes `DIR/steer/<condition>/` (responses, official file, metrics), `DIR/steering.json` and
`DIR/plots/steering.png` (`--op clamp`: `steering_clamp.json`, `plots/steering_clamp.png`, and
conditions named `<direction>-<kind>-clamp<factor>`); a condition whose folder is complete is not
generated again.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from tqdm import tqdm

from benchmarks import outputs
from benchmarks.adapters import Adapter, Rules, csv_choices, get_adapter, open_image
from benchmarks.bootstrap import FEW_GROUPS, paired_bootstrap
from benchmarks.neuron_map import down_projection, random_neurons, scale_neurons
from benchmarks.runs import Run, load_run, read_features
from benchmarks.splits import sample_images
from benchmarks.stages import check_limit, parse_stage, stage_module
from benchmarks.stages.plot import pyplot
from vlm_sparsify.clt_free import FeatureSteerer, SteeredFeature
from vlm_sparsify.files import read_json
from vlm_sparsify.generation import generate_batch
from vlm_sparsify.interventions import Intervention
from vlm_sparsify.positions import check_steer_region
from vlm_sparsify.replacement import ReplacementModel

STEERING = "steering.json"
"""The report of `--op scale`; `--op clamp` writes `steering_clamp.json` (`report_name`)."""
SteerOp = Literal["scale", "clamp"]
NEURON_KINDS = ("neurons", "neurons_control")
"""The conditions that edit MLP neurons, which `--op clamp` leaves out."""
KINDS = ("features", "control", "neurons", "neurons_control", "clt_free")
DIRECTIONS = ("good", "bad")
"""Feature lists of features.json; a direction's random controls are drawn with seed + its place."""
CONTROL_OF = {"features": "control", "neurons": "neurons_control"}
"""The random control each steered kind is compared with at the same factor."""
COLORS = {"features": "#2a9d8f", "control": "#8d99ae", "neurons": "#e9c46a",
          "neurons_control": "#a68a64", "clt_free": "#264653"}  # fmt: skip


@dataclass
class SteerConfig:
    """Steering on the held-out split against a random-feature control."""

    out: str
    """Output folder of the benchmark run (features.json, neuron_map.json, capture.json)."""
    coders: str | None = None
    """Coder run folder (default: the one capture used)."""
    factors: str = "0,0.5,2,4"
    """Comma-separated factors: of the activation (--op scale) or of the typical activation
    (--op clamp)."""
    op: SteerOp = "scale"
    """scale: multiply each steered feature's activation by the factor (0 zeroes it); clamp: set
    it to the factor times its typical activation (its mean when it fires in the analysed
    samples) at every steered token, fired or not. clamp steers features only: the neurons
    conditions are left out."""
    region: str = "decision"
    """Token positions steered in every condition: decision (the last prompt token and every
    response token) or all."""
    kinds: str = ",".join(KINDS)
    """Comma-separated conditions besides the baseline: features, control, neurons,
    neurons_control, clt_free."""
    directions: str = "good,bad"
    """Which feature lists to steer."""
    bootstrap: int = 1000
    """Bootstrap resamples for the intervals."""
    confidence: float = 0.95
    """Interval coverage, a share between 0 and 1 (0.95: a 95 percent interval)."""
    seed: int = 0
    """Seed of the random control features and of the bootstrap."""
    limit: int | None = None
    """Only the first N held-out items."""
    batch_size: int = 8
    """Items per generate call."""
    device: str | None = None
    """Device (default: cuda if available)."""
    force: bool = False
    """Regenerate every condition."""


@dataclass(frozen=True)
class Condition:
    name: str
    kind: str
    direction: str
    factor: float
    op: str = "scale"


def condition_name(direction: str, kind: str, factor: float, op: str = "scale") -> str:
    """`good-features-x2` (scale) or `good-features-clamp2` (clamp): the condition's folder."""
    return f"{direction}-{kind}-{'x' if op == 'scale' else 'clamp'}{factor:g}"


def report_name(op: str) -> str:
    """steering.json for `--op scale`, steering_clamp.json for `--op clamp`: the two reports
    (and their plots) sit side by side."""
    return STEERING if op == "scale" else f"steering_{op}.json"


def main(argv: list[str], benchmark: str) -> None:
    config = parse_stage(argv, benchmark, "steer", SteerConfig)
    try:
        report = steer(Path(config.out), config, benchmark)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"{benchmark} steer: {err}") from err
    print(format_table(report))


def parse_factors(text: str) -> list[float]:
    try:
        factors = [float(word) for word in text.split(",") if word.strip()]
    except ValueError:
        factors = []
    if not factors or not all(0 <= f < float("inf") for f in factors):  # nan fails too
        raise ValueError(f"--factors {text!r}: give non-negative numbers, e.g. 0,0.5,2,4")
    repeated = sorted({f for f in factors if factors.count(f) > 1})
    if repeated:  # one condition folder per factor: a repeat would be counted and plotted twice
        raise ValueError(f"--factors {text!r}: {', '.join(f'{f:g}' for f in repeated)} given twice")
    return factors


def unique_choices(text: str, known: Sequence[str], flag: str) -> list[str]:
    """`csv_choices`, each name once: a repeated kind or direction would be generated, counted
    in the progress bar and read back twice."""
    chosen = csv_choices(text, known, flag)
    repeated = sorted({name for name in chosen if chosen.count(name) > 1})
    if repeated:
        raise ValueError(f"{flag} {text!r}: {', '.join(repeated)} given twice")
    return chosen


def random_control(
    features: Sequence[dict],
    num_latents: int,
    seed: int,
    frequency: np.ndarray | None = None,
    nearest: int = 5,
    exclude: Mapping[str, Collection[int]] | None = None,
) -> list[dict]:
    """One random latent per feature from the same source hookpoint, distinct and never one of the
    selected latents there nor of `exclude` (latents per hookpoint, e.g. the other direction's).

    With `frequency` (`[S, L]` share of the analysed samples each latent fires in, from
    feature_stats.npz, indexed by the feature's `source` position), matched on it: drawn among the
    `nearest` latents that fired (frequency > 0) and are still free whose frequency is closest to
    the feature's (ties: lower index first), so that the control fires about as often as the
    feature it stands for; each control records its `frequency` and the feature's
    (`feature_frequency`). Without it, or when no fired latent is left, drawn uniformly among the
    free latents of the hookpoint."""
    rng = np.random.default_rng(seed)
    selected: dict[str, set[int]] = {}
    for feature in features:
        selected.setdefault(feature["hookpoint"], set()).add(feature["feature_idx"])
    taken: dict[str, set[int]] = {h: set(s) for h, s in selected.items()}
    for hookpoint, latents in (exclude or {}).items():
        taken.setdefault(hookpoint, set()).update(latents)
    control = []
    for feature in features:
        hookpoint = feature["hookpoint"]
        free = np.setdiff1d(np.arange(num_latents), np.fromiter(taken[hookpoint], np.int64))
        if len(free) == 0:
            raise ValueError(f"no latent left at {hookpoint} for the random control")
        pool, layer_frequency = free, None
        if frequency is not None and "source" in feature:
            layer_frequency = frequency[feature["source"]]
            living = free[layer_frequency[free] > 0]
            if len(living):
                target = float(layer_frequency[feature["feature_idx"]])
                distance = np.abs(layer_frequency[living] - target)
                pool = living[np.argsort(distance, kind="stable")[:nearest]]
        latent = int(rng.choice(pool))
        matched: dict[str, float] = {}
        if layer_frequency is not None:
            matched = {
                "frequency": float(layer_frequency[latent]),
                "feature_frequency": float(layer_frequency[feature["feature_idx"]]),
            }
        taken[hookpoint].add(latent)
        control.append({**feature, "feature_idx": latent, **matched})
    return control


def interventions_for(
    features: Sequence[dict], factor: float, region: str = "decision", op: str = "scale"
) -> list[Intervention]:
    """One intervention per source hookpoint, on the tokens of `region`: each feature scaled by
    `factor` (op scale), or set to `factor` times its `reference` (op clamp)."""
    by_source: dict[str, list[dict]] = {}
    for feature in features:
        by_source.setdefault(feature["hookpoint"], []).append(feature)
    return [
        Intervention(
            "scale" if op == "scale" else "set",
            tuple(f["feature_idx"] for f in chosen),
            layers=hookpoint,
            region=region,
            value=factor if op == "scale" else tuple(clamped(f, factor) for f in chosen),
        )
        for hookpoint, chosen in by_source.items()
    ]


def clamped(feature: dict, factor: float) -> float:
    """The activation `--op clamp` sets `feature` to: `factor` times its typical activation."""
    return factor * feature["reference"]


def mapped_neurons(neuron_map: Sequence[dict], direction: str) -> dict[str, list[int]]:
    """Union of the top neurons of the direction's features, per target MLP."""
    neurons: dict[str, set[int]] = {}
    for entry in neuron_map:
        if entry["feature"]["direction"] != direction:
            continue
        for target in entry["targets"]:
            chosen = {n["neuron_idx"] for n in target["top_mlp_neurons"]}
            neurons.setdefault(target["target_hookpoint"], set()).update(chosen)
    return {hookpoint: sorted(n) for hookpoint, n in neurons.items()}


def feature_controls(
    selected: Mapping[str, Sequence[dict]],
    num_latents: int,
    seed: int,
    frequency: np.ndarray | None = None,
    nearest: int = 5,
) -> dict[str, list[dict]]:
    """The random control of each direction's features (`random_control` with seed + the
    direction's place in DIRECTIONS), never a latent selected for any direction: the good control
    must not steer a bad feature, nor the bad control a good one."""
    everything: dict[str, set[int]] = {}
    for features in selected.values():
        for feature in features:
            everything.setdefault(feature["hookpoint"], set()).add(feature["feature_idx"])
    return {
        direction: random_control(
            selected[direction], num_latents, seed + i, frequency, nearest, everything
        )
        for i, direction in enumerate(DIRECTIONS)
        if direction in selected
    }


def random_neuron_control(
    neurons: dict[str, list[int]],
    sizes: dict[str, int],
    seed: int,
    exclude: Mapping[str, Collection[int]] | None = None,
) -> dict[str, list[int]]:
    """As many random neurons per target MLP as `neurons` lists there (`sizes`: neurons per MLP),
    never one of them nor of `exclude` (per MLP, e.g. the other direction's mapped neurons); each
    MLP's draw has its own seed, derived from `seed`."""
    ordered = sorted(neurons.items())
    seeds = np.random.default_rng(seed).integers(2**31, size=len(ordered)).tolist()
    exclude = exclude or {}
    return {
        hookpoint: sorted(
            random_neurons(
                sizes[hookpoint], len(chosen), [*chosen, *exclude.get(hookpoint, [])], mlp_seed
            )
        )
        for (hookpoint, chosen), mlp_seed in zip(ordered, seeds, strict=True)
    }


def neuron_controls(
    config: SteerConfig,
    all_neurons: dict[str, dict[str, list[int]]],
    sizes: dict[str, int],
    directions: Sequence[str],
) -> dict[str, dict[str, list[int]]]:
    """The random neuron control of each of `directions` (`random_neuron_control`, never a
    neuron mapped for either direction); none unless `neurons_control` is steered, so a model
    with too few unmapped neurons (a tiny one) still steers its features."""
    if "neurons_control" not in steered_kinds(config):
        return {}
    return {
        d: random_neuron_control(
            all_neurons[d], sizes, config.seed + DIRECTIONS.index(d), all_neurons[other]
        )
        for d, other in zip(DIRECTIONS, DIRECTIONS[::-1], strict=True)
        if d in directions
    }


def steered_kinds(config: SteerConfig) -> list[str]:
    """The conditions of `--kinds` that `--op` can steer (clamp: not the neurons ones)."""
    kinds = unique_choices(config.kinds, KINDS, "--kinds")
    return [k for k in kinds if config.op == "scale" or k not in NEURON_KINDS]


def conditions(config: SteerConfig, by_direction: dict[str, list[dict]]) -> list[Condition]:
    kinds = steered_kinds(config)
    result = [Condition("baseline", "baseline", "", 1.0)]
    for direction, features in by_direction.items():
        if not features:
            continue
        for factor in parse_factors(config.factors):
            for kind in kinds:
                name = condition_name(direction, kind, factor, config.op)
                result.append(Condition(name, kind, direction, factor, config.op))
    return result


def typical_activation(out: Path) -> np.ndarray:
    """`[S, L]` mean activation of each latent over the analysed samples where it fires (each
    sample's mean over its firing tokens; feature_stats.npz's good and bad averages weighted by
    how many GOOD and BAD samples it fired in); 0 for a latent that never fired."""
    path = out / outputs.FEATURE_STATS
    if not path.exists():
        raise FileNotFoundError(
            f"--op clamp sets features to a multiple of their typical activation, read from "
            f"{path}, which is missing: run `analyze` first"
        )
    stats = np.load(path)
    result = read_features(out)
    good = stats["good_freq"] * result["total_good_samples"]
    bad = stats["bad_freq"] * result["total_bad_samples"]
    total = stats["good_avg_activation"] * good + stats["bad_avg_activation"] * bad
    return np.divide(total, good + bad, out=np.zeros(total.shape), where=good + bad > 0)


def steer(out: Path, config: SteerConfig, benchmark: str) -> dict:
    unique_choices(config.kinds, KINDS, "--kinds")  # bad flags fail before the model loads
    if config.op not in get_args(SteerOp):
        raise ValueError(f"--op {config.op!r}: use scale or clamp")
    if not steered_kinds(config):
        raise ValueError(
            f"--op clamp steers features only, and --kinds {config.kinds!r} names none: add "
            "features, control or clt_free"
        )
    unique_choices(config.directions, DIRECTIONS, "--directions")
    parse_factors(config.factors)
    check_steer_region(config.region)
    check_limit(config.limit)
    if config.bootstrap < 1:
        raise ValueError(f"--bootstrap {config.bootstrap}: give a positive number of resamples")
    if config.batch_size < 1:
        raise ValueError(f"--batch-size {config.batch_size}: give a positive number of items")
    if not 0 < config.confidence < 1:
        raise ValueError(
            f"--confidence {config.confidence:g}: give a share between 0 and 1, e.g. 0.95"
        )
    result = read_features(out)
    held_out = result.get("split", {}).get("held_out_ids", [])
    if not held_out:
        raise ValueError(
            f"{out / outputs.FEATURES} has no held-out ids; rerun analyze with --held-out-fraction > 0"
        )
    left_out = [k for k in unique_choices(config.kinds, KINDS, "--kinds") if k in NEURON_KINDS]
    if config.op == "clamp" and left_out:
        print(
            f"steer: --op clamp steers features only; leaving out {', '.join(left_out)} "
            "(neurons have no recorded typical activation: steer them with --op scale)"
        )
    reference = typical_activation(out) if config.op == "clamp" else None
    neuron_map = _read_neuron_map(out, config, result["features"])
    run = load_run(out, benchmark, config.coders, config.device)
    hookpoints = list(run.coders.hookpoints)
    if "clt_free" in config.kinds and not getattr(run.coders, "transcode", True):
        raise ValueError(
            "the clt_free condition steers with transcoder weights; these coders are SAEs: "
            "leave it out, e.g. --kinds features,control"
        )
    directions = unique_choices(config.directions, DIRECTIONS, "--directions")
    selected = {
        d: [
            {**f, "source": hookpoints.index(f["hookpoint"])}
            for f in result["features"]
            if f["direction"] == d
        ]
        for d in DIRECTIONS
    }
    by_direction = {d: selected[d] for d in directions}
    replacement = ReplacementModel(run.model, run.coders, mode="error")
    # drawn for both directions whatever --directions says, so a direction's control never
    # changes with the other's presence and holds none of either's selected features
    all_controls = feature_controls(
        selected, replacement.num_latents, config.seed, _firing_frequency(out)
    )
    control = {d: all_controls[d] for d in directions}
    if reference is not None:
        by_direction, control = (
            {d: _with_reference(fs, reference) for d, fs in chosen.items()}
            for chosen in (by_direction, control)
        )
    all_neurons = {d: mapped_neurons(neuron_map or [], d) for d in DIRECTIONS}
    sizes = {
        hookpoint: down_projection(run.model, hookpoint).in_features
        for chosen in all_neurons.values()
        for hookpoint in chosen
    }
    neurons = {d: all_neurons[d] for d in directions}
    neuron_control = neuron_controls(config, all_neurons, sizes, directions)
    adapter = get_adapter(benchmark)
    items = held_out_items(adapter.load_items(run.data, run.recipe), held_out, out)
    items = items[: config.limit]
    rules = Rules(**read_json(out / outputs.CLASSIFICATION, keys=("rules",))["rules"])
    generated: dict[str, dict[str, Any]] = {}
    images: dict[str, str] = {}
    todo = list(conditions(config, by_direction))
    progress = tqdm(total=len(todo) * len(items), desc=f"{benchmark} steer", unit="sample")
    for condition in todo:
        progress.set_postfix_str(condition.name)
        setup = _setup(
            condition, run, replacement, by_direction, control, neurons, neuron_control,
            config.region,
        )  # fmt: skip
        if setup is None:
            progress.update(len(items))
            continue
        folder = out / "steer" / condition.name
        records = _generate(folder, items, run, setup, config, adapter, progress)
        if condition.kind == "baseline":
            images = sample_images(records)
        verdicts = adapter.classify(run.data, records, rules)
        generated[condition.name] = {
            "condition": condition,
            "responses": {r["id"]: r["response"] for r in records},
            "good": {v.id: float(v.good) for v in verdicts},
            "official": _official_metrics(benchmark, folder, out, rules),
            "n_features": len(by_direction.get(condition.direction, [])),
        }
    progress.close()
    report = _report(generated, config, benchmark, len(items), control, images)
    report["control_neurons"] = neuron_control
    report["feature_region"] = result.get("parameters", {}).get("region")
    report["steer_region"] = config.region
    if reference is not None:
        report["clamped_features"] = {
            d: [{key: f[key] for key in ("layer", "feature_idx", "hookpoint", "reference")}
                for f in fs]
            for d, fs in by_direction.items()
        }  # fmt: skip
    name = report_name(config.op)
    outputs.write_json(out / name, report)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    plot_steering(report, plots / name.replace(".json", ".png"))
    return report


def _with_reference(features: Sequence[dict], reference: np.ndarray) -> list[dict]:
    """The features, each with its typical activation (`reference`, for --op clamp); a note
    names those that never fired in the analysed samples, which clamping can only zero."""
    result = [{**f, "reference": float(reference[f["source"], f["feature_idx"]])} for f in features]
    silent = [f"{f['hookpoint']}:{f['feature_idx']}" for f in result if f["reference"] == 0]
    if silent:
        print(
            f"steer: {', '.join(silent)} never fired in the analysed samples: no typical "
            "activation, so --op clamp sets them to 0"
        )
    return result


def held_out_items(items: Sequence, held_out: Sequence[str], out: Path) -> list:
    """The benchmark items that are held-out samples of features.json, in item order; none is an
    error and a missing share is noted (the data flags of capture.json changed since analyze, or
    the benchmark's data did)."""
    wanted = set(held_out)
    chosen = [item for item in items if item.id in wanted]
    missing = len(wanted) - len(chosen)
    if not chosen:
        raise ValueError(
            f"none of the {len(wanted)} held-out ids of {out / outputs.FEATURES} (e.g. "
            f"{sorted(wanted)[:3]}) is an item of the data in {out / outputs.CAPTURE}: the data "
            "flags or files changed since capture and analyze; run them again on this data"
        )
    if missing:
        print(
            f"steer: {missing} of the {len(wanted)} held-out ids of {out / outputs.FEATURES} are "
            f"not items of the data in {out / outputs.CAPTURE}; steering the other {len(chosen)}"
        )
    return chosen


@dataclass
class Setup:
    """How to generate one condition: the replacement model + interventions, or hooks."""

    replacement: ReplacementModel | None
    interventions: list[Intervention]
    hooks: Callable[[], AbstractContextManager]
    spec: dict


def _setup(
    condition: Condition,
    run: Run,
    replacement: ReplacementModel,
    by_direction: dict[str, list[dict]],
    control: dict[str, list[dict]],
    neurons: dict[str, dict[str, list[int]]],
    neuron_control: dict[str, dict[str, list[int]]],
    region: str,
) -> Setup | None:
    kind, factor = condition.kind, condition.factor
    features = by_direction.get(condition.direction, [])
    spec: dict[str, Any] = {**asdict(condition)}
    if condition.op == "scale":  # as condition.json was before --op, so those folders are kept
        del spec["op"]
    if kind == "baseline":
        return Setup(None, [], nullcontext, spec)
    spec["region"] = region  # steered tokens
    match kind:
        case "features" | "control":
            chosen = features if kind == "features" else control[condition.direction]
            spec["features"] = [(f["hookpoint"], f["feature_idx"]) for f in chosen]
            if condition.op == "clamp":
                spec["values"] = [clamped(f, factor) for f in chosen]
            edits = interventions_for(chosen, factor, region, condition.op)
            return Setup(replacement, edits, nullcontext, spec)
        case "neurons" | "neurons_control":
            scaled = (neurons if kind == "neurons" else neuron_control)[condition.direction]
            if not scaled:
                return None
            spec["neurons"] = scaled
            return Setup(None, [], lambda: scale_neurons(run.model, scaled, factor, region), spec)
        case "clt_free":
            steered = [
                SteeredFeature(f["hookpoint"], f["feature_idx"], factor)
                if condition.op == "scale"
                else SteeredFeature(f["hookpoint"], f["feature_idx"], clamped(f, factor), "set")
                for f in features
            ]
            steerer = FeatureSteerer.from_coders(run.coders, steered)
            spec["features"] = [(f.hookpoint, f.feature_idx) for f in steered]
            if condition.op == "clamp":  # as features': new typical activations generate it again
                spec["values"] = [f.value for f in steered]
            return Setup(None, [], lambda: steerer.attach(run.model, region), spec)
        case other:
            raise ValueError(f"Unknown steering condition '{other}'")


def _generate(
    folder: Path,
    items: list,
    run: Run,
    setup: Setup,
    config: SteerConfig,
    adapter: Adapter,
    progress: tqdm,
) -> list[dict]:
    """The condition's response records, generated unless its folder already holds them;
    `progress` counts the items."""
    spec = {**setup.spec, "ids": [item.id for item in items], "model": run.settings.get("model")}
    spec = json.loads(json.dumps(spec))  # as condition.json reads back (tuples become lists)
    done = folder / "condition.json"
    if not config.force and done.exists() and read_json(done) == spec:
        progress.update(len(items))
        return outputs.read_append_log(folder / outputs.RESPONSES)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    records = []
    with setup.hooks():
        for start in range(0, len(items), config.batch_size):
            batch = items[start : start + config.batch_size]
            prompts = [run.recipe.format_prompt(item.question, run.processor) for item in batch]
            generations = generate_batch(
                run.model,
                run.processor,
                [open_image(item.image) for item in batch],
                prompts,
                replacement=setup.replacement,
                interventions=setup.interventions,
                max_new_tokens=run.settings.get("max_new_tokens", 32),
            )
            for item, generation in zip(batch, generations, strict=True):
                records.append({"id": item.id, "response": generation.response, **item.fields})
            progress.update(len(batch))
    outputs.write_atomic(folder / outputs.RESPONSES, "".join(json.dumps(r) + "\n" for r in records))
    adapter.write_official(records, folder / adapter.OFFICIAL_FILE)
    outputs.write_json(done, spec)
    return records


def _official_metrics(benchmark: str, folder: Path, out: Path, rules: Rules) -> dict | None:
    """The benchmark's own `score --out` on the condition's folder, with the label files classify
    took the labels from (POPE `--questions-dir`); `{"error"}` if it cannot score."""
    shutil.copy(out / outputs.CAPTURE, folder / outputs.CAPTURE)
    labels = ["--questions-dir", rules.questions_dir] if rules.questions_dir else []
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            score = stage_module(benchmark, "score")
            score.main(["--out", str(folder), *labels], benchmark=benchmark)
    except (SystemExit, ValueError, FileNotFoundError) as err:
        return {"error": str(err)}
    return read_json(folder / outputs.METRICS)


def _firing_frequency(out: Path) -> np.ndarray | None:
    """`[S, L]` share of the analysed samples each latent fires in (feature_stats.npz), if present:
    good_freq and bad_freq weighted by the GOOD and BAD sample counts of features.json (their plain
    sum would rate a latent of every BAD sample as frequent as one of every GOOD sample, however
    few the BAD ones)."""
    path = out / outputs.FEATURE_STATS
    if not path.exists():
        print(f"steer: no {path}; the random control is drawn without matching firing frequency")
        return None
    stats = np.load(path)
    result = read_features(out)
    n_good, n_bad = result["total_good_samples"], result["total_bad_samples"]
    fired = stats["good_freq"] * n_good + stats["bad_freq"] * n_bad
    return fired / max(n_good + n_bad, 1)


def _read_neuron_map(out: Path, config: SteerConfig, features: list[dict]) -> list[dict] | None:
    """neuron_map.json, when it maps exactly the `features` of features.json (refused when the
    neurons conditions would use a map of other features, e.g. made before analyze ran again)."""
    path = out / outputs.NEURON_MAP
    wanted = set(NEURON_KINDS) & set(steered_kinds(config))
    if not path.exists():
        if wanted:
            print(f"steer: no {path}; skipping the neurons condition (run `map` first)")
        return None
    neuron_map = read_json(path)

    def keys(listed: list[dict]) -> list[tuple]:
        return sorted((f["hookpoint"], f["feature_idx"], f["direction"]) for f in listed)

    if keys([entry["feature"] for entry in neuron_map]) == keys(features):
        return neuron_map
    if wanted:
        raise ValueError(
            f"{path} maps other features than {out / outputs.FEATURES} (analyze ran after map): "
            "run `map` again, or leave the neurons conditions out "
            "(--kinds features,control,clt_free)"
        )
    return None


def _report(
    generated: dict[str, dict[str, Any]],
    config: SteerConfig,
    benchmark: str,
    n_items: int,
    control: dict[str, list[dict]],
    images: dict[str, str],
) -> dict:
    base = generated["baseline"]
    ids = list(base["good"])
    base_scores = [base["good"][i] for i in ids]
    # whole images are resampled: the held-out split is by image, and one image's samples are
    # not independent (a sample without an image is a group of its own)
    groups = [images.get(i, f"id:{i}") for i in ids]

    def delta(scores: dict[str, float], reference: list[float]) -> dict:
        treated = [scores[i] for i in ids]
        return paired_bootstrap(
            reference, treated, config.bootstrap, config.confidence, config.seed, groups
        ).to_json()

    report: dict[str, Any] = {
        "benchmark": benchmark,
        "metric": "good_rate",
        "op": config.op,
        "metric_definition": "share of held-out samples GOOD under classification.json's rules",
        "held_out_samples": n_items,
        "factors": parse_factors(config.factors),
        "bootstrap": {
            "resamples": config.bootstrap,
            "confidence": config.confidence,
            "seed": config.seed,
            "paired": True,
            "resampled": "images",
            "groups": len(set(groups)),
            "warning": few_images_warning(len(set(groups))),
        },  # fmt: skip
        "baseline": {
            "good_rate": float(np.mean(base_scores)) if ids else 0.0,
            "n": len(ids),
            "official": base["official"],
        },  # fmt: skip
        **{kind: [] for kind in KINDS},
        "control_features": {
            d: [
                {
                    key: f[key]
                    for key in (
                        "layer",
                        "feature_idx",
                        "hookpoint",
                        "frequency",
                        "feature_frequency",
                        "reference",
                    )
                    if key in f
                }
                for f in fs
            ]  # fmt: skip
            for d, fs in control.items()
        },
    }
    for name, entry in generated.items():
        condition: Condition = entry["condition"]
        if condition.kind == "baseline":
            continue
        scores = entry["good"]
        row: dict[str, Any] = {
            "name": name,
            "direction": condition.direction,
            "factor": condition.factor,
            "n_features": entry["n_features"],
            "good_rate": float(np.mean([scores[i] for i in ids])) if ids else 0.0,
            "delta_vs_baseline": delta(scores, base_scores),
            "changed_responses": sum(entry["responses"][i] != base["responses"][i] for i in ids),
            "official": entry["official"],
        }
        direction, factor, op = condition.direction, condition.factor, condition.op
        twin = condition_name(direction, CONTROL_OF.get(condition.kind, ""), factor, op)
        if condition.kind in CONTROL_OF and twin in generated:
            control_scores = [generated[twin]["good"][i] for i in ids]
            row["delta_vs_control"] = delta(scores, control_scores)
        features = condition_name(direction, "features", factor, op)
        if condition.kind == "clt_free" and features in generated:
            same = [entry["responses"][i] == generated[features]["responses"][i] for i in ids]
            row["same_responses_as_features"] = float(np.mean(same)) if ids else 1.0
        report[condition.kind].append(row)
    return report


def few_images_warning(groups: int) -> str | None:
    """What the intervals are worth when they resample fewer than FEW_GROUPS images."""
    if groups == 1:
        return "one image: the intervals say nothing about other images"
    if 1 < groups < FEW_GROUPS:
        return (
            f"only {groups} images: percentile intervals from fewer than {FEW_GROUPS} resampled "
            "images are unreliable (too narrow); hold out more images (analyze "
            "--held-out-fraction) or read the intervals as rough"
        )
    return None


def format_table(report: dict) -> str:
    base = report["baseline"]
    groups = report["bootstrap"].get("groups", base["n"])
    lines = [
        f"steer {report['benchmark']} ({_op_text(report.get('op', 'scale'))}): "
        f"{report['held_out_samples']} held-out samples, metric "
        f"GOOD rate, baseline {base['good_rate']:.3f}; deltas with "
        f"{report['bootstrap']['confidence']:.0%} paired bootstrap intervals over "
        f"{groups} images"
        + (f"\nwarning: {warning}" if (warning := few_images_warning(groups)) else ""),
        f"{'condition':<26}{'factor':>7}{'rate':>8}{'delta':>9}  {'interval':<19}{'changed':>8}"
        f"  {'vs control':<26}",
    ]
    for kind in KINDS:
        for row in report[kind]:
            d = row["delta_vs_baseline"]
            interval = f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
            lines.append(
                f"{row['name']:<26}{row['factor']:>7g}{row['good_rate']:>8.3f}"
                f"{d['delta']:>+9.3f}  {interval:<19}{row['changed_responses']:>8}"
                f"  {_delta_text(row.get('delta_vs_control'))}"
            )
    return "\n".join(lines)


def _op_verb(op: str) -> str:
    return "scaled" if op == "scale" else "clamped (x typical activation)"


def _op_text(op: str) -> str:
    return "features scaled by the factor" if op == "scale" else (
        "features clamped to the factor x their typical activation"
    )  # fmt: skip


def _delta_text(delta: dict | None) -> str:
    if delta is None:
        return ""
    return f"{delta['delta']:+.3f} [{delta['ci_low']:+.3f}, {delta['ci_high']:+.3f}]"


def measured_points(
    rows: Sequence[dict], factors: Sequence[float]
) -> tuple[list[float], list[float], list[float], list[float]]:
    """(x position, delta, lower error, upper error) of the rows' factors among `factors`."""
    by_factor = {row["factor"]: row["delta_vs_baseline"] for row in rows}
    points = [(x, by_factor[f]) for x, f in enumerate(factors) if f in by_factor]
    return (
        [float(x) for x, _ in points],
        [d["delta"] for _, d in points],
        [d["delta"] - d["ci_low"] for _, d in points],
        [d["ci_high"] - d["delta"] for _, d in points],
    )


def plot_steering(report: dict, path: Path, dpi: int = 120) -> Path:
    """GOOD-rate delta vs factor per direction, for each condition and its random control.
    Only measured factors get points; the baseline (the unedited model: x1 when scaling, zero by
    definition) is the line at 0."""
    present = {row["direction"] for kind in KINDS for row in report[kind]}
    directions = [d for d in ("good", "bad") if d in present]
    factors = sorted(report["factors"])
    plt = pyplot()
    fig, axes = plt.subplots(
        1, max(len(directions), 1), figsize=(6.5 * max(len(directions), 1), 4.5), squeeze=False
    )
    kinds = [k for k in KINDS if report[k]]
    for ax, direction in zip(axes[0], directions, strict=False):
        reference = "x1" if report.get("op", "scale") == "scale" else "no edit"
        ax.axhline(0, color="black", lw=0.8, label=f"baseline ({reference}, reference)")
        for i, kind in enumerate(kinds):
            rows = [r for r in report[kind] if r["direction"] == direction]
            xs, ys, low, high = measured_points(rows, factors)
            xs = [x + (i - (len(kinds) - 1) / 2) * 0.1 for x in xs]
            ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, color=COLORS[kind],
                        ls="--" if kind in ("clt_free", *CONTROL_OF.values()) else "-",
                        label=kind.replace("_", " "))  # fmt: skip
        ax.set_xticks(range(len(factors)), [f"x{f:g}" for f in factors])
        ax.set_xlabel(
            "scale factor" if report.get("op", "scale") == "scale"
            else "clamp factor (x typical activation)"
        )  # fmt: skip
        ax.set_ylabel("GOOD rate - baseline")
        ax.set_title(f"steering {direction.upper()} features")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    base = report["baseline"]
    good = round(base["good_rate"] * base["n"])
    fig.suptitle(
        f"{report['benchmark']}: {report['held_out_samples']} held-out samples ({good} GOOD / "
        f"{base['n'] - good} BAD at baseline)\nfeatures from region "
        f"{report.get('feature_region')}, {_op_verb(report.get('op', 'scale'))} at "
        f"{report.get('steer_region', 'all')} tokens, "
        f"{report['bootstrap']['confidence']:.0%} CI"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path
