"""CLTInference: the wide decoder copies decode exactly as the CLT, and notice weight changes."""

import pytest
import torch
from sparsify import SparseCoderConfig

from vlm_sparsify.clt_inference import CLTInference
from vlm_sparsify.cross_layer import CrossLayerTranscoder

HOOKS = [f"model.language_model.layers.{i}.mlp" for i in range(4)]
D, LATENTS, K = 16, 64, 4


def random_clt(cross_layer: int = 3, seed: int = 0) -> CrossLayerTranscoder:
    cfg = SparseCoderConfig(num_latents=LATENTS, k=K, transcode=True)
    clt = CrossLayerTranscoder(HOOKS, D, cfg, cross_layer)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in clt.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return clt


@pytest.mark.parametrize("cross_layer", [1, 3, 4])
def test_encode_and_decode_equal_the_clts(cross_layer: int) -> None:
    clt = random_clt(cross_layer)
    fused = CLTInference(clt)
    x = torch.randn(37, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in range(len(HOOKS)):
            expected = clt.encode(p, x)
            got = fused.encode(p, x)
            assert torch.equal(got.top_acts, expected.top_acts)
            assert torch.equal(got.top_indices, expected.top_indices)
            parts = clt.decode(p, expected.top_acts, expected.top_indices)
            stacked = fused.decode(p, expected.top_acts, expected.top_indices)
            assert stacked.shape == (37, clt.n_targets(p), D) and stacked.dtype == torch.float32
            # the same embedding_bag sums, one wide call instead of one per target: bit-equal
            assert torch.equal(stacked, torch.stack(parts, 1))


@pytest.mark.parametrize("post_encoder", [False, True])
def test_target_biases_are_what_decoding_without_biases_leaves_out(post_encoder: bool) -> None:
    """Sum over sources of decode(bias=False), plus target_biases, is the sum of the decodes."""
    clt = random_clt(cross_layer=3)
    if post_encoder:  # source 1 decodes target by target (not from a wide copy)
        clt.sources[1].add_post_encoder(scales=False)
    fused = CLTInference(clt)
    x = torch.randn(9, D, generator=torch.Generator().manual_seed(4))
    with_bias = torch.zeros(len(HOOKS), 9, D)
    without = torch.zeros(len(HOOKS), 9, D)
    with torch.no_grad():
        for p in range(len(HOOKS)):
            acts, indices, _ = fused.encode(p, x)
            n = clt.n_targets(p)
            with_bias[p : p + n] += fused.decode(p, acts, indices).transpose(0, 1)
            without[p : p + n] += fused.decode(p, acts, indices, bias=False).transpose(0, 1)
    sums = fused.target_biases()
    assert sums.shape == (len(HOOKS), D) and sums.dtype == torch.float32
    assert sums.abs().min() > 0  # every target has biases (random weights)
    torch.testing.assert_close(without + sums[:, None], with_bias)
    # target 3 is reached by sources 1, 2 and 3 (cross_layer 3)
    expected = sum(clt.sources[p].b_decs[3 - p] for p in (1, 2, 3))
    torch.testing.assert_close(sums[3], expected.detach())


def test_acts_get_gradients_through_the_wide_decoders() -> None:
    clt = random_clt()
    fused = CLTInference(clt)
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        acts, indices, _ = clt.encode(0, x)
    grads = []
    for decode in (
        lambda a: fused.decode(0, a, indices),
        lambda a: torch.stack(clt.decode(0, a, indices), 1),
    ):
        leaf = acts.clone().requires_grad_(True)
        (decode(leaf) * torch.linspace(-1, 1, D)).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_post_encoder_sources_decode_target_by_target() -> None:
    clt = random_clt()
    clt.sources[1].add_post_encoder(scales=True)
    with torch.no_grad():
        clt.sources[1].post_encs[0].fill_(0.5)  # type: ignore[index]
        for scale in clt.sources[1].post_enc_scales:  # type: ignore[union-attr]
            scale.fill_(2.0)
    fused = CLTInference(clt)
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for p in range(len(HOOKS)):
            acts, indices, _ = clt.encode(p, x)
            expected = torch.stack(clt.decode(p, acts, indices), 1)
            torch.testing.assert_close(fused.decode(p, acts, indices), expected)
    assert fused.decoders[1] is None and fused.decoders[0] is not None
    fused.target_biases()
    assert fused.nbytes == CLTInference.copy_nbytes(clt)  # source 1 is not copied


def test_current_notices_every_kind_of_weight_change() -> None:
    clt = random_clt()
    fused = CLTInference(clt)
    assert fused.current() and fused.nbytes == 0  # nothing decoded yet
    x = torch.randn(3, D)
    with torch.no_grad():
        for p in range(len(HOOKS)):
            fused.decode(p, *fused.encode(p, x)[:2])
    # the copies: the wide decoders (the encoders are the CLT's own on the CPU)
    decoder_bytes = sum(W.nbytes for s in clt.sources for W in s.W_decs)
    bias_bytes = sum(b.numel() * 4 for s in clt.sources for b in s.b_decs)
    assert fused.nbytes == decoder_bytes + bias_bytes
    sums = fused.target_biases()  # [H, d] float32: one row per target
    assert fused.nbytes == decoder_bytes + bias_bytes + sums.nbytes
    assert fused.nbytes == CLTInference.copy_nbytes(clt)
    with torch.no_grad():
        clt.sources[2].W_decs[1].mul_(2)  # an optimizer step is in place
    assert not fused.current()
    fused = CLTInference(clt)
    clt.load_state_dict(random_clt(seed=5).state_dict())  # copies into the same storage
    assert not fused.current()
    fused = CLTInference(clt)
    clt.double()  # new storage
    assert not fused.current()


def test_a_decoding_step_after_the_prefill_decodes_its_own_rows() -> None:
    """The bag offsets kept per shape: a prefill of 9 rows, then steps of 1 and 2 rows."""
    clt = random_clt()
    fused = CLTInference(clt)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for rows in (9, 1, 2, 9):
            x = torch.randn(rows, D, generator=generator)
            for p in range(len(HOOKS)):
                acts, indices, _ = clt.encode(p, x)
                expected = torch.stack(clt.decode(p, acts, indices), 1)
                assert torch.equal(fused.decode(p, acts, indices), expected)


def test_triton_decodes_into_targets_only_sources_without_post_encoders(monkeypatch) -> None:
    """Per-target activation offsets make a source's decode non-linear: no direct decode."""
    import vlm_sparsify.triton_decode

    monkeypatch.setattr(vlm_sparsify.triton_decode, "check_available", lambda device: None)
    clt = random_clt()
    clt.sources[1].add_post_encoder(scales=False)
    triton = CLTInference(clt, kernel="triton")
    assert [triton.direct(p) for p in range(4)] == [True, False, True, True]
    assert not any(CLTInference(clt).direct(p) for p in range(4))


def test_encoder_copies_in_another_dtype_count_in_nbytes(monkeypatch) -> None:
    """On CUDA the encoders are copied in bf16: `nbytes` and `copy_nbytes` count them."""
    import vlm_sparsify.clt_inference

    monkeypatch.setattr(vlm_sparsify.clt_inference, "_encoder_dtype", lambda w: torch.bfloat16)
    clt = random_clt()
    fused = CLTInference(clt)
    encoder_bytes = sum(s.encoder.weight.numel() + s.encoder.bias.numel() for s in clt.sources)
    assert fused.nbytes == 2 * encoder_bytes  # nothing decoded yet
    with torch.no_grad():
        for p in range(len(HOOKS)):
            fused.decode(p, *fused.encode(p, torch.randn(3, D))[:2])
    fused.target_biases()
    assert fused.nbytes == CLTInference.copy_nbytes(clt)


def test_copies_of_a_bf16_clt_count_their_float32_biases() -> None:
    clt = random_clt().bfloat16()
    fused = CLTInference(clt)
    with torch.no_grad():
        for p in range(len(HOOKS)):
            fused.decode(p, *fused.encode(p, torch.randn(3, D))[:2])
    fused.target_biases()
    assert fused.nbytes == CLTInference.copy_nbytes(clt)
