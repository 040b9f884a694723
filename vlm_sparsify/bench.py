"""`python -m vlm_sparsify.bench [--json] [--gpu [--parts P,...]] [--quick]`: speed goals, measured.

On the tiny default model (CPU), in one run, each figure against its reference in the same
process, interleaved, after warm-up, as a median:

- `plugin_vs_stock_plt_step`: our PLT training step over stock `sparsify.Trainer`'s;
- `clt_vs_plt_step`: a CLT over every layer vs a PLT of equal width and k (full training step);
- `clt_sharded_vs_data_parallel_step`: that CLT's step over two gloo processes, sharded by layer
  (`--distribute_modules`) vs data parallel (no goal: the cost of the extra collectives);
- `replacement_vs_base_generate`: greedy `generate` of the CLT replacement model over the base
  model's (open-loop; error mode beside it);
- `capture_vs_base_generate`: generation with feature capture on vs off;
- `topk_pruned_vs_torch_prefill` / `_decode`: the inference encoder's exact pruned top-k over
  `torch.topk` at the generation prefill's and a decoding step's row counts;
- `store_bytes_per_active`: bytes on disk per (index, value) pair of a real capture;
- `analyze_7b_s` / `analyze_tiny_s`: the `analyze` stage on synthetic stores;
- `pipeline_vs_pretokenized`: training tokens/s fed by the multimodal pipeline (BatchStream +
  DataLoader worker running the processor) over the same batches pre-tokenized in memory.

`--gpu` measures the LLaVA-1.5-7B-size figures instead (`vlm_sparsify/bench_gpu.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from dataclasses import asdict
from typing import Any

GOALS: dict[str, tuple[str, float]] = {
    "plugin_vs_stock_plt_step": ("<=", 1.10),
    "clt_vs_plt_step": ("<=", 2.0),
    "replacement_vs_base_generate": ("<=", 1.5),
    "replacement_error_vs_base_generate": ("<=", 1.5),
    "store_bytes_per_active": ("<=", 4.5),
    "analyze_7b_s": ("<=", 10.0),
    "pipeline_vs_pretokenized": (">=", 0.95),
}
"""Goal per CPU figure: what each feature may cost over the path it extends (stock sparsify, a PLT,
the base model), so using it stays worth it; the pipeline goal is the GPU one, shown on CPU too."""

GPU_GOALS: dict[str, tuple[str, float]] = {
    "plugin_vs_stock_plt_step": ("<=", 1.10),
    "clt_vs_stock_plt_tok_per_s": (">=", 0.8),
    "replacement_vs_base_generate": ("<=", 1.1),
    "pipeline_vs_pretokenized": (">=", 0.95),
}
"""Goal per `--gpu` figure (LLaVA-1.5-7B size): the same costs at the scale the plugin is for."""

METHODS = {
    "plugin_vs_stock_plt_step": (
        "stock sparsify.Trainer.fit() runs over text-only batches; its dataset runs the "
        "plugin's train_on_batch on each batch when stock fetches it, timed alone; stock's "
        "step (hook-driven forward, coder forward+backward, optimizer step, bookkeeping, batch "
        "fetch) is the time from there to its next fetch: ABAB step by step on identical "
        "batches; first 2 steps of each round dropped; median of per-step ratios"
    ),
    "clt_vs_plt_step": "train_on_batch on one multimodal batch, CLT and PLT alternating per step",
    "clt_sharded_vs_data_parallel_step": (
        "a CLT over every layer (all targets, the bench's width and k, 512 random tokens per "
        "process): forward, backward and gradient sum on two gloo processes, sharded "
        "(--distribute_modules) vs data parallel, alternating per step; rank 0's times"
    ),
    "replacement_vs_base_generate": (
        "benchmark_generate: greedy generate of exactly max_new_tokens, base and replacement "
        "back to back in alternating order, one warm-up each; median over repeats of each "
        "repeat's ratio (details: ratio_of_medians, ratio_min, ratio_max); CLT with the default "
        "decoder (auto: fused on a CPU, hybrid on a GPU with triton); each repeat also times a "
        "one-token generate of both: details give prefill_ratio and per_token_ratio (the later "
        "tokens)"
    ),
    "replacement_fused_vs_base_generate": (
        "--gpu: as replacement_vs_base_generate with decoder='fused': each CLT source decoded "
        "into all its targets by one embedding_bag over a wide copy of its decoders (the CPU's "
        "default; on a GPU the default, auto, is hybrid: the triton kernel in forwards of at "
        "least ReplacementModel.hybrid_min_rows positions, the fused embedding_bag below)"
    ),
    "replacement_triton_vs_base_generate": (
        "--gpu: as replacement_vs_base_generate with decoder='triton': each source decoded "
        "straight into the pending sums by vlm_sparsify.triton_decode"
    ),
    "capture_vs_base_generate": "benchmark_generate with mode=off and capture on (+ pop_samples)",
    "topk_pruned_vs_torch_prefill": (
        "topk_rows vs torch.topk(sorted=False) on ReLU'd Gaussian rows (16 inputs cycled), "
        "alternating per call; rows = the generation prefill's tokens"
    ),
    "topk_pruned_vs_torch_decode": "as the prefill figure, rows = one decoding step's batch",
    "store_bytes_per_active": "FeatureStore.bytes_per_active_feature of a real capture",
    "analyze_7b_s": "benchmarks.bench_analyze: 1000 samples x 108 rows x 32 layers, k=32",
    "pipeline_vs_pretokenized": (
        "tokens/s of PLT training fed by BatchStream + DataLoader worker vs the same batches "
        "pre-tokenized in memory; alternating blocks; first batch of each block untimed"
    ),
}


def goal_status(
    key: str, value: float, goals: dict[str, tuple[str, float]] = GOALS
) -> tuple[str, str]:
    if key not in goals:
        return "", ""
    op, target = goals[key]
    ok = value <= target if op == "<=" else value >= target
    return f"{op} {target:g}", "PASS" if ok else "MISS"


def format_table(results: dict[str, Any], goals: dict[str, tuple[str, float]] = GOALS) -> str:
    rows = [(key, value) for key, value in results.items() if isinstance(value, float)]
    width = max(len(key) for key, _ in rows)
    lines = [f"{'figure':<{width}}  {'value':>9}  {'goal':>8}  status", "-" * (width + 30)]
    for key, value in rows:
        goal, status = goal_status(key, value, goals)
        lines.append(f"{key:<{width}}  {value:>9.3f}  {goal:>8}  {status}")
    machine = results["machine"]
    lines.append("")
    lines.append(
        f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
        f"{machine['date']}, load {machine['load_average_1min']:.1f}"
    )
    lines.append(f"model: {results.get('model', '')}")
    if "--quick" in results.get("command", ""):
        lines.append("--quick: smoke-run sizes; the statuses are not measurements of the goals")
    return "\n".join(lines)


def check_finite(results: dict[str, Any]) -> None:
    bad = [k for k, v in results.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise RuntimeError(f"non-finite benchmark figures: {bad}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from vlm_sparsify.bench_gpu import PARTS as GPU_PARTS

    parser = argparse.ArgumentParser(
        prog="python -m vlm_sparsify.bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--gpu", action="store_true", help="LLaVA-1.5-7B size on a CUDA GPU")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run at small sizes (~20 s on 2 idle cores): checks that every part runs; "
        "its figures are not the measured ones",
    )
    parser.add_argument(
        "--parts",
        default=None,
        help="with --gpu: comma-separated parts to run (default all, in this order: "
        f"{', '.join(GPU_PARTS)}), e.g. stock,clt to measure the CLT's ratio again",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the tiny model's ops are too small to split, and "
        "on a shared machine thread synchronisation dominates and scatters the timings)",
    )
    args = parser.parse_args(argv)
    if args.parts is not None and not args.gpu:
        parser.error("--parts picks parts of --gpu; the CPU figures run together")
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: give a positive number of torch CPU threads")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    # Libraries and stages print progress: keep stdout for the result alone
    with contextlib.redirect_stdout(sys.stderr):
        import torch

        from vlm_sparsify.bench_steps import machine_info

        if not args.gpu:
            torch.set_num_threads(args.threads)

        if args.gpu:
            from vlm_sparsify.bench_gpu import run_gpu

            parts = GPU_PARTS if args.parts is None else [p.strip() for p in args.parts.split(",")]
            results = run_gpu(quick=args.quick, log=log, parts=parts)
        else:
            from vlm_sparsify.bench_cpu import CpuSizes, run_cpu

            sizes = CpuSizes.quick() if args.quick else CpuSizes()
            results = run_cpu(sizes, log)
            results["settings"] = asdict(sizes)
        results["machine"] = machine_info()
    goals = GPU_GOALS if args.gpu else GOALS
    results["goals"] = {key: f"{op} {target:g}" for key, (op, target) in goals.items()}
    results["methods"] = METHODS
    results["command"] = "python -m vlm_sparsify.bench " + " ".join(argv or sys.argv[1:])
    check_finite(results)
    print(json.dumps(results, indent=1) if args.json else format_table(results, goals))
    if results.get("errors"):
        raise SystemExit(f"parts of the benchmark failed: {results['errors']}")
    return results


if __name__ == "__main__":
    main()
