"""The coder-set interface: every coder set implements it, and its shared formulas."""

import torch
from sparsify import SparseCoderConfig
from torch import nn

from vlm_sparsify.coder_set import (
    CoderSet,
    InferenceCoderSet,
    centre_encoder,
    fraction_of_variance_unexplained,
    total_variance,
)
from vlm_sparsify.cross_layer import CrossLayerTranscoder
from vlm_sparsify.per_layer import PerLayerCoders
from vlm_sparsify.sharded_clt import ShardedCLT
from vlm_sparsify.sharded_per_layer import ShardedPerLayer

HOOKS = ["a.mlp", "b.mlp", "c.mlp"]


def test_every_coder_set_implements_the_interface_it_claims() -> None:
    cfg = SparseCoderConfig(num_latents=8, k=2, transcode=True)
    whole = [PerLayerCoders(HOOKS, 4, cfg), CrossLayerTranscoder(HOOKS, 4, cfg, 2)]
    sharded = [ShardedPerLayer(HOOKS, 4, cfg), ShardedCLT(HOOKS, 4, cfg, 2)]
    for coders in whole:
        assert isinstance(coders, InferenceCoderSet), type(coders).__name__
    for coders in sharded:
        assert isinstance(coders, CoderSet), type(coders).__name__
        assert not isinstance(coders, InferenceCoderSet), type(coders).__name__


def test_fvu_and_encoder_centring_are_sparsify_s_formulas() -> None:
    torch.manual_seed(0)
    y, y_hat = torch.randn(6, 3), torch.randn(6, 3)
    variance = ((y - y.mean(0)) ** 2).sum()
    assert torch.equal(total_variance(y), variance)
    assert torch.equal(
        fraction_of_variance_unexplained(y, y_hat), ((y - y_hat) ** 2).sum() / variance
    )
    given = fraction_of_variance_unexplained(y, y_hat, torch.tensor(2.0))
    assert torch.equal(given, ((y - y_hat) ** 2).sum() / 2)
    encoder, mean = nn.Linear(3, 5), torch.randn(3)
    centre_encoder(encoder, mean)
    torch.testing.assert_close(encoder(mean), torch.zeros(5), atol=1e-6, rtol=0)
