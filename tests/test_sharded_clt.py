"""The sharded CLT (`--distribute_modules`): layer ownership, and on one process the same step as
the data-parallel CLT, bit for bit on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sparsify import SparseCoderConfig

from vlm_sparsify.__main__ import run
from vlm_sparsify.coder_io import load_coders
from vlm_sparsify.cross_layer import CrossLayerTranscoder, n_sources_per_target
from vlm_sparsify.sharded_clt import ShardedCLT, layer_parameters, shard_layers
from vlm_sparsify.training import build_coders, loss_per_target

HOOKS = [f"model.language_model.layers.{i}.mlp" for i in range(5)]


def test_layers_go_to_contiguous_balanced_blocks() -> None:
    weights = layer_parameters(32, 16, 8192, 4096)
    assert shard_layers(weights, 1) == [0] * 32
    for world in (2, 3, 4, 8):
        owners = shard_layers(weights, world)
        assert owners == sorted(owners) and set(owners) == set(range(world))
        shares = [sum(w for w, r in zip(weights, owners, strict=True) if r == k) for k in range(world)]  # fmt: skip
        assert max(shares) < 1.35 * sum(weights) / world  # a late layer holds 16 decoders
    # one layer per rank when there are as many ranks as layers, whatever the weights
    assert shard_layers([100, 1, 1], 3) == [0, 1, 2]
    assert shard_layers([1, 1, 100], 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="at most one process per hookpoint"):
        shard_layers([1, 1], 3)


def test_layer_parameters_count_every_decoder_once() -> None:
    per_layer = layer_parameters(5, 3, 8, 4)
    sources = n_sources_per_target(5, 3)
    assert per_layer == [8 * 4 + 8 + s * (8 * 4 + 4) for s in sources]
    clt = CrossLayerTranscoder(HOOKS, 4, SparseCoderConfig(num_latents=8, k=2, transcode=True), 3)
    assert sum(per_layer) == sum(p.numel() for p in clt.parameters())


def pair(cross_layer: int, **cfg_kwargs) -> tuple[CrossLayerTranscoder, ShardedCLT]:
    cfg = SparseCoderConfig(num_latents=32, k=4, transcode=True, **cfg_kwargs)
    whole = CrossLayerTranscoder(HOOKS, 8, cfg, cross_layer, init_seed=3)
    sharded = ShardedCLT(HOOKS, 8, cfg, cross_layer, init_seed=3)
    return whole, sharded


def same_parameters(whole: CrossLayerTranscoder, sharded: ShardedCLT, grads: bool) -> None:
    """Every tensor of `whole` against the sharded layer that holds it."""
    for p, source in enumerate(whole.sources):
        layer = sharded.layer(p)
        for a, b in ((source.encoder.weight, layer.encoder.weight), (source.encoder.bias, layer.encoder.bias)):  # fmt: skip
            check(a, b, grads)
        for i in range(source.n_targets):
            W, b_dec = sharded.decoder(p, p + i)
            check(source.W_decs[i], W, grads)
            check(source.b_decs[i], b_dec, grads)


def check(a: torch.Tensor, b: torch.Tensor, grads: bool) -> None:
    if not grads:
        assert torch.equal(a, b)
        return
    assert (a.grad is None) == (b.grad is None)
    if a.grad is not None:
        # the encoder's gradient adds its targets' terms in another order: rounding apart
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("auxk", [False, True], ids=["fvu", "fvu+auxk+multi_topk"])
def test_one_process_takes_the_data_parallel_clts_step(auxk: bool) -> None:
    whole, sharded = pair(3, multi_topk=auxk)
    same_parameters(whole, sharded, grads=False)
    torch.manual_seed(0)
    inputs = [torch.randn(40, 8) for _ in HOOKS]
    outputs = [torch.randn(40, 8) + i for i, _ in enumerate(HOOKS)]
    whole.init_biases(inputs, outputs)
    sharded.init_biases(inputs, outputs)
    same_parameters(whole, sharded, grads=False)
    with torch.no_grad():  # decoders away from zero, so features get gradients
        for p, source in enumerate(whole.sources):
            for i, W in enumerate(source.W_decs):
                W.normal_()
                sharded.decoder(p, p + i)[0].copy_(W)
    variances = [(y - y.mean(0)).pow(2).sum() for y in outputs]
    dead = [torch.arange(32) % (p + 2) == 0 for p in range(len(HOOKS))] if auxk else None
    results = [
        loss_per_target(
            coders,
            inputs,
            outputs,
            variances,
            micro_acc_steps=2,
            dead_masks=dead,
            auxk_alpha=1 / 32,
        )  # fmt: skip
        for coders in (whole, sharded)
    ]
    (fvu_a, idx_a, l0_a, aux_a), (fvu_b, idx_b, l0_b, aux_b) = results
    assert torch.equal(fvu_a, fvu_b)
    assert all(torch.equal(a, b) for a, b in zip(idx_a, idx_b, strict=True))
    assert l0_a == l0_b and aux_a == aux_b
    assert (aux_a > 0) == auxk
    same_parameters(whole, sharded, grads=True)
    moved = [p.grad.abs().max() for p in sharded.parameters() if p.grad is not None]
    assert len(moved) == len(list(sharded.parameters())) and min(moved) > 0


def test_build_coders_shards_clts_and_per_layer_coders() -> None:
    from vlm_sparsify.sharded_per_layer import ShardedPerLayer

    cfg = SparseCoderConfig(num_latents=16, k=2)
    sharded = build_coders(HOOKS, 8, cfg, 2, torch.device("cpu"), distribute=True)
    assert isinstance(sharded, ShardedCLT) and sharded.owned == list(range(5))
    assert sharded.plan() == "layers 0-4 on rank 0"
    per_layer = build_coders(HOOKS, 8, SparseCoderConfig(num_latents=16, k=2), 0, "cpu", distribute=True)  # fmt: skip
    assert isinstance(per_layer, ShardedPerLayer) and per_layer.local.hookpoints == HOOKS
    with pytest.raises(ValueError, match="a CLT's skip connections"):
        ShardedCLT(HOOKS, 8, SparseCoderConfig(num_latents=16, k=2, transcode=True, skip_connection=True), 2)  # fmt: skip


def sharded_flags(cross_layer: str) -> tuple[str, ...]:
    """The flags of the sharded runs of conftest's `sharded_first_step` (less
    `--distribute_modules true`), which the tests here and in test_sharded_per_layer pass too."""
    return ("--transcode", "true", "--cross_layer", cross_layer, "--save_every", "1",
            "--save_best", "true")  # fmt: skip


def torchrun(folder, save_dir, run_name: str, *extra: str, port: int) -> None:
    from tests.test_training import cli

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(port), "-m", "vlm_sparsify",
        *cli(folder, save_dir, run_name, *extra),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def gloo_step(rank: int, out: str) -> None:
    """In one of two gloo processes (conftest's `gloo_steps`): a sharded CLT's step on its half
    of the batch, saved as `clt-{rank}.pt`."""
    whole, sharded = pair(3, multi_topk=True)
    inputs, outputs, variances, dead = step_data(whole, sharded)
    half = slice(0, 24) if rank == 0 else slice(24, 40)  # ranks hold unequal token counts
    fvu, indices, l0, auxk = loss_per_target(
        sharded, [x[half] for x in inputs], [y[half] for y in outputs], variances,
        dead_masks=dead, auxk_alpha=1 / 32,
    )  # fmt: skip
    grads = {k: p.grad for k, p in sharded.named_parameters()}
    result = {"fvu": fvu, "auxk": auxk, "indices": indices, "grads": grads}
    torch.save(result, f"{out}/clt-{rank}.pt")


def step_data(whole: CrossLayerTranscoder, sharded: ShardedCLT):
    """A batch of 40 tokens, biases initialised on it, decoders away from zero (in both CLTs)."""
    torch.manual_seed(0)
    inputs = [torch.randn(40, 8) for _ in HOOKS]
    outputs = [torch.randn(40, 8) + i for i, _ in enumerate(HOOKS)]
    whole.init_biases(inputs, outputs)
    with torch.no_grad():  # decoders away from zero, so features get gradients
        for p, source in enumerate(whole.sources):
            for i, W in enumerate(source.W_decs):
                W.normal_()
                if p + i in sharded.owned:
                    sharded.decoder(p, p + i)[0].copy_(W)
                    sharded.decoder(p, p + i)[1].copy_(source.b_decs[i])
            if p in sharded.owned:
                sharded.layer(p).encoder.bias.copy_(source.encoder.bias)
    variances = [(y - y.mean(0)).pow(2).sum() for y in outputs]
    dead = [torch.arange(32) % (p + 2) == 0 for p in range(len(HOOKS))]
    return inputs, outputs, variances, dead


def test_two_gloo_processes_compute_the_whole_batchs_gradients(gloo_steps: Path) -> None:
    """Features broadcast, target FVUs on the gathered batch, feature gradients summed back at
    the source's owner: each parameter's gradient is the one-process CLT's on the whole batch."""
    results = [torch.load(gloo_steps / f"clt-{r}.pt", weights_only=True) for r in (0, 1)]
    whole, sharded = pair(3, multi_topk=True)
    inputs, outputs, variances, dead = step_data(whole, sharded)
    fvu, indices, _, auxk = loss_per_target(
        whole, inputs, outputs, variances, dead_masks=dead, auxk_alpha=1 / 32
    )
    torch.testing.assert_close(results[0]["fvu"] + results[1]["fvu"], fvu)
    assert results[0]["auxk"] + results[1]["auxk"] == pytest.approx(auxk, rel=1e-6)
    for p, idx in enumerate(indices):  # each rank reports its own tokens' features
        assert torch.equal(torch.cat([results[0]["indices"][p], results[1]["indices"][p]]), idx)
    owners = shard_layers(layer_parameters(len(HOOKS), 3, 32, 8), 2)
    assert owners == [0, 0, 0, 1, 1]
    checked = 0
    for p, source in enumerate(whole.sources):
        grads = results[owners[p]]["grads"]
        for name in ("weight", "bias"):
            expected = getattr(source.encoder, name).grad
            assert expected.abs().max() > 0
            torch.testing.assert_close(grads[f"layers.{p}.encoder.{name}"], expected)
            checked += 1
        for i in range(source.n_targets):
            t = p + i
            j = p - whole.sources_reaching(t)[0]
            grads = results[owners[t]]["grads"]
            torch.testing.assert_close(grads[f"layers.{t}.W_decs.{j}"], source.W_decs[i].grad)
            torch.testing.assert_close(grads[f"layers.{t}.b_decs.{j}"], source.b_decs[i].grad)
            checked += 2
    assert checked == 2 * len(HOOKS) + 2 * sum(whole.n_targets(p) for p in range(len(HOOKS)))


@pytest.mark.slow
def test_two_gloo_processes_sharing_the_layers_train_what_one_process_trains(
    tmp_path, tiny_llava_dir, sharded_first_step
):
    """Through the CLI: one step on the same global batch (the gradients themselves are
    compared above); the checkpoint is the usual CLT run."""
    from tests.test_training import HOOKS, cli, weights

    run(cli(tiny_llava_dir, tmp_path, "one", *sharded_flags("2"), "--max_examples", "8"))
    one, two = tmp_path / "one", sharded_first_step("2") / "sharded"  # the same flags, 2 processes
    assert json.loads((two / "rank1-shard.json").read_text())["owners"] == [0, 0, 1]
    summaries = [json.loads((r / "summary.json").read_text()) for r in (one, two)]
    for a, b in zip(*summaries, strict=True):
        assert a["fvu"] == pytest.approx(b["fvu"], rel=1e-5)
    moved = 0.0
    for hook in HOOKS:
        reference, sharded = weights(one)[hook], weights(two)[hook]
        assert sorted(reference) == sorted(sharded)
        for key, value in sharded.items():
            # at initialisation the decoder biases' gradient is zero up to rounding, and
            # SignSGD steps by lr * its sign: they may differ by 2 * lr
            atol = 2e-3 + 1e-6 if key.startswith("b_decs") else 1e-5
            torch.testing.assert_close(value, reference[key], atol=atol, rtol=0)
            if key.startswith("W_decs"):
                moved = max(moved, float(reference[key].abs().max()))
    assert moved > 5e-4
    loaded = load_coders(two)  # the usual CLT layout
    assert isinstance(loaded, CrossLayerTranscoder) and loaded.hookpoints == HOOKS


@pytest.mark.slow
@pytest.mark.parametrize("cross_layer", ["2", "0"], ids=["clt", "plt"])
def test_a_sharded_run_resumes_bit_for_bit(
    tmp_path, tiny_llava_dir, sharded_first_step, cross_layer
):
    import shutil

    from tests.test_training import HOOKS, cli, weights

    extra = (*sharded_flags(cross_layer), "--distribute_modules", "true")
    port = 29542 if cross_layer == "2" else 29552
    # 28 examples: the last batch of 8 leaves rank 1 without any (it steps with no tokens)
    torchrun(tiny_llava_dir, tmp_path, "whole", *extra, "--max_examples", "28", port=port)
    # the split run's first part, 8 examples: the CLI tests' two-process run (a copy of it)
    first = sharded_first_step(cross_layer)
    shutil.copytree(first / "sharded", tmp_path / "split")
    shutil.copytree(first / "sharded-best", tmp_path / "split-best")
    state = torch.load(tmp_path / "split" / "state.pt", weights_only=True)
    assert state["global_step"] == 1
    torchrun(tiny_llava_dir, tmp_path, "split", *extra, "--max_examples", "28", "--resume",
             "true", port=port + 2)  # fmt: skip
    assert torch.load(tmp_path / "whole" / "state.pt", weights_only=True)["global_step"] == 4
    whole, split = weights(tmp_path / "whole"), weights(tmp_path / "split")
    for hook in HOOKS:
        for key, value in whole[hook].items():
            assert torch.equal(value, split[hook][key]), (hook, key)
    # --save_best: the best-so-far is part of the state, so the resumed run keeps the same best
    best_whole, best_split = weights(tmp_path / "whole-best"), weights(tmp_path / "split-best")
    assert all(torch.equal(v, best_split[h][k]) for h in HOOKS for k, v in best_whole[h].items())
    assert not list((tmp_path / "whole-best").glob("rank*"))  # coders only
    for r in (0, 1):
        a = load_file(tmp_path / "whole" / f"rank{r}-train_params.safetensors")
        b = load_file(tmp_path / "split" / f"rank{r}-train_params.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the layers' owners depend on the number of processes: one process cannot resume two's run
    with pytest.raises(ValueError, match="sharded over 2 processes and this run has 1"):
        run(cli(tiny_llava_dir, tmp_path, "split", *extra, "--resume", "true"))
    with pytest.raises(ValueError, match=r"--distribute_modules false \(saved: true\)"):
        run(cli(tiny_llava_dir, tmp_path, "split", "--cross_layer", cross_layer, "--resume", "true",
                "--distribute_modules", "false"))  # fmt: skip


@pytest.mark.slow
def test_a_sharded_update_that_diverges_stops_every_process_before_saving(tmp_path, tiny_llava_dir):
    from tests.test_training import cli

    # --lr 1e30: each process's layers diverge; the FVU check is summed over the processes
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    extra = ("--transcode", "true", "--cross_layer", "3", "--distribute_modules", "true",
             "--save_every", "1", "--lr", "1e30")  # fmt: skip
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", "29562", "-m", "vlm_sparsify",
        *cli(tiny_llava_dir, tmp_path, "huge", *extra),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    message = "the update to step 1 made the FVU non-finite on its own batch, not saved"
    assert result.stderr.count(message) == 2, result.stderr[-3000:]  # both processes, one line
    assert "vlm_sparsify/" not in result.stderr  # no traceback of ours (torchrun prints its own)
    assert not (tmp_path / "huge").exists()


def test_the_cli_says_what_distribute_modules_works_with(tmp_path, tiny_llava_dir):
    from tests.test_training import cli

    flags = ("--distribute_modules", "true", "--cross_layer", "2", "--loss_fn", "kl")
    with pytest.raises(ValueError, match="not compatible with the cross-entropy or KL"):
        run(cli(tiny_llava_dir, tmp_path, "x", *flags))
    assert not (tmp_path / "x").exists()


def test_finetune_reads_each_processs_own_tensors_of_a_clt_run(tmp_path, monkeypatch) -> None:
    import vlm_sparsify.sharding as sharding
    from vlm_sparsify.coder_io import CheckpointError, save_coders
    from vlm_sparsify.sharded_checkpoint import load_owned_tensors

    cfg = SparseCoderConfig(num_latents=32, k=4, transcode=True)
    saved = CrossLayerTranscoder(HOOKS, 8, cfg, 3)
    with torch.no_grad():
        for p in saved.parameters():
            p.normal_()
    save_coders(saved, tmp_path / "run")
    # rank 1 of 2 holds layers 3 and 4: their encoders, and the decoders into them
    monkeypatch.setattr(sharding.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(sharding.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(sharding.dist, "get_world_size", lambda: 2)
    clt = ShardedCLT(HOOKS, 8, cfg, 3)
    assert clt.owned == [3, 4] and clt.plan() == "layers 0-2 on rank 0, 3-4 on rank 1"
    load_owned_tensors(clt, tmp_path / "run")
    loaded = 0
    for t in clt.owned:
        assert torch.equal(clt.layer(t).encoder.weight, saved.sources[t].encoder.weight)
        for p in clt.sources_reaching(t):
            W, b = clt.decoder(p, t)
            assert torch.equal(W, saved.sources[p].W_decs[t - p])
            assert torch.equal(b, saved.sources[p].b_decs[t - p])
            loaded += 1
    assert loaded == 3 + 3  # sources 1, 2, 3 reach layer 3; 2, 3, 4 reach layer 4
    with pytest.raises(CheckpointError, match=r"cross_layer 3 \(this run: 2\)"):
        load_owned_tensors(ShardedCLT(HOOKS, 8, cfg, 2), tmp_path / "run")
    wider = SparseCoderConfig(num_latents=64, k=4, transcode=True)
    with pytest.raises(CheckpointError, match=r"num_latents 32 \(this run: 64\); pass the flags"):
        load_owned_tensors(ShardedCLT(HOOKS, 8, wider, 3), tmp_path / "run")


def test_a_hub_copy_leaves_the_processes_resume_files_out(tmp_path, monkeypatch) -> None:
    from vlm_sparsify.hub import hub_files

    for name in ("config.json", "summary.json", "state.pt", "l.0.mlp/cfg.json",
                 "l.0.mlp/sae.safetensors", "rank0-shard.json", "rank0-optimizer_0.pt",
                 "rank1-train_params.safetensors", "rank_1_state.pt"):  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    shared = ["config.json", "l.0.mlp/cfg.json", "l.0.mlp/sae.safetensors", "summary.json"]
    assert hub_files(tmp_path) == shared
    assert uploaded_by_push_to_hub(tmp_path, monkeypatch) == shared


def uploaded_by_push_to_hub(run_dir, monkeypatch) -> list[str]:
    """The files `push_to_hub` has huggingface_hub upload, with `HfApi` faked (no network): its
    `upload_folder` patterns applied by huggingface_hub's own filter, as the real one does."""
    from huggingface_hub.utils import filter_repo_objects

    import vlm_sparsify.hub as hub

    uploaded = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo, exist_ok=False):
            pass

        def upload_folder(self, repo_id, folder_path, allow_patterns=None, ignore_patterns=None):
            files = sorted(
                str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()
            )
            uploaded.extend(
                filter_repo_objects(
                    files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns
                )
            )

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    assert hub.push_to_hub(run_dir, "me/run") == "https://huggingface.co/me/run"
    return uploaded


def test_each_process_is_told_its_own_share_of_the_memory() -> None:
    from vlm_sparsify.cross_layer import training_memory_bytes
    from vlm_sparsify.sharded_clt import shard_memory_bytes

    size = (32, 8192, 4096, 16)  # LLaVA-7B, CLT-16, bf16 decoders, signum (docs/memory.md)
    whole = training_memory_bytes(*size, "signum", 4, 2)
    shares = [shard_memory_bytes(*size, 4, r, "signum", 4, 2) for r in range(4)]
    for key, value in whole.items():
        assert sum(share[key] for share in shares) == value
    assert [round(share["total"] / 1e9, 1) for share in shares] == [23.6, 24.8, 21.7, 21.7]
    assert shard_memory_bytes(*size, 1, 0, "adam", 4, 2) == training_memory_bytes(*size, "adam", 4, 2)  # fmt: skip


def test_each_gpu_process_is_pinned_to_its_gpu_before_nccl_starts(monkeypatch) -> None:
    import torch.distributed as dist

    from vlm_sparsify import sharding

    calls: list[tuple] = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(
        dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend))
    )
    assert sharding.init_distributed()
    assert calls == [("set_device", 1), ("init", "nccl")]
    monkeypatch.delenv("LOCAL_RANK")
    assert not sharding.init_distributed() and len(calls) == 2  # one process: nothing starts
