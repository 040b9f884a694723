"""`--loss_fn kl` / `ce`: coders trained through the open-loop replacement model."""

import pytest
import torch
import torch.nn.functional as F

import vlm_sparsify.training as training
from tests.test_training import cli
from vlm_sparsify.__main__ import run
from vlm_sparsify.bench_cpu import easyvqa_batch
from vlm_sparsify.bench_steps import make_trainer, train_config
from vlm_sparsify.data import easyvqa_examples
from vlm_sparsify.end_to_end import next_text_positions
from vlm_sparsify.hookpoints import mlp_hookpoints
from vlm_sparsify.recipe import find_recipe
from vlm_sparsify.replacement import ReplacementModel
from vlm_sparsify.tiny.evaluate import SHIPPED, load_tiny


@pytest.fixture(scope="module")
def shipped():
    """The trained easy-VQA LLaVA: sharp next-token distributions, so KLs are not ~0."""
    model, processor = load_tiny()
    return model, processor, find_recipe("tiny_llava")


@pytest.fixture(scope="module")
def batch(shipped):
    model, processor, recipe = shipped
    return easyvqa_batch(easyvqa_examples("train")[:4], processor, recipe, model)


def e2e_trainer(shipped, loss_fn: str, cross_layer: int, **overrides):
    model, _, recipe = shipped
    hookpoints = mlp_hookpoints(model, recipe)
    cfg = train_config(4, 4, 8)
    cfg.loss_fn = loss_fn
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    return make_trainer(model, hookpoints, cfg, cross_layer=cross_layer)


@pytest.mark.parametrize("cross_layer", [0, 3], ids=["plt", "clt"])
def test_kl_is_the_replacement_models_kl_and_its_gradient_reaches_every_source(
    shipped, batch, cross_layer
):
    trainer = e2e_trainer(shipped, "kl", cross_layer, grad_acc_steps=2)
    trainer.train_on_batch(batch)  # step 0: biases initialised, gradients kept (accumulating)
    model = trainer.model
    coders = trainer.coders
    # the end-to-end gradient reached every source's decoder (zero at the start, so the encoders
    # get none yet) through the frozen model
    sources = coders.coders if cross_layer == 0 else coders.sources
    for p, source in enumerate(sources):
        decoders = [w for name, w in source.named_parameters() if "dec" in name and w.ndim == 2]
        assert decoders and all(w.grad is not None and w.grad.abs().sum() > 0 for w in decoders), p
    assert all(w.grad is None for w in model.parameters())  # the model stays frozen
    with torch.no_grad():
        clean = model(**batch["inputs"]).logits
        replaced = ReplacementModel(model, coders, mode="open-loop")(**batch["inputs"]).logits
    mask = batch["token_mask"]
    expected = F.kl_div(
        replaced[mask].log_softmax(-1), clean[mask].log_softmax(-1), log_target=True,
        reduction="sum",
    ) / mask.sum()  # fmt: skip
    assert expected > 0.05  # the replacement is not the model: a real number to compare

    metrics = trainer.train_on_batch(batch)  # step 1: same weights until its optimizer step
    torch.testing.assert_close(torch.tensor(metrics["kl"]), expected, rtol=1e-5, atol=1e-6)
    assert trainer.state.loss_history == pytest.approx(
        [trainer.state.loss_history[0], float(expected)], rel=1e-5
    )


def test_kl_training_brings_the_replacement_closer(tmp_path):
    args = cli(SHIPPED, tmp_path, "kl", "--transcode", "true", "--cross_layer", "4",
               "--loss_fn", "kl", "--lr", "3e-3")  # fmt: skip
    args[args.index("--recipe") + 1] = "tiny_llava"
    for flag, value in [("--max_examples", "480"), ("--batch_size", "16"), ("--num_latents", "512"),
                        ("--k", "16")]:  # fmt: skip
        args[args.index(flag) + 1] = value
    trainer = run(args)
    history = trainer.state.loss_history
    assert len(history) == 30
    assert sum(history[-4:]) / 4 < 0.6 * sum(history[:4]) / 4, history  # 0.44 measured
    state = torch.load(tmp_path / "kl" / "state.pt", weights_only=True)
    assert state["loss_history"] == history  # kept for --resume


def test_ce_counts_only_positions_whose_next_token_is_text():
    input_ids = torch.tensor([[0, 0, 5, 9, 9, 6, 7], [5, 9, 9, 6, 7, 8, 4]])
    attention = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    positions = next_text_positions(input_ids, attention, image_id=9)
    assert positions.tolist() == [
        [False, False, False, False, True, True],  # padding, then 5 -> image, image -> image
        [False, False, True, True, True, True],
    ]


def test_ce_scores_each_position_s_logits_against_the_token_after_it():
    from vlm_sparsify.end_to_end import ce_sum

    input_ids = torch.tensor([[3, 1, 4, 1, 5]])
    # position i's logits point at token i + 1: a near-zero loss (against token i: not)
    logits = torch.zeros(1, 5, 8)
    logits[0, torch.arange(4), input_ids[0, 1:]] = 30.0
    positions = torch.tensor([[True, True, False, True]])
    total = ce_sum(logits, input_ids, positions)
    expected = F.cross_entropy(logits[0, [0, 1, 3]], input_ids[0, [1, 2, 4]], reduction="sum")
    torch.testing.assert_close(total, expected)
    assert float(total) < 1e-6


def test_ce_training_runs_and_records_its_loss(shipped, batch):
    trainer = e2e_trainer(shipped, "ce", 3)
    losses = [trainer.train_on_batch(batch)["ce"] for _ in range(3)]
    assert all(loss > 0 for loss in losses)
    assert trainer.state.loss_history == losses


def test_end_to_end_refuses_what_it_cannot_train(tmp_path, tiny_llava_dir, shipped):
    with pytest.raises(ValueError, match="micro_acc_steps"):
        run(cli(tiny_llava_dir, tmp_path, "m", "--loss_fn", "kl", "--micro_acc_steps", "2"))
    with pytest.raises(ValueError, match="sparse autoencoders train with --loss_fn fvu"):
        run(cli(tiny_llava_dir, tmp_path, "s", "--loss_fn", "kl", "--transcode", "false"))
    with pytest.raises(ValueError, match="--auxk_alpha and --multi_topk add to the local"):
        run(cli(tiny_llava_dir, tmp_path, "a", "--loss_fn", "kl", "--auxk_alpha", "0.1"))
    with pytest.raises(ValueError, match="unknown --loss_fn"):
        e2e_trainer(shipped, "mse", 0)


def test_nan_end_to_end_loss_stops_before_the_backward(shipped, batch, monkeypatch):
    trainer = e2e_trainer(shipped, "kl", 3)
    monkeypatch.setattr(
        training, "end_to_end_sum", lambda *a: (torch.tensor(float("nan")), torch.tensor(3))
    )
    with pytest.raises(training.NonFiniteLossError, match="end-to-end kl"):
        trainer.train_on_batch(batch)
    assert trainer.state.loss_history == []


@pytest.mark.parametrize("finetune", [False, True])
def test_a_finetune_keeps_its_loaded_biases_at_step_0(shipped, batch, finetune):
    # (in this file for its trained model and batch) a new run sets them from the first batch
    trainer = e2e_trainer(shipped, "fvu", 0, grad_acc_steps=2, finetune=finetune)
    before = [t.detach().clone() for t in trainer.coders.parameters()]
    trainer.train_on_batch(batch)  # step 0, no optimizer step yet (accumulating)
    after = list(trainer.coders.parameters())
    assert all(map(torch.equal, before, after)) == finetune
