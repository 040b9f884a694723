"""FeatureCapture on its own: indices at every coder width, a silent source named, pop forgets."""

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


def test_a_source_that_recorded_nothing_is_named_and_pop_forgets() -> None:
    capture = FeatureCapture(2, 16, torch.float32)
    regions = torch.full((1, 2), REGION_CODE["prompt"], dtype=torch.int8)
    capture.start_forward(0, None, regions)
    capture.record(1, torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.long))
    capture.end_forward()
    with pytest.raises(RuntimeError, match="source 0 recorded nothing"):
        capture.pop_samples()
    capture = FeatureCapture(1, 16, torch.float32)
    capture.start_forward(0, None, regions)
    capture.record(0, torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.long))
    capture.end_forward()
    assert len(capture.pop_samples()) == 1 and capture.pop_samples() == []
