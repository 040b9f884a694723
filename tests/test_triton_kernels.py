"""The Triton CLT kernels against torch (on a GPU, or the CPU with TRITON_INTERPRET=1)."""

import importlib.util
import os

import pytest
import torch
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
