"""Timing primitives shared by the CPU and GPU benchmarks (`python -m vlm_sparsify.bench`).

Every figure is a ratio against a reference measured in the same process, interleaved with it,
after warm-up, as a median: absolute times on a shared machine drift, ratios much less.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import torch
import transformers
from sparsify import SparseCoderConfig, TrainConfig
from sparsify import Trainer as StockTrainer
from torch import Tensor, nn
from torch.utils.data import Dataset

from vlm_sparsify.coder_io import Coders
from vlm_sparsify.replacement import Decoder, Mode, ReplacementModel
from vlm_sparsify.training import Trainer, build_coders, build_optimizers

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_profile(run: Callable[[], Any], device: torch.device, top: int = 15) -> dict[str, Any]:
    """One call of `run` under torch.profiler: wall time, the number of kernels launched on
    the device (None on a CPU), the ops' summed self time on the device (the CPU's on a CPU),
    and the `top` ops by that time (name, calls, ms): where the time of a step goes."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        run()
        sync(device)
    wall = time.perf_counter() - start
    averages = prof.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    ranked = sorted(averages, key=lambda e: getattr(e, attr), reverse=True)
    kernels = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA) if cuda else None
    return {
        "wall_ms": wall * 1e3,
        "device_kernels": kernels,
        "self_ms": sum(getattr(e, attr) for e in averages) / 1e3,
        "time_of": "device" if cuda else "cpu",
        "top": [
            {"name": e.key[:100], "calls": e.count, "ms": getattr(e, attr) / 1e3}
            for e in ranked[:top]
        ],
    }


def machine_info() -> dict[str, Any]:
    """CPU model, cores, GPU, library versions, date and load (the machine may be shared)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence stock sparsify's prints and progress bars while it is being timed."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


class InterleavedBatches(Dataset):
    """Rows of `input_ids` for stock sparsify's DataLoader. When stock fetches the first row of
    a batch (its previous step has ended), the plugin's step runs on that same batch and is
    timed on its own; stock's step is the time from there to its next batch fetch. So the two
    trainers alternate step by step (ABAB...) on identical batches under identical load."""

    def __init__(
        self, input_ids: Tensor, batch_size: int, device: torch.device, plugin_step: Callable
    ):
        self.input_ids = input_ids
        self.batch_size = batch_size
        self.device = device
        self.plugin_step = plugin_step
        self.stock_times: list[float] = []
        self.plugin_times: list[float] = []
        self._stock_start: float | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        if i % self.batch_size == 0:
            self.boundary(self.input_ids[i : i + self.batch_size])
        return {"input_ids": self.input_ids[i]}

    def boundary(self, ids: Tensor | None) -> None:
        """End stock's running step; run the plugin's step on the next batch."""
        sync(self.device)
        now = time.perf_counter()
        if self._stock_start is not None:
            self.stock_times.append(now - self._stock_start)
        if ids is not None:
            self.plugin_step(ids.to(self.device))
            sync(self.device)
            self.plugin_times.append(time.perf_counter() - now)
        self._stock_start = time.perf_counter()


def relative_hookpoints(model: nn.Module, hookpoints: list[str]) -> list[str]:
    """Our root-model hookpoints as stock sparsify names them (relative to `model.base_model`)."""
    base = model.base_model
    prefix = next(name for name, module in model.named_modules() if module is base)
    return [h.removeprefix(f"{prefix}.") if prefix else h for h in hookpoints]


def train_config(
    batch_size: int, expansion_factor: int, k: int, hookpoints: list[str] | None = None
) -> TrainConfig:
    """PLT settings shared by both trainers: signum, k fixed from step 0, no saving."""
    return TrainConfig(
        SparseCoderConfig(transcode=True, expansion_factor=expansion_factor, k=k),
        batch_size=batch_size,
        hookpoints=hookpoints or [],
        log_to_wandb=False,
        save_every=10**9,
    )


def make_trainer(
    model: PreTrainedModel,
    hookpoints: list[str],
    cfg: TrainConfig,
    cross_layer: int = 0,
    decoder_dtype: torch.dtype | None = None,
) -> Trainer:
    """The plugin's trainer, built as `python -m vlm_sparsify` builds it."""
    device = next(model.parameters()).device
    d_in = model.config.get_text_config().hidden_size
    coders = build_coders(
        hookpoints, d_in, cfg.sae, cross_layer, device, decoder_dtype=decoder_dtype
    )
    optimizers, schedulers = build_optimizers(cfg, coders, 10**6)
    model.requires_grad_(False)
    return Trainer(model, coders, cfg, optimizers, schedulers)


def plugin_vs_stock_steps(
    model: PreTrainedModel,
    hookpoints: list[str],
    input_ids: Tensor,
    batch_size: int,
    expansion_factor: int,
    k: int,
    warmup: int = 2,
    with_plugin: bool = True,
) -> Paired:
    """Step times of stock `sparsify.Trainer.fit()` (hook-driven forward, coder forward +
    backward, optimizer step, bookkeeping, batch fetch) and of the plugin's
    `Trainer.train_on_batch`, alternating step by step on the same batches, after `warmup`.
    Without `with_plugin`, stock runs alone (its plugin times are then ~0)."""
    device = next(model.parameters()).device
    plugin = (
        make_trainer(model, hookpoints, train_config(batch_size, expansion_factor, k))
        if with_plugin
        else None
    )

    def plugin_step(ids: Tensor) -> None:
        if plugin is not None:
            mask = torch.ones_like(ids, dtype=torch.bool)
            plugin.train_on_batch({"inputs": {"input_ids": ids}, "token_mask": mask})

    cfg = train_config(batch_size, expansion_factor, k, relative_hookpoints(model, hookpoints))
    data = InterleavedBatches(input_ids, batch_size, device, plugin_step)
    with quiet():
        stock = StockTrainer(cfg, data, model)
        stock.save = lambda: None
        stock.fit()
    data.boundary(None)
    return Paired(data.plugin_times[warmup:], data.stock_times[warmup:])


@dataclass
class Paired:
    """Interleaved measurements of a candidate against its reference."""

    candidate: list[float] = field(default_factory=list)
    reference: list[float] = field(default_factory=list)

    def __add__(self, other: Paired) -> Paired:
        return Paired(self.candidate + other.candidate, self.reference + other.reference)

    @property
    def ratio(self) -> float:
        """Median over pairs of candidate / reference (neighbours in time share the load)."""
        return statistics.median(c / r for c, r in zip(self.candidate, self.reference, strict=True))

    def summary(self, unit: str = "s") -> dict[str, float]:
        return {
            f"candidate_{unit}": statistics.median(self.candidate),
            f"reference_{unit}": statistics.median(self.reference),
            "ratio": self.ratio,
            "ratio_of_medians": statistics.median(self.candidate)
            / statistics.median(self.reference),
            "n": len(self.candidate),
        }


def alternate_steps(
    candidate: Callable[[], Any],
    reference: Callable[[], Any],
    steps: int,
    warmup: int,
    device: torch.device,
) -> Paired:
    """ABAB...: one call of each per step, timed separately, after `warmup` untimed pairs."""
    paired = Paired()

    def timed(run: Callable[[], Any]) -> float:
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        return time.perf_counter() - start

    for i in range(warmup + steps):
        first, second = (candidate, reference) if i % 2 == 0 else (reference, candidate)
        a, b = timed(first), timed(second)
        if i >= warmup:
            c, r = (a, b) if first is candidate else (b, a)
            paired.candidate.append(c)
            paired.reference.append(r)
    return paired


def tokens_per_second(
    trainer: Trainer, batches: Iterable[dict[str, Any]], n_batches: int, device: torch.device
) -> tuple[int, float, float]:
    """Masked tokens trained, seconds taken and seconds spent waiting for batches, over the first
    `n_batches` of `batches`, from the first batch's arrival to the last step's end: worker
    start-up (before the first batch) and shut-down (the loader's end, after the last) happen
    once per run, so they are not throughput."""
    iterator = iter(batches)
    batch = next(iterator)
    tokens, waited = 0, 0.0
    sync(device)
    start = time.perf_counter()
    for i in range(n_batches):
        if i:
            asked = time.perf_counter()
            following = next(iterator, None)
            waited += time.perf_counter() - asked
            if following is None:
                raise ValueError(f"the pipeline made {i} batches, {n_batches} expected")
            batch = following
        trainer.train_on_batch(batch)
        tokens += int(batch["token_mask"].sum())
    sync(device)
    seconds = time.perf_counter() - start
    if next(iterator, None) is not None:
        raise ValueError(f"the pipeline made more than the {n_batches} batches expected")
    return tokens, seconds, waited


def pipeline_vs_pretokenized(
    trainer: Trainer,
    make_loader: Callable[[], Iterable[dict[str, Any]]],
    pretokenized: list[dict[str, Any]],
    rounds: int,
    device: torch.device,
) -> tuple[Paired, float]:
    """Tokens/s of training fed by the live multimodal pipeline vs by the same batches held in
    memory, alternating blocks of equal length (candidate = pipeline); and the median share of a
    pipeline block's time the training loop spent waiting for its next batch.

    Every batch trains once first: each has its own padded length, and a step at a new shape is
    slow (allocator, kernels); a warm-up on one batch left the other shapes to the first timed
    block, the pipeline's, and cost it ~15% on an H200 (0.85-0.88 in the 2026-11-27 runs)."""
    for batch in pretokenized:
        trainer.train_on_batch(batch)
    paired, waits = Paired(), []
    for r in range(rounds):
        for live in (True, False) if r % 2 == 0 else (False, True):
            source = make_loader() if live else pretokenized
            tokens, seconds, waited = tokens_per_second(trainer, source, len(pretokenized), device)
            (paired.candidate if live else paired.reference).append(tokens / seconds)
            if live:
                waits.append(waited / seconds)
    return paired, statistics.median(waits)


def sharded_vs_data_parallel(
    layers: int, d: int, latents: int, k: int, tokens: int, steps: int, warmup: int = 2
) -> Paired:
    """A CLT step (forward, backward, gradient sum) over two gloo processes with
    `--distribute_modules` (candidate) vs data parallel (reference): all targets, the same
    random activations, alternating step by step on both processes; rank 0's timings."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        sizes = (layers, d, latents, k, tokens, steps, warmup)
        mp.spawn(_sharded_worker, args=(tmp, *sizes), nprocs=2)
        timings = torch.load(f"{tmp}/timings.pt", weights_only=True)
    return Paired(timings["sharded"], timings["data_parallel"])


def _sharded_worker(
    rank: int, tmp: str, layers: int, d: int, latents: int, k: int, tokens: int, steps: int,
    warmup: int,
) -> None:  # fmt: skip
    import torch.distributed as dist

    from vlm_sparsify.training import loss_per_target, sum_gradients, total_variances

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    try:
        hookpoints = [f"layers.{i}.mlp" for i in range(layers)]
        generator = torch.Generator().manual_seed(rank)
        xs = [torch.randn(tokens, d, generator=generator) for _ in hookpoints]
        ys = [torch.randn(tokens, d, generator=generator) for _ in hookpoints]
        variances = total_variances(ys)
        coders = {
            name: build_coders(
                hookpoints, d, SparseCoderConfig(num_latents=latents, k=k), layers,
                torch.device("cpu"), distribute=name == "sharded",
            )
            for name in ("sharded", "data_parallel")
        }  # fmt: skip
        timings: dict[str, list[float]] = {name: [] for name in coders}
        for i in range(warmup + steps):
            for name, coder_set in coders.items():
                dist.barrier()
                start = time.perf_counter()
                loss_per_target(coder_set, xs, ys, variances)
                sum_gradients(coder_set)
                dist.barrier()
                if i >= warmup:
                    timings[name].append(time.perf_counter() - start)
        if rank == 0:
            torch.save(timings, f"{tmp}/timings.pt")
    finally:
        dist.destroy_process_group()


def benchmark_generate(
    model: nn.Module,
    coders: Coders,
    inputs: dict[str, Tensor],
    mode: Mode = "open-loop",
    max_new_tokens: int = 16,
    repeats: int = 5,
    capture: bool = False,
    decoder: Decoder = "auto",
    cuda_graphs: bool = True,
) -> dict[str, Any]:
    """Greedy `generate` time of the replacement model over the base model's (same run).

    Both generate exactly `max_new_tokens` tokens; one warm-up each. Each repeat times both
    back to back, in alternating order, and also a one-token generation (the prefill) of both;
    `ratio` (and `prefill_ratio`, `per_token_ratio`: the later tokens) is the median over repeats
    of the repeat's own ratio, as `Paired.ratio` (neighbours in time share the machine's load);
    `ratio_of_medians`, `ratio_min` and `ratio_max` show how much the repeats agree.
    """
    replacement = ReplacementModel(
        model, coders, mode=mode, decoder=decoder, cuda_graphs=cuda_graphs
    )
    device = next(model.parameters()).device

    def timed(run: Any, new_tokens: int) -> float:
        sync(device)
        start = time.perf_counter()
        run(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        sync(device)
        return time.perf_counter() - start

    def replaced(**kwargs: Any) -> Any:
        if not capture:
            return replacement.generate(**kwargs)
        with replacement.capture() as features:
            output = replacement.generate(**kwargs)
            features.pop_samples()
        return output

    whole, prefill, later = Paired(), Paired(), Paired()
    with torch.inference_mode():
        timed(model.generate, max_new_tokens)
        timed(replaced, max_new_tokens)
        for i in range(repeats):
            times: dict[tuple[str, int], float] = {}
            runs = [("base", model.generate), ("replacement", replaced)]
            for new_tokens in (max_new_tokens, 1):
                for name, run in runs if i % 2 == 0 else runs[::-1]:
                    times[name, new_tokens] = timed(run, new_tokens)
            for paired, key in ((whole, max_new_tokens), (prefill, 1)):
                paired.candidate.append(times["replacement", key])
                paired.reference.append(times["base", key])
            later.candidate.append(whole.candidate[-1] - prefill.candidate[-1])
            later.reference.append(whole.reference[-1] - prefill.reference[-1])
    ratios = [c / r for c, r in zip(whole.candidate, whole.reference, strict=True)]
    return {
        "base_s": statistics.median(whole.reference),
        "replacement_s": statistics.median(whole.candidate),
        "base_prefill_s": statistics.median(prefill.reference),
        "replacement_prefill_s": statistics.median(prefill.candidate),
        "ratio": whole.ratio,
        "ratio_of_medians": whole.summary()["ratio_of_medians"],
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "prefill_ratio": prefill.ratio,
        "per_token_ratio": later.ratio if min(later.reference) > 0 else float("nan"),
        "repeats": repeats,
        "decoder": replacement.decoder_in_use,
        "cuda_graphs": graphs.captured if (graphs := replacement.decode_graphs) else 0,
        "cuda_graphs_failed": graphs.failed if graphs else None,
    }
