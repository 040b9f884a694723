"""The TopK encoder for every coder: sparsify's fused encoder in training (with a Triton weight
gradient on CUDA), a faster exact one outside.

`sparsify.fused_encoder` is an autograd Function (its backward is sparse). When no gradient is
needed (the replacement model, capture, fidelity, steering) its forward alone is enough, and on the
CPU `torch.topk` over each row of latents costs more than the encoder's matmul; `topk_rows` selects
the same k values from a quarter of the candidates (see its docstring).

In training on CUDA, `TopKEncoder` replaces it: the same forward, grad_input and grad_bias, but the
weight gradient from sparsify's Triton embedding-bag backward (`embedding_bag_bw_rev_indices`, which
our decoders' backward already runs). Why: stock's backward materialises `grad_values * input` as
`[N, k, d]` rows (2.1 GB in bf16 per layer at 8,192 tokens, k 32, d 4096; 4.3 GB once cast to
float32) and `index_add_`s them with float32 atomics: 7.7 ms per layer on an H200, about 300 ms of a
1.41 s CLT step with the multiply and the cast, where the kernel takes 0.66 ms per call for those
shapes in the decoders' backward. Measured on the H200 (LLaVA-7B size, CLT-16, 8,192 latents,
BENCHMARKS.md run 7): 27 ms for the 32 encoders' backward, the step 1.40x faster (1.43 s -> 1.01 s,
0.66x -> 0.92x stock sparsify's PLT tokens/s) and 5.9 GiB less at the peak. With float32
weights (training's, under bf16 autocast) each latent's row is summed in float32 either way, but in
another order and without first rounding each product to bf16 (stock's atomics have no fixed order
either), so on CUDA the weight gradient is not bit for bit stock's. On the CPU training stays
stock's `fused_encoder`, bit for bit.
"""

import os
from types import SimpleNamespace

import torch
from sparsify.fused_encoder import EncoderOutput, FusedEncoder, fused_encoder
from torch import Tensor

from vlm_sparsify.triton_decode import available as triton_available

BLOCK_SIZE = 4
"""Members of each of `topk_rows`' blocks: it keeps k blocks, so BLOCK_SIZE * k candidates."""

TRITON_WEIGHT_GRADIENT = os.environ.get("SPARSIFY_DISABLE_TRITON") != "1"
"""Train CUDA tensors with `TopKEncoder` (the default). Off with SPARSIFY_DISABLE_TRITON=1, as
sparsify's own Triton decoder, or by setting it False (`bench --gpu` measures the CLT step both
ways: `clt_sparsify_encoder_tok_per_s`)."""

TRITON_BACKWARD_ON_CPU = False
"""Let `encode_topk` train CPU tensors with `TopKEncoder` too when TRITON_INTERPRET=1 (Triton's
interpreter: for tests; set it with pytest's monkeypatch). On CUDA it is used whenever triton
imports; otherwise the CPU keeps sparsify's `fused_encoder`."""

TRITON_LATENT_MULTIPLE = 8
"""`embedding_bag_bw_rev_indices` gives each program 8 latents: num_latents must be a multiple."""


def encode_topk(x: Tensor, weight: Tensor, bias: Tensor, k: int, activation: str) -> EncoderOutput:
    """`fused_encoder(x, weight, bias, k, activation)`; outside autograd, exact and faster; in
    autograd `TopKEncoder` where `triton_backward_applies`."""
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or bias.requires_grad
    )
    if needs_grad and triton_backward_applies(x, weight, k, activation):
        return EncoderOutput(*TopKEncoder.apply(x, weight, bias, k, activation))
    if needs_grad or activation != "topk":
        return fused_encoder(x, weight, bias, k, activation)
    # addmm with the ReLU as its epilogue: one cuBLASLt kernel on CUDA where F.linear and
    # relu_ launch two (a decoding step is launch-bound); on the CPU addmm, then relu_
    pre_acts = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t())
    top_acts, top_indices = topk_rows(pre_acts, k)
    if x.dim() == 2:
        return EncoderOutput(top_acts, top_indices, pre_acts)
    rows = x.shape[:-1]  # as fused_encoder: any leading dimensions
    return EncoderOutput(
        top_acts.view(*rows, k), top_indices.view(*rows, k), pre_acts.view(*rows, -1)
    )


def triton_backward_applies(x: Tensor, weight: Tensor, k: int, activation: str) -> bool:
    """Whether `encode_topk` trains with `TopKEncoder`: TopK, triton importable, the tensors on
    CUDA (or on the CPU under TRITON_INTERPRET=1 with `TRITON_BACKWARD_ON_CPU`), and shapes the
    kernel takes (x `[N, d]`, num_latents a multiple of 8, N * k < 2**31)."""
    on_device = (x.device.type == "cuda" and TRITON_WEIGHT_GRADIENT) or (
        x.device.type == "cpu" and TRITON_BACKWARD_ON_CPU
    )
    return (
        activation == "topk"
        and on_device
        and triton_available(x.device)
        and x.dim() == 2
        and weight.shape[0] % TRITON_LATENT_MULTIPLE == 0
        and x.shape[0] * k < 2**31
    )


class TopKEncoder(FusedEncoder):
    """sparsify's `FusedEncoder` for TopK (its forward, grad_input and grad_bias) with the weight
    gradient from sparsify's Triton embedding-bag backward instead of `index_add_` (see the module
    docstring): grad_weight[m] = sum of grad_values[n, j] * input[n] over indices[n, j] == m."""

    @staticmethod
    def backward(ctx, grad_values, grad_indices, grad_preacts):
        from sparsify.xformers import embedding_bag_bw_rev_indices  # imports triton

        input, weight, _, indices = ctx.saved_tensors
        needs_weight_grad = ctx.needs_input_grad[1]
        # stock's own backward, asked for no weight gradient, gives grad_input and grad_bias
        stock = SimpleNamespace(
            saved_tensors=ctx.saved_tensors,
            needs_input_grad=(ctx.needs_input_grad[0], False, *ctx.needs_input_grad[2:]),
        )
        grad_input, _, grad_bias, _, _ = FusedEncoder.backward(
            stock, grad_values, grad_indices, grad_preacts
        )
        grad_weight = None
        if needs_weight_grad:
            # the kernel indexes rows by hand (contiguous tensors) and also returns the
            # gradient of grad_values as per-sample weights, which nothing here needs
            grad_weight, _ = embedding_bag_bw_rev_indices(
                indices.contiguous(),
                weight.contiguous(),
                grad_values.contiguous(),
                input.contiguous(),
            )
        return grad_input, grad_weight, grad_bias, None, None


def topk_rows(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest values of each row of `x` `[N, M]` and their indices, in no order.

    On the CPU, when M is a multiple of 4 and M/4 >= 2k: split each row into M/4 blocks of 4
    strided members (j, j + M/4, j + M/2, j + 3M/4), keep the k blocks with the largest maxima and
    take the top k of their 4k members. Exact: every value above the k-th largest block maximum
    lies in a kept block, and the kept blocks' maxima are k values at least that large, so the
    selected values equal torch.topk's (indices may differ only among tied values). Otherwise it
    is `torch.topk(sorted=False)`.
    """
    n, m = x.shape
    width = m // BLOCK_SIZE
    if x.device.type != "cpu" or m % BLOCK_SIZE or width < 2 * k:
        values, indices = x.topk(k, dim=-1, sorted=False)
        return values, indices
    block_max = x.reshape(n, BLOCK_SIZE, width).amax(1)
    _, blocks = block_max.topk(k, dim=-1, sorted=False)
    offsets = torch.arange(0, m, width, device=x.device)
    candidates = (blocks[:, None, :] + offsets[:, None]).view(n, BLOCK_SIZE * k)
    values, picked = x.gather(1, candidates).topk(k, dim=-1, sorted=False)
    return values, candidates.gather(1, picked)
