"""benchmarks.runs: the model, recipe and coders a later stage loads from an output folder."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from benchmarks import outputs
from benchmarks.__main__ import run
from benchmarks.adapters import get_adapter
from benchmarks.runs import capture_recipe, load_run, read_features, teacher_forced_inputs
from tests.benchmarks.test_attribute import coders_dir  # noqa: F401 (fixture)
from tests.benchmarks.test_capture_classify import GREEDY
from tests.test_recipes import _images, _tiny
from vlm_sparsify.data import load_rgb
from vlm_sparsify.recipe import find_recipe


def test_capture_recipe_is_the_flag_then_the_recorded_match_then_the_model_s(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llava"}))
    settings = {"model": str(model), "recipe": "tiny_llava"}
    # --recipe wins over what capture recorded
    assert capture_recipe({"settings": settings, "recipe_used": "llava"}).name == "tiny_llava"
    # without --recipe: the recipe capture matched and recorded, not matched again
    settings["recipe"] = None
    assert capture_recipe({"settings": settings, "recipe_used": "tiny_llava"}).name == "tiny_llava"
    with pytest.warns(UserWarning, match="matched only by config.model_type 'llava'"):
        assert capture_recipe({"settings": settings}).name == "llava"  # older capture.json


def test_load_run_refuses_an_out_of_another_benchmark(tmp_path):
    info = {"settings": {"model": "default"}, "data": {"kinds": "yesno"}}
    (tmp_path / outputs.CAPTURE).write_text(json.dumps(info))
    with pytest.raises(ValueError, match="is a capture of easyvqa .* not of pope"):
        load_run(tmp_path, "pope", None, "cpu")


def test_read_features_names_the_stage_that_writes_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="features.json: run `analyze` first"):
        read_features(tmp_path)
    (tmp_path / outputs.FEATURES).write_text(json.dumps({"selected": []}))
    with pytest.raises(ValueError, match="features.json lacks features: not the file this tool"):
        read_features(tmp_path)


def test_load_run_uses_the_captured_dtype_and_refuses_coders_of_another_k(
    tmp_path,
    tiny_llava_dir,
    coders_dir,  # noqa: F811
):
    out = tmp_path / "out"
    run(["easyvqa", "capture", "--out", str(out), "--model", str(tiny_llava_dir), "--coders",
         str(coders_dir), "--kinds", "yesno", "--limit", "1", *GREEDY])  # fmt: skip
    info = json.loads((out / outputs.CAPTURE).read_text())
    assert info["settings"]["dtype"] == "float32"
    info["settings"]["dtype"] = "bfloat16"  # as if captured in bfloat16
    (out / outputs.CAPTURE).write_text(json.dumps(info))
    loaded = load_run(out, "easyvqa", None, "cpu")
    assert loaded.model.dtype == torch.bfloat16
    [record] = outputs.read_append_log(out / outputs.RESPONSES)
    items = {i.id: i for i in get_adapter("easyvqa").load_items(loaded.data, loaded.recipe)}
    inputs = teacher_forced_inputs(loaded, record, load_rgb(items[record["id"]].image))
    assert inputs["pixel_values"].dtype == torch.bfloat16  # the model's, not the processor's
    # one unpadded row: the prompt then every response token, all attended
    length = inputs["input_ids"].shape[1]
    assert (
        inputs["input_ids"][0, -len(record["response_token_ids"]) :].tolist()
        == record["response_token_ids"]
    )
    assert inputs["attention_mask"].tolist() == [[1] * length]
    # the same weights read with another k would pick other features than the store holds
    other = tmp_path / "other_k"
    shutil.copytree(coders_dir, other)
    for cfg in other.glob("*/cfg.json"):
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "k": 4}))
    with pytest.raises(ValueError, match="not the coders the feature store was captured with"):
        load_run(out, "easyvqa", str(other), "cpu")


def test_the_store_s_coders_are_recognised_in_layer_order_past_layer_nine():
    """Hookpoints compare in the store's S-axis order (layer 10 after 9, not after 1), and the
    fingerprint tells apart coders of the same shape."""
    from sparsify import SparseCoderConfig

    from benchmarks.runs import _check_coders
    from benchmarks.store import StoreMeta, coder_fingerprint
    from vlm_sparsify.training import build_coders

    hookpoints = [f"model.language_model.layers.{i}.mlp" for i in range(12)]
    cfg = SparseCoderConfig(num_latents=8, k=2)
    coders = build_coders(hookpoints, 4, cfg, cross_layer=0, device=torch.device("cpu"))
    meta = StoreMeta(hookpoints, 2, 8, fingerprint=coder_fingerprint(coders))
    _check_coders(coders, "run", meta)  # the store's own coders
    other = build_coders(hookpoints, 4, cfg, 0, torch.device("cpu"))
    with torch.no_grad():  # as training moves them (at init every bias is zero)
        next(iter(other.items()))[1].encoder.bias.add_(0.01)
    for wrong in (StoreMeta(hookpoints[::-1], 2, 8), meta, StoreMeta(hookpoints, 2, 16)):
        checked = other if wrong is meta else coders
        with pytest.raises(ValueError, match="--coders run are not the coders the feature store"):
            _check_coders(checked, "run", wrong)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "gemma3", "idefics3", "llava_next", "paligemma"])
def test_teacher_forcing_gives_the_logits_of_greedy_generation_in_every_family(name):
    """attribute and map re-run a sample as prompt + response in one forward: the model must
    see the image as generation did (Qwen's image_grid_thw, Idefics3's pixel_attention_mask,
    LLaVA-NeXT's image_sizes, Gemma 3's token types) and the response as generated tokens
    (PaliGemma's causal suffix), so each response row's logits are generation's."""
    recipe = find_recipe(name)
    model, processor = _tiny(name)
    image = _images()[0]
    prompt = recipe.format_prompt("is there a red circle?", processor)
    encoded = processor(images=[[image]], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**encoded, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True)  # fmt: skip
    response = generated.sequences[0, encoded["input_ids"].shape[1] :].tolist()
    loaded = SimpleNamespace(model=model, processor=processor, recipe=recipe)
    inputs = teacher_forced_inputs(loaded, {"prompt": prompt, "response_token_ids": response},
                                   image)  # fmt: skip
    assert inputs["input_ids"][0, -3:].tolist() == response
    with torch.no_grad():
        logits = model(**inputs).logits[0, -4:-1]
    torch.testing.assert_close(logits, torch.cat(generated.logits), rtol=1e-4, atol=1e-4)
