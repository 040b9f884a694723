"""Our training path reproduces stock `sparsify.Trainer` on text-only batches (same weights)."""

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from sparsify import SparseCoderConfig, TrainConfig
from sparsify import Trainer as StockTrainer
from transformers import LlamaConfig, LlamaForCausalLM

from vlm_sparsify.training import Trainer, build_coders, build_optimizers, eval_weights

BATCH, SEQ, STEPS = 4, 16, 6


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=100,
    )
    return LlamaForCausalLM(config).eval()


# 64 tokens a step: not yet dead at 64 (sparsify counts a latent dead above the threshold)
AUXK = dict(auxk_alpha=1 / 32, dead_feature_threshold=64)
K_DECAY = dict(k_decay_steps=4)  # from min(64 latents, 10 x 32) = 64 down to k 4


@pytest.mark.parametrize(
    ("transcode", "extra"),
    [
        (True, {}),
        (False, {}),
        (True, AUXK),
        (True, {"multi_topk": True}),
        (False, AUXK),
        (True, K_DECAY),
        (True, {**K_DECAY, "grad_acc_steps": 2}),
        (True, {"auxk_alpha": 1 / 32, "dead_feature_threshold": 60, "grad_acc_steps": 2}),
        (True, {"micro_acc_steps": 2}),
    ],
    ids=[
        "plt",
        "sae",
        "plt-auxk",
        "plt-multi-topk",
        "sae-auxk",
        "k-decay",
        "k-decay-grad-acc",
        "auxk-grad-acc",  # dead counts move at optimizer steps, over all their batches' tokens
        "micro-acc",  # every chunk's FVU divides by the whole batch's variance
    ],
)
def test_plugin_matches_stock_trainer(tmp_path, transcode: bool, extra: dict):
    model = tiny_llama()
    ids = torch.randint(0, 100, (BATCH * STEPS, SEQ), generator=torch.Generator().manual_seed(1))
    train_extra = {k: v for k, v in extra.items() if k != "multi_topk"}
    sae_cfg = dict(transcode=transcode, num_latents=64, k=4, multi_topk="multi_topk" in extra)

    stock_cfg = TrainConfig(
        SparseCoderConfig(**sae_cfg),
        batch_size=BATCH,
        hookpoints=["layers.*.mlp"],
        log_to_wandb=False,
        save_dir=str(tmp_path),
        run_name="stock",
        save_every=10**6,
        **train_extra,
    )
    dataset = Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    StockTrainer(stock_cfg, dataset, model).fit()

    ours_cfg = TrainConfig(
        SparseCoderConfig(**sae_cfg), batch_size=BATCH, log_to_wandb=False, **train_extra
    )
    hookpoints = [f"model.layers.{i}.mlp" for i in range(3)]
    coders = build_coders(hookpoints, 32, ours_cfg.sae, 0, torch.device("cpu"))
    initial = {h: {k: v.clone() for k, v in coders[h].state_dict().items()} for h in hookpoints}
    optimizers, schedulers = build_optimizers(ours_cfg, coders, STEPS)
    trainer = Trainer(model, coders, ours_cfg, optimizers, schedulers)
    batches = [
        {"inputs": {"input_ids": chunk}, "token_mask": torch.ones_like(chunk, dtype=torch.bool)}
        for chunk in ids.split(BATCH)
    ]
    trainer.fit(batches)
    assert ours_cfg.sae.k == 4  # the run's --k (its config.json) is not the decayed k
    if "auxk_alpha" in extra:  # latents were dead at the end: AuxK was part of the loss
        assert any(
            (c > extra["dead_feature_threshold"]).any() for c in trainer.state.tokens_since_fired
        )

    with eval_weights(optimizers):
        for i, hookpoint in enumerate(hookpoints):
            stock = load_file(tmp_path / "stock" / f"layers.{i}.mlp" / "sae.safetensors")
            ours = coders[hookpoint].state_dict()
            assert set(stock) == set(ours)
            for key, value in stock.items():
                torch.testing.assert_close(ours[key], value, atol=1e-5, rtol=0)
            # training moved the weights: the comparison is not between two initialisations
            moved = (ours["W_dec"] - initial[hookpoint]["W_dec"]).abs().max()
            assert moved > 1e-3


def test_a_run_ending_mid_accumulation_drops_the_last_batch_as_stock_does(tmp_path):
    # --grad_acc_steps 2 over 5 batches: stock never applies the 5th batch's gradient yet saves
    # global_step 5 (its --resume then skips that batch); ours saves the same weights as step 4
    model = tiny_llama()
    ids = torch.randint(0, 100, (BATCH * 5, SEQ), generator=torch.Generator().manual_seed(1))
    sae_cfg = SparseCoderConfig(transcode=True, num_latents=64, k=4)
    stock_cfg = TrainConfig(
        sae_cfg, batch_size=BATCH, hookpoints=["layers.*.mlp"], log_to_wandb=False,
        save_dir=str(tmp_path), run_name="stock", save_every=10**6, grad_acc_steps=2,
    )  # fmt: skip
    dataset = Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    StockTrainer(stock_cfg, dataset, model).fit()
    assert torch.load(tmp_path / "stock" / "state.pt", weights_only=True)["global_step"] == 5

    ours_cfg = TrainConfig(sae_cfg, batch_size=BATCH, log_to_wandb=False, grad_acc_steps=2)
    hookpoints = [f"model.layers.{i}.mlp" for i in range(3)]
    coders = build_coders(hookpoints, 32, ours_cfg.sae, 0, torch.device("cpu"))
    optimizers, schedulers = build_optimizers(ours_cfg, coders, 5)
    trainer = Trainer(model, coders, ours_cfg, optimizers, schedulers)
    trainer.fit(
        {"inputs": {"input_ids": chunk}, "token_mask": torch.ones_like(chunk, dtype=torch.bool)}
        for chunk in ids.split(BATCH)
    )
    state = trainer.state
    assert (state.global_step, state.batches_seen, state.tokens_seen) == (4, 4, 4 * BATCH * SEQ)
    assert trainer.dropped_batches == 1 and len(state.fvu_history) == 4
    assert all(p.grad is None for p in coders.parameters())  # the partial gradient is gone
    with eval_weights(optimizers):
        for i, hookpoint in enumerate(hookpoints):
            stock = load_file(tmp_path / "stock" / f"layers.{i}.mlp" / "sae.safetensors")
            for key, value in stock.items():
                torch.testing.assert_close(
                    coders[hookpoint].state_dict()[key], value, atol=0, rtol=0
                )


@pytest.mark.parametrize("transcode", [False, True], ids=["sae", "plt"])
def test_the_update_check_before_a_save_leaves_training_unchanged(transcode: bool):
    # the check runs the updated coders forward on their batch (before each checkpoint); an SAE
    # renormalised its decoder rows there too, one more time than stock sparsify does, and the
    # sign optimizer turned those last-bit changes into different weights
    def train(check: bool) -> dict[str, torch.Tensor]:
        model = tiny_llama()
        ids = torch.randint(0, 100, (BATCH * 4, SEQ), generator=torch.Generator().manual_seed(1))
        cfg = TrainConfig(
            SparseCoderConfig(transcode=transcode, num_latents=64, k=4),
            batch_size=BATCH,
            log_to_wandb=False,
        )
        hookpoints = [f"model.layers.{i}.mlp" for i in range(3)]
        coders = build_coders(hookpoints, 32, cfg.sae, 0, torch.device("cpu"))
        optimizers, schedulers = build_optimizers(cfg, coders, 4)
        trainer = Trainer(model, coders, cfg, optimizers, schedulers)
        for chunk in ids.split(BATCH):
            trainer.check_update = check
            mask = torch.ones_like(chunk, dtype=torch.bool)
            trainer.train_on_batch({"inputs": {"input_ids": chunk}, "token_mask": mask})
        return {k: v.clone() for k, v in coders.state_dict().items()}

    unchecked, checked = train(False), train(True)
    for key, value in unchecked.items():
        assert torch.equal(checked[key], value), key
