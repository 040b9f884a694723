"""`TopKEncoder` (Triton weight gradient) against sparsify's `FusedEncoder` and a float64 reference.

The kernel runs on a CUDA GPU, or on the CPU through Triton's interpreter (make test-triton); the
test that CPU training stays stock's by default runs everywhere.
"""

import importlib.util
import os

import pytest
import torch
from sparsify import SparseCoderConfig
from sparsify.fused_encoder import fused_encoder
from torch import Tensor

from vlm_sparsify import topk_encoder
from vlm_sparsify.cross_layer import CrossLayerTranscoder
from vlm_sparsify.topk_encoder import encode_topk, triton_backward_applies

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="the kernel needs triton and a CUDA GPU, or TRITON_INTERPRET=1 (CPU)",
)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"


@pytest.fixture
def triton_on_cpu(monkeypatch):
    monkeypatch.setattr(topk_encoder, "TRITON_BACKWARD_ON_CPU", True)


def assert_stocks(ours: Tensor, stock: Tensor) -> None:
    """Bit for bit: on CUDA `gradients` runs torch's deterministic index_add_ (stock's atomics
    add in no fixed order: a bf16 grad_bias of 41 rows differed by 4 ulps on an H200)."""
    assert torch.equal(ours, stock)


def encoder_inputs(
    rows: int, latents: int, d: int, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor]:
    """x (a column slice: not contiguous), weight and bias; the bias makes latent 0 win in most
    rows, then latents 1-3, and latents from `latents // 2` on lose in every row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d + 3, generator=g)[:, 3:]
    weight = torch.randn(latents, d, generator=g) / d**0.5
    bias = torch.randn(latents, generator=g) * 0.1
    bias[:4] += torch.tensor([5.0, 3.0, 3.0, 3.0])
    bias[latents // 2 :] -= 100.0
    return x.to(dtype), weight.to(dtype), bias.to(dtype)


def gradients(
    encode,
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    k: int,
    autocast: bool = False,
    device: str = DEVICE,
) -> tuple[tuple[Tensor, ...], tuple[Tensor, Tensor, Tensor]]:
    """`encode`'s outputs, and the gradients of x, weight and bias for `upstream_gradient` of the
    top-k values, given through their transpose (so not contiguous, as autograd may hand it)."""
    leaves = [t.detach().to(device).requires_grad_() for t in (x, weight, bias)]
    deterministic = torch.are_deterministic_algorithms_enabled()
    # warn_only: cuBLAS's matmul has no deterministic switch without CUBLAS_WORKSPACE_CONFIG
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            out = encode(*leaves, k, "topk")
        upstream = upstream_gradient(x.shape[0], k).to(device)
        (out.top_acts.T.float() * upstream).sum().backward()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    grads = tuple(leaf.grad.cpu() for leaf in leaves)
    return tuple(t.detach().cpu() for t in out), grads  # type: ignore[return-value]


def backward_name(x: Tensor, weight: Tensor, bias: Tensor, k: int, device: str = DEVICE) -> str:
    """The autograd node `encode_topk` gives these tensors (weight needing a gradient)."""
    weight = weight.to(device).requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=x.dtype != weight.dtype):
        out = encode_topk(x.to(device), weight, bias.to(device), k, "topk")
    return type(out.top_acts.grad_fn).__name__


def upstream_gradient(rows: int, k: int) -> Tensor:
    """The seeded gradient `gradients` gives the top-k values, transposed: `[k, rows]`."""
    return torch.randn(k, rows, generator=torch.Generator().manual_seed(7))


def reference_weight_gradient(x: Tensor, weight: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    """float64 weight gradient through a dense `[N, M]` gradient of the latents, from the
    gradient autograd gives the top-k values (`upstream_gradient` in their dtype)."""
    grad_values = upstream_gradient(*values.shape).T.to(values.dtype)
    dense = torch.zeros(x.shape[0], weight.shape[0], dtype=torch.float64)
    dense.scatter_add_(1, indices, grad_values.double())
    return dense.T @ x.double()


@needs_triton
@pytest.mark.parametrize(
    ("rows", "latents", "d", "k"),
    [(37, 64, 24, 5), (50, 96, 40, 1), (9, 16, 8, 8), (23, 40, 33, 3)],
    ids=["odd-rows-by-k", "k-1", "k-half-the-chosen-latents", "d-not-a-power-of-2"],
)
def test_triton_backward_matches_fused_encoder(triton_on_cpu, rows, latents, d, k):
    x, weight, bias = encoder_inputs(rows, latents, d, seed=rows)
    assert backward_name(x, weight, bias, k) == "TopKEncoderBackward"
    ours, our_grads = gradients(encode_topk, x, weight, bias, k)
    stock, stock_grads = gradients(fused_encoder, x, weight, bias, k)
    assert all(torch.equal(a, b) for a, b in zip(ours, stock, strict=True))
    indices = ours[1]
    counts = torch.bincount(indices.flatten(), minlength=latents)
    # the cases the kernel must get right: latents most rows chose, latents no row chose
    assert counts.max() >= rows // 2 and (counts == 0).any()
    grad_input, grad_weight, grad_bias = our_grads
    assert_stocks(grad_input, stock_grads[0])
    assert_stocks(grad_bias, stock_grads[2])
    torch.testing.assert_close(grad_weight, stock_grads[1], rtol=1e-5, atol=1e-6)
    assert grad_weight.dtype == weight.dtype and grad_weight.shape == weight.shape
    assert torch.all(grad_weight[counts == 0] == 0)
    expected = reference_weight_gradient(x, weight, *ours[:2])
    torch.testing.assert_close(grad_weight.double(), expected, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize(
    ("x_dtype", "weight_dtype", "autocast"),
    [
        (torch.bfloat16, torch.float32, True),  # training on CUDA: bf16 activations, autocast
        (torch.float32, torch.float32, True),
        (torch.bfloat16, torch.bfloat16, False),
    ],
    ids=["bf16-x-autocast", "f32-x-autocast", "bf16"],
)
def test_bf16_weight_gradient_is_as_close_to_float64_as_stocks(
    triton_on_cpu, x_dtype, weight_dtype, autocast
):
    x, weight, bias = encoder_inputs(41, 64, 48, seed=3)
    x, weight, bias = x.to(x_dtype), weight.to(weight_dtype), bias.to(weight_dtype)
    assert backward_name(x, weight, bias, 6) == "TopKEncoderBackward"
    ours, our_grads = gradients(encode_topk, x, weight, bias, 6, autocast)
    stock, stock_grads = gradients(fused_encoder, x, weight, bias, 6, autocast)
    assert ours[0].dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(ours, stock, strict=True))
    assert_stocks(our_grads[0], stock_grads[0])
    assert_stocks(our_grads[2], stock_grads[2])
    assert our_grads[1].dtype == weight_dtype
    expected = reference_weight_gradient(x, weight, *ours[:2])
    # stock rounds each bf16 product to bf16 before its float32 sum (and with bf16 weights each
    # partial sum); Triton's interpreter stores float32 into bf16 by truncation, not to nearest
    if x_dtype == torch.bfloat16 and not (INTERPRETED and weight_dtype == torch.bfloat16):
        our_error = (our_grads[1].double() - expected).abs()
        stock_error = (stock_grads[1].double() - expected).abs()
        assert our_error.sum() <= stock_error.sum() and our_error.max() <= stock_error.max()
    # bf16 products are exact in float32: ours is their float32 sum, rounded once to the weight
    ulps = 1 if INTERPRETED else 0.5
    tolerance = 1e-6 if weight_dtype == torch.float32 else ulps * 2**-7
    torch.testing.assert_close(our_grads[1].double(), expected, rtol=tolerance, atol=1e-6)


@needs_triton
def test_clt_parameter_gradients_match_stocks_encoder(triton_on_cpu, monkeypatch):
    """Through a CLT's forward (encode_topk in `CrossLayerTranscoder.encode`)."""
    cfg = SparseCoderConfig(num_latents=32, k=4, transcode=True)
    clt = CrossLayerTranscoder([f"l.{i}" for i in range(3)], 16, cfg, cross_layer=2).to(DEVICE)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in clt.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    inputs = [torch.randn(19, 16, generator=g).to(DEVICE) for _ in range(3)]
    outputs = [torch.randn(19, 16, generator=g).to(DEVICE) for _ in range(3)]

    def parameter_grads() -> dict[str, Tensor]:
        clt.zero_grad()
        clt(inputs, outputs).fvu.sum().backward()
        return {name: p.grad.clone() for name, p in clt.named_parameters() if p.grad is not None}

    ours = parameter_grads()
    assert type(clt.encode(0, inputs[0]).top_acts.grad_fn).__name__ == "TopKEncoderBackward"
    monkeypatch.setattr(topk_encoder, "triton_backward_applies", lambda *args: False)
    stock = parameter_grads()
    assert ours.keys() == stock.keys() and any("encoder" in name for name in ours)
    # on CUDA the forward runs under bf16 autocast and atomics add in no fixed order
    tolerance = 1e-5 if DEVICE == "cpu" else 1e-2
    for name in ours:
        torch.testing.assert_close(ours[name], stock[name], rtol=tolerance, atol=tolerance)


@needs_triton
@pytest.mark.parametrize("latents", [60, 36])
def test_num_latents_not_a_multiple_of_8_falls_back_to_stock(triton_on_cpu, latents):
    x, weight, bias = encoder_inputs(21, latents, 16, seed=latents)
    assert not triton_backward_applies(x.to(DEVICE), weight.to(DEVICE), 4, "topk")
    ours, our_grads = gradients(encode_topk, x, weight, bias, 4)
    stock, stock_grads = gradients(fused_encoder, x, weight, bias, 4)
    assert all(torch.equal(a, b) for a, b in zip(ours, stock, strict=True))
    for a, b in zip(our_grads, stock_grads, strict=True):
        assert_stocks(a, b)


def test_training_on_the_cpu_is_stocks_fused_encoder_by_default():
    """Without the switch the CPU never takes the Triton path, TRITON_INTERPRET=1 or not."""
    assert not topk_encoder.TRITON_BACKWARD_ON_CPU
    x, weight, bias = encoder_inputs(33, 64, 24, seed=9)
    assert backward_name(x, weight, bias, 5, device="cpu") == "FusedEncoderBackward"
    ours, our_grads = gradients(encode_topk, x, weight, bias, 5, device="cpu")
    stock, stock_grads = gradients(fused_encoder, x, weight, bias, 5, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(ours, stock, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(our_grads, stock_grads, strict=True))


@needs_triton
def test_triton_backward_applies_only_to_shapes_the_kernel_takes(triton_on_cpu):
    x, weight = torch.empty(5, 8, device=DEVICE), torch.empty(64, 8, device=DEVICE)
    rows = torch.empty(1, 8, device=DEVICE).expand(2**28, 8)  # 2**28 rows, no memory
    assert triton_backward_applies(x, weight, 4, "topk")
    assert triton_backward_applies(rows, weight, 7, "topk")
    assert not triton_backward_applies(rows, weight, 8, "topk")  # N * k = 2**31
    assert not triton_backward_applies(x, weight[:60], 4, "topk")
    assert not triton_backward_applies(x, weight, 4, "groupmax")
    assert not triton_backward_applies(x[None], weight, 4, "topk")
    assert not triton_backward_applies(torch.empty(5, 8, device="meta"), weight, 4, "topk")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the switch is for CUDA tensors")
def test_the_cuda_switch_turns_the_triton_backward_off(monkeypatch):
    """`TRITON_WEIGHT_GRADIENT` False (SPARSIFY_DISABLE_TRITON=1 at import): stock's backward."""
    x, weight, bias = encoder_inputs(33, 64, 24, seed=11)
    assert backward_name(x, weight, bias, 5, device="cuda") == "TopKEncoderBackward"
    monkeypatch.setattr(topk_encoder, "TRITON_WEIGHT_GRADIENT", False)
    assert backward_name(x, weight, bias, 5, device="cuda") == "FusedEncoderBackward"
