"""Per-layer coders sharded over processes (`--distribute_modules` with `--cross_layer 0`): the
same step as data parallel, and a checkpoint stock sparsify loads."""

import json
from pathlib import Path

import pytest
import torch
from sparsify import SparseCoder, SparseCoderConfig

from vlm_sparsify.cross_layer import CrossLayerTranscoder
from vlm_sparsify.per_layer import PerLayerCoders
from vlm_sparsify.sharded_per_layer import ShardedPerLayer
from vlm_sparsify.training import loss_per_target

HOOKS = [f"model.language_model.layers.{i}.mlp" for i in range(3)]


def pair(transcode: bool) -> tuple[PerLayerCoders, ShardedPerLayer]:
    cfg = SparseCoderConfig(num_latents=32, k=4, transcode=transcode, multi_topk=True)
    return PerLayerCoders(HOOKS, 8, cfg, init_seed=3), ShardedPerLayer(HOOKS, 8, cfg, init_seed=3)


def step_data(whole: PerLayerCoders, sharded: ShardedPerLayer):
    """40 tokens, biases initialised on them by each set, dead masks for AuxK."""
    torch.manual_seed(0)
    inputs = [torch.randn(40, 8) for _ in HOOKS]
    outputs = [torch.randn(40, 8) + i for i, _ in enumerate(HOOKS)]
    whole.init_biases(inputs, outputs)
    sharded.init_biases(inputs, outputs)  # its own (one process owns every hookpoint)
    variances = [(y - y.mean(0)).pow(2).sum() for y in outputs]
    dead = [torch.arange(32) % (p + 2) == 0 for p in range(len(HOOKS))]
    return inputs, outputs, variances, dead


@pytest.mark.parametrize("transcode", [True, False], ids=["plt", "sae"])
def test_one_process_takes_the_per_layer_step_bit_for_bit(transcode: bool) -> None:
    whole, sharded = pair(transcode)
    inputs, outputs, variances, dead = step_data(whole, sharded)
    for p in range(len(HOOKS)):  # the same init, as sparsify seeds it
        assert torch.equal(sharded.coder(p).encoder.weight, whole.coders[p].encoder.weight)
    results = [
        loss_per_target(c, inputs, outputs, variances, 2, dead_masks=dead, auxk_alpha=1 / 32)
        for c in (whole, sharded)
    ]
    (fvu_a, idx_a, l0_a, aux_a), (fvu_b, idx_b, l0_b, aux_b) = results
    assert torch.equal(fvu_a, fvu_b) and l0_a == l0_b and aux_a == aux_b
    assert all(torch.equal(a, b) for a, b in zip(idx_a, idx_b, strict=True))
    for p in range(len(HOOKS)):
        for (name, a), b in zip(whole.coders[p].named_parameters(), sharded.coder(p).parameters(), strict=True):  # fmt: skip
            assert torch.equal(a.grad, b.grad), (p, name)


def gloo_steps(rank: int, out: str) -> None:
    """In one of two gloo processes (conftest's `gloo_steps`): the sharded per-layer step on its
    share of the batch, for PLTs and SAEs, saved as `per_layer-{transcode}-{rank}.pt`."""
    for transcode in (True, False):
        whole, sharded = pair(transcode)
        inputs, outputs, variances, dead = step_data(whole, sharded)
        half = slice(0, 24) if rank == 0 else slice(24, 40)  # unequal token counts
        fvu, indices, _, auxk = loss_per_target(
            sharded, [x[half] for x in inputs], [y[half] for y in outputs], variances,
            dead_masks=dead, auxk_alpha=1 / 32,
        )  # fmt: skip
        grads = {p: [q.grad for q in sharded.coder(p).parameters()] for p in sharded.owned}
        result = {"fvu": fvu, "auxk": auxk, "indices": indices, "grads": grads}
        torch.save(result, f"{out}/per_layer-{transcode}-{rank}.pt")


@pytest.mark.parametrize("transcode", [True, False], ids=["plt", "sae"])
def test_two_gloo_processes_compute_the_whole_batchs_gradients(
    gloo_steps: Path, transcode: bool
) -> None:
    saved = [gloo_steps / f"per_layer-{transcode}-{r}.pt" for r in (0, 1)]
    results = [torch.load(path, weights_only=True) for path in saved]
    whole, sharded = pair(transcode)
    inputs, outputs, variances, dead = step_data(whole, sharded)
    fvu, indices, _, auxk = loss_per_target(
        whole, inputs, outputs, variances, dead_masks=dead, auxk_alpha=1 / 32
    )
    torch.testing.assert_close(results[0]["fvu"] + results[1]["fvu"], fvu)
    assert results[0]["auxk"] + results[1]["auxk"] == pytest.approx(auxk, rel=1e-6)
    for p, idx in enumerate(indices):  # each process reports its own tokens' features
        assert torch.equal(torch.cat([results[0]["indices"][p], results[1]["indices"][p]]), idx)
    owners = {0: 0, 1: 0, 2: 1}
    for p, coder in enumerate(whole.coders):
        grads = results[owners[p]]["grads"][p]
        for expected, got in zip(coder.parameters(), grads, strict=True):
            torch.testing.assert_close(got, expected.grad)


@pytest.mark.slow
def test_a_sharded_plt_run_loads_with_stock_sparsify(tmp_path, tiny_llava_dir, sharded_first_step):
    from tests.test_sharded_clt import sharded_flags
    from tests.test_training import cli, weights
    from vlm_sparsify.__main__ import run

    run(cli(tiny_llava_dir, tmp_path, "one", *sharded_flags("0"), "--max_examples", "8"))
    one, two = tmp_path / "one", sharded_first_step("0") / "sharded"  # the same flags, 2 processes
    summaries = [json.loads((r / "summary.json").read_text()) for r in (one, two)]
    for a, b in zip(*summaries, strict=True):
        assert a["fvu"] == pytest.approx(b["fvu"], rel=1e-5)
    loaded = SparseCoder.load_many(str(two), local=True)
    assert sorted(loaded) == sorted(HOOKS)
    reference, sharded = weights(one), weights(two)
    for hook in HOOKS:
        for key, value in sharded[hook].items():
            atol = 2e-3 + 1e-6 if key == "b_dec" else 1e-5  # as the data-parallel test
            torch.testing.assert_close(value, reference[hook][key], atol=atol, rtol=0)


def test_finetune_refuses_coders_of_another_kind_as_one_process_does(tmp_path) -> None:
    from vlm_sparsify.coder_io import CheckpointError, save_coders
    from vlm_sparsify.sharded_checkpoint import load_owned_tensors

    sae_cfg = SparseCoderConfig(num_latents=32, k=4, transcode=False)
    save_coders(PerLayerCoders(HOOKS, 8, sae_cfg), tmp_path / "sae")
    plt_cfg = SparseCoderConfig(num_latents=32, k=4, transcode=True)
    # an SAE's tensors have a PLT's keys and shapes: they loaded into the PLT without a word
    with pytest.raises(CheckpointError, match="kind 'sparse autoencoders' .*'per-layer transc"):
        load_owned_tensors(ShardedPerLayer(HOOKS, 8, plt_cfg), tmp_path / "sae")
    save_coders(CrossLayerTranscoder(HOOKS, 8, plt_cfg, 2), tmp_path / "clt")
    with pytest.raises(CheckpointError, match="kind 'a cross-layer transcoder' .*--cross_layer"):
        load_owned_tensors(ShardedPerLayer(HOOKS, 8, plt_cfg), tmp_path / "clt")
    saved = PerLayerCoders(HOOKS, 8, plt_cfg, init_seed=5)
    save_coders(saved, tmp_path / "plt")
    sharded = ShardedPerLayer(HOOKS, 8, plt_cfg)
    load_owned_tensors(sharded, tmp_path / "plt")
    assert torch.equal(sharded.coder(2).encoder.weight, saved.coder(2).encoder.weight)


def test_finetune_refuses_a_run_of_other_hookpoints_as_one_process_does(tmp_path) -> None:
    from vlm_sparsify.coder_io import CheckpointError, save_coders
    from vlm_sparsify.sharded_checkpoint import load_owned_tensors

    cfg = SparseCoderConfig(num_latents=32, k=4, transcode=True)
    more = [*HOOKS, "model.language_model.layers.3.mlp"]
    save_coders(PerLayerCoders(more, 8, cfg), tmp_path / "more")
    # each process took its own hookpoints' coders: the run's others were left out unnoticed
    with pytest.raises(CheckpointError, match="were requested"):
        load_owned_tensors(ShardedPerLayer(HOOKS, 8, cfg), tmp_path / "more")


def test_finetune_names_the_skip_connection_and_width_that_differ_in_one_line(tmp_path) -> None:
    from vlm_sparsify.coder_io import CheckpointError, save_coders
    from vlm_sparsify.sharded_checkpoint import load_owned_tensors

    cfg = SparseCoderConfig(num_latents=32, k=4, transcode=True)
    save_coders(PerLayerCoders(HOOKS, 8, cfg), tmp_path / "plt")
    skip = SparseCoderConfig(num_latents=32, k=4, transcode=True, skip_connection=True)
    with pytest.raises(CheckpointError) as caught:
        load_owned_tensors(ShardedPerLayer(HOOKS, 8, skip), tmp_path / "plt")
    message = str(caught.value)  # the training CLI prints it as its one line
    assert "\n" not in message and "skip_connection False (this run: True)" in message, message
    # one process's check, field by field, before any weight is read
    wider = SparseCoderConfig(num_latents=64, k=4, transcode=True)
    with pytest.raises(CheckpointError, match=r"num_latents 32 \(this run: 64\); pass the flags"):
        load_owned_tensors(ShardedPerLayer(HOOKS, 8, wider), tmp_path / "plt")
