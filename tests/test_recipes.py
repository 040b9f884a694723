"""Recipes: lookup, validation, and a tiny random model of every shipped recipe that trains."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sparsify.config import SparseCoderConfig
from torch import nn

from benchmarks.neuron_map import down_projection
from vlm_sparsify.data import (
    Example,
    check_image_token,
    collate,
    encode_example,
    image_token_id,
    token_mask,
)
from vlm_sparsify.generation import generate_batch
from vlm_sparsify.hookpoints import decoder_layers_path, mlp_hookpoints, vision_layer_paths
from vlm_sparsify.loading import load_model_and_processor
from vlm_sparsify.random_models import (
    build_tiny,
    build_tiny_model,
    build_tiny_processor,
    build_tokenizer,
)
from vlm_sparsify.recipe import (
    Recipe,
    RecipeError,
    check_train_value,
    find_recipe,
    shipped_recipes,
)
from vlm_sparsify.replacement import ReplacementModel
from vlm_sparsify.training import (
    build_coders,
    collect_activations,
    loss_per_target,
    total_variances,
)

RECIPES = sorted(shipped_recipes())
LLAVA_TOML = Path(__file__).resolve().parents[1] / "recipes" / "llava.toml"


def test_every_family_of_the_issue_is_shipped():
    assert set(RECIPES) >= {
        "llava",
        "llava_next",
        "qwen2_vl",
        "qwen2_5_vl",
        "idefics3",
        "gemma3",
        "paligemma",
        "llava_onevision",
        "qwen3_vl",
        "internvl",
        "vipllava",
        "aya_vision",
        "glm4v",
        "ovis2",
        "smolvlm",
    }


# -- lookup ---------------------------------------------------------------------------------------


def test_lookup_by_name():
    recipe = find_recipe("qwen2_5_vl")
    assert recipe.model_class == "Qwen2_5_VLForConditionalGeneration"
    assert recipe.decoder_layers[0] == "model.language_model.layers"


def test_lookup_by_path(tmp_path):
    path = tmp_path / "my_family.toml"
    path.write_text(LLAVA_TOML.read_text().replace('name = "llava"', 'name = "my_family"'))
    recipe = find_recipe(str(path))
    assert recipe.name == "my_family" and recipe.source == str(path)
    assert recipe.model_class == "LlavaForConditionalGeneration"


@pytest.mark.parametrize(
    ("model_id", "name"),
    [
        ("llava-hf/llava-1.5-7b-hf", "llava"),
        ("llava-hf/llava-v1.6-mistral-7b-hf", "llava_next"),
        ("llava-hf/llava-v1.6-34b-hf", "llava_next"),
        ("Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl"),
        ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl"),
        ("HuggingFaceTB/SmolVLM-256M-Instruct", "idefics3"),
        ("HuggingFaceM4/Idefics3-8B-Llama3", "idefics3"),
        ("google/gemma-3-4b-it", "gemma3"),
        ("google/paligemma-3b-mix-224", "paligemma"),
        ("google/paligemma2-3b-pt-448", "paligemma"),
        ("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "llava_onevision"),
        ("llava-hf/llava-onevision-qwen2-7b-si-hf", "llava_onevision"),
        ("Qwen/Qwen3-VL-2B-Instruct", "qwen3_vl"),
        ("Qwen/Qwen3-VL-8B-Thinking", "qwen3_vl"),
        ("Qwen/Qwen3-VL-32B-Instruct-FP8", "qwen3_vl"),
        ("OpenGVLab/InternVL3-1B-hf", "internvl"),
        ("OpenGVLab/InternVL3-78B-hf", "internvl"),
        ("llava-hf/vip-llava-7b-hf", "vipllava"),
        ("llava-hf/vip-llava-13b-hf", "vipllava"),
        ("CohereLabs/aya-vision-8b", "aya_vision"),
        ("CohereForAI/aya-vision-32b", "aya_vision"),
        ("zai-org/GLM-4.1V-9B-Thinking", "glm4v"),
        ("THUDM/GLM-4.1V-9B-Base", "glm4v"),
        ("thisisiron/Ovis2-1B-hf", "ovis2"),
        ("thisisiron/Ovis2-34B-hf", "ovis2"),
        ("HuggingFaceTB/SmolVLM2-2.2B-Instruct", "smolvlm"),
        ("HuggingFaceTB/SmolVLM2-500M-Video-Instruct", "smolvlm"),
        ("HuggingFaceTB/SmolVLM2-256M-Video-Instruct", "smolvlm"),
        ("HuggingFaceTB/SmolVLM-500M-Instruct", "idefics3"),
    ],
)
def test_lookup_by_model_id_matches_exactly_one_recipe(model_id, name):
    assert find_recipe(model_id=model_id).name == name
    assert [r.name for r in shipped_recipes().values() if r.matches(model_id)] == [name]


@pytest.mark.parametrize(
    "model_id", ["Qwen/Qwen3-VL-30B-A3B-Instruct", "Qwen/Qwen3-VL-235B-A22B-Thinking"]
)
def test_a_qwen3_vl_moe_id_matches_no_recipe(model_id):
    # model_type qwen3_vl_moe: its MLPs are expert blocks, not the qwen3_vl recipe's
    assert [r.name for r in shipped_recipes().values() if r.matches(model_id)] == []


def test_lookup_by_model_type_of_a_saved_model(tmp_path):
    recipe = find_recipe("paligemma")
    model = build_tiny_model(recipe, _tokenizer_only(recipe))
    folder = tmp_path / "my-finetune"  # a name no model_ids pattern knows
    model.config.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "paligemma"
    assert find_recipe(model_id=str(folder)).name == "paligemma"


def test_a_local_folder_is_found_by_its_model_type_before_a_glob_on_its_path(tmp_path):
    folder = tmp_path / "llava-1.5-project" / "my-qwen"  # the path matches llava's `*llava-1.5*`
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    assert find_recipe(model_id=str(folder)).name == "qwen2_5_vl"
    # a glob still chooses among the recipes of the folder's model_type
    (folder / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert find_recipe(model_id=str(folder)).name == "llava"


def test_a_text_only_gemma3_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "gemma-3-1b-it"  # matches the gemma3 recipe's `*gemma-3-*`
    folder.mkdir()
    config = {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"is Gemma3ForCausalLM .*'gemma3'.*no vision tower"):
        find_recipe(model_id=str(folder))


def test_a_text_only_checkpoint_is_refused_before_its_weights_load(tmp_path):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=128,
    )  # fmt: skip
    Gemma3ForCausalLM(config).save_pretrained(tmp_path)  # as a Hub id would: no path to match
    with pytest.raises(
        ValueError, match=r"is Gemma3ForCausalLM .*recipe 'gemma3'.*no vision tower"
    ):
        load_model_and_processor(str(tmp_path), find_recipe("gemma3"), device="cpu")


def test_unknown_model_lists_the_recipes_and_the_flag(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "florence2"}))
    with pytest.raises(ValueError, match="florence2") as err:
        find_recipe(model_id=str(tmp_path))
    message = str(err.value)
    assert "--recipe PATH" in message
    assert all(name in message for name in RECIPES)


def test_a_mistyped_model_folder_is_named_as_a_path_not_as_an_unknown_model(tmp_path):
    # `python -m vlm_sparsify ./vlm_sparsify/tiny/easyvqa_llav` said "no recipe matches model
    # ...; pass --recipe NAME", sending the user after a recipe when the path was wrong
    shipped = Path(__file__).parents[1] / "vlm_sparsify" / "tiny" / "easyvqa_llava"
    assert find_recipe(model_id=str(shipped)).name == "tiny_llava"
    for typo in (str(shipped)[:-1], str(tmp_path / "nomodel"), "./my-model"):
        with pytest.raises(
            FileNotFoundError, match=f"no model folder '{re.escape(typo)}'.* not a Hub id"
        ):
            find_recipe(model_id=typo)
    with pytest.raises(FileNotFoundError, match="has no config.json: not a model folder"):
        find_recipe(model_id=str(tmp_path))  # a folder, but nothing saved in it
    with pytest.raises(ValueError, match="no recipe matches model 'acme/vista-7b'"):
        find_recipe(model_id="acme/vista-7b")  # a Hub id no recipe knows: the recipes' message


def test_unknown_recipe_name_lists_the_recipes():
    with pytest.raises(ValueError, match="unknown recipe 'llava2'") as err:
        find_recipe("llava2")
    assert "--recipe PATH" in str(err.value) and "gemma3" in str(err.value)


@pytest.mark.parametrize("class_name", ["os.system", "Popen", "subprocess.Popen", "PIL.Image"])
def test_a_non_transformers_class_is_rejected(tmp_path, class_name):
    path = tmp_path / "evil.toml"
    path.write_text(
        LLAVA_TOML.read_text().replace(
            'class = "LlavaForConditionalGeneration"', f'class = "{class_name}"'
        )
    )
    recipe = find_recipe(str(path))
    with pytest.raises(ValueError, match="only name transformers classes"):
        recipe.resolve_model_class()


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "[train]",
            "[trian]",
            r"unknown table 'trian' at the top level \(did you mean 'train'\?\)",
        ),
        (
            'model_type = "llava"',
            'model_type = "llava"\nmodel_typ = "x"',
            "unknown key 'model_typ' at the top level",
        ),
        ('mlp = "mlp"', 'mpl = "mlp"', r"unknown key 'mpl' at \[layers\] \(did you mean 'mlp'\?\)"),
        ('class = "Llava', 'klass = "Llava', r"unknown key 'klass' at \[model\]"),
        (
            'image_token = "<image>"',
            'image_token = "<image>"\nsystem_prompt = "hi"',
            r"unknown key 'system_prompt' at \[prompt\]",
        ),
        (
            'text_column = "answer"',
            'text_colum = "answer"',
            r"'text_colum' at \[dataset\] \(did you mean 'text_column'",
        ),
        (
            'config_class = "LlavaConfig"',
            'config_clas = "LlavaConfig"',
            r"'config_clas' at \[tiny\]",
        ),
        (
            'image_token = "<image>"',
            'image_token = "<image>"\nuse_chat_template = "false"',
            r"\[prompt\] use_chat_template = 'false' must be true or false",
        ),
        (
            'class = "LlavaForConditionalGeneration"',
            "class = 3",
            r"\[model\] class = 3 must be a string",
        ),
        (
            'decoder = ["model.language_model.layers", "language_model.model.layers"]',
            "decoder = 5",
            r"\[layers\] decoder = 5 must be a string or a list of strings",
        ),
        (
            'decoder = ["model.language_model.layers", "language_model.model.layers"]',
            "decoder = []",
            r"\[layers\] decoder lists no path",
        ),
        (
            'model_ids = ["llava-hf/llava-1.5-*"',
            'model_ids = 5\nx = ["llava-hf/llava-1.5-*"',
            "model_ids = 5 must be a string or a list",
        ),
        ('path = "lmms-lab/COCO-Caption2017"\n', "", r"lacks the key 'path' at \[dataset\]"),
        (
            "{question} ASSISTANT",
            "{quest} ASSISTANT",
            r"\[prompt\] template .* has a placeholder other than \{question\} \(KeyError: 'quest'\)",
        ),
        ("USER: <image>", "USER:", r"\[prompt\] template .* lacks '<image>'"),
    ],
)
def test_a_malformed_recipe_is_one_line_naming_table_and_key(tmp_path, old, new, message):
    text = LLAVA_TOML.read_text()
    assert old in text
    path = tmp_path / "bad.toml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ValueError, match=message) as err:
        find_recipe(str(path))
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_under_a_chat_template_the_template_needs_no_image_token(tmp_path):
    """The chat template writes the prompt (and its image placeholder): `template` is not used,
    so a template without the image token is no error there."""
    text = LLAVA_TOML.read_text()
    old = 'template = "USER: <image>\\n{question} ASSISTANT:"'
    assert old in text
    path = tmp_path / "chat.toml"
    path.write_text(text.replace(old, 'use_chat_template = true\ntemplate = "{question}"'))
    assert find_recipe(str(path)).prompt.use_chat_template


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_classes_resolve_inside_transformers(name):
    recipe = find_recipe(name)
    assert issubclass(recipe.resolve_model_class(), nn.Module)
    recipe.resolve_processor_class()
    assert recipe.dataset.path and recipe.dataset.image_column
    assert recipe.prompt.use_chat_template or "{question}" in recipe.prompt.template
    if recipe.prompt.use_chat_template:
        assert "chat_template" in recipe.tiny, "the offline processor needs a chat template"


# -- a tiny random model of every shipped recipe --------------------------------------------------


def _tokenizer_only(recipe: Recipe) -> Any:
    """Enough of a processor to size the model: the tiny tokenizer."""
    return SimpleNamespace(tokenizer=build_tokenizer(recipe))


def _require(recipe: Recipe) -> None:
    for package in recipe.tiny.get("requires", []):
        pytest.importorskip(package, reason=f"recipe '{recipe.name}' needs {package}")


@cache
def _tiny(name: str) -> tuple[Any, Any]:
    return build_tiny(find_recipe(name))


def _vision_depth(config: Any) -> int:
    vision = config.vision_config
    return int(getattr(vision, "depth", None) or vision.num_hidden_layers)


@pytest.mark.parametrize("name", RECIPES)
def test_hookpoints_one_per_text_decoder_layer(name):
    recipe = find_recipe(name)
    model = build_tiny_model(recipe, _tokenizer_only(recipe))
    assert model.config.model_type == recipe.model_type
    n_layers = model.config.get_text_config().num_hidden_layers
    hookpoints = mlp_hookpoints(model, recipe)
    assert len(hookpoints) == n_layers
    # the transformers >= 4.52 layout, listed first, is the one found in 5.x
    assert hookpoints == [f"{recipe.decoder_layers[0]}.{i}.{recipe.mlp}" for i in range(n_layers)]
    for hookpoint in hookpoints:
        assert "MLP" in type(model.get_submodule(hookpoint)).__name__
    vision = vision_layer_paths(model, recipe)
    assert len(vision) == _vision_depth(model.config)
    assert all(p.startswith(("model.visual.", "model.vision")) for p in vision)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(40, 32), (64, 120)]  # (width, height): different sizes and aspect ratios
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _batch(recipe: Recipe, processor: Any) -> dict[str, torch.Tensor]:
    first, second = _images()
    examples = [
        Example("a", first, "what color is the circle?", "red"),
        Example("b", second, "describe this image.", "a blue square on the left"),
    ]
    encoded = [encode_example(e, processor, recipe, ctx_len=256) for e in examples]
    return collate(encoded, processor.tokenizer.pad_token_id)


class _Stop(Exception):
    pass


def _first_layer_inputs(model: nn.Module, recipe: Recipe, inputs: dict) -> torch.Tensor:
    """Hidden states entering decoder layer 0: the embeddings with image features merged in."""
    seen: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((args[0] if args else kwargs["hidden_states"]).clone())
        raise _Stop

    layer = model.get_submodule(f"{decoder_layers_path(model, recipe)}.0")
    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("name", RECIPES)
def test_image_mask_selects_the_tokens_the_model_fills_with_image_features(name):
    recipe = find_recipe(name)
    _require(recipe)
    model, processor = _tiny(name)
    batch = _batch(recipe, processor)
    image_mask = token_mask(batch, image_token_id(processor, recipe), "image")
    pad_token = recipe.prompt.image_pad_token or recipe.prompt.image_token
    pad_id = processor.tokenizer.convert_tokens_to_ids(pad_token)
    assert image_mask.sum(1).tolist() == (batch["input_ids"] == pad_id).sum(1).tolist()
    assert (image_mask.sum(1) > 0).all()
    # the model overwrites the token embedding exactly where the mask says image, and at the
    # image delimiters its config names as visual indicators (Ovis2's <IMG_START>, ...: fixed
    # visual-table embeddings, checked below not to come from the pixels)
    indicators = torch.tensor(getattr(model.config, "visual_indicator_token_ids", None) or [])
    delimiters = torch.isin(batch["input_ids"], indicators.long())
    assert delimiters.any() == (len(indicators) > 0)
    before = _first_layer_inputs(model, recipe, batch)
    embedded = model.get_input_embeddings()(batch["input_ids"])
    assert torch.equal((before - embedded).abs().amax(-1) > 0, image_mask | delimiters)
    # and what it writes there comes from the pixels (LLaVA-NeXT's row-end tokens do not)
    after = _first_layer_inputs(model, recipe, {**batch, "pixel_values": -batch["pixel_values"]})
    from_pixels = (before - after).abs().amax(-1) > 0
    assert not (from_pixels & ~image_mask).any()
    assert (from_pixels.sum(1) > 0).all()


@pytest.mark.parametrize("name", RECIPES)
def test_the_replacement_model_runs_every_recipe(name):
    """What the benchmarks and `ask` do with a recipe's model (map finds its MLPs' neurons at
    their down_proj): error mode gives its logits and its greedy answers to a left-padded batch
    of two images, capturing features whose image region is where the model's image tokens are;
    open loop generates the same with and without the KV cache, and is not the model."""
    recipe = find_recipe(name)
    _require(recipe)
    model, processor = _tiny(name)
    cfg = SparseCoderConfig(num_latents=32, k=4, transcode=True)
    hidden = model.config.get_text_config().hidden_size
    for hookpoint in mlp_hookpoints(model, recipe):  # where map reads its neurons
        assert down_projection(model, hookpoint).out_features == hidden
    coders = build_coders(mlp_hookpoints(model, recipe), hidden, cfg, cross_layer=2,
                          device=torch.device("cpu"))  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in coders.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    images = _images()
    prompts = [recipe.format_prompt(q, processor) for q in ("what is it?", "and this one, here?")]
    error = ReplacementModel(model, coders, mode="error")
    base = generate_batch(model, processor, images, prompts, max_new_tokens=4)
    got = generate_batch(model, processor, images, prompts, replacement=error, capture=True,
                         value_dtype=torch.float32, max_new_tokens=4)  # fmt: skip
    assert [g.tokens for g in got] == [g.tokens for g in base]
    image_id = image_token_id(processor, recipe)
    for generation in got:
        sample = generation.sample
        assert sample is not None
        image = torch.zeros(len(sample.token_ids), dtype=torch.bool)
        for start, stop in sample.regions["image"]:
            image[start:stop] = True
        assert torch.equal(image, sample.token_ids == image_id) and image.any()

    inputs = processor(images=[[i] for i in images], text=prompts, return_tensors="pt",
                       padding=True, padding_side="left")  # fmt: skip
    open_loop = ReplacementModel(model, coders, mode="open-loop")
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(**inputs).logits
        assert (error(**inputs).logits - logits).abs().max() <= 1e-4
        assert (open_loop(**inputs).logits - logits).abs().max() > 1e-2
        cached = open_loop.generate(**inputs, **greedy, use_cache=True)
        assert torch.equal(cached, open_loop.generate(**inputs, **greedy, use_cache=False))


@pytest.mark.parametrize("name", RECIPES)
def test_two_image_text_examples_train_one_plt_step(name):
    recipe = find_recipe(name)
    _require(recipe)
    model, processor = _tiny(name)
    batch = _batch(recipe, processor)
    mask = token_mask(batch, image_token_id(processor, recipe), "all")
    assert int(mask.sum()) == int(batch["attention_mask"].sum())
    hookpoints = mlp_hookpoints(model, recipe)
    inputs, outputs = collect_activations(model, hookpoints, batch, mask)
    d_in = model.config.get_text_config().hidden_size
    assert [x.shape for x in inputs] == [(int(mask.sum()), d_in)] * len(hookpoints)
    cfg = SparseCoderConfig(transcode=True, num_latents=64, k=4)
    coders = build_coders(hookpoints, d_in, cfg, cross_layer=0, device=torch.device("cpu"))
    coders.init_biases(inputs, outputs)
    fvu, indices, l0, _ = loss_per_target(coders, inputs, outputs, total_variances(outputs))
    assert fvu.shape == (len(hookpoints),) and torch.isfinite(fvu).all() and (fvu > 0).all()
    assert l0 == [4.0] * len(hookpoints)
    for coder in coders.coders:
        # sparsify starts a transcoder's decoder at zero, so only the decoder's gradient is
        # non-zero at step 0; the encoder's exists and is finite
        grad = coder.encoder.weight.grad
        assert grad is not None and torch.isfinite(grad).all()
        assert torch.isfinite(coder.W_dec.grad).all() and coder.W_dec.grad.abs().sum() > 0


# -- the real from_pretrained path for a non-LLaVA family -----------------------------------------


def test_gemma3_round_trips_through_from_pretrained(tmp_path):
    recipe = find_recipe("gemma3")
    model, processor = _tiny("gemma3")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor, found = load_model_and_processor(
        str(tmp_path), dtype="float32", device="cpu"
    )
    assert found.name == "gemma3"  # found through config.model_type: the folder name says nothing
    assert type(loaded) is type(model) and type(loaded_processor) is type(processor)
    assert image_token_id(loaded_processor, recipe) == image_token_id(processor, recipe)
    batch = _batch(recipe, processor)
    loaded_batch = _batch(recipe, loaded_processor)
    assert all(torch.equal(batch[k], loaded_batch[k]) for k in batch)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**loaded_batch).logits, model(**batch).logits)


def test_qwen_tiny_processors_are_the_real_classes_without_a_video_slot():
    import transformers

    for name, cls in (("qwen2_vl", "Qwen2VLProcessor"), ("qwen2_5_vl", "Qwen2_5_VLProcessor")):
        _, processor = _tiny(name)
        assert isinstance(processor, getattr(transformers, cls))
        assert type(processor).get_attributes() == ["image_processor", "tokenizer"]


def test_a_model_type_several_recipes_share_warns_and_names_the_flag(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.warns(UserWarning, match="also 'llava': tiny_llava.*--recipe NAME"):
        assert find_recipe(model_id=str(tmp_path)).name == "llava"


# -- PaliGemma: the answer is the causal suffix, not part of the bidirectional prefix -----------


def test_paligemma_answer_is_causal_and_its_labels_are_dropped():
    recipe = find_recipe("paligemma")
    model, processor = _tiny("paligemma")
    image = _images()[0]
    outputs: list[torch.Tensor] = []
    hookpoint = mlp_hookpoints(model, recipe)[-1]

    def grab(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        outputs.append(output[0].clone())

    handle = model.get_submodule(hookpoint).register_forward_hook(grab)
    encoded = []
    try:
        for answer in ("a red circle", "blue"):
            enc = encode_example(Example("a", image, "caption en", answer), processor, recipe, 256)
            assert "labels" not in enc  # training makes its own targets
            encoded.append(enc)
            with torch.no_grad():
                model(**enc)
    finally:
        handle.remove()
    types = encoded[0]["token_type_ids"][0]
    n_prefix = int((types == 0).sum())
    assert types[n_prefix:].eq(1).all() and len(types) > n_prefix  # the answer is the suffix
    # the prefix does not see the answer: the same outputs there for two different answers
    torch.testing.assert_close(outputs[0][:n_prefix], outputs[1][:n_prefix], rtol=0, atol=1e-6)
    # and truncating the text to a few tokens leaves no labels of the untruncated length
    short = encode_example(Example("a", image, "caption en", "a red circle"), processor, recipe, 3)
    assert "labels" not in short and short["input_ids"].shape == short["token_type_ids"].shape


@pytest.mark.parametrize(
    ("name", "video_processor"),
    [
        ("qwen2_vl", "Qwen2VLVideoProcessor"),
        ("qwen2_5_vl", "Qwen2VLVideoProcessor"),
        ("llava_onevision", "LlavaOnevisionVideoProcessor"),
        ("qwen3_vl", "Qwen3VLVideoProcessor"),
        ("internvl", "InternVLVideoProcessor"),
        ("glm4v", "Glm4vVideoProcessor"),
    ],
)
def test_image_only_processors_round_trip_through_from_pretrained_without_torchvision(
    tmp_path, name, video_processor
):
    recipe = find_recipe(name)
    model, processor = _tiny(name)
    assert type(processor).get_attributes() == ["image_processor", "tokenizer"]
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    # a real checkpoint names a video processor too: image training leaves it out
    (tmp_path / "video_preprocessor_config.json").write_text(
        json.dumps({"video_processor_type": video_processor})
    )
    loaded, loaded_processor, found = load_model_and_processor(
        str(tmp_path), dtype="float32", device="cpu"
    )
    assert found.name == name and type(loaded) is type(model)
    assert isinstance(loaded_processor, type(processor).__mro__[1])
    # the processor's own keywords (LLaVA-OneVision's num_image_tokens) are saved and read back
    for key, value in recipe.tiny.get("processor", {}).items():
        assert getattr(loaded_processor, key) == value, key
    batch = _batch(recipe, processor)
    loaded_batch = _batch(recipe, loaded_processor)
    assert all(torch.equal(batch[k], loaded_batch[k]) for k in batch)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**loaded_batch).logits, model(**batch).logits)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_names_the_token_its_model_fills_with_image_features(name):
    recipe = find_recipe(name)
    _require(recipe)
    model, processor = _tiny(name)
    check_image_token(model.config, processor, recipe)
    assert image_token_id(processor, recipe) == model.config.image_token_id


def test_a_wrong_image_token_that_every_prompt_holds_is_refused_when_the_model_loads(tmp_path):
    import dataclasses

    recipe = find_recipe("qwen2_vl")
    model, processor = _tiny("qwen2_vl")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    # <|vision_start|> is a token of the tokenizer and in every prompt: only the model knows
    wrong = dataclasses.replace(
        recipe, prompt=dataclasses.replace(recipe.prompt, image_pad_token="<|vision_start|>")
    )
    assert (_batch(wrong, processor)["input_ids"] == image_token_id(processor, wrong)).any()
    message = (
        r"recipe 'qwen2_vl': \[prompt\] image_pad_token = '<\|vision_start\|>' is token \d+, "
        r"but the model fills token \d+ \('<\|image_pad\|>', config.image_token_id\)"
    )
    with pytest.raises(ValueError, match=message):
        load_model_and_processor(str(tmp_path), wrong, dtype="float32", device="cpu")


@pytest.mark.parametrize("token", ["<s>", "<imgx>"])
def test_a_wrong_image_token_under_a_chat_template_is_refused(token):
    """With the chat template writing the prompt and the processor naming its image token id,
    a wrong [prompt] image_token (known to the tokenizer or not) trained on unnoticed, though
    docs/recipes.md says it stops the run."""
    import dataclasses

    recipe = find_recipe("llava_next")
    model, processor = _tiny("llava_next")
    check_image_token(model.config, processor, recipe)
    wrong = dataclasses.replace(
        recipe, prompt=dataclasses.replace(recipe.prompt, image_token=token)
    )
    message = (
        rf"recipe 'llava_next': \[prompt\] image_token = '{token}' is not the placeholder this "
        r"processor expands into image tokens \('<image>', its image_token\)"
    )
    with pytest.raises(ValueError, match=message):
        check_image_token(model.config, processor, wrong)


def test_a_missing_image_pad_token_names_the_key_to_set():
    """Gemma 3's processor names its placeholder's id as image_token_id (as Ovis2's does): a
    recipe without image_pad_token was told to "name that token", not which key names it."""
    import dataclasses

    recipe = find_recipe("gemma3")
    model, processor = _tiny("gemma3")
    wrong = dataclasses.replace(
        recipe, prompt=dataclasses.replace(recipe.prompt, image_pad_token="")
    )
    message = (
        r"the processor's image_token_id is token \d+, but the model fills token \d+ "
        r"\('<image_soft_token>', config.image_token_id\) with image features; set \[prompt\] "
        r"image_pad_token = '<image_soft_token>'"
    )
    with pytest.raises(ValueError, match=message):
        check_image_token(model.config, processor, wrong)


def test_a_typo_in_a_tiny_config_table_names_the_table_and_the_field():
    import dataclasses

    recipe = find_recipe("llava")
    config = {**recipe.tiny["config"]}
    config["text_config"] = {**config["text_config"], "num_hiden_layers": 1}
    typo = dataclasses.replace(recipe, tiny={**recipe.tiny, "config": config})
    message = (
        r"recipe 'llava': \[tiny.config.text_config\] num_hiden_layers is not a field of "
        r"LlamaConfig \(did you mean 'num_hidden_layers'\?\)"
    )
    with pytest.raises(ValueError, match=message):
        build_tiny_model(typo)


def test_a_typo_in_the_tiny_image_processor_table_names_the_key():
    """An image processor keeps an unknown keyword as an attribute nobody reads: `sizee` built
    the default 336 px processor for a 28 px model, silently."""
    import dataclasses

    recipe = find_recipe("llava")
    image_processor = {**recipe.tiny["image_processor"]}
    image_processor["sizee"] = image_processor.pop("size")
    typo = dataclasses.replace(recipe, tiny={**recipe.tiny, "image_processor": image_processor})
    message = (
        r"recipe 'llava': \[tiny.image_processor\] sizee is not a keyword of "
        r"CLIPImageProcessor\w* \(did you mean 'size'\?\)"
    )
    with pytest.raises(ValueError, match=message):
        build_tiny_processor(typo)


def test_the_embedded_models_names_resolve_to_its_folder_not_the_hub():
    from vlm_sparsify.loading import DEFAULT_MODEL, resolve_model

    assert resolve_model("default") == resolve_model("vlm_sparsify/tiny-easyvqa-llava")
    assert resolve_model("default") == DEFAULT_MODEL and Path(DEFAULT_MODEL).is_dir()
    assert find_recipe(model_id=resolve_model("vlm_sparsify/tiny-easyvqa-llava")).name == (
        "tiny_llava"
    )


@dataclass
class _Flags:
    lr: float = 1e-3
    k: int = 32
    layers: list[int] = field(default_factory=list)


@pytest.mark.parametrize(
    ("key", "value", "ok"),
    [
        ("lr", 3, True),  # TOML's 3 for 3.0
        ("lr", 2e-4, True),
        ("lr", True, False),  # a bool is an int to Python, not a learning rate
        ("k", True, False),
        ("k", 1.5, False),
        ("layers", [0, 2], True),
        ("layers", [0, False], False),
    ],
)
def test_a_train_value_of_the_wrong_type_is_refused(key, value, ok):
    if ok:
        check_train_value("r", key, value, _Flags())
    else:
        with pytest.raises(RecipeError, match=rf"\[train\] {key} = .* is not a valid --{key}"):
            check_train_value("r", key, value, _Flags())


@pytest.mark.parametrize(
    ("model_type", "architectures", "text_only"),
    [
        ("gemma3_text", [], True),
        ("llama", ["LlamaForCausalLM"], True),  # a text-only model_type without "_text"
        ("qwen2_vl", ["Qwen2VLForConditionalGeneration"], False),
    ],
)
def test_a_model_of_another_type_is_named_text_only_by_its_type_or_class(
    model_type, architectures, text_only
):
    from vlm_sparsify.recipe import model_type_mismatch

    config = {"model_type": model_type, "architectures": architectures}
    message = str(model_type_mismatch("m", config, find_recipe("llava")))
    assert ("a text-only model" in message) == text_only
    assert ("pass --recipe" in message) != text_only


def test_a_recipes_mlp_path_is_read(tmp_path):
    text = LLAVA_TOML.read_text()
    assert 'mlp = "mlp"' in text
    path = tmp_path / "ffn.toml"
    path.write_text(text.replace('mlp = "mlp"', 'mlp = "feed_forward"'))
    assert find_recipe(str(path)).mlp == "feed_forward"


def test_select_hookpoints_orders_dedups_and_strides():
    from vlm_sparsify.hookpoints import select_hookpoints

    recipe = find_recipe("llava")
    model = build_tiny_model(recipe, _tokenizer_only(recipe))
    mlps = mlp_hookpoints(model, recipe)
    assert len(mlps) >= 2
    assert select_hookpoints(model, recipe) == mlps
    assert select_hookpoints(model, recipe, layer_stride=2) == mlps[::2]
    assert select_hookpoints(model, recipe, layers=[1, 0, 1]) == mlps[:2]
    # patterns name modules in any order; the forward's order (attention before MLP) is kept
    layers = decoder_layers_path(model, recipe)
    both = select_hookpoints(model, recipe, hookpoints=[f"{layers}.0.mlp", f"{layers}.0.self_attn"])
    assert both == [f"{layers}.0.self_attn", f"{layers}.0.mlp"]
    strided = select_hookpoints(model, recipe, hookpoints=[f"{layers}.*.mlp"], layer_stride=2)
    assert strided == mlps[::2]
    with pytest.raises(ValueError, match=rf"--layers \[{len(mlps)}\] out of range"):
        select_hookpoints(model, recipe, layers=[len(mlps)])
    with pytest.raises(ValueError, match="outside the language model's decoder layers"):
        select_hookpoints(model, recipe, hookpoints=["*vision_tower*mlp"])
    # a layer count that disagrees with the text config is refused
    model.config.get_text_config().num_hidden_layers = len(mlps) + 1
    with pytest.raises(ValueError, match=f"holds {len(mlps)} layers but the text config says"):
        mlp_hookpoints(model, recipe)
