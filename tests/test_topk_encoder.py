import pytest
import torch
from sparsify.fused_encoder import fused_encoder

from vlm_sparsify.topk_encoder import encode_topk, topk_rows


def sorted_values(values: torch.Tensor) -> torch.Tensor:
    return values.sort(-1, descending=True).values


@pytest.mark.parametrize(
    ("rows", "latents", "k"),
    [(1, 1024, 32), (4, 1024, 32), (77, 1024, 32), (9, 128, 16), (5, 96, 16), (3, 130, 8)],
)
def test_topk_rows_selects_torch_topk_values(rows, latents, k):
    generator = torch.Generator().manual_seed(rows * latents + k)
    x = torch.randn(rows, latents, generator=generator)
    # ties: integers and (after relu) zeros, often more than k of them in a row
    x = torch.cat([x, x.mul(2).round().relu(), x.relu() - 5]).contiguous()
    values, indices = topk_rows(x, k)
    expected, _ = x.topk(k, dim=-1)
    assert torch.equal(sorted_values(values), expected)
    assert torch.equal(x.gather(1, indices), values)
    assert all(len(set(row.tolist())) == k for row in indices)


def test_topk_rows_of_a_row_does_not_depend_on_the_batch():
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(0))
    values, indices = topk_rows(x, 16)
    for i in (0, 17, 39):
        alone = topk_rows(x[i : i + 1], 16)
        assert torch.equal(alone[0][0], values[i]) and torch.equal(alone[1][0], indices[i])


def test_encode_topk_is_the_fused_encoder():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(50, 64, generator=generator)
    weight = torch.randn(512, 64, generator=generator, requires_grad=True)
    bias = torch.randn(512, generator=generator, requires_grad=True)
    # in autograd: sparsify's own, output for output, and its gradient reaches the encoder
    fast = encode_topk(x, weight, bias, 24, "topk")
    stock = fused_encoder(x, weight, bias, 24, "topk")
    assert all(torch.equal(a, b) for a, b in zip(fast, stock, strict=True))
    fast.top_acts.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    # outside autograd: the same values, indices and pre-activations; only the order differs
    with torch.no_grad():
        fast = encode_topk(x, weight, bias, 24, "topk")
    assert torch.equal(fast.pre_acts, stock.pre_acts.detach())
    fast_order, stock_order = fast.top_indices.argsort(-1), stock.top_indices.argsort(-1)
    assert torch.equal(
        fast.top_indices.gather(1, fast_order), stock.top_indices.gather(1, stock_order)
    )
    assert torch.equal(
        fast.top_acts.gather(1, fast_order), stock.top_acts.detach().gather(1, stock_order)
    )
    # groupmax is sparsify's, with or without autograd
    with torch.no_grad():
        groups = encode_topk(x, weight, bias, 16, "groupmax")
    assert torch.equal(groups.top_indices, fused_encoder(x, weight, bias, 16, "groupmax")[1])


@pytest.mark.parametrize("needs_grad", ["x", "weight", "bias"])
def test_encode_topk_is_sparsifys_own_whenever_one_input_needs_a_gradient(needs_grad):
    """Its sparse backward: the output (order included) is fused_encoder's."""
    generator = torch.Generator().manual_seed(4)
    tensors = {
        "x": torch.randn(20, 64, generator=generator),
        "weight": torch.randn(512, 64, generator=generator),
        "bias": torch.randn(512, generator=generator),
    }
    tensors[needs_grad].requires_grad_(True)
    fast = encode_topk(*tensors.values(), 24, "topk")
    stock = fused_encoder(*tensors.values(), 24, "topk")
    assert all(torch.equal(a, b) for a, b in zip(fast, stock, strict=True))
    assert fast.top_acts.grad_fn is not None


@pytest.mark.parametrize("shape", [(64,), (2, 5, 64)], ids=["one-row", "batch-by-token"])
def test_encode_topk_outside_autograd_takes_any_leading_dimensions(shape):
    """As `fused_encoder`: x `[..., d]` gives top-k and pre-activations `[..., k]` / `[..., M]`."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=generator)
    weight = torch.randn(512, 64, generator=generator)
    bias = torch.randn(512, generator=generator)
    fast = encode_topk(x, weight, bias, 24, "topk")
    stock = fused_encoder(x, weight, bias, 24, "topk")
    assert fast.top_acts.shape == stock.top_acts.shape == (*shape[:-1], 24)
    torch.testing.assert_close(fast.pre_acts, stock.pre_acts)
    torch.testing.assert_close(sorted_values(fast.top_acts), sorted_values(stock.top_acts))
    assert torch.equal(fast.pre_acts.gather(-1, fast.top_indices), fast.top_acts)


@pytest.mark.parametrize("transcode", [False, True])
def test_per_layer_encode_is_stock_sparse_coder_encode(transcode):
    from sparsify import SparseCoderConfig

    from vlm_sparsify.per_layer import PerLayerCoders

    coders = PerLayerCoders(["a", "b"], 32, SparseCoderConfig(num_latents=256, k=8,
                            transcode=transcode))  # fmt: skip
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in coders.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
        x = torch.randn(40, 32, generator=generator)
        for p, stock in enumerate(coders.coders):
            ours, theirs = coders.encode(p, x), stock.encode(x)
            order, stock_order = ours.top_indices.argsort(-1), theirs.top_indices.argsort(-1)
            assert torch.equal(ours.pre_acts, theirs.pre_acts)
            assert torch.equal(
                ours.top_indices.gather(1, order), theirs.top_indices.gather(1, stock_order)
            )
            assert torch.equal(
                ours.top_acts.gather(1, order), theirs.top_acts.gather(1, stock_order)
            )
