"""FeatureCapture on its own: captured indices keep their values at every coder width."""

import pytest
import torch

from vlm_sparsify.capture import REGION_CODE, FeatureCapture


@pytest.mark.parametrize("num_latents", [32768, 32769, 40000, 70000])
def test_the_widest_latent_indices_come_back_unchanged(num_latents: int) -> None:
    capture = FeatureCapture(1, num_latents, torch.float32)
    regions = torch.full((1, 2), REGION_CODE["prompt"], dtype=torch.int8)
    capture.start_forward(0, torch.tensor([[5, 6]]), regions)
    top = num_latents - 1
    indices = torch.tensor([[top, 0], [1, top - 1]])
    capture.record(0, torch.tensor([[1.0, 2.0], [3.0, 4.0]]), indices)
    capture.end_forward()
    (sample,) = capture.pop_samples()
    assert sample.indices.long()[:, 0].tolist() == indices.tolist()
    assert sample.regions["prompt"] == [(0, 2)]
