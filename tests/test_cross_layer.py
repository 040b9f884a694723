"""The CLT: targets per source, predictions summed over sources, init, parity, memory model."""

import pytest
import torch
from sparsify import SparseCoderConfig
from sparsify.sign_sgd import SignSGD

from vlm_sparsify.cross_layer import (
    CLTSource,
    CrossLayerTranscoder,
    n_sources_per_target,
    n_targets_per_source,
    training_memory_bytes,
)
from vlm_sparsify.per_layer import PerLayerCoders
from vlm_sparsify.schedule_free import ScheduleFreeSignSGD

HOOKS3 = ["model.language_model.layers.0.mlp", "model.language_model.layers.1.mlp", "l.2.mlp"]


@pytest.mark.parametrize(
    ("layers", "cross_layer", "expected"),
    [(4, 4, [4, 3, 2, 1]), (4, 2, [2, 2, 2, 1]), (5, 16, [5, 4, 3, 2, 1]), (3, 0, [1, 1, 1])],
)
def test_n_targets_per_source(layers: int, cross_layer: int, expected: list[int]) -> None:
    assert n_targets_per_source(layers, cross_layer) == expected
    hooks = [f"l.{i}" for i in range(layers)]
    cfg = SparseCoderConfig(num_latents=4, k=1, transcode=True)
    if cross_layer:
        clt = CrossLayerTranscoder(hooks, 2, cfg, cross_layer)
        assert [clt.n_targets(p) for p in range(layers)] == expected
        assert [len(clt.sources_reaching(t)) for t in range(layers)] == n_sources_per_target(
            layers, cross_layer
        )


def hand_built_clt(cross_layer: int) -> tuple[CrossLayerTranscoder, list[torch.Tensor]]:
    """d=2, 3 latents, k=1; encoder picks latent 0 at source 0 (act 2), 1 at 1 (act 3), 2 at 2 (3)."""
    cfg = SparseCoderConfig(num_latents=3, k=1, transcode=True)
    clt = CrossLayerTranscoder(HOOKS3, 2, cfg, cross_layer)
    with torch.no_grad():
        for p, source in enumerate(clt.sources):
            source.encoder.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
            source.encoder.bias.zero_()
            for i, (W, b) in enumerate(zip(source.W_decs, source.b_decs, strict=True)):
                # Row j of decoder p->t is [100p + 10t + j, -(100p + 10t + j)]
                base = 100 * p + 10 * (p + i) + torch.arange(3.0)
                W.copy_(torch.stack([base, -base], dim=1))
                b.copy_(torch.tensor([p + 1.0, 0.5 * (p + i)]))
    inputs = [torch.tensor([[2.0, 1.0]]), torch.tensor([[0.5, 3.0]]), torch.tensor([[-1.0, -2.0]])]
    return clt, inputs


def row(p: int, t: int, j: int) -> torch.Tensor:
    v = 100.0 * p + 10.0 * t + j
    return torch.tensor([v, -v])


def bias(p: int, t: int) -> torch.Tensor:
    return torch.tensor([p + 1.0, 0.5 * t])


def test_hand_built_prediction_is_sum_over_sources() -> None:
    clt, inputs = hand_built_clt(cross_layer=3)
    expected = [
        2 * row(0, 0, 0) + bias(0, 0),
        2 * row(0, 1, 0) + bias(0, 1) + 3 * row(1, 1, 1) + bias(1, 1),
        2 * row(0, 2, 0)
        + bias(0, 2)
        + 3 * row(1, 2, 1)
        + bias(1, 2)
        + 3 * row(2, 2, 2)
        + bias(2, 2),
    ]
    outputs = [torch.tensor([[1.0, 2.0]]).repeat(1, 1) for _ in range(3)]
    out = clt(inputs, outputs)
    for t in range(3):
        torch.testing.assert_close(out.predictions[t][0], expected[t])
    assert [int(i) for i in torch.cat(out.latent_indices).flatten()] == [0, 1, 2]
    assert [float(a) for a in torch.cat(out.latent_acts).detach().flatten()] == [2.0, 3.0, 3.0]
    # predict() and decode() agree with forward
    encoded = [clt.encode(p, x) for p, x in enumerate(inputs)]
    torch.testing.assert_close(clt.predict(encoded, 2)[0], expected[2])
    torch.testing.assert_close(clt.decode(1, *encoded[1][:2])[1][0], 3 * row(1, 2, 1) + bias(1, 2))


def test_hand_built_cross_layer_2_skips_far_targets() -> None:
    clt, inputs = hand_built_clt(cross_layer=2)
    expected_2 = 2 * 0 + 3 * row(1, 2, 1) + bias(1, 2) + 3 * row(2, 2, 2) + bias(2, 2)
    ys = [torch.zeros(2, 2) for _ in range(3)]
    two = [x.repeat(2, 1) for x in inputs]
    ys[2] = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    out = clt(two, ys)
    torch.testing.assert_close(out.predictions[2][0], expected_2)
    # FVU of target 2 by hand: sum of squared errors over the two rows / total variance 4
    sq = (expected_2 - ys[2][0]).pow(2).sum() + (expected_2 - ys[2][1]).pow(2).sum()
    torch.testing.assert_close(out.fvu[2], sq / 4.0)


def random_acts(seed: int, hooks: int, n: int, d: int) -> tuple[list, list]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d, generator=g) + 1.0 for _ in range(hooks)]
    ys = [torch.randn(n, d, generator=g) * 2 - 3.0 for _ in range(hooks)]
    return xs, ys


def test_init_biases_centres_encoders_and_splits_target_means() -> None:
    xs, ys = random_acts(0, 4, 64, 8)
    clt = CrossLayerTranscoder(
        [f"l.{i}" for i in range(4)], 8, SparseCoderConfig(num_latents=32, k=4, transcode=True), 2
    )
    clt.init_biases(xs, ys)
    for p, x in enumerate(xs):
        encoder = clt.sources[p].encoder
        torch.testing.assert_close(encoder(x).mean(0), torch.zeros(32), atol=1e-5, rtol=0)
    out = clt(xs, ys)
    for t, y in enumerate(ys):
        # decoders start at zero, so the prediction is the target mean
        torch.testing.assert_close(out.predictions[t], y.mean(0).expand_as(y), atol=1e-5, rtol=0)
    torch.testing.assert_close(clt.sources[1].b_decs[0], ys[1].mean(0) / 2)
    torch.testing.assert_close(clt.sources[0].b_decs[0], ys[0].mean(0))
    # Sources 0 and 1 both reach target 1 with equal biases, but each owns its tensor
    with torch.no_grad():
        clt.sources[0].b_decs[1].add_(1.0)
    torch.testing.assert_close(clt.sources[1].b_decs[0], ys[1].mean(0) / 2)


@pytest.mark.parametrize("local_terms", [False, True], ids=["fvu", "fvu-auxk-multi-topk"])
def test_cross_layer_1_equals_per_layer_transcoders(local_terms: bool) -> None:
    """A CLT reaching one layer is sparsify's PLT: same init (seeded), FVU and gradients, and
    the same AuxK and multi-TopK terms."""
    xs, ys = random_acts(1, 3, 128, 16)
    cfg = SparseCoderConfig(num_latents=64, k=8, transcode=True, multi_topk=local_terms)
    hooks = [f"l.{i}" for i in range(3)]
    plt, clt = PerLayerCoders(hooks, 16, cfg), CrossLayerTranscoder(hooks, 16, cfg, 1)
    for coders in (plt, clt):
        coders.init_biases(xs, ys)
        with torch.no_grad():  # move decoders off zero identically
            for p in range(3):
                W = coders.coders[p].W_dec if coders is plt else coders.sources[p].W_decs[0]
                W.copy_(torch.linspace(-1, 1, W.numel()).view_as(W))
    dead = [torch.arange(64) % (p + 2) == 0 for p in range(3)] if local_terms else None
    a, b = plt(xs, ys, dead_masks=dead), clt(xs, ys, dead_masks=dead)
    torch.testing.assert_close(a.fvu, b.fvu)
    assert a.fvu.min().item() > 0.1
    losses = []
    for out in (a, b):
        loss = out.fvu.sum()
        if local_terms:
            assert out.auxk_loss.min() > 0 and out.multi_topk_fvu.min() > 0
            loss = loss + out.auxk_loss.sum() / 32 + out.multi_topk_fvu.sum() / 8
        losses.append(loss)
    if local_terms:
        torch.testing.assert_close(a.auxk_loss, b.auxk_loss)
        torch.testing.assert_close(a.multi_topk_fvu, b.multi_topk_fvu)
    for loss in losses:
        loss.backward()
    for p in range(3):
        torch.testing.assert_close(plt.coders[p].W_dec.grad, clt.sources[p].W_decs[0].grad)
        torch.testing.assert_close(
            plt.coders[p].encoder.weight.grad, clt.sources[p].encoder.weight.grad
        )


def test_training_step_lowers_summed_fvu_and_reaches_all_decoders() -> None:
    xs, ys = random_acts(2, 3, 256, 16)
    cfg = SparseCoderConfig(num_latents=64, k=8, transcode=True)
    clt = CrossLayerTranscoder([f"l.{i}" for i in range(3)], 16, cfg, 3)
    clt.init_biases(xs, ys)
    opt = torch.optim.Adam(clt.parameters(), lr=1e-2)
    first = None
    for _ in range(20):
        loss = clt(xs, ys).fvu.sum()
        first = loss.item() if first is None else first
        loss.backward()
        if opt.state == {}:
            assert all(float(W.grad.abs().sum()) > 0 for s in clt.sources for W in s.W_decs)
        opt.step()
        opt.zero_grad()
    assert clt(xs, ys).fvu.sum().item() < 0.9 * first


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t.numel() > 1)


@pytest.mark.parametrize("optimizer", ["signum", "adam"])
def test_memory_formula_matches_measured_bytes(optimizer: str) -> None:
    """Weights, gradients and optimizer state counted after a real step equal the formula."""
    hooks, d, latents, reach = 5, 16, 64, 3
    cfg = SparseCoderConfig(num_latents=latents, k=4, transcode=True)
    clt = CrossLayerTranscoder(
        [f"l.{i}" for i in range(hooks)], d, cfg, reach, decoder_dtype=torch.bfloat16
    )
    xs, ys = random_acts(3, hooks, 32, d)
    if optimizer == "signum":
        opt = ScheduleFreeSignSGD(SignSGD(clt.parameters(), lr=1e-3), momentum=0.95)
        opt.train()
    else:
        opt = torch.optim.Adam(clt.parameters(), lr=1e-3)
    clt(xs, ys).fvu.sum().backward()
    grads = tensor_bytes(p.grad for p in clt.parameters())
    opt.step()
    state = tensor_bytes(v for s in opt.state.values() for v in s.values())
    expected = training_memory_bytes(hooks, latents, d, reach, optimizer, 4, 2)
    assert clt.memory_bytes(optimizer) == expected
    assert tensor_bytes(clt.parameters()) == expected["weights"]
    assert grads == expected["gradients"]
    assert state == expected["optimizer"]
    assert expected["decoder_weights"] == (3 + 3 + 3 + 2 + 1) * latents * d * 2


def test_llava_7b_decoder_size() -> None:
    """32 layers x 8192 latents x cross_layer 16 at d=4096: ~13 B decoder parameters."""
    mem = training_memory_bytes(32, 8192, 4096, 16, "signum", 4, 2)
    assert mem["decoder_weights"] // 2 == 392 * 8192 * 4096  # 13.15e9 parameters


def normal_parameters(module: torch.nn.Module) -> None:
    """Every parameter drawn from N(0, 1) after seed 0 (transcoder decoders start at zero)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_()


@pytest.mark.parametrize("grad", [False, True])
def test_cpu_decode_of_a_source_equals_decoding_each_target(grad: bool) -> None:
    """CPU `decode` flattens the bags once for all targets: bit for bit `decode_target`'s."""
    torch.manual_seed(0)
    source = CLTSource(32, 256, n_targets=3)
    source.add_post_encoder(scales=True)
    for parameter in source.parameters():
        parameter.data.normal_()
    acts, indices = torch.rand(20, 8), torch.randint(0, 256, (20, 8))
    with torch.set_grad_enabled(grad):
        together = source.decode(acts, indices)
        one_by_one = [source.decode_target(i, acts, indices) for i in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(together, one_by_one, strict=True))
    if grad:
        grads = [
            torch.autograd.grad(sum(part.sum() for part in parts), list(source.W_decs))
            for parts in (together, one_by_one)
        ]
        assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_training_that_cannot_fit_stops_before_allocating() -> None:
    from vlm_sparsify.cross_layer import check_training_fits

    # LLaVA-7B's CLT-16 at 8,192 latents, bf16 decoders, signum: 91.8 GB (docs/memory.md)
    needed = training_memory_bytes(32, 8192, 4096, 16, "signum", 4, 2)
    assert needed["total"] == pytest.approx(91.8e9, rel=0.01)
    with pytest.raises(SystemExit, match="needs ~85.5 GiB .* 66.0 GiB free .* --decoder_dtype"):
        check_training_fits(needed, 66 * 2**30, "signum")  # an 80 GB card with the model loaded
    with pytest.warns(UserWarning, match="little room is left for activations"):
        check_training_fits(needed, 90 * 2**30, "signum")
    check_training_fits(needed, 120 * 2**30, "signum")  # an H200: silent


def test_predict_adds_each_sources_skip_connection_on_its_own_input() -> None:
    cfg = SparseCoderConfig(num_latents=16, k=2, transcode=True, skip_connection=True)
    clt = CrossLayerTranscoder(HOOKS3, 4, cfg, cross_layer=2)
    normal_parameters(clt)
    inputs, outputs = random_acts(1, 3, 5, 4)
    encoded = [clt.encode(p, x) for p, x in enumerate(inputs)]
    out = clt(inputs, outputs)
    for t in range(3):
        without_skip = clt.predict(encoded, t)
        skips = sum(
            inputs[p] @ clt.sources[p].W_skips[t - p].detach().T for p in clt.sources_reaching(t)
        )
        torch.testing.assert_close(clt.predict(encoded, t, inputs), without_skip + skips)
        torch.testing.assert_close(clt.predict(encoded, t, inputs), out.predictions[t])


@pytest.mark.parametrize("scales", [False, True])
def test_post_encoder_offset_leaves_zero_valued_topk_slots_at_zero(scales: bool) -> None:
    """clt-training's post-encoder: (act + offset * (act > 0)) * scale."""
    source = CLTSource(4, 8, n_targets=1)
    source.add_post_encoder(scales=scales)
    torch.manual_seed(0)
    with torch.no_grad():
        source.W_decs[0].normal_()
        source.b_decs[0].normal_()
        source.post_encs[0].fill_(0.5)
        if scales:
            source.post_enc_scales[0].fill_(3.0)
    acts, indices = torch.tensor([[2.0, 0.0]]), torch.tensor([[1, 3]])  # slot 2: nothing fired
    value = 7.5 if scales else 2.5
    assert source.target_acts(0, acts, indices).tolist() == [[value, 0.0]]
    expected = value * source.W_decs[0][1] + source.b_decs[0]
    torch.testing.assert_close(source.decode_target(0, acts, indices)[0], expected.detach())


def test_auxk_is_scaled_down_when_fewer_latents_than_k_aux_are_dead():
    from vlm_sparsify.cross_layer import auxk_loss

    d, latents = 8, 6  # k_aux = d / 2 = 4
    W_dec = torch.eye(latents, d)
    pre = torch.tensor([[5.0, 1.0, 2.0, 3.0, 0.0, 0.0]])
    dead = torch.tensor([False, False, True, False, False, False])  # 1 dead of k_aux 4
    loss = auxk_loss(W_dec, pre, torch.zeros(1, d), torch.tensor(1.0), dead)
    # only latent 2 (pre-activation 2) decodes: squared error 4, scaled by 1 dead / k_aux 4
    torch.testing.assert_close(loss, torch.tensor(1.0))


def test_auxk_of_a_source_decodes_through_its_own_layer_decoder() -> None:
    """Source 0's AuxK predicts its own layer's residual with W_decs[0], not a later target's."""
    cfg = SparseCoderConfig(num_latents=16, k=2, transcode=True)
    clt = CrossLayerTranscoder(HOOKS3, 4, cfg, cross_layer=2)
    normal_parameters(clt)
    xs, ys = random_acts(4, 3, 8, 4)
    dead = [torch.arange(16) % 2 == 0 for _ in range(3)]
    before = clt(xs, ys, dead_masks=dead).auxk_loss
    with torch.no_grad():
        clt.sources[0].W_decs[1].mul_(3.0)  # source 0 -> target 1 only
    after = clt(xs, ys, dead_masks=dead).auxk_loss
    assert before[0] > 0
    torch.testing.assert_close(after[0], before[0])
    assert not torch.allclose(after[1], before[1])  # target 1's residual moved


def test_free_cpu_memory_is_bytes_between_free_pages_and_physical_memory() -> None:
    import os

    from vlm_sparsify.cross_layer import free_memory_bytes

    page = os.sysconf("SC_PAGE_SIZE")
    free = free_memory_bytes(torch.device("cpu"))
    assert free is not None
    # MemAvailable counts free pages and reclaimable caches, in kB in /proc/meminfo
    assert page * os.sysconf("SC_AVPHYS_PAGES") / 2 < free <= page * os.sysconf("SC_PHYS_PAGES")


def test_the_callers_total_variances_are_the_fvu_denominators() -> None:
    """The trainer passes each target's variance over all processes' tokens: FVU and multi-TopK
    FVU divide by it, not by this batch's own."""
    from vlm_sparsify.coder_set import total_variance

    xs, ys = random_acts(5, 3, 32, 8)
    cfg = SparseCoderConfig(num_latents=32, k=2, transcode=True, multi_topk=True)
    clt = CrossLayerTranscoder(HOOKS3, 8, cfg, cross_layer=2)
    clt.init_biases(xs, ys)
    own = clt(xs, ys)
    doubled = clt(xs, ys, total_variances=[2 * total_variance(y) for y in ys])
    torch.testing.assert_close(doubled.fvu, own.fvu / 2)
    torch.testing.assert_close(doubled.multi_topk_fvu, own.multi_topk_fvu / 2)


def test_invalid_clt_settings_are_refused() -> None:
    from vlm_sparsify.cross_layer import coder_memory_bytes

    cfg = SparseCoderConfig(num_latents=4, k=1, transcode=True)
    with pytest.raises(ValueError, match="cross_layer must be >= 0, got -1"):
        n_targets_per_source(3, -1)
    with pytest.raises(ValueError, match="cross_layer must be >= 1 for a CLT, got 0"):
        CrossLayerTranscoder(HOOKS3, 2, cfg, 0)
    with pytest.raises(ValueError, match="set cfg.transcode=True"):
        CrossLayerTranscoder(HOOKS3, 2, SparseCoderConfig(num_latents=4, k=1), 2)
    with pytest.raises(ValueError, match="Unknown optimizer 'sgd'"):
        coder_memory_bytes(1, 1, 4, 2, "sgd")
    clt = CrossLayerTranscoder(HOOKS3, 2, cfg, 2)
    encoded = [None, clt.encode(1, torch.ones(1, 2)), None]
    with pytest.raises(ValueError, match=r"target 1 \(.*layers.1.mlp\) needs source 0 encoded"):
        clt.predict(encoded, 1)
