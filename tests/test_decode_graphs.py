"""CUDA graphs of the open-loop decoding steps (`vlm_sparsify.decode_graphs`) replay the eager work.

These need a CUDA GPU (`scripts/gpu_bench.sh` runs them on one); on a CPU the replacement model
never records graphs, which the first test checks.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch
from torch import nn

from tests.test_replacement import GREEDY, LAYERS, batch, make_coders, tiny_llava
from vlm_sparsify.interventions import Intervention
from vlm_sparsify.replacement import ReplacementModel

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def generate(replacement: ReplacementModel, rows: int = 2, **kwargs: Any) -> Any:
    inputs = {name: value[:rows] for name, value in batch().items()}
    device = next(replacement.model.parameters()).device
    inputs = {name: value.to(device) for name, value in inputs.items()}
    # no EOS: every call takes the same decoding steps, whatever the random coders predict
    settings = {**GREEDY, "eos_token_id": None, "output_scores": True}
    settings.update(return_dict_in_generate=True, **kwargs)
    with torch.inference_mode():
        return replacement.generate(**inputs, **settings)


def assert_same(graphed: Any, eager: Any) -> None:
    assert torch.equal(graphed.sequences, eager.sequences)
    for a, b in zip(graphed.scores, eager.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return tiny_llava().to(device)


def test_no_graphs_on_a_cpu() -> None:
    replacement = ReplacementModel(tiny_llava(), make_coders("clt"))
    generate(replacement)
    assert replacement.decode_graphs is None


@CUDA
@pytest.mark.parametrize("kind", ["clt", "clt3-skip"])
@pytest.mark.parametrize("decoder", ["fused", "auto"])
def test_graphs_replay_the_eager_decoding_steps(model: nn.Module, kind: str, decoder: str) -> None:
    coders = make_coders(kind).to(model.device)
    graphed = ReplacementModel(model, coders, decoder=decoder)
    eager = ReplacementModel(model, coders, decoder=decoder, cuda_graphs=False)
    first = generate(graphed)
    graphs = graphed.decode_graphs
    assert graphs is not None and graphs.failed is None
    assert graphs.captured == LAYERS  # one per layer, recorded at the first decoding step
    assert_same(first, generate(eager))
    assert_same(generate(graphed), first)  # replayed, not recorded again
    assert graphed.decode_graphs is graphs and graphs.captured == LAYERS


@CUDA
def test_another_batch_size_records_its_own_graphs(model: nn.Module) -> None:
    coders = make_coders("clt").to(model.device)
    graphed = ReplacementModel(model, coders)
    eager = ReplacementModel(model, coders, cuda_graphs=False)
    for rows in (2, 1, 2):
        assert_same(generate(graphed, rows), generate(eager, rows))
    assert graphed.decode_graphs is not None and graphed.decode_graphs.captured == 2 * LAYERS


@CUDA
def test_edits_and_capture_decode_eagerly(model: nn.Module) -> None:
    coders = make_coders("clt").to(model.device)
    edit = Intervention("add", features=(3, 9), layers=(0, 2), region="response", value=2.0)
    graphed = ReplacementModel(model, coders, interventions=[edit])
    eager = ReplacementModel(model, coders, interventions=[edit], cuda_graphs=False)
    assert_same(generate(graphed), generate(eager))
    plain = ReplacementModel(model, coders)
    with plain.capture() as capture:
        captured = generate(plain)
    assert capture.pop_samples()
    assert plain.decode_graphs is not None and plain.decode_graphs.captured == 0
    assert_same(generate(plain), captured)
    assert plain.decode_graphs.captured == LAYERS


@CUDA
def test_new_weights_record_new_graphs(model: nn.Module) -> None:
    coders = make_coders("clt").to(model.device)
    graphed = ReplacementModel(model, coders)
    before = generate(graphed)
    with torch.no_grad():
        for source in coders.sources:
            for decoder in source.W_decs:
                decoder.mul_(-1.5)
    after = generate(graphed)
    assert not torch.allclose(after.scores[-1], before.scores[-1])
    assert_same(after, generate(ReplacementModel(model, coders, cuda_graphs=False)))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_a_dropped_replacement_model_frees_its_copies_at_once(device: str) -> None:
    """No reference cycle: the copies (26 GB for a CLT-16 on LLaVA-7B) go with the last
    reference, not at the garbage collector's next pass."""
    model = tiny_llava().to(device)
    replacement = ReplacementModel(model, make_coders("clt").to(device))
    generate(replacement)
    assert replacement.fused_nbytes > 0
    copies = weakref.ref(replacement._inference)
    gone = weakref.ref(replacement)
    gc.disable()  # freed by reference counting alone
    try:
        del replacement
        assert gone() is None and copies() is None
    finally:
        gc.enable()
