"""ReplacementModel on a tiny random LLaVA: error-mode exactness, open-loop sums, KV cache, capture."""

from __future__ import annotations

import importlib.util
import os
from collections import Counter
from contextlib import nullcontext
from typing import Any

import pytest
import torch
from sparsify import SparseCoderConfig
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlavaConfig, LlavaForConditionalGeneration

from vlm_sparsify import topk_encoder
from vlm_sparsify.bench_steps import benchmark_generate
from vlm_sparsify.cross_layer import CrossLayerTranscoder
from vlm_sparsify.interventions import Intervention
from vlm_sparsify.per_layer import PerLayerCoders
from vlm_sparsify.replacement import ReplacementModel

LAYERS, D, LATENTS, K = 4, 32, 64, 4
IMAGE, PAD, EOS = 5, 0, 2
HOOKPOINTS = [f"model.language_model.layers.{i}.mlp" for i in range(LAYERS)]


def tiny_llava() -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            projection_dim=32,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=D,
            intermediate_size=64,
            num_hidden_layers=LAYERS,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=256,
            initializer_range=0.2,
        ),
        image_token_index=IMAGE,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(config).eval()


def randomize(coders: nn.Module, seed: int) -> nn.Module:
    """Random encoders and decoders (transcoder decoders start at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in coders.named_parameters():
            scale = 0.5 if "encoder" in name else 0.1
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return coders.eval()


def make_coders(kind: str) -> nn.Module:
    skip = kind.endswith("-skip")  # random W_skips: each target also adds W_skip x of its sources
    cfg = SparseCoderConfig(num_latents=LATENTS, k=K, transcode=True, skip_connection=skip)
    if kind == "plt":
        return randomize(PerLayerCoders(HOOKPOINTS, D, cfg), seed=1)
    # clt3 reaches 3 of the 4 layers: source 0 does not write into the last one
    cross_layer = 3 if kind.startswith("clt3") else LAYERS
    coders = CrossLayerTranscoder(HOOKPOINTS, D, cfg, cross_layer=cross_layer)
    return randomize(coders, seed=4 if skip else 2)


def batch() -> dict[str, Tensor]:
    """Two prompts with 4 image tokens each; the first is left-padded by two."""
    input_ids = torch.tensor(
        [
            [PAD, PAD, 1, IMAGE, IMAGE, IMAGE, IMAGE, 7, 8, 9],
            [1, IMAGE, IMAGE, IMAGE, IMAGE, 9, 10, 11, 12, 13],
        ]
    )
    generator = torch.Generator().manual_seed(3)
    return {
        "input_ids": input_ids,
        "attention_mask": (input_ids != PAD).long(),
        "pixel_values": torch.randn(2, 3, 28, 28, generator=generator),
    }


def triton_runs() -> bool:
    """These tests run the model on the CPU: the triton decoder only through the interpreter
    (tests/test_triton_kernels.py checks the compiled kernels on a GPU)."""
    return importlib.util.find_spec("triton") is not None and (
        os.environ.get("TRITON_INTERPRET") == "1"
    )


NEEDS_TRITON = pytest.mark.skipif(
    not triton_runs(),
    reason="the triton decoder on the CPU needs triton and TRITON_INTERPRET=1 (make test-triton)",
)
TRITON = pytest.param("triton", marks=NEEDS_TRITON)
"""The Triton decoder (vlm_sparsify/triton_decode.py) as a test parameter."""

GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)


@pytest.fixture(scope="module")
def model() -> LlavaForConditionalGeneration:
    return tiny_llava()


class MLPRecorder:
    """Records each hooked MLP's input and (possibly replaced) output, for checks by hand."""

    def __init__(self, model: nn.Module):
        self.inputs: list[Tensor] = [torch.empty(0)] * LAYERS
        self.outputs: list[Tensor] = [torch.empty(0)] * LAYERS
        self.handles = [
            model.get_submodule(h).register_forward_hook(self._hook(i))
            for i, h in enumerate(HOOKPOINTS)
        ]

    def _hook(self, i: int):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            self.inputs[i] = args[0].detach().reshape(-1, D).clone()
            self.outputs[i] = output.detach().reshape(-1, D).clone()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def dense_features(encoder: nn.Linear, x: Tensor) -> Tensor:
    """TopK features by hand, dense [N, L]."""
    pre = torch.relu(x @ encoder.weight.T + encoder.bias)
    values, indices = pre.topk(K, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values)


def decoder_of(coders: nn.Module, p: int, t: int) -> tuple[Tensor, Tensor]:
    """(W_dec [L, d], b_dec [d]) from source p into target t, read from the coder weights."""
    if isinstance(coders, CrossLayerTranscoder):
        source = coders.sources[p]
        return source.W_decs[t - p].detach(), source.b_decs[t - p].detach()
    assert p == t
    return coders.coders[p].W_dec.detach(), coders.coders[p].b_dec.detach()


def encoder(coders: nn.Module, p: int) -> nn.Linear:
    if isinstance(coders, CrossLayerTranscoder):
        return coders.sources[p].encoder
    return coders.coders[p].encoder


def reaches(coders: nn.Module, p: int, t: int) -> bool:
    return p <= t < p + coders.n_targets(p)


@pytest.mark.parametrize(
    "kind,decoder",
    [
        ("plt", "fused"),
        ("clt", "fused"),
        ("clt", "per-target"),
        pytest.param("clt", "triton", marks=NEEDS_TRITON),
    ],
)
def test_error_mode_reproduces_the_model(model: nn.Module, kind: str, decoder: str) -> None:
    coders = make_coders(kind)
    inputs = batch()
    with torch.no_grad():
        base_logits = model(**inputs).logits
        base_tokens = model.generate(**inputs, **GREEDY)
        # A no-op intervention forces the edited-minus-clean path through every source
        noop = [Intervention("scale", features=tuple(range(LATENTS)), value=1.0)]
        replacement = ReplacementModel(
            model, coders, mode="error", interventions=noop, decoder=decoder
        )
        with replacement.capture() as capture:
            logits = replacement(**inputs).logits
        tokens = replacement.generate(**inputs, **GREEDY)
        open_loop = ReplacementModel(model, coders, mode="open-loop")(**inputs).logits
    assert len(capture.pop_samples()) == 2
    assert (logits - base_logits).abs().max() <= 1e-4
    assert torch.equal(tokens, base_tokens)
    # the replacement itself is not the model: error mode is not trivially the identity
    assert (open_loop - base_logits).abs().max() > 1e-2


@pytest.mark.parametrize(
    "kind,decoder",
    [
        ("plt", "fused"),
        *(
            (kind, decoder)
            for kind in ("clt", "clt3", "clt3-skip")
            for decoder in ("fused", "per-target")
        ),
        pytest.param("clt", "triton", marks=NEEDS_TRITON),
        pytest.param("clt3", "triton", marks=NEEDS_TRITON),
    ],
)
@pytest.mark.parametrize("ring", ["one slot per target", "n_targets slots, reused"])
def test_open_loop_output_is_the_sum_of_decoder_contributions(
    model: nn.Module, kind: str, decoder: str, ring: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if ring.endswith("reused"):  # as in a large prefill: slots are reset and reused in turn
        monkeypatch.setattr(ReplacementModel, "full_ring_bytes", 0)
    coders = make_coders(kind)
    with torch.no_grad(), ReplacementModel(model, coders, mode="open-loop", decoder=decoder):
        recorder = MLPRecorder(model)
        model(**batch())
        recorder.remove()
    with torch.no_grad():
        for t in range(LAYERS):
            expected = torch.zeros_like(recorder.outputs[t])
            for p in range(t + 1):
                if reaches(coders, p, t):
                    W_dec, b_dec = decoder_of(coders, p, t)
                    f_p = dense_features(encoder(coders, p), recorder.inputs[p])
                    expected += f_p @ W_dec + b_dec
                    if kind.endswith("-skip"):  # by hand from the weights, on source p's input
                        expected += recorder.inputs[p] @ coders.sources[p].W_skips[t - p].T
            torch.testing.assert_close(recorder.outputs[t], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decoder", ["fused", "per-target", TRITON])
def test_zeroing_a_feature_moves_every_target_by_its_decoder_contributions(
    model: nn.Module, decoder: str
) -> None:
    coders = make_coders("clt")
    # Later sources read nothing (zero encoder, fixed distinct biases): their features are the same
    # whatever the stream, so the only change downstream is source 0's decoded contributions.
    with torch.no_grad():
        for p in range(1, LAYERS):
            coders.sources[p].encoder.weight.zero_()
            coders.sources[p].encoder.bias.copy_(torch.linspace(0.1, 1.0, LATENTS))
    inputs = batch()
    with (
        torch.no_grad(),
        ReplacementModel(model, coders, mode="open-loop", decoder=decoder) as replacement,
    ):
        recorder = MLPRecorder(model)
        model(**inputs)
        clean = list(recorder.outputs)
        f_0 = dense_features(encoder(coders, 0), recorder.inputs[0])
        feature = int(f_0[-1].argmax())
        with replacement.intervene([Intervention("zero", features=feature, layers=0)]):
            model(**inputs)
        recorder.remove()
    assert (f_0[:, feature] > 0).sum() >= 1
    for t in range(LAYERS):
        W_dec, _ = decoder_of(coders, 0, t)
        expected = -f_0[:, feature, None] * W_dec[feature]
        torch.testing.assert_close(recorder.outputs[t] - clean[t], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decoder", ["fused", "per-target", TRITON])
@pytest.mark.parametrize("ring", ["one slot per target", "n_targets slots, reused"])
def test_zeroing_a_feature_in_error_mode_changes_its_layer_by_its_contribution(
    model: nn.Module, decoder: str, ring: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if ring.endswith("reused"):
        monkeypatch.setattr(ReplacementModel, "full_ring_bytes", 0)
    coders = make_coders("clt3")
    inputs = batch()
    with (
        torch.no_grad(),
        ReplacementModel(model, coders, mode="error", decoder=decoder) as replacement,
    ):
        recorder = MLPRecorder(model)
        model(**inputs)
        clean, x_1 = recorder.outputs[1], recorder.inputs[1]
        f_1 = dense_features(encoder(coders, 1), x_1)
        feature = int(f_1[0].argmax())
        with replacement.intervene([Intervention("zero", features=feature, layers=1)]):
            model(**inputs)
        recorder.remove()
    W_dec, _ = decoder_of(coders, 1, 1)
    expected = -f_1[:, feature, None] * W_dec[feature]
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(recorder.inputs[1], x_1)
    torch.testing.assert_close(recorder.outputs[1] - clean, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kind,mode,decoder",
    [
        ("clt", "open-loop", "fused"),
        ("clt", "open-loop", "per-target"),
        pytest.param("clt", "open-loop", "triton", marks=NEEDS_TRITON),
        ("clt", "error", "fused"),
        pytest.param("clt", "error", "triton", marks=NEEDS_TRITON),
        ("clt", "off", "fused"),
        ("plt", "open-loop", "fused"),
    ],
)
def test_generate_with_kv_cache_equals_without(
    model: nn.Module, kind: str, mode: str, decoder: str
) -> None:
    coders = make_coders(kind)
    edit = [Intervention("add", features=(3, 9), layers=(0, 2), region="response", value=2.0)]
    replacement = ReplacementModel(model, coders, mode=mode, interventions=edit, decoder=decoder)
    runs = []
    with torch.no_grad():
        for use_cache in (True, False):
            with replacement.capture() as capture:
                tokens = replacement.generate(**batch(), **GREEDY, use_cache=use_cache)
            runs.append((tokens, capture.pop_samples()))
    (cached, cached_samples), (uncached, uncached_samples) = runs
    assert torch.equal(cached, uncached)
    for a, b in zip(cached_samples, uncached_samples, strict=True):
        assert a.regions == b.regions
        assert torch.equal(a.token_ids, b.token_ids)
        assert torch.equal(a.indices.sort(-1).values, b.indices.sort(-1).values)
        # values are stored in bf16: float32 rounding that differs between the cached and the
        # uncached matmul shapes may put one value a bf16 rounding step (2**-8 relative) apart
        torch.testing.assert_close(
            a.values.float().sort(-1).values,
            b.values.float().sort(-1).values,
            rtol=2**-7,
            atol=1e-5,
        )


def test_capture_is_the_exact_top_k_with_regions(model: nn.Module) -> None:
    coders = make_coders("clt")
    inputs = batch()
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        with ReplacementModel(model, coders, mode="open-loop") as replacement:
            recorder = MLPRecorder(model)
            with replacement.capture() as capture:
                model(**inputs)
            recorder.remove()
        samples = capture.pop_samples()
        assert len(samples) == 2
        for p in range(LAYERS):
            exact = coders.encode(p, recorder.inputs[p])
            exact_indices = exact.top_indices.view(2, -1, K)
            exact_acts = exact.top_acts.view(2, -1, K)
            for b, sample in enumerate(samples):
                order = sample.indices[:, p].long().argsort(-1)
                expected_order = exact_indices[b][mask[b]].argsort(-1)
                assert torch.equal(
                    sample.indices[:, p].long().gather(-1, order),
                    exact_indices[b][mask[b]].gather(-1, expected_order),
                )
                torch.testing.assert_close(
                    sample.values[:, p].float().gather(-1, order),
                    exact_acts[b][mask[b]].gather(-1, expected_order).bfloat16().float(),
                )
    first, second = samples
    assert torch.equal(first.token_ids, inputs["input_ids"][0, 2:])
    assert first.indices.dtype == torch.int16 and first.values.dtype == torch.bfloat16
    assert first.regions == {"image": [(1, 5)], "prompt": [(0, 1), (5, 8)], "response": []}
    assert second.regions == {"image": [(1, 5)], "prompt": [(0, 1), (5, 10)], "response": []}


def test_a_static_cache_captures_as_the_dynamic_one(model: nn.Module) -> None:
    """With `cache_implementation="static"` the model gets a 4-d attention mask (the pads are on
    its diagonal) and the cache's length as a tensor that grows in place."""
    edit = Intervention("add", features=3, region="response", value=2.0)
    replacement = ReplacementModel(model, make_coders("clt"), interventions=[edit])
    runs = []
    with torch.no_grad():
        for cache in ("dynamic", "static"):
            with replacement.capture() as capture:
                settings = {**GREEDY, "eos_token_id": None, "cache_implementation": cache}
                tokens = replacement.generate(**batch(), **settings)
            runs.append((tokens, capture.pop_samples()))
    (dynamic, dynamic_samples), (static, static_samples) = runs
    assert torch.equal(static, dynamic)
    for a, b in zip(dynamic_samples, static_samples, strict=True):
        assert a.regions == b.regions
        assert torch.equal(a.token_ids, b.token_ids)
        assert torch.equal(a.indices.sort(-1).values, b.indices.sort(-1).values)


@pytest.mark.parametrize("family", ["gemma3", "qwen2_vl"])
def test_a_static_cache_s_masks_per_attention_type_give_the_regions(family: str) -> None:
    """Gemma 3 and Qwen2-VL get one 4-d mask per attention type with a static cache."""
    from vlm_sparsify.hookpoints import mlp_hookpoints
    from vlm_sparsify.random_models import build_tiny
    from vlm_sparsify.recipe import find_recipe

    recipe = find_recipe(family)
    vlm, processor = build_tiny(recipe)
    d = vlm.config.get_text_config().hidden_size
    cfg = SparseCoderConfig(num_latents=LATENTS, k=K, transcode=True)
    replacement = ReplacementModel(vlm, PerLayerCoders(mlp_hookpoints(vlm, recipe), d, cfg))
    input_ids = torch.tensor([[PAD, PAD, 20, 21, 22], [20, 21, 22, 23, 24]])  # text tokens
    inputs = {"input_ids": input_ids, "attention_mask": (input_ids != PAD).long()}
    regions = []
    with torch.no_grad():
        for cache in ("dynamic", "static"):
            with replacement.capture() as capture:
                settings = {**GREEDY, "eos_token_id": None, "cache_implementation": cache}
                replacement.generate(**inputs, **settings)
            regions.append([sample.regions for sample in capture.pop_samples()])
    assert regions[0] == regions[1]
    assert regions[1][0] == {"image": [], "prompt": [(0, 3)], "response": [(3, 8)]}


def test_capture_during_generate_marks_the_response(model: nn.Module) -> None:
    replacement = ReplacementModel(model, make_coders("plt"), mode="off")
    with torch.no_grad(), replacement.capture() as capture:
        tokens = replacement.generate(**batch(), **{**GREEDY, "eos_token_id": None})
    samples = capture.pop_samples()
    # every generated token but the last one is fed back in (the last is never read)
    new = GREEDY["max_new_tokens"] - 1
    assert samples[0].regions["response"] == [(8, 8 + new)]
    assert samples[1].regions["response"] == [(10, 10 + new)]
    assert torch.equal(samples[0].token_ids[8:], tokens[0, 10:-1])
    assert samples[0].indices.shape == (8 + new, LAYERS, K)


def test_capture_stops_the_response_at_eos(model: nn.Module) -> None:
    replacement = ReplacementModel(model, make_coders("plt"), mode="off")
    with torch.no_grad():
        plain = replacement.generate(**batch(), **{**GREEDY, "eos_token_id": None})
        eos = int(plain[1, 12])  # the third token of the second row ends it there
        with replacement.capture() as capture:
            tokens = replacement.generate(**batch(), **{**GREEDY, "eos_token_id": eos})
    first_eos = (tokens[:, 10:] == eos).int().argmax(1)
    samples = capture.pop_samples()
    assert samples[1].regions["response"] == [(10, 10 + int(first_eos[1]))]
    assert int(first_eos[1]) <= 2


def test_capture_keeps_the_whole_response_of_rows_without_eos(model: nn.Module) -> None:
    replacement = ReplacementModel(model, make_coders("plt"), mode="off")
    with torch.no_grad():
        plain = replacement.generate(**batch(), **{**GREEDY, "eos_token_id": None})
        eos = min(set(range(PAD + 1, 100)) - set(plain[:, 10:].flatten().tolist()))
        with replacement.capture() as capture:
            replacement.generate(**batch(), **{**GREEDY, "eos_token_id": eos})
    new = GREEDY["max_new_tokens"] - 1  # no row ends: every fed-back token is response
    assert [s.regions["response"] for s in capture.pop_samples()] == [
        [(8, 8 + new)],
        [(10, 10 + new)],
    ]


def test_capture_stops_at_the_eos_and_refuses_the_beams_generate_really_uses() -> None:
    """A `generation_config` passed to generate gets its unset values from the model's
    (transformers >= 4.50): its EOS, and its beams."""
    from transformers import GenerationConfig

    model = tiny_llava()  # its own: its generation_config changes
    replacement = ReplacementModel(model, make_coders("plt"), mode="off")
    given = GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        plain = replacement.generate(**batch(), **{**GREEDY, "eos_token_id": None})
        model.generation_config.eos_token_id = eos = int(plain[1, 12])  # ends row 1 there
        with replacement.capture() as capture:
            tokens = replacement.generate(**batch(), generation_config=given)
        model.generation_config.num_beams = 2
        with pytest.raises(ValueError, match="beam search"), replacement.capture():
            replacement.generate(**batch(), generation_config=given)
    first_eos = int((tokens[1, 10:] == eos).int().argmax())
    assert first_eos <= 2 and (tokens[1, 10 + first_eos + 1 :] == PAD).all()
    assert capture.pop_samples()[1].regions["response"] == [(10, 10 + first_eos)]


def test_region_intervention_touches_only_that_region(model: nn.Module) -> None:
    coders = make_coders("clt")
    inputs = batch()
    image = (inputs["input_ids"] == IMAGE).reshape(-1)
    feature = 7
    add = Intervention("add", features=feature, layers=0, region="image", value=5.0)
    with torch.no_grad(), ReplacementModel(model, coders, mode="open-loop") as replacement:
        recorder = MLPRecorder(model)
        model(**inputs)
        clean = recorder.outputs[0]
        with replacement.intervene([add]):
            model(**inputs)
        recorder.remove()
    W_dec, _ = decoder_of(coders, 0, 0)
    delta = recorder.outputs[0] - clean
    assert torch.equal(delta[~image], torch.zeros_like(delta[~image]))
    torch.testing.assert_close(delta[image], (5.0 * W_dec[feature]).expand(int(image.sum()), D))


def test_response_intervention_leaves_the_prompt_alone(model: nn.Module) -> None:
    coders = make_coders("clt")
    steer = Intervention("set", features=(1, 2, 3), region="response", value=20.0)
    replacement = ReplacementModel(model, coders, mode="error")
    with torch.no_grad():
        with replacement.capture() as capture:
            clean = replacement.generate(**batch(), **GREEDY)
            steered = replacement.generate(**batch(), **GREEDY, interventions=[steer])
        clean_sample, _, steered_sample, _ = capture.pop_samples()
    assert replacement.interventions == []
    assert torch.equal(clean[:, :11], steered[:, :11])  # the first new token reads the prompt only
    assert not torch.equal(clean, steered)
    prompt = slice(0, 8)
    assert torch.equal(clean_sample.indices[prompt], steered_sample.indices[prompt])


def test_interventions_of_a_forward_call_apply_to_that_call(model: nn.Module) -> None:
    # as in generate; LLaVA's forward takes **kwargs and would drop them without a word
    replacement = ReplacementModel(model, make_coders("clt"), mode="error")
    boost = Intervention("set", features=(1, 2, 3), layers=1, value=20.0)
    with torch.no_grad():
        clean = replacement(**batch()).logits
        steered = replacement(**batch(), interventions=boost).logits
        with replacement.intervene(boost):
            expected = replacement(**batch()).logits
    assert replacement.interventions == []
    assert not torch.allclose(steered, clean)
    assert torch.equal(steered, expected)


def test_hooks_are_removed_on_exit(model: nn.Module) -> None:
    coders = make_coders("clt")
    inputs = batch()
    with torch.no_grad():
        base = model(**inputs).logits
        with ReplacementModel(model, coders, mode="open-loop"):
            replaced = model(**inputs).logits
        after = model(**inputs).logits
    assert not torch.allclose(base, replaced)
    assert torch.equal(base, after)


def test_a_forward_wrapped_on_the_instance_is_restored_on_exit() -> None:
    """Open loop overrides each replaced MLP's `forward` on the instance; leaving restores what
    was there (an accelerate hook placed on the MLP module itself lives there)."""
    hooks = pytest.importorskip("accelerate.hooks")
    model = tiny_llava()  # its own: the hook stays on it

    class Count(hooks.ModelHook):
        calls = 0

        def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            Count.calls += 1
            return args, kwargs

    hooks.add_hook_to_module(model.get_submodule(HOOKPOINTS[1]), Count())
    with torch.no_grad():
        with ReplacementModel(model, make_coders("clt"), mode="open-loop"):
            model(**batch())
        assert Count.calls == 0  # replaced: the MLP did not run
        model(**batch())
    assert Count.calls == 1


def test_layers_without_coders_are_left_alone(model: nn.Module) -> None:
    cfg = SparseCoderConfig(num_latents=LATENTS, k=K, transcode=True)
    coders = randomize(PerLayerCoders(HOOKPOINTS[2:3], D, cfg), seed=4)
    with torch.no_grad():
        recorder = MLPRecorder(model)
        model(**batch())
        recorder.remove()
        base = list(recorder.outputs)
        with ReplacementModel(model, coders, mode="open-loop"):
            recorder = MLPRecorder(model)
            model(**batch())
            recorder.remove()
    assert torch.equal(recorder.outputs[0], base[0]) and torch.equal(recorder.outputs[1], base[1])
    assert not torch.allclose(recorder.outputs[2], base[2])


def test_auto_decoder_is_hybrid_only_on_a_cuda_gpu_with_triton(
    model: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`auto` (the default) is resolved for the coders' current device; the interpreter
    (TRITON_INTERPRET=1) is for tests and does not count."""
    from vlm_sparsify.replacement import resolve_decoder

    rm = ReplacementModel(model, make_coders("clt"))
    assert rm.decoder == "auto" and rm.decoder_in_use == "fused"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for installed in (True, False):
        monkeypatch.setattr("vlm_sparsify.replacement.triton_available", lambda d, i=installed: i)
        assert resolve_decoder("auto", torch.device("cpu")) == "fused"
        expected = "hybrid" if installed else "fused"
        assert resolve_decoder("auto", torch.device("cuda")) == expected
        assert resolve_decoder("per-target", torch.device("cuda")) == "per-target"
        assert rm.decoder_in_use == "fused"
    assert ReplacementModel(model, make_coders("plt")).decoder_in_use == "per-target"


def test_unknown_mode_and_hookpoint_are_named(model: nn.Module) -> None:
    with pytest.raises(ValueError, match="Unknown replacement mode 'closed'"):
        ReplacementModel(model, make_coders("plt"), mode="closed")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match="Unknown decoder 'wide'; use auto, fused, triton, hybrid, per-target"
    ):
        ReplacementModel(model, make_coders("clt"), decoder="wide")  # type: ignore[arg-type]
    cfg = SparseCoderConfig(num_latents=LATENTS, k=K, transcode=True)
    stale = PerLayerCoders(["language_model.model.layers.0.mlp"], D, cfg)
    with pytest.raises(ValueError, match="not modules of LlavaForConditionalGeneration"):
        ReplacementModel(model, stale)
    attention = PerLayerCoders([HOOKPOINTS[0].replace(".mlp", ".self_attn")], D, cfg)
    with pytest.raises(ValueError, match=r"\['.*layers.0.self_attn'\] are attention modules"):
        ReplacementModel(model, attention)
    with pytest.raises(
        ValueError, match=f"edits feature {LATENTS} but the coder at .* has {LATENTS}"
    ):
        ReplacementModel(model, make_coders("clt"), interventions=[Intervention("zero", LATENTS)])


def test_each_coder_is_checked_against_its_own_width_and_its_model(model: nn.Module) -> None:
    narrow = PerLayerCoders(HOOKPOINTS[1:2], D, SparseCoderConfig(num_latents=8, k=K))
    coders = PerLayerCoders(HOOKPOINTS[:1], D, SparseCoderConfig(num_latents=LATENTS, k=K))
    coders.hookpoints, coders.coders = (
        HOOKPOINTS[:2],
        nn.ModuleList([*coders.coders, *narrow.coders]),
    )
    replacement = ReplacementModel(model, coders)
    replacement.interventions = Intervention("zero", features=20, layers=0)  # one is a list too
    with pytest.raises(ValueError, match=f"feature 20 but the coder at {HOOKPOINTS[1]} has 8"):
        replacement.interventions = [Intervention("zero", features=20, layers=1)]
    wide = PerLayerCoders(HOOKPOINTS, 2 * D, SparseCoderConfig(num_latents=LATENTS, k=K))
    with pytest.raises(
        ValueError, match=f"reads {2 * D}-dimensional .* width {D}: .*another model"
    ):
        ReplacementModel(model, wide)


def make_saes() -> PerLayerCoders:
    cfg = SparseCoderConfig(num_latents=LATENTS, k=K, transcode=False)
    saes = randomize(PerLayerCoders(HOOKPOINTS, D, cfg), seed=6)
    assert isinstance(saes, PerLayerCoders)
    return saes


def test_saes_read_and_rebuild_the_mlp_output(model: nn.Module) -> None:
    saes = make_saes()
    inputs = batch()
    with torch.no_grad():
        true = MLPRecorder(model)  # hooked first: each MLP's own output on the replaced stream
        with ReplacementModel(model, saes, mode="open-loop") as replacement:
            replaced = MLPRecorder(model)
            with replacement.capture() as capture:
                model(**inputs)
            replaced.remove()
        true.remove()
        sample = capture.pop_samples()[1]  # the unpadded row
        for p, coder in enumerate(saes.coders):
            torch.testing.assert_close(replaced.outputs[p], coder(true.outputs[p]).sae_out)
            expected = coder.encode(true.outputs[p]).top_indices.view(2, -1, K)[1]
            assert torch.equal(
                sample.indices[:, p].long().sort(-1).values, expected.sort(-1).values
            )


def test_one_replacement_model_hooks_a_model_at_a_time(model: nn.Module) -> None:
    inputs = batch()
    clt = ReplacementModel(model, make_coders("clt"), mode="open-loop")
    plt = ReplacementModel(model, make_coders("plt"), mode="open-loop")
    with torch.no_grad():
        alone = clt(**inputs).logits
        with clt:
            with pytest.raises(RuntimeError, match="another ReplacementModel already hooks"):
                plt.install()
            assert torch.equal(model(**inputs).logits, alone)  # the CLT still replaces
        assert torch.equal(clt(**inputs).logits, alone)
        assert not torch.equal(plt(**inputs).logits, alone)


def test_capture_blocks_nest_and_the_outer_one_resumes(model: nn.Module) -> None:
    replacement = ReplacementModel(model, make_coders("plt"), mode="off")
    with torch.no_grad(), replacement.capture() as outer:
        replacement(**batch())
        with replacement.capture() as inner:
            replacement(**batch())
        replacement(**batch())
    assert (len(outer.pop_samples()), len(inner.pop_samples())) == (4, 2)


def test_attribution_refuses_standing_interventions(model: nn.Module) -> None:
    replacement = ReplacementModel(
        model, make_coders("clt"), mode="error", interventions=[Intervention("zero", 1)]
    )
    with pytest.raises(ValueError, match="no interventions"), replacement.attribution():
        pass


def test_interventions_must_be_intervention_objects(model: nn.Module) -> None:
    replacement = ReplacementModel(model, make_coders("plt"))
    with pytest.raises(TypeError, match="interventions are Intervention objects, got 'zero'"):
        replacement.interventions = ["zero"]  # type: ignore[list-item]


def test_an_older_config_s_image_token_index_gives_the_image_tokens() -> None:
    from types import SimpleNamespace

    model = nn.Module()
    model.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.Linear(2 * D, D))
    model.config = SimpleNamespace(image_token_index=IMAGE)  # no image_token_id
    cfg = SparseCoderConfig(num_latents=LATENTS, k=K, transcode=True)
    assert ReplacementModel(model, PerLayerCoders(["mlp"], D, cfg)).image_token_id == IMAGE


def test_coders_that_train_get_gradients_through_their_own_weights(model: nn.Module) -> None:
    """End-to-end training: grad enabled and weights requiring grad skip the fused copies."""
    clt = make_coders("clt")
    try:
        ReplacementModel(model, clt)(**batch()).logits.square().sum().backward()
        assert all(W.grad is not None and W.grad.abs().sum() > 0 for W in clt.sources[0].W_decs)
    finally:
        model.zero_grad(set_to_none=True)


def test_capture_refuses_beam_search(model: nn.Module) -> None:
    replacement = ReplacementModel(model, make_coders("plt"), mode="off")
    with replacement.capture(), pytest.raises(ValueError, match="num_beams=1"):
        replacement.generate(**batch(), **{**GREEDY, "num_beams": 2})


def test_fused_and_per_target_decoding_agree_and_follow_weight_changes(model: nn.Module) -> None:
    coders = make_coders("clt3")
    inputs = batch()
    fused = ReplacementModel(model, coders, mode="open-loop")
    per_target = ReplacementModel(model, coders, mode="open-loop", decoder="per-target")
    with torch.no_grad():
        logits = fused(**inputs).logits
        assert fused.fused_nbytes > 0 and per_target.fused_nbytes == 0
        torch.testing.assert_close(logits, per_target(**inputs).logits, atol=1e-5, rtol=1e-5)
        coders.sources[1].W_decs[1].mul_(-3.0)  # as a training step would, in place
        changed = fused(**inputs).logits
        torch.testing.assert_close(changed, per_target(**inputs).logits, atol=1e-5, rtol=1e-5)
    assert (changed - logits).abs().max() > 1e-3


def test_fused_copies_that_would_crowd_the_gpu_give_way_to_per_target(
    model: nn.Module, monkeypatch
) -> None:
    import vlm_sparsify.replacement as replacement_module

    coders = make_coders("clt")
    inputs = batch()
    with torch.no_grad():
        expected = ReplacementModel(model, coders, decoder="per-target")(**inputs).logits
        monkeypatch.setattr(replacement_module, "free_memory_bytes", lambda device: 1000)
        rm = ReplacementModel(model, coders)
        with pytest.warns(UserWarning, match="decoding target by target instead"):
            logits = rm(**inputs).logits
        assert rm.fused_nbytes == 0
        torch.testing.assert_close(logits, expected)
        # memory freed later: the next call takes the copies after all
        monkeypatch.setattr(replacement_module, "free_memory_bytes", lambda device: 2**40)
        torch.testing.assert_close(rm(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
    assert rm.fused_nbytes > 0


def test_fused_copies_are_refused_above_half_the_free_memory(model: nn.Module, monkeypatch) -> None:
    import vlm_sparsify.replacement as replacement_module
    from vlm_sparsify.clt_inference import CLTInference

    coders = make_coders("clt")
    needed = CLTInference.copy_nbytes(coders)
    monkeypatch.setattr(replacement_module, "free_memory_bytes", lambda device: 3 * needed // 2)
    rm = ReplacementModel(model, coders)
    with torch.no_grad(), pytest.warns(UserWarning, match="decoding target by target instead"):
        rm(**batch())
    assert rm.fused_nbytes == 0


def test_off_ignores_interventions(model: nn.Module) -> None:
    zero_all = Intervention("zero", features=tuple(range(LATENTS)))
    with torch.no_grad():
        expected = model(**batch()).logits
        for kind in ("plt", "clt"):
            rm = ReplacementModel(model, make_coders(kind), mode="off")
            torch.testing.assert_close(rm(**batch(), interventions=zero_all).logits, expected)


def test_benchmark_reports_a_ratio(model: nn.Module) -> None:
    result = benchmark_generate(model, make_coders("clt"), batch(), max_new_tokens=2, repeats=1)
    assert result["base_s"] > 0 and result["replacement_s"] > 0
    assert result["ratio"] == pytest.approx(result["replacement_s"] / result["base_s"])
    assert result["decoder"] == "fused"


def test_benchmark_alternates_the_order_of_each_repeat(
    model: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Base first in even repeats, the replacement first in odd ones (after one warm-up each)."""
    calls: list[tuple[str, int]] = []
    generate = model.generate

    def recorded(*args: Any, **kwargs: Any) -> Any:
        hooked = getattr(model, "_vlm_sparsify_replacement", None) is not None
        calls.append(("replacement" if hooked else "base", kwargs["max_new_tokens"]))
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", recorded)
    result = benchmark_generate(model, make_coders("clt"), batch(), max_new_tokens=2, repeats=2)
    base, rep = "base", "replacement"
    assert calls == [
        (base, 2), (rep, 2),  # warm-up
        (base, 2), (rep, 2), (base, 1), (rep, 1),
        (rep, 2), (base, 2), (rep, 1), (base, 1),
    ]  # fmt: skip
    assert result["repeats"] == 2
    assert result["ratio_min"] <= result["ratio"] <= result["ratio_max"]


def test_benchmark_ratios_are_per_repeat_and_the_later_tokens_exclude_each_run_s_own_prefill(
    model: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a fake clock: base takes 1 s to prefill and 2 s in all, the replacement 3 s and 7 s
    (repeat 0) or 3 s and 9 s (repeat 1): ratios 3.5 and 4.5, later tokens 4 and 6 over 1."""
    import vlm_sparsify.bench_steps as bench_steps

    now = [0.0]
    generate = model.generate
    calls = [0]

    def timed(*args: Any, **kwargs: Any) -> Any:
        hooked = getattr(model, "_vlm_sparsify_replacement", None) is not None
        whole = kwargs["max_new_tokens"] == 2
        calls[0] += 1
        if hooked:
            now[0] += (9.0 if calls[0] > 6 else 7.0) if whole else 3.0
        else:
            now[0] += 2.0 if whole else 1.0
        return generate(*args, **kwargs)

    class Clock:
        @staticmethod
        def perf_counter() -> float:
            return now[0]

    monkeypatch.setattr(model, "generate", timed)
    monkeypatch.setattr(bench_steps, "time", Clock)
    result = benchmark_generate(model, make_coders("clt"), batch(), max_new_tokens=2, repeats=2)
    assert (result["ratio_min"], result["ratio_max"]) == (3.5, 4.5)
    assert result["ratio"] == 4.0 and result["prefill_ratio"] == 3.0
    assert result["per_token_ratio"] == 5.0  # (7 - 3) / 1 and (9 - 3) / 1
    assert result["base_s"] == 2.0 and result["replacement_prefill_s"] == 3.0


@pytest.mark.parametrize("decoder", ["fused", "per-target", "fused-own-weights"])
def test_attribution_gradients_match_a_finite_difference(
    model: nn.Module, decoder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """activation x gradient of a logit equals the first-order effect of scaling the feature."""
    own_weights = decoder == "fused-own-weights"
    if own_weights:  # as on CUDA: the CLT's own weights decode (no decoder copies are taken)
        monkeypatch.setattr(ReplacementModel, "attribution_own_weights_on", ("cpu",))
        decoder = "fused"
    inputs = batch()
    coders = make_coders("clt")
    # weights that need no gradient: the fused copies serve (else the CLT's own weights do)
    fused = decoder == "fused"
    coders.requires_grad_(not fused)
    rm = ReplacementModel(model, coders, mode="error", decoder=decoder)
    with rm.attribution() as leaves:
        logits = rm(**inputs).logits
    assert (rm.fused_nbytes > 0) == (fused and not own_weights)
    assert torch.equal(logits, model(**inputs).logits)  # the leaves do not change the values
    target = logits[0, -1, 3]
    target.backward()
    p, acts, indices = leaves[0]
    # the strongest attributed feature of the last token, and the effect of scaling it slightly
    row = acts.shape[0] - 1
    attribution = (acts * acts.grad)[row]
    j = int(attribution.abs().argmax())
    feature = int(indices[row, j])
    eps = 1e-3
    nudged = ReplacementModel(model, coders, mode="error")
    with (
        torch.no_grad(),
        nudged.intervene([Intervention("scale", features=feature, layers=p, value=1 + eps)]),
    ):
        moved = nudged(**inputs).logits[0, -1, 3]
    # scaling multiplies every token's activation of that feature; compare with the summed
    # attribution of that feature over all tokens
    total = float((acts * acts.grad).detach()[indices == feature].sum())
    assert abs(total) > 1e-3  # a feature that matters
    assert float(moved - target.detach()) / eps == pytest.approx(total, rel=0.05)


def test_a_submodule_called_alone_refuses_regions_and_capture(model: nn.Module) -> None:
    """The language model called alone has no token regions (the root model's pre-hook reads
    them): a region-limited edit edited every token, or, after a root forward, used that
    forward's stale regions; capture wrote into the last root forward's rows or failed."""
    language_model = model.model.language_model
    tokens = batch()["input_ids"][:, 2:]
    rm = ReplacementModel(model, make_coders("clt"), mode="error")
    edit = Intervention("set", features=3, value=5.0, region="response")
    for root_forward_first in (False, True):
        with rm, rm.intervene(edit), torch.no_grad():
            if root_forward_first:
                rm(**batch())
            with pytest.raises(ValueError, match="this forward's regions are unknown"):
                language_model(input_ids=tokens)
        with rm, rm.capture(), torch.no_grad():
            if root_forward_first:
                rm(**batch())
            with pytest.raises(RuntimeError, match="capture follows forwards of the root model"):
                language_model(input_ids=tokens)
    with rm, rm.intervene(Intervention("set", features=3, value=5.0)), torch.no_grad():
        edited = language_model(input_ids=tokens).last_hidden_state  # every token: no regions
    assert not torch.equal(edited, language_model(input_ids=tokens).last_hidden_state)


def test_capture_inside_attribution_records_the_leaves_features(model: nn.Module) -> None:
    rm = ReplacementModel(model, make_coders("clt"), mode="error")
    with rm.attribution() as leaves, rm.capture() as capture:
        rm(**batch())
    samples = capture.pop_samples()
    keep = batch()["attention_mask"].reshape(-1).bool()
    assert len(samples) == 2 and len(leaves) == LAYERS
    for p, acts, indices in leaves:
        captured = torch.cat([sample.indices[:, p] for sample in samples]).long()
        assert torch.equal(captured, indices[keep])
        values = torch.cat([sample.values[:, p] for sample in samples])
        assert torch.equal(values, acts.detach()[keep].bfloat16())


def test_attribution_refuses_interventions_and_modes_added_inside_its_block(
    model: nn.Module,
) -> None:
    """The attribution step ignores interventions and assumes error mode: changing either inside
    the block silently gave unedited (or wrong) outputs."""
    rm = ReplacementModel(model, make_coders("clt"), mode="error")
    edit = Intervention("set", features=3, value=5.0)
    with rm.attribution():
        with pytest.raises(RuntimeError, match="attribution runs without interventions"):
            rm.intervene(edit).__enter__()
        with pytest.raises(RuntimeError, match="attribution runs without interventions"):
            rm.generate(**batch(), **GREEDY, interventions=edit)
        with pytest.raises(RuntimeError, match="attribution needs mode='error'"):
            rm.mode = "open-loop"
    assert rm.interventions == [] and rm.mode == "error"
    rm.mode = "open-loop"  # outside the block, both work again
    with rm.intervene(edit):
        assert rm.interventions == [edit]


@pytest.mark.skipif(triton_runs(), reason="triton can run here")
def test_the_triton_decoder_says_what_it_needs(model: nn.Module) -> None:
    needs = "the triton CLT decoder (needs the triton package|runs on a CUDA GPU)"
    with pytest.raises(RuntimeError, match=needs):
        ReplacementModel(model, make_coders("clt"), decoder="triton")


@NEEDS_TRITON
def test_hybrid_decodes_the_prefill_with_triton_and_the_steps_with_embedding_bag(
    model: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vlm_sparsify.clt_inference import CLTInference

    coders = make_coders("clt3")
    with torch.no_grad():
        reference = ReplacementModel(model, coders, decoder="fused").generate(**batch(), **GREEDY)
    rows: dict[str, list[int]] = {"triton": [], "embedding_bag": []}
    decode_into, decode = CLTInference.decode_into, CLTInference.decode

    def spy(kernel: str, method: Any) -> Any:
        def wrapper(self: CLTInference, p: int, top_acts: Tensor, *args: Any, **kwargs: Any):
            rows[kernel].append(top_acts.shape[0])
            return method(self, p, top_acts, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(CLTInference, "decode_into", spy("triton", decode_into))
    monkeypatch.setattr(CLTInference, "decode", spy("embedding_bag", decode))
    hybrid = ReplacementModel(model, coders, decoder="hybrid")
    hybrid.hybrid_min_rows = 16  # the test prompts' prefill: 2 sequences of more than 8 tokens
    with torch.no_grad():
        tokens = hybrid.generate(**batch(), **GREEDY)
    assert torch.equal(tokens, reference)
    assert rows["triton"] and min(rows["triton"]) >= 16
    assert rows["embedding_bag"] and set(rows["embedding_bag"]) == {2}  # one row per sequence


NO_KERNEL = {"view", "_unsafe_view", "reshape", "alias", "slice", "select", "unsqueeze", "t",
             "expand", "detach", "as_strided", "transpose", "lift_fresh", "promote_types",
             "empty", "new_empty", "empty_like"}  # fmt: skip
"""Ops that launch no kernel on a GPU (views, metadata, allocation)."""


def kernels_of_a_decoding_step(model: nn.Module, replacement: ReplacementModel | None) -> Counter:
    """Kernel-launching ops of one greedy decoding step after a prefill (the KV cache's)."""

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            name = func.overloadpacket.__name__
            if name not in NO_KERNEL:
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    inputs = batch()
    with torch.no_grad(), replacement or nullcontext():
        out = model(**inputs, use_cache=True)
        step = {
            "input_ids": out.logits[:, -1:].argmax(-1),
            "attention_mask": torch.cat(
                [inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1
            ),
            "past_key_values": out.past_key_values,
            "use_cache": True,
        }
        with Count() as count:
            model(**step)
    return count.ops


def test_a_decoding_step_launches_about_the_mlps_kernels(
    model: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At a decoding step a GPU is launch-bound: open loop through the fused copies runs, per
    layer, as many kernels as the MLP it replaces (encoder addmm with its ReLU, top-k,
    embedding_bag, ring addition, read-out vs three matmuls, SiLU, product), plus a few per
    forward (the ring's start from the summed biases, the bags' offsets at a new row count)."""
    # torch's top-k, as on a GPU (on the CPU topk_rows prunes with a few more ops)
    monkeypatch.setattr(topk_encoder, "topk_rows", lambda x, k: x.topk(k, dim=-1, sorted=False))
    base = kernels_of_a_decoding_step(model, None)
    replaced = kernels_of_a_decoding_step(model, ReplacementModel(model, make_coders("clt")))
    extra = sum(replaced.values()) - sum(base.values())
    assert replaced["embedding_bag"] + replaced["_embedding_bag_forward_only"] == LAYERS
    assert base["silu"] == LAYERS and replaced["silu"] == 0
    assert extra == 2, (base, replaced)
