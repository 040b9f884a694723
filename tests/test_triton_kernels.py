"""The Triton CLT kernels against torch (on a GPU, or the CPU with TRITON_INTERPRET=1)."""

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from sparsify import SparseCoderConfig

from vlm_sparsify.clt_inference import CLTInference
from vlm_sparsify.cross_layer import CrossLayerTranscoder

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="the kernel needs triton and a CUDA GPU, or TRITON_INTERPRET=1 (CPU)",
)
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.mark.parametrize(
    "rows,k,width,dtype",
    [(1, 4, 40, torch.float32), (37, 8, 300, torch.bfloat16), (130, 3, 128, torch.float32)],
)
def test_decode_accumulate_adds_the_sparse_product_and_bias(rows, k, width, dtype):
    from vlm_sparsify.triton_decode import decode_accumulate

    g = torch.Generator().manual_seed(rows)
    latents = 96
    wide = torch.randn(latents, width + 24, generator=g).to(dtype)
    weight = wide[:, 24:]  # a column slice: row stride of the wider matrix
    bias = torch.randn(width, generator=g)
    indices = torch.stack([torch.randperm(latents, generator=g)[:k] for _ in range(rows)])
    acts = torch.rand(rows, k, generator=g)
    ring = torch.randn(rows, 3, width, generator=g)  # out: slot 1, row stride 3 * width
    before = ring.clone()
    args = [t.to(DEVICE) for t in (indices, acts, weight, bias)]
    ring = ring.to(DEVICE)
    decode_accumulate(ring[:, 1], *args)
    expected = before.clone()
    expected[:, 1] += (acts[:, :, None] * weight.float()[indices]).sum(1) + bias
    torch.testing.assert_close(ring.cpu(), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unit column strides"):
        decode_accumulate(ring[:, 1].T, *args)


def test_decode_into_equals_decode_with_and_without_bias():
    cfg = SparseCoderConfig(num_latents=64, k=4, transcode=True)
    clt = CrossLayerTranscoder([f"l.{i}" for i in range(4)], 16, cfg, cross_layer=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in clt.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    clt = clt.to(DEVICE)
    fused = CLTInference(clt, kernel="triton")
    x = torch.randn(9, 16, generator=g).to(DEVICE)
    with torch.no_grad():
        for p in range(4):
            assert fused.direct(p)
            acts, indices, _ = fused.encode(p, x)
            stacked = fused.decode(p, acts, indices)  # [9, n, 16] with biases
            n = clt.n_targets(p)
            biases = torch.stack(list(clt.sources[p].b_decs)).float()
            for bias in (True, False):
                out = torch.zeros(9, n - 1 if n > 1 else 1, 16, device=DEVICE)
                first = 1 if n > 1 else 0
                count = out.shape[1]
                fused.decode_into(p, acts, indices, out.view(9, -1), first, count, bias)
                expected = stacked[:, first : first + count]
                if not bias:
                    expected = expected - biases[first : first + count]
                torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_source_decode_and_its_gradients_equal_embedding_bag(dtype):
    from vlm_sparsify.triton_train import source_decode

    g = torch.Generator().manual_seed(1)
    latents, rows, k, d = 48, 45, 5, 70  # latents used by many rows: segments longer than 16
    weights = [(torch.randn(latents, d, generator=g) * 0.5).to(dtype) for _ in range(3)]
    indices = torch.stack([torch.randperm(latents, generator=g)[:k] for _ in range(rows)])
    acts = torch.rand(rows, k, generator=g).to(dtype)
    coefs = [torch.randn(rows, d, generator=g) for _ in weights]

    def run(decode, leaf_dtype):
        leaves = [w.to(DEVICE, leaf_dtype, copy=True).requires_grad_(True) for w in weights]
        a = acts.to(DEVICE, leaf_dtype, copy=True).requires_grad_(True)
        outs = decode(a, indices.to(DEVICE), leaves)
        sum((o.float() * c.to(DEVICE)).sum() for o, c in zip(outs, coefs, strict=True)).backward()
        return (
            [o.float().cpu() for o in outs],
            a.grad.float().cpu(),
            [w.grad.float().cpu() for w in leaves],
        )

    def reference(a, idx, leaves):
        return [F.embedding_bag(idx, w, per_sample_weights=a, mode="sum") for w in leaves]

    outs, dacts, dws = run(source_decode, dtype)
    # against float32 throughout: the kernels accumulate in float32 and round once
    ref_outs, ref_dacts, ref_dws = run(reference, torch.float32)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for a, b in zip(outs + dws + [dacts], ref_outs + ref_dws + [ref_dacts], strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_a_clt_trains_the_same_with_the_triton_decoder():
    cfg = SparseCoderConfig(num_latents=64, k=4, transcode=True)
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(20, 16, generator=g).to(DEVICE) for _ in range(4)]
    outputs = [torch.randn(20, 16, generator=g).to(DEVICE) for _ in range(4)]
    results = []
    for kernel in ("embedding_bag", "triton"):
        clt = CrossLayerTranscoder([f"l.{i}" for i in range(4)], 16, cfg, cross_layer=3).to(DEVICE)
        with torch.no_grad():
            for param in clt.parameters():
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)))
        clt.gpu_decoder = kernel
        out = clt(inputs, outputs)
        out.fvu.sum().backward()
        results.append((out.fvu.detach().cpu(), [p.grad.cpu() for p in clt.parameters()]))
    (fvu_a, grads_a), (fvu_b, grads_b) = results
    torch.testing.assert_close(fvu_a, fvu_b, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
