"""The TopK encoder for every coder: sparsify's fused encoder in training, a faster exact one outside.

`sparsify.fused_encoder` is an autograd Function (its backward is sparse). When no gradient is
needed (the replacement model, capture, fidelity, steering) its forward alone is enough, and on the
CPU `torch.topk` over each row of latents costs more than the encoder's matmul; `topk_rows` selects
the same k values from a quarter of the candidates (see its docstring).
"""

import torch
from sparsify.fused_encoder import EncoderOutput, fused_encoder
from torch import Tensor

BLOCK_SIZE = 4
"""Members of each of `topk_rows`' blocks: it keeps k blocks, so BLOCK_SIZE * k candidates."""


def encode_topk(x: Tensor, weight: Tensor, bias: Tensor, k: int, activation: str) -> EncoderOutput:
    """`fused_encoder(x, weight, bias, k, activation)`; outside autograd, exact and faster."""
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or bias.requires_grad
    )
    if needs_grad or activation != "topk":
        return fused_encoder(x, weight, bias, k, activation)  # type: ignore[arg-type]
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
