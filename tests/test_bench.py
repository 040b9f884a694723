"""`python -m vlm_sparsify.bench --quick --json` runs and reports every figure (no timing asserts)."""

import json
import math
import os
import subprocess
import sys

import pytest

from vlm_sparsify.bench import GOALS, GPU_GOALS, format_table

FIGURES = (
    "plugin_vs_stock_plt_step",
    "clt_vs_plt_step",
    "clt_sharded_vs_data_parallel_step",
    "replacement_vs_base_generate",
    "replacement_error_vs_base_generate",
    "capture_vs_base_generate",
    "topk_pruned_vs_torch_prefill",
    "topk_pruned_vs_torch_decode",
    "store_bytes_per_active",
    "analyze_7b_s",
    "analyze_tiny_s",
    "pipeline_vs_pretokenized",
)


@pytest.fixture(scope="module")
def quick_run() -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "vlm_sparsify.bench", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(done.stdout)  # stdout holds the JSON object alone


def test_quick_json_has_every_figure(quick_run: dict):
    for key in FIGURES:
        value = quick_run[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    # a TopK capture stores one int16 index and one bf16 value per active feature, plus index
    assert 4.0 <= quick_run["store_bytes_per_active"] < 6.0
    assert set(GOALS) <= set(FIGURES)
    machine = quick_run["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["torch"] and machine["date"]


def test_gpu_flag_fails_fast_without_cuda(capsys):
    import torch

    from vlm_sparsify.bench import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        main(["--gpu", "--json"])
    assert capsys.readouterr().out == ""


def test_gpu_table_uses_the_gpu_goals():
    results = {
        "replacement_vs_base_generate": 1.2,
        "clt_vs_stock_plt_tok_per_s": 0.9,
        "machine": {"cpu": "x", "cores": 1, "torch": "t", "date": "d", "load_average_1min": 0.0},
    }
    table = format_table(results, GPU_GOALS)
    assert "<= 1.1" in table and ">= 0.8" in table
    assert table.count("MISS") == 1 and table.count("PASS") == 1


def test_gpu_measurements_run_at_toy_size_on_the_cpu():
    """`--gpu`'s code path end to end at `GpuSizes.smoke()` (no CUDA kernels: the CPU's)."""
    import torch

    from vlm_sparsify.bench_gpu import GpuSizes, measure_at_size

    results = measure_at_size(GpuSizes.smoke(), torch.device("cpu"), lambda message: None)
    figures = [
        "plugin_vs_stock_plt_step",
        "clt_vs_stock_plt_tok_per_s",
        "replacement_vs_base_generate",
        "replacement_error_vs_base_generate",
        "replacement_fused_vs_base_generate",
        "pipeline_vs_pretokenized",
    ]
    for key in figures:
        value = results[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert set(GPU_GOALS) <= set(results)
    assert "errors" not in results
    assert results["details"]["replacement_fused_vs_base_generate"]["base_s"] > 0


def test_gpu_sizes_fit_the_card():
    """The CLT-16 at 8,192 latents fits an H200 (measured peak 113.8 GiB), an H100 at 4,096."""
    from vlm_sparsify.bench_gpu import GpuSizes, fit_to_memory, training_peak_bytes

    sizes = GpuSizes()
    assert 110 * 2**30 < training_peak_bytes(sizes) < 120 * 2**30
    assert fit_to_memory(sizes, 150_000_000_000).num_latents == 8192  # H200: 140 GiB
    assert fit_to_memory(sizes, 85_000_000_000).num_latents == 4096  # H100 80 GB: 79 GiB
    with pytest.raises(SystemExit, match="needs ~.* GiB even at 2048 latents"):
        fit_to_memory(sizes, 30 * 2**30)


@pytest.mark.parametrize(
    "patched,failed,measured",
    [
        ("benchmark_generate", ["replacement vs base generate"], "clt_vs_stock_plt_tok_per_s"),
        # the CLT training part fails: generation falls back to an untrained CLT of that shape
        ("timed_steps", ["CLT 4 x 128 x cross_layer 2"], "replacement_vs_base_generate"),
    ],
)
def test_a_failing_gpu_part_is_reported_and_the_others_still_run(
    monkeypatch, patched, failed, measured
):
    import torch

    from vlm_sparsify import bench_gpu

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(bench_gpu, patched, out_of_memory)
    results = bench_gpu.measure_at_size(
        bench_gpu.GpuSizes.smoke(), torch.device("cpu"), lambda message: None
    )
    error = "OutOfMemoryError: CUDA out of memory (simulated)"
    assert results["errors"] == dict.fromkeys(failed, error)
    assert results[measured] > 0 and results["pipeline_vs_pretokenized"] > 0
    assert 0 <= results["details"]["pipeline_vs_pretokenized"]["loader_wait_share"] < 1


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="the triton parts on a CPU need triton and TRITON_INTERPRET=1 (make test-triton)",
)
def test_gpu_measurements_time_the_triton_decoders_too():
    import torch

    from vlm_sparsify.bench_gpu import GpuSizes, measure_at_size

    results = measure_at_size(GpuSizes.smoke(), torch.device("cpu"), lambda message: None)
    assert "errors" not in results
    assert results["replacement_triton_vs_base_generate"] > 0


def test_gpu_parts_run_only_the_parts_asked_for():
    import torch

    from vlm_sparsify.bench_gpu import GpuSizes, measure_at_size

    results = measure_at_size(
        GpuSizes.smoke(), torch.device("cpu"), lambda message: None, parts=("stock", "clt")
    )
    assert results["clt_vs_stock_plt_tok_per_s"] > 0 and results["stock_plt_tok_per_s"] > 0
    measured = {key for key, value in results.items() if isinstance(value, float)}
    assert measured == {
        "stock_plt_tok_per_s",
        "stock_plt_peak_gib",
        "clt_tok_per_s",
        "clt_peak_gib",
        "clt_vs_stock_plt_tok_per_s",
    }


def test_gpu_profile_part_records_where_the_time_goes():
    import torch

    from vlm_sparsify.bench_gpu import GpuSizes, measure_at_size

    results = measure_at_size(
        GpuSizes.smoke(), torch.device("cpu"), lambda message: None, parts=("profile",)
    )
    assert "errors" not in results
    found = results["details"]["profile"]
    for name in ("clt_step", "base_generate", "open_loop_generate"):
        profile = found[name]
        assert profile["wall_ms"] > 0 and profile["time_of"] == "cpu"
        assert profile["device_kernels"] is None  # counted on a GPU only
        top = profile["top"]
        most = 40 if name == "clt_step" else 15  # the training step's breakdown in more detail
        assert 0 < len(top) <= most and all(row["calls"] >= 1 for row in top)
        assert [row["ms"] for row in top] == sorted((row["ms"] for row in top), reverse=True)
    assert found["new_tokens"] == 2


def test_kernel_profile_counts_calls_and_ranks_ops_by_time():
    import torch

    from vlm_sparsify.bench_steps import kernel_profile

    a = torch.randn(256, 256)

    def run():
        for _ in range(3):
            a @ a
        a.add(1)

    profile = kernel_profile(run, torch.device("cpu"), top=50)
    calls = {row["name"]: row["calls"] for row in profile["top"]}
    assert calls["aten::mm"] == 3 and calls["aten::add"] == 1
    assert profile["top"][0]["name"] in ("aten::mm", "aten::matmul")  # the matmuls dominate
    assert profile["wall_ms"] > 0 and profile["self_ms"] > 0


def test_unknown_gpu_parts_and_parts_without_gpu_are_refused(capsys):
    from vlm_sparsify.bench import main

    with pytest.raises(SystemExit, match=r"unknown --parts \['clt-trition'\]; choose from"):
        main(["--gpu", "--parts", "stock,clt-trition"])
    with pytest.raises(SystemExit):
        main(["--parts", "stock"])
    assert "--parts picks parts of --gpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # was torch's RuntimeError traceback from set_num_threads
        main(["--threads", "0"])
    assert "--threads 0: give a positive number" in capsys.readouterr().err


def test_tokens_per_second_counts_the_batches_asked_for_and_the_waits():
    """The clock runs from the first batch's arrival to the last step's end: waits for later
    batches count (and are reported), a pipeline making too few or too many batches is named."""
    import time

    import torch

    from vlm_sparsify.bench_steps import tokens_per_second

    class Trainer:
        def __init__(self) -> None:
            self.seen: list[int] = []

        def train_on_batch(self, batch: dict) -> None:
            self.seen.append(batch["id"])

    def batches(n: int, slow: int | None = None):
        for i in range(n):
            if i == slow:
                time.sleep(0.05)
            yield {"id": i, "token_mask": torch.ones(2, 3, dtype=torch.bool)}

    trainer = Trainer()
    tokens, seconds, waited = tokens_per_second(trainer, batches(3, slow=2), 3, torch.device("cpu"))
    assert trainer.seen == [0, 1, 2] and tokens == 18
    assert 0.05 <= waited <= seconds
    # the first batch's wait (worker start-up) is outside the clock
    _, seconds, waited = tokens_per_second(Trainer(), batches(3, slow=0), 3, torch.device("cpu"))
    assert waited < 0.05 and seconds < 0.05
    with pytest.raises(ValueError, match="the pipeline made 2 batches, 3 expected"):
        tokens_per_second(Trainer(), batches(2), 3, torch.device("cpu"))
    with pytest.raises(ValueError, match="more than the 3 batches expected"):
        tokens_per_second(Trainer(), batches(4), 3, torch.device("cpu"))


def test_paired_ratio_is_the_median_of_the_per_pair_ratios():
    """Each pair's own ratio, then their median: not the mean, not the ratio of the medians."""
    from vlm_sparsify.bench_steps import Paired

    paired = Paired([2.0, 3.0, 10.0], [1.0, 3.0, 2.0])  # pair ratios 2, 1, 5
    assert paired.ratio == 2.0  # mean 8/3, ratio of medians 1.5, reference / candidate 0.5
    assert paired.summary() == {
        "candidate_s": 3.0,
        "reference_s": 2.0,
        "ratio": 2.0,
        "ratio_of_medians": 1.5,
        "n": 3,
    }
    assert Paired([1.0], [2.0]) + Paired([3.0], [4.0]) == Paired([1.0, 3.0], [2.0, 4.0])


def test_alternate_steps_swaps_the_order_each_step_and_drops_the_warm_up():
    """ABBA...: each time goes to its own function whichever ran first; warm-up pairs untimed."""
    import time

    import torch

    from vlm_sparsify.bench_steps import alternate_steps

    calls: list[str] = []

    def candidate() -> None:
        calls.append("c")
        time.sleep(0.01)

    def reference() -> None:
        calls.append("r")

    paired = alternate_steps(candidate, reference, steps=3, warmup=2, device=torch.device("cpu"))
    assert calls == ["c", "r", "r", "c", "c", "r", "r", "c", "c", "r"]
    assert len(paired.candidate) == len(paired.reference) == 3
    assert min(paired.candidate) >= 0.01 > max(paired.reference)


def test_a_figure_exactly_at_its_goal_passes():
    from vlm_sparsify.bench import goal_status

    assert goal_status("clt_vs_plt_step", 2.0) == ("<= 2", "PASS")
    assert goal_status("clt_vs_plt_step", 2.01)[1] == "MISS"
    assert goal_status("pipeline_vs_pretokenized", 0.95) == (">= 0.95", "PASS")
    assert goal_status("pipeline_vs_pretokenized", 0.94)[1] == "MISS"
    assert goal_status("analyze_tiny_s", 1.0) == ("", "")


def test_non_finite_figures_are_refused():
    from vlm_sparsify.bench import check_finite

    check_finite({"a": 1.0, "machine": {"cpu": "x"}})
    with pytest.raises(RuntimeError, match=r"\['b'\]"):
        check_finite({"a": 1.0, "b": float("nan")})


def test_pipeline_blocks_alternate_which_runs_first_after_every_batch_trained_once():
    """Every batch trains once untimed; then live / pretokenized blocks, ABBA by round."""
    import torch

    from vlm_sparsify.bench_steps import pipeline_vs_pretokenized

    seen: list[str] = []

    class Trainer:
        def train_on_batch(self, batch: dict) -> None:
            seen.append(batch["source"])

    def batch(source: str) -> dict:
        return {"source": source, "token_mask": torch.ones(1, 2, dtype=torch.bool)}

    pretokenized = [batch("pre"), batch("pre")]
    paired, _ = pipeline_vs_pretokenized(
        Trainer(), lambda: [batch("live"), batch("live")], pretokenized, 2, torch.device("cpu")
    )
    blocks = [seen[i] for i in range(0, len(seen), 2)]
    assert blocks == ["pre", "live", "pre", "pre", "live"]
    assert len(paired.candidate) == len(paired.reference) == 2
