"""`python -m benchmarks BENCH analyze --out DIR`: rank features that separate GOOD from BAD.

Reads `DIR/store/` (feature store), `DIR/classification.json` (`{"GOOD": [{"id", ...}],
"BAD": [...]}`) and, when present, `DIR/store/attributions.safetensors`; writes
`DIR/features.json` (selected features, seed's keys plus direction, significance and split) and
`DIR/feature_stats.npz` (every statistic for every (layer, latent), for plots).
Only the train split of the samples is used; the held-out ids are listed for `steer`. The split
is by image (each sample's image from `DIR/responses.jsonl`), so no image is on both sides.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from safetensors import safe_open

from benchmarks import outputs
from benchmarks.bootstrap import FEW_GROUPS
from benchmarks.influence import (
    BAD,
    GOOD,
    FiringCounts,
    benjamini_hochberg,
    feature_scores,
    fisher_exact,
    group_means,
    round_robin,
)
from benchmarks.splits import Split, sample_images, split_ids
from benchmarks.stages import stage_parser
from benchmarks.store import INDEX, FeatureStore
from vlm_sparsify.files import read_json

Region = Literal["decision", "response", "prompt", "image", "all"]
"""Token regions of attribute and analyze (`decision`: the positions that predict the response)."""
RankBy = Literal["goodness", "attribution"]
ANALYSIS_VERSION = 6
"""Recorded in features.json; raised whenever the split, the statistics or the recorded keys
change (2: split by image; 3: zero-valued top-k slots do not count as firing; 4:
Benjamini-Hochberg over the features that fire; 5: --rank-by attribution ranks GOOD minus BAD
attribution; 6: `layers` lists every analysed layer), so that an older features.json is
recomputed rather than taken as up to date."""
CHUNK_BINS = 1 << 17
"""Samples per accumulation chunk: about this many / num_latents (bins that fit in cache)."""


@dataclass
class AnalyzeConfig:
    """Feature influence analysis over the train split (docs/benchmarks.md)."""

    out: str
    """Output folder of the benchmark run (holds store/ and classification.json)."""
    region: Region = "decision"
    """Token region whose features are analysed; `decision`: the positions that predict the
    response tokens (the last prompt token and every response token but the last)."""
    target_features: int = 50
    """Features to select per direction."""
    min_per_layer: int = 1
    """Each layer gets at least this many (when it has candidates), even beyond the target."""
    direction: Literal["good", "bad", "both"] = "both"
    """Select features that fire more in GOOD samples, in BAD samples, or both lists."""
    rank_by: RankBy = "goodness"
    """Rank by goodness / badness score, or by mean attribution over GOOD minus over BAD samples
    (good features; the reverse for bad ones; needs attributions)."""
    eps: float = 0.01
    """Added to the denominators of the ratios (a share of samples)."""
    fdr: float = 0.05
    """Benjamini-Hochberg false-discovery rate for `significant`."""
    significant_only: bool = False
    """Select only features significant at --fdr."""
    held_out_fraction: float = 0.2
    """Share of samples held out for steering (never used for selection)."""
    split_seed: int = 0
    """Seed of the hash-based train / held-out split (by image: all samples of an image land on
    the same side)."""
    force: bool = False
    """Recompute even when features.json is up to date."""


def parse_config(argv: list[str], benchmark: str = "BENCH") -> AnalyzeConfig:
    """The flags given; those not given as recorded in OUT/features.json's `parameters` (so analyze
    alone after `all` keeps all's settings), else the defaults above."""
    config = stage_parser(benchmark, "analyze", AnalyzeConfig).parse_args(argv).config
    recorded = recorded_parameters(Path(config.out) / outputs.FEATURES)
    if not recorded:
        return config
    recorded_config = replace(AnalyzeConfig(out=config.out), **recorded)
    config = (
        stage_parser(benchmark, "analyze", AnalyzeConfig, recorded_config).parse_args(argv).config
    )
    default = AnalyzeConfig(out=config.out)
    kept = [
        f"{k}={v}" for k, v in recorded.items() if getattr(default, k) != v == getattr(config, k)
    ]
    if kept:
        print(f"analyze: as recorded in {config.out}/{outputs.FEATURES}: {', '.join(kept)}")
    return config


def recorded_parameters(path: Path) -> dict:
    """The `parameters` of an earlier features.json that are still AnalyzeConfig fields."""
    if not path.exists():
        return {}
    recorded = read_json(path, keys=()).get("parameters", {})
    names = {f.name for f in fields(AnalyzeConfig)} - {"out", "force"}
    return {key: value for key, value in recorded.items() if key in names}


def check_config(config: AnalyzeConfig) -> None:
    """Values the statistics cannot take (a negative eps flips or blows up every ratio), refused
    before they reach features.json, whose parameters later runs take as their defaults."""
    if not config.eps > 0:
        raise ValueError(f"--eps {config.eps:g}: give a positive share of samples, e.g. 0.01")
    if not 0 < config.fdr <= 1:
        raise ValueError(f"--fdr {config.fdr:g}: give a rate between 0 and 1, e.g. 0.05")
    for flag, value in (("--target-features", config.target_features),
                        ("--min-per-layer", config.min_per_layer)):  # fmt: skip
        if value < 0:
            raise ValueError(f"{flag} {value}: give 0 or more")
    if not 0 <= config.held_out_fraction < 1:
        raise ValueError(
            f"--held-out-fraction {config.held_out_fraction:g}: give a share from 0 up to 1 "
            "(excluded), e.g. 0.2"
        )


def main(argv: list[str], benchmark: str) -> None:
    config = parse_config(argv, benchmark)
    check_config(config)
    out = Path(config.out)
    target = out / outputs.FEATURES
    if not config.force and _up_to_date(target, config, out):
        print(f"analyze: {target} is up to date (--force to recompute)")
        return
    start = time.perf_counter()
    result = analyze(out, config, dataset=benchmark)
    _write_json(target, result)
    counts = result["layer_distribution"]
    print(
        f"analyze: {result['selected_features_count']} features from "
        f"{result['total_good_samples']} GOOD / {result['total_bad_samples']} BAD train samples, "
        f"{sum(f['significant'] for f in result['features'])} significant at FDR {config.fdr} "
        f"(of {result['features_tested']} features that fire), "
        f"{len(counts)} layers; {time.perf_counter() - start:.1f} s -> {target}"
    )


MIN_GROUP = 10
"""Train samples per group (GOOD, BAD) below which analyze warns that its figures are noise."""


def small_groups_warning(n_good: int, n_bad: int) -> str | None:
    """A warning when either group has fewer than MIN_GROUP train samples: a firing rate over
    a handful of samples moves by a large step per sample, and Fisher's test cannot reach a
    small p-value (with one BAD sample, no p-value is below 1 / (n_good + 1))."""
    small = [f"{n} {name}" for n, name in ((n_good, "GOOD"), (n_bad, "BAD")) if n < MIN_GROUP]
    if not small:
        return None
    return (
        f"only {' and '.join(small)} train samples (of {n_good} GOOD / {n_bad} BAD): the "
        "selected features rest on too few samples to mean much and none is likely to be "
        "significant; capture more items (--limit) or relax the classify rules"
    )


CONFOUNDED_SHARES = 0.5
"""GOOD shares of two kinds of sample (classify's groups) further apart than this, each over at
least MIN_GROUP train samples, make analyze warn that kind and GOOD / BAD are confounded."""


def kinds_confound_warning(train_group: dict[str, int], kinds: dict[str, str]) -> str | None:
    """A warning when the train samples' GOOD share differs by more than CONFOUNDED_SHARES
    between kinds (AMBER's dimensions, easy-VQA's kinds, POPE's splits): a feature that tells
    the kinds apart (a caption prompt from a yes/no question) then separates GOOD from BAD too."""
    by_kind: dict[str, list[int]] = {}
    for sample_id, group in train_group.items():
        if sample_id in kinds:
            by_kind.setdefault(kinds[sample_id], []).append(group)
    shares = {
        kind: sum(group == GOOD for group in members) / len(members)
        for kind, members in by_kind.items()
        if len(members) >= MIN_GROUP
    }
    if len(shares) < 2 or max(shares.values()) - min(shares.values()) <= CONFOUNDED_SHARES:
        return None
    listed = ", ".join(
        f"{kind} {sum(g == GOOD for g in by_kind[kind])}/{sum(g == BAD for g in by_kind[kind])}"
        for kind in sorted(shares, key=lambda kind: shares[kind])
    )
    return (
        f"GOOD / BAD train samples by kind ({listed}): the kinds' GOOD shares differ so much that "
        "features telling the kinds apart rank as GOOD / BAD features; to compare like with like, "
        "capture one kind into its own --out (AMBER --subset generative or discriminative, "
        "easy-VQA --kinds, POPE --splits)"
    )


def analyze(out: Path, config: AnalyzeConfig, dataset: str) -> dict:
    store = FeatureStore(out / outputs.STORE)
    groups, kinds = _read_classification(out / outputs.CLASSIFICATION)
    stored = store.ids()
    labelled = [sample_id for sample_id in stored if sample_id in groups]
    if not labelled:
        raise ValueError(
            f"no sample of {out / outputs.CLASSIFICATION} is in the feature store {store.path}; "
            "run capture and classify on the same --out"
        )
    responses = outputs.read_append_log(out / outputs.RESPONSES)
    answered = {str(record["id"]) for record in responses}
    # a stored sample without a response line is one an interrupted capture will redo
    unlabelled = [
        sample_id for sample_id in stored if sample_id in answered and sample_id not in groups
    ]
    if unlabelled:
        raise ValueError(
            f"{len(unlabelled)} of the {len(answered)} captured samples have no GOOD / BAD label "
            f"in {out / outputs.CLASSIFICATION} (first: {', '.join(unlabelled[:3])}): capture "
            f"added them after classify ran; run classify --out {out} again"
        )
    images = sample_images(responses)
    split = split_ids(labelled, config.held_out_fraction, config.split_seed, images)
    if split.group_by != "image" and config.held_out_fraction > 0:
        print(
            f"analyze: {sum(s not in images for s in labelled)} samples name no image in "
            f"{out / outputs.RESPONSES}: each is split on its own (group_by {split.group_by})"
        )
    held_images = {images.get(s, s) for s in split.held_out}
    if config.held_out_fraction > 0 and len(held_images) < 2:
        print(
            f"analyze: warning: the held-out split holds {len(split.held_out)} samples of "
            f"{len(held_images)} image(s): steer would have {'nothing' if not held_images else 'one image'} "
            "to judge its features on; capture more items or raise --held-out-fraction"
        )
    elif config.held_out_fraction > 0 and len(held_images) < FEW_GROUPS:
        print(
            f"analyze: warning: the held-out split holds {len(split.held_out)} samples of "
            f"{len(held_images)} images: steer's bootstrap intervals from fewer than {FEW_GROUPS} "
            "images are unreliable; capture more items or raise --held-out-fraction"
        )
    train_group = {sample_id: groups[sample_id] for sample_id in split.train}
    n_bad = sum(group == BAD for group in train_group.values())
    if not n_bad or n_bad == len(train_group):
        raise ValueError(
            f"the train split holds {len(train_group) - n_bad} GOOD and {n_bad} BAD samples: "
            "separating the two needs both; capture more items or change the classify rules"
        )
    few = small_groups_warning(len(train_group) - n_bad, n_bad)
    if few:
        print(f"analyze: warning: {few}")
    confound = kinds_confound_warning(train_group, kinds)
    if confound:
        print(f"analyze: warning: {confound}")
    counts = firing_counts(store, train_group, config.region)
    stats = feature_scores(counts, config.eps)
    stats["p_value"] = fisher_exact(
        counts.fired[GOOD],
        int(counts.n_samples[GOOD]),
        counts.fired[BAD],
        int(counts.n_samples[BAD]),
    )
    tested = (counts.fired[GOOD] + counts.fired[BAD]) >= 1
    stats["q_value"] = benjamini_hochberg(stats["p_value"], tested)
    attributions = out / outputs.STORE / outputs.ATTRIBUTIONS
    attribution_region = None
    if attributions.exists():
        attribution_region, attributed = read_attribution_meta(attributions)
        if config.rank_by == "attribution" and attribution_region != config.region:
            raise ValueError(
                f"--rank-by attribution with --region {config.region}, but {attributions} sums "
                f"region {attribution_region}; run `attribute --region {config.region} --force`"
            )
        missing = set(train_group) - set(attributed)
        if missing:
            lacks = (
                f"{attributions} lacks {len(missing)} of the {len(train_group)} train samples "
                f"(e.g. {sorted(missing)[0]}; attribute ran with --limit?)"
            )
            if config.rank_by == "attribution":
                raise ValueError(f"{lacks}: run attribute again")
            # a mean over the attributed part is not the train mean features.json promises
            print(f"analyze: {lacks}: its attributions are left out; run attribute again")
            attribution_region = None
        else:
            stats.update(attribution_stats(attributions, train_group, counts.fired.shape[1:]))
    elif config.rank_by == "attribution":
        raise FileNotFoundError(
            f"--rank-by attribution needs {attributions}: run `attribute` first"
        )
    _write_npz(out / outputs.FEATURE_STATS, stats)
    selected = select_features(stats, config)
    layers = layer_numbers(store.meta.hookpoints)
    features = [
        _feature_json(stats, layer, latent, direction, layers, store.meta.hookpoints, config.fdr)
        for direction, picks in selected.items()
        for layer, latent in picks
    ]
    distribution: dict[str, int] = {}
    for feature in features:
        distribution[str(feature["layer"])] = distribution.get(str(feature["layer"]), 0) + 1
    return {
        "dataset": dataset,
        "total_good_samples": int(counts.n_samples[GOOD]),
        "total_bad_samples": int(counts.n_samples[BAD]),
        "total_features_analyzed": int(counts.fired[0].size),
        "features_tested": int(tested.sum()),
        "selected_features_count": len(features),
        "layers": layers,
        "layer_distribution": distribution,
        "features": features,
        "split": _split_json(split, groups),
        "parameters": _parameters(config),
        "attribution_region": attribution_region,
        "analysis_version": ANALYSIS_VERSION,
    }


def firing_counts(store: FeatureStore, sample_group: dict[str, int], region: str) -> FiringCounts:
    """Accumulate firing statistics of the samples in `sample_group`, shard by shard."""
    meta = store.meta
    counts = FiringCounts.zeros(len(meta.hookpoints), meta.num_latents)
    per_chunk = max(1, CHUNK_BINS // meta.num_latents)
    for shard in store.shards(sample_group):
        for first in range(0, len(shard.records), per_chunk):
            records = shard.records[first : first + per_chunk]
            sample_rows = [record.rows(region) + record.start for record in records]
            rows = np.concatenate(sample_rows)
            row_sample = np.repeat(np.arange(len(records)), [len(r) for r in sample_rows])
            groups = np.array([sample_group[record.id] for record in records])
            counts.add(shard.indices(rows), shard.values(rows), row_sample, groups)
    return counts


def read_attribution_meta(path: Path) -> tuple[str, list[str]]:
    """The region an attributions file sums over (`all` in files written before it was recorded,
    when `all` was attribute's only default) and the samples it covers, in its order."""
    with safe_open(path, framework="numpy") as file:
        meta = file.metadata()
    return meta.get("region", "all"), [str(sample_id) for sample_id in json.loads(meta["ids"])]


def attribution_stats(
    path: Path, sample_group: dict[str, int], shape: tuple[int, int]
) -> dict[str, np.ndarray]:
    """Mean attribution per (layer, latent) over GOOD, BAD and all train samples."""
    with safe_open(path, framework="numpy") as file:
        ids = json.loads(file.metadata()["ids"])
        arrays = {name: file.get_tensor(name) for name in ("sample", "layer", "latent", "value")}
    groups = np.array([sample_group.get(str(sample_id), -1) for sample_id in ids], dtype=np.int64)
    args = (arrays["sample"], arrays["layer"], arrays["latent"], arrays["value"].astype(np.float64))
    by_group = group_means(*args, groups, shape)
    pooled = group_means(*args, np.where(groups >= 0, 0, -1), shape)[0]
    return {
        "attribution_good": by_group[GOOD],
        "attribution_bad": by_group[BAD],
        "attribution": pooled,
    }


def select_features(
    stats: dict[str, np.ndarray], config: AnalyzeConfig
) -> dict[str, list[tuple[int, int]]]:
    """Round-robin selection per direction; a feature belongs to the direction it scores higher in.

    Keys: goodness / badness score, or with `rank_by` attribution the mean attribution over GOOD
    samples minus that over BAD samples (good) and its negative (bad)."""
    if config.rank_by == "attribution":
        # GOOD minus BAD: the attribution pushes towards what the model said, right or wrong, so
        # a feature that supports every answer alike is neither good nor bad
        good_key = stats["attribution_good"] - stats["attribution_bad"]
        bad_key = -good_key
    else:
        good_key, bad_key = stats["goodness_score"], stats["badness_score"]
    allowed = stats["q_value"] <= config.fdr if config.significant_only else True
    directions = ("good", "bad") if config.direction == "both" else (config.direction,)
    selected = {}
    for direction in directions:
        key, other = (good_key, bad_key) if direction == "good" else (bad_key, good_key)
        candidates = allowed & (key > 0) & (key >= other if direction == "good" else key > other)
        scores = np.where(candidates, key, np.nan)
        selected[direction] = round_robin(scores, config.target_features, config.min_per_layer)
    return selected


def layer_numbers(hookpoints: list[str]) -> list[int]:
    """Decoder layer number of each hookpoint (last integer in its name), else its position."""
    numbers = []
    for hookpoint in hookpoints:
        found = re.findall(r"\d+", hookpoint)
        numbers.append(int(found[-1]) if found else -1)
    if len(set(numbers)) != len(numbers) or -1 in numbers:
        return list(range(len(hookpoints)))
    return numbers


def _feature_json(
    stats: dict[str, np.ndarray],
    position: int,
    latent: int,
    direction: str,
    layers: list[int],
    hookpoints: list[str],
    fdr: float,
) -> dict[str, Any]:
    feature: dict[str, Any] = {"layer": layers[position], "feature_idx": latent}
    for name in (
        "goodness_score",
        "badness_score",
        "frequency_ratio",
        "activation_ratio",
        "good_freq",
        "bad_freq",
        "good_avg_activation",
        "bad_avg_activation",
        "p_value",
        "q_value",
        "attribution",
        "attribution_good",
        "attribution_bad",
    ):
        if name in stats:
            feature[name] = float(stats[name][position, latent])
    feature["significant"] = bool(feature["q_value"] <= fdr)
    feature["direction"] = direction
    feature["hookpoint"] = hookpoints[position]
    return feature


def _read_classification(path: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Each sample's label (GOOD / BAD) and its kind (classify's group; written since
    2026-11-27, so an older file gives none)."""
    if not path.exists():
        raise FileNotFoundError(f"missing {path}: run `classify` first")
    data = read_json(path, keys=())
    groups, kinds = {}, {}
    for label, group in (("GOOD", GOOD), ("BAD", BAD)):
        for item in data.get(label, []):
            groups[str(item["id"])] = group
            if "group" in item:
                kinds[str(item["id"])] = str(item["group"])
    return groups, kinds


def _split_json(split: Split, groups: dict[str, int]) -> dict:
    held_out_bad = sum(groups[sample_id] == BAD for sample_id in split.held_out)
    return {
        **split.to_json(),
        "held_out_good": len(split.held_out) - held_out_bad,
        "held_out_bad": held_out_bad,
    }


def _parameters(config: AnalyzeConfig) -> dict:
    return {key: value for key, value in asdict(config).items() if key not in ("out", "force")}


def _up_to_date(target: Path, config: AnalyzeConfig, out: Path) -> bool:
    if not target.exists():
        return False
    inputs = [
        out / outputs.CLASSIFICATION,
        out / outputs.RESPONSES,
        out / outputs.STORE / INDEX,
        out / outputs.STORE / outputs.ATTRIBUTIONS,
    ]
    newest = max((p.stat().st_mtime for p in inputs if p.exists()), default=0.0)
    if target.stat().st_mtime <= newest:
        return False
    recorded = read_json(target, keys=())
    return (
        recorded.get("parameters") == _parameters(config)
        and recorded.get("analysis_version") == ANALYSIS_VERSION
    )


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as file:
        # (as Any: numpy 2's savez also takes allow_pickle, which a dict of arrays cannot fill;
        # passing it would store an array of that name under numpy 1.26)
        np.savez(file, **cast(dict[str, Any], arrays))
    tmp.replace(path)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
