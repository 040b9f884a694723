"""Time `analyze` on a synthetic feature store at LLaVA-7B scale (a benchmark, not a test).

`python -m benchmarks.bench_analyze [--samples 1000] [--tokens 100] [--layers 32]
[--latents 8192] [--k 32]` builds the store in a temporary folder (~410 MB at the defaults),
runs the analyze stage on it and prints the seconds it took and the store's bytes per feature.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import outputs
from benchmarks.stages import analyze
from benchmarks.store import FeatureStore, StoreMeta


def build_synthetic_store(
    out: Path,
    samples: int,
    tokens: int,
    layers: int,
    latents: int,
    k: int,
    samples_per_shard: int = 32,
    seed: int = 0,
) -> None:
    """`out/store/` with random TopK features (prompt = 8 rows, then `tokens` response rows)
    and `out/classification.json` with every other sample GOOD."""
    generator = torch.Generator().manual_seed(seed)
    hookpoints = [f"model.language_model.layers.{i}.mlp" for i in range(layers)]
    store = FeatureStore(out / outputs.STORE, StoreMeta(hookpoints, k, latents))
    rows, prompt = tokens + 8, 8
    for first in range(0, samples, samples_per_shard):
        batch = []
        for i in range(first, min(first + samples_per_shard, samples)):
            indices = torch.randint(0, latents, (rows, layers, k), generator=generator)
            values = torch.rand(rows, layers, k, generator=generator).to(torch.bfloat16)
            regions = {"prompt": [(0, prompt)], "response": [(prompt, rows)]}
            batch.append((f"s{i}", indices, values, regions))
        store.append(batch)
    labels: dict[str, list[dict[str, str]]] = {"GOOD": [], "BAD": []}
    for i in range(samples):
        labels["GOOD" if i % 2 == 0 else "BAD"].append({"id": f"s{i}"})
    (out / outputs.CLASSIFICATION).write_text(json.dumps(labels))


def bench_analyze(
    samples: int = 1000, tokens: int = 100, layers: int = 32, latents: int = 8192, k: int = 32
) -> dict[str, float]:
    """Seconds to build the store and to analyze all its samples (response region, wall and
    process CPU time: the CPU time is what the machine's other load does not inflate), and the
    store's bytes per active feature."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        start = time.perf_counter()
        build_synthetic_store(out, samples, tokens, layers, latents, k)
        built, cpu = time.perf_counter(), time.process_time()
        analyze.main(["--out", tmp, "--force", "--held-out-fraction", "0"], benchmark="synthetic")
        done = time.perf_counter()
        return {
            "build_s": built - start,
            "analyze_s": done - built,
            "analyze_cpu_s": time.process_time() - cpu,
            "bytes_per_active_feature": FeatureStore(
                out / outputs.STORE
            ).bytes_per_active_feature(),
        }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("samples", 1000), ("tokens", 100), ("layers", 32), ("latents", 8192)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--k", type=int, default=32)
    args = parser.parse_args()
    print(json.dumps(bench_analyze(**vars(args)), indent=2))
