"""The examples stage: each feature's top samples, patch grids, tokens, the page and the PNG."""

from __future__ import annotations

import copy
import dataclasses
import html
import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import outputs
from benchmarks.__main__ import run
from benchmarks.feature_examples import (
    Example,
    FeatureRef,
    parse_feature_refs,
    patch_grid,
    sample_tokens,
    token_strings,
    top_examples,
)
from benchmarks.stages.examples import _images_and_processor
from benchmarks.store import FeatureStore, StoreMeta
from tests.benchmarks.test_attribute import coders_dir  # noqa: F401 (fixture)
from tests.benchmarks.test_capture_classify import GREEDY
from vlm_sparsify.data import load_rgb
from vlm_sparsify.recipe import Recipe, find_recipe

HOOKPOINTS = [f"model.language_model.layers.{i}.mlp" for i in range(2)]
SPAN = re.compile(r'<span class="([^"]*)" style="([^"]*)" title="([^"]*)">([^<]*)</span>')


def sample(sample_id: str, rows: list[dict[int, float]], source: int = 0, k: int = 2):
    """A store sample whose source `source` has, per row, the given {latent: value} (k slots,
    padded with latents 90+ at 0.5); the other source is silent filler."""
    indices = torch.zeros(len(rows), 2, k, dtype=torch.int64)
    values = torch.zeros(len(rows), 2, k)
    for r, row in enumerate(rows):
        pairs = list(row.items()) + [(90 + j, 0.5) for j in range(k - len(row))]
        indices[r, source] = torch.tensor([p[0] for p in pairs])
        values[r, source] = torch.tensor([p[1] for p in pairs])
        indices[r, 1 - source] = torch.tensor([95, 96][:k])
        values[r, 1 - source] = 0.25
    regions = {"prompt": [(0, 1)], "response": [(1, len(rows))]}
    return sample_id, indices, values, regions


def test_top_examples_rank_by_peak_keep_store_order_on_ties_and_skip_silent_samples(tmp_path):
    store = FeatureStore(tmp_path / "store", StoreMeta(HOOKPOINTS, 2, 100, "float32"))
    store.append([
        sample("a", [{7: 1.0}, {7: 3.0}, {}]),
        sample("b", [{7: 5.0}, {}, {3: 2.0}]),
    ])  # fmt: skip
    store.append([
        sample("c", [{}, {3: 9.0}, {}]),  # 7 silent
        sample("d", [{}, {7: 3.0}, {}]),  # ties with a: a was stored first
        sample("e", [{7: 2.0}, {}, {}], source=1),  # feature 7 of the other source
    ])  # fmt: skip
    refs = [FeatureRef(0, 7), FeatureRef(0, 3), FeatureRef(1, 7), FeatureRef(0, 50)]
    found = top_examples(store, refs, top=3)
    assert [(e.sample_id, e.peak, e.peak_row) for e in found[FeatureRef(0, 7)]] == [
        ("b", 5.0, 0), ("a", 3.0, 1), ("d", 3.0, 1)
    ]  # fmt: skip
    np.testing.assert_array_equal(found[FeatureRef(0, 7)][1].activations, [1.0, 3.0, 0.0])
    assert [e.sample_id for e in found[FeatureRef(0, 3)]] == ["c", "b"]
    assert [(e.sample_id, e.peak) for e in found[FeatureRef(1, 7)]] == [("e", 2.0)]
    assert found[FeatureRef(0, 50)] == []
    # top 1; and the region: over the response rows only, b's peak is 0 for feature 7
    assert [e.sample_id for e in top_examples(store, refs[:1], top=1)[refs[0]]] == ["b"]
    response = top_examples(store, refs[:1], top=3, region="response")[refs[0]]
    assert [(e.sample_id, e.peak, e.peak_row) for e in response] == [
        ("a", 3.0, 1), ("d", 3.0, 1)
    ]  # fmt: skip
    with pytest.raises(ValueError, match="--top 0"):
        top_examples(store, refs, top=0)


def test_top_examples_keep_to_the_given_ids_and_pass_over_samples_without_the_region(tmp_path):
    store = FeatureStore(tmp_path / "store", StoreMeta(HOOKPOINTS, 2, 100, "float32"))
    store.append([sample("a", [{7: 4.0}, {}]), sample("b", [{}, {7: 1.0}])])
    ref = FeatureRef(0, 7)
    assert [e.sample_id for e in top_examples(store, [ref], top=2)[ref]] == ["a", "b"]
    assert [e.sample_id for e in top_examples(store, [ref], top=2, ids=["b"])[ref]] == ["b"]
    # no sample has image rows: none is ranked (an empty region has no peak)
    assert top_examples(store, [ref], top=2, region="image") == {ref: []}


def test_patch_grid_only_for_one_block_of_the_given_shape():
    acts = np.arange(20, dtype=np.float32)
    grid = patch_grid(acts, {"image": [(3, 12)], "prompt": [(0, 3), (12, 20)]}, (3, 3))
    np.testing.assert_array_equal(grid, np.arange(3, 12).reshape(3, 3))
    assert patch_grid(acts, {"image": [(3, 12)]}, None) is None  # no layout known
    assert patch_grid(acts, {"image": [(3, 11)]}, (3, 3)) is None  # 8 tokens
    assert patch_grid(acts, {"image": [(0, 4), (8, 12)]}, (2, 2)) is None  # two blocks
    assert patch_grid(acts, {"prompt": [(0, 20)]}, (2, 2)) is None
    wide = patch_grid(acts, {"image": [(2, 8)]}, (2, 3))
    np.testing.assert_array_equal(wide, [[2, 3, 4], [5, 6, 7]])


def test_tiled_images_get_no_whole_block_grid_even_when_their_token_count_is_a_square(tmp_path):
    from benchmarks.feature_examples import ViewGrid
    from vlm_sparsify.random_models import build_tiny
    from vlm_sparsify.recipe import find_recipe

    for name, size in [("llava_next", (16, 32)), ("llava", (40, 64))]:
        recipe = find_recipe(name)
        model, processor = build_tiny(recipe)
        image = Image.new("RGB", size, (200, 30, 30))
        record = {
            "prompt": recipe.format_prompt("what shape?", processor),
            "response_token_ids": [5],
        }
        ids = processor(images=[image], text=[record["prompt"]])["input_ids"][0]
        count = sum(1 for t in ids if t == model.config.image_token_id)
        assert count == 16 if name == "llava_next" else count == 4  # squares both
        tokens, shape = sample_tokens(processor, record, image, len(ids), count)
        assert tokens == list(ids), name
        if name == "llava":
            assert shape == (2, 2)
        else:  # its crops' grid only, never the 16 tokens as a 4 x 4 square
            assert isinstance(shape, ViewGrid), shape
            assert shape.view.startswith("high-resolution crops drawn"), shape
            assert shape.shape[0] * shape.shape[1] < count


def test_qwen2_vl_token_grid_comes_from_the_processor(tmp_path):
    from benchmarks.example_pages import card_picture
    from benchmarks.feature_examples import Example
    from vlm_sparsify.random_models import build_tiny
    from vlm_sparsify.recipe import find_recipe

    recipe = find_recipe("qwen2_vl")
    model, processor = build_tiny(recipe)
    image = Image.new("RGB", (80, 50), (200, 30, 30))  # resized to 84 x 56: 6 x 4 patches of 14
    record = {
        "prompt": recipe.format_prompt("what shape?", processor),
        "response_token_ids": [5, 6],
    }
    prompt_ids = processor(images=[image], text=[record["prompt"]])["input_ids"][0]
    rows = len(prompt_ids) + 1
    ids, shape = sample_tokens(processor, record, image, rows, 6)
    assert shape == (2, 3)  # merged 2 x 2: 2 rows of 3 tokens
    image_rows = [i for i, t in enumerate(ids) if t == model.config.image_token_id]
    assert len(image_rows) == 6 and image_rows == list(range(image_rows[0], image_rows[0] + 6))
    assert sample_tokens(processor, record, image, rows + 1, 6) == (None, None)
    acts = np.zeros(rows, np.float32)
    acts[image_rows[0] + 5] = 2.0  # the bottom-right token
    span = (image_rows[0], image_rows[0] + 6)
    example = Example("s", 2.0, image_rows[0] + 5, acts, {"image": [span]})
    picture = card_picture(image, example, 2.0, shape)
    assert picture.size == (224, 149)  # the grid's aspect
    pixels = np.asarray(picture).astype(int)
    assert pixels[-10, -10].sum() > pixels[10, 10].sum() + 200  # lit there, dimmed elsewhere


def test_feature_references_name_decoder_layers():
    layers = [8, 16]
    assert parse_feature_refs("L16/F3, 8/5,L16/F3", layers, 10) == [
        FeatureRef(1, 3), FeatureRef(0, 5)
    ]  # fmt: skip
    with pytest.raises(ValueError, match="no coder at layer 2"):
        parse_feature_refs("L2/F3", layers, 10)
    with pytest.raises(ValueError, match="feature 10 is out of range"):
        parse_feature_refs("L8/F10", layers, 10)
    with pytest.raises(ValueError, match="LAYER/FEATURE"):
        parse_feature_refs("L8F1", layers, 10)


def trained_tokenizer(kind: str):
    """A small real tokenizer of `kind`: byte-level BPE (GPT-2, Qwen2, SmolVLM) or SentencePiece
    style BPE with byte fallback (Llama, LLaVA-1.5)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["Is the café red?\nA circle\tcosts $5, naïve 🙂 yes.", "There is a blue shape."] * 20
    if kind == "byte_level":
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet,
                                      special_tokens=["<image>"])  # fmt: skip
    else:
        backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
        backend.decoder = decoders.Sequence([
            decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ])  # fmt: skip
        special = ["<unk>", "<s>", "<image>", *(f"<0x{i:02X}>" for i in range(256))]
        trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=special, limit_alphabet=30)
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_token_strings_read_as_the_decoded_text(kind):
    tokenizer = trained_tokenizer(kind)
    text = "<image>\nIs the café red?\tnaïve 🙂 no\nGrüße"  # ü, ß, 🙂: bytes / fallback
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    strings = token_strings(tokenizer, ids)
    assert len(strings) == len(ids) and "".join(strings) == tokenizer.decode(ids)
    assert "".join(strings).endswith("red?\tnaïve 🙂 no\nGrüße")
    assert not any("\ufffd" in s or "\u0120" in s or "\u2581" in s or "<0x" in s for s in strings)
    # the token that completes the emoji holds it; no token holds a byte of it alone
    assert sum("🙂" in s for s in strings) == 1
    # cut inside the emoji: the last token shows the broken character as decode does
    cut = next(n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    assert "".join(token_strings(tokenizer, ids[:cut])) == tokenizer.decode(ids[:cut])
    # image rows keep their vocabulary piece (drawn as one chip, never decoded)
    image = tokenizer.convert_tokens_to_ids("<image>")
    assert token_strings(tokenizer, [image, image], skip=[0, 1]) == ["<image>", "<image>"]
    # after a block of image tokens the text reads on as decoded (its context: the image)
    after = [image] * 20 + ids[1:]
    strings = token_strings(tokenizer, after, skip=range(20))
    assert strings[:20] == ["<image>"] * 20
    assert "".join(strings) == tokenizer.decode(after)


def test_token_strings_of_a_word_level_tokenizer_join_with_spaces(tiny_llava):
    tokenizer = tiny_llava[1].tokenizer
    ids = tokenizer("what is red ?", add_special_tokens=False)["input_ids"]
    assert token_strings(tokenizer, ids) == ["what", " is", " red", " ?"]
    # an id past the vocabulary (a random tiny model's padded embeddings generate them) shows
    unknown = len(tokenizer) + 3
    assert token_strings(tokenizer, [*ids[:2], unknown, ids[2]]) == [
        "what", " is", f"<id {unknown}>", " red"
    ]  # fmt: skip


def test_examples_stage_on_a_real_capture(tmp_path, tiny_llava_dir, coders_dir, capsys):  # noqa: F811
    out = tmp_path / "out"
    run(["easyvqa", "capture", "--out", str(out), "--model", str(tiny_llava_dir), "--coders",
         str(coders_dir), "--kinds", "yesno,caption", "--limit", "4", *GREEDY])  # fmt: skip
    run(["easyvqa", "classify", "--out", str(out)])
    store = FeatureStore(out / outputs.STORE)
    # the most frequent latent of source 1 (layer 1): it fires somewhere
    first = next(iter(store))
    latent = int(torch.mode(first.indices[:, 1].flatten()).values)
    with pytest.raises(SystemExit, match="run `analyze` first, or name --features"):
        run(["easyvqa", "examples", "--out", str(out)])
    # a latent of source 1 that fires nowhere (the coders are random: one of 128 with k 16
    # in four samples stays silent in practice)
    fired = {int(i) for stored in store for i in stored.indices[:, 1].flatten()}
    silent = sorted(set(range(store.meta.num_latents)) - fired)
    if silent:
        capsys.readouterr()
        run(["easyvqa", "examples", "--out", str(out), "--features", f"L1/F{silent[0]}"])
        printed = capsys.readouterr().out
        assert "examples: 1 feature (1 firing in no sample of region all) -> " in printed
    run(["easyvqa", "examples", "--out", str(out), "--features", f"L1/F{latent}", "--top", "3"])
    assert "examples: 1 feature -> " in capsys.readouterr().out  # was '(0 fire in no sample ...)'

    document = json.loads((out / "examples" / "examples.json").read_text())
    [feature] = document["features"]
    assert (feature["layer"], feature["feature_idx"]) == (1, latent)
    assert feature["hookpoint"] == store.meta.hookpoints[1]
    labels = json.loads((out / outputs.CLASSIFICATION).read_text())
    label_of = {str(v["id"]): name for name in ("GOOD", "BAD") for v in labels[name]}
    # the peaks, recomputed from the store sample by sample
    peaks = {}
    for stored in store:
        hits = (stored.indices[:, 1] == latent) * stored.values[:, 1].float()
        peaks[stored.id] = float(hits.sum(1).max())
    expected = sorted((p, s) for s, p in peaks.items() if p > 0)[::-1][:3]
    shown = feature["samples"]
    assert [s["peak"] for s in shown] == pytest.approx([p for p, _ in expected])
    records = {r["id"]: r for r in outputs.read_append_log(out / outputs.RESPONSES)}
    images, processor = _images_and_processor(out, "easyvqa")
    image_token = json.loads((tiny_llava_dir / "config.json").read_text())["image_token_index"]
    for shown_sample in shown:
        assert shown_sample["label"] == label_of[shown_sample["id"]]
        assert shown_sample["note"] is None and shown_sample["peak_token"] is not None
        # the rebuilt tokens are the rows' tokens: image rows hold the image token, no other row
        stored = store.load(shown_sample["id"])
        [(a, b)] = stored.regions["image"]
        side = int(np.sqrt(b - a))
        assert np.asarray(shown_sample["image_grid"]).shape == (side, side)
        rows = stored.indices.shape[0]
        image = load_rgb(images[stored.id])
        ids, shape = sample_tokens(processor, records[shown_sample["id"]], image, rows, b - a)
        assert ids is not None and shown_sample["peak_row"] < rows
        assert shape == (side, side)  # LLaVA-1.5: one [1, 3, H, W] image, a square
        assert [i for i, t in enumerate(ids) if t == image_token] == list(range(a, b))
    page = (out / "examples" / "index.html").read_text()
    assert all(s["id"] in page for s in shown) and page.count('<div class="card ') == len(shown)
    # each card's peak is shaded on the feature's scale: the top sample's peak is the brightest
    from benchmarks.example_pages import colours

    assert len(shown) >= 2
    for card, shown_sample in zip(page.split('<div class="card ')[1:], shown, strict=True):
        [style] = [style for kind, style, _, _ in SPAN.findall(card) if "peak" in kind.split()]
        rgb = re.match(r"background: rgb\((\d+),(\d+),(\d+)\);", style).groups()
        level = shown_sample["peak"] / shown[0]["peak"]
        assert np.abs(np.array(rgb, int) - colours(np.array(level))).max() <= 3, level
    assert f"L1/F{latent}" in page and "data:image/jpeg;base64," in page
    with Image.open(out / "plots" / "feature_examples.png") as png:
        assert png.size[0] > 100 and png.size[1] > 100
    with pytest.raises(SystemExit, match="no coder at layer 7"):
        run(["easyvqa", "examples", "--out", str(out), "--features", "L7/F1"])
    # a features.json of another store: a hookpoint or a latent it does not hold
    hookpoint = store.meta.hookpoints[1]
    for other in [("model.layers.9.mlp", 1), (hookpoint, store.meta.num_latents)]:
        feature = {"hookpoint": other[0], "feature_idx": other[1], "layer": 1, "direction": "good",
                   "good_freq": 0.5, "bad_freq": 0.1}  # fmt: skip
        (out / outputs.FEATURES).write_text(json.dumps({"features": [feature]}))
        with pytest.raises(SystemExit, match="does not hold: run analyze again on this store"):
            run(["easyvqa", "examples", "--out", str(out)])
    # a sample without its response line: the card says so, the page is written
    (out / outputs.RESPONSES).write_text("")
    run(["easyvqa", "examples", "--out", str(out), "--features", f"L1/F{latent}", "--top", "1"])
    [shown] = json.loads((out / "examples" / "examples.json").read_text())["features"][0]["samples"]
    assert shown["note"] == f"no line in {outputs.RESPONSES}: tokens not shown"


def test_examples_stage_shows_the_analyzed_features_by_decoder_layer_over_the_region(
    tmp_path, tiny_llava, tiny_llava_dir, llava_recipe
):
    """Coders of layer 1 only (store source 0 is decoder layer 1); the features analyze selected,
    in features.json's order; ranked over the response rows."""
    from sparsify import SparseCoderConfig

    from vlm_sparsify.coder_io import save_coders
    from vlm_sparsify.hookpoints import mlp_hookpoints
    from vlm_sparsify.training import build_coders

    model, _ = tiny_llava
    hookpoint = mlp_hookpoints(model, llava_recipe)[1]
    cfg = SparseCoderConfig(num_latents=16, k=4)
    coders = build_coders([hookpoint], model.config.text_config.hidden_size, cfg, cross_layer=1,
                          device=torch.device("cpu"))  # fmt: skip
    layer_1_coders = save_coders(coders, tmp_path / "coders")
    out = tmp_path / "out"
    run(["easyvqa", "capture", "--out", str(out), "--model", str(tiny_llava_dir), "--coders",
         str(layer_1_coders), "--kinds", "yesno,caption", "--limit", "4", *GREEDY])  # fmt: skip
    store = FeatureStore(out / outputs.STORE)
    assert store.meta.hookpoints == [hookpoint]
    # the response rows' peak of every latent, per sample
    peaks: dict[int, dict[str, tuple[float, int]]] = {}
    for stored in store:
        response = np.concatenate([np.arange(a, b) for a, b in stored.regions["response"]])
        for latent in range(16):
            acts = ((stored.indices[:, 0] == latent) * stored.values[:, 0].float()).sum(1).numpy()
            row = int(response[np.argmax(acts[response])])
            if acts[row] > 0:
                peaks.setdefault(latent, {})[stored.id] = (float(acts[row]), row)
    first, second = sorted(peaks, key=lambda latent: -len(peaks[latent]))[:2]
    selected = [
        {"hookpoint": hookpoint, "feature_idx": latent, "layer": 1, "direction": direction,
         "good_freq": good, "bad_freq": bad}
        for latent, direction, good, bad in [(second, "bad", 0.125, 0.5), (first, "good", 0.75, 0.25)]
    ]  # fmt: skip
    (out / outputs.FEATURES).write_text(json.dumps({"features": selected}))
    run(["easyvqa", "examples", "--out", str(out), "--region", "response", "--top", "2",
         "--plot-features", "0"])  # fmt: skip

    document = json.loads((out / "examples" / "examples.json").read_text())
    assert (document["region"], document["top"]) == ("response", 2)
    assert [(f["layer"], f["hookpoint"], f["feature_idx"]) for f in document["features"]] == [
        (1, hookpoint, second), (1, hookpoint, first)
    ]  # fmt: skip
    records = {r["id"]: r for r in outputs.read_append_log(out / outputs.RESPONSES)}
    images, processor = _images_and_processor(out, "easyvqa")
    for feature in document["features"]:
        ranked = sorted(peaks[feature["feature_idx"]].items(), key=lambda s: -s[1][0])[:2]
        shown = feature["samples"]
        assert [(s["id"], s["peak_row"]) for s in shown] == [(i, row) for i, (_, row) in ranked]
        assert [s["peak"] for s in shown] == pytest.approx([p for _, (p, _) in ranked])
        for shown_sample in shown:
            stored = store.load(shown_sample["id"])
            [(a, b)] = stored.regions["image"]
            image = load_rgb(images[stored.id])
            rows = stored.indices.shape[0]
            ids, shape = sample_tokens(processor, records[stored.id], image, rows, b - a)
            strings = token_strings(processor.tokenizer, ids, skip=range(a, b))
            assert shown_sample["peak_token"] == strings[shown_sample["peak_row"]]
            acts = (stored.indices[:, 0] == feature["feature_idx"]) * stored.values[:, 0].float()
            grid = acts.sum(1)[a:b].reshape(shape).numpy().round(4)
            np.testing.assert_allclose(shown_sample["image_grid"], grid, atol=1e-4)
    page = (out / "examples" / "index.html").read_text()
    assert page.index(f"L1/F{second}") < page.index(f"L1/F{first}")
    assert f"{hookpoint} · selected for BAD · fires in 12.5% of GOOD and 50.0% of BAD" in page
    assert "selected for GOOD · fires in 75.0% of GOOD and 25.0% of BAD samples" in page
    assert not (out / "plots" / "feature_examples.png").exists()  # --plot-features 0
    # the PNG holds the first --plot-features features: one row, 2.1 + 0.5 inches high
    run(["easyvqa", "examples", "--out", str(out), "--plot-features", "1", "--dpi", "20"])
    with Image.open(out / "plots" / "feature_examples.png") as png:
        assert png.size[1] == 52
    with pytest.raises(SystemExit, match="--plot-features -1: give --top >= 1 and --plot-fe"):
        run(["easyvqa", "examples", "--out", str(out), "--plot-features", "-1"])


def test_a_missing_image_is_noted_on_its_card_and_the_page_still_renders(tmp_path, tiny_llava):
    from benchmarks.example_pages import FeatureSection, write_page
    from benchmarks.feature_examples import Example
    from benchmarks.stages.examples import _card

    _, processor = tiny_llava
    example = Example("s1", 2.0, 1, np.array([0.0, 2.0, 1.0], np.float32), {"prompt": [(0, 3)]})
    record = {"id": "s1", "prompt": "USER: <image>\nhi ASSISTANT:", "response_token_ids": [3]}
    missing = tmp_path / "gone.png"
    card = _card(example, {"s1": "BAD"}, {"s1": record}, {"s1": missing}, processor, {}, 2.0)
    assert card.picture is None and card.tokens is None and card.label == "BAD"
    assert card.note == f"image missing: {missing}"
    write_page(tmp_path / "page.html", "t", "i", [FeatureSection("L0/F1", "h", [card], 2.0)])
    page = (tmp_path / "page.html").read_text()
    assert "image missing" in page and "row 1" in page and "<img" not in page


def test_a_page_of_photos_at_llava_scale_stays_small(tmp_path):
    """576 image tokens per sample, photos: the page holds each card's image as a JPEG."""
    from matplotlib import cbook

    from benchmarks.example_pages import Card, FeatureSection, card_picture, colours, write_page
    from benchmarks.feature_examples import Example

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as photo:
        photo = photo.convert("RGB").resize((336, 336))
    rng = np.random.default_rng(0)
    cards = []
    for n in range(6):
        acts = np.where(rng.random(616) < 0.2, rng.random(616) * 4, 0).astype(np.float32)
        regions = {"prompt": [(0, 5), (581, 600)], "image": [(5, 581)], "response": [(600, 616)]}
        example = Example(f"s{n}", float(acts.max()), int(acts.argmax()), acts, regions)
        picture = card_picture(photo, example, 4.0, (24, 24))
        cards.append(Card(example, "GOOD", picture, [f" w{r}" for r in range(616)]))
    write_page(tmp_path / "page.html", "t", "i", [FeatureSection("L0/F1", "h", cards, 4.0)])
    size = (tmp_path / "page.html").stat().st_size
    assert size < 6 * 45_000, size  # as PNG: ~6 x 110 KB
    # the colour table is the colour map
    from matplotlib import colormaps

    for value in (0.0, 0.5, 1.0):
        expected = np.round(np.asarray(colormaps["inferno"](value))[:3] * 255)
        np.testing.assert_allclose(colours(np.array(value)), expected, atol=1)


def test_the_page_escapes_what_comes_from_data_and_the_plot_takes_dollars(tmp_path):
    from benchmarks.example_pages import Card, FeatureSection, plot_grid, write_page
    from benchmarks.feature_examples import Example

    acts = np.array([0, 2.0, 0], np.float32)
    example = Example('"><script>x</script>', 2.0, 1, acts, {"prompt": [(0, 3)]})
    card = Card(example, "BAD", None, ["<b>", " $x^$", '"'], note="<i>image missing</i>")
    sections = [FeatureSection("L0/F1", "<s>", [card], 2.0)]
    write_page(tmp_path / "page.html", "<h>", "<p>", sections)
    page = (tmp_path / "page.html").read_text()
    assert "<script>" not in page and "<i>" not in page and "<s>" not in page
    assert "&lt;b&gt;" in page and "&quot;&gt;&lt;script&gt;" in page
    plot_grid(tmp_path / "plot.png", "t", sections, 50)  # a token $x^$ is no math to matplotlib
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_a_narrow_plot_keeps_its_title_and_marks_features_firing_nowhere(tmp_path):
    from benchmarks.example_pages import Card, FeatureSection, plot_grid

    acts = np.array([0, 2.0], np.float32)
    card = Card(Example("a", 2.0, 1, acts, {"prompt": [(0, 2)]}), "GOOD", None, ["x", "y"])
    sections = [FeatureSection("L0/F1", "", [], 2.0), FeatureSection("L0/F2", "", [card], 2.0)]
    plot_grid(tmp_path / "plot.png", "easyvqa: where 2 features fire most", sections, 50)
    with Image.open(tmp_path / "plot.png") as png:
        assert png.size == (240, 235)  # one card: 4.8 inches wide, the title's width, not 2.5
        pixels = np.asarray(png.convert("L"))
    # the empty row (the first) holds its note: dark text in its middle third
    assert pixels[60:130, 80:200].min() < 128


def test_the_colour_scale_covers_tokens_outside_the_ranking_region(tmp_path):
    from benchmarks.example_pages import colour_scale

    store = FeatureStore(tmp_path / "store", StoreMeta(HOOKPOINTS, 2, 100, "float32"))
    store.append([sample("a", [{7: 9.0}, {7: 3.0}, {}]), sample("b", [{}, {7: 2.0}, {}])])
    ranked = top_examples(store, [FeatureRef(0, 7)], top=2, region="response")[FeatureRef(0, 7)]
    assert [(e.sample_id, e.peak) for e in ranked] == [("a", 3.0), ("b", 2.0)]
    assert colour_scale(ranked) == 9.0  # the prompt row of a: brighter than any response peak
    assert colour_scale([]) == 0.0


def test_the_page_marks_the_peak_the_image_chip_and_the_response_tokens(tmp_path, monkeypatch):
    from benchmarks.example_pages import Card, FeatureSection, colours, plot_grid, write_page

    regions = {"prompt": [(0, 1)], "image": [(1, 3)], "response": [(3, 5)]}
    tokens = ["Is", "<image>", "<image>", " red", " yes"]
    # peak on a response token; the image chip shows its highest row (row 2), not its first
    in_text = Example("t", 4.0, 4, np.array([0, 1, 3, 0, 4], np.float32), regions)
    # peak on the first image row: the chip holds it
    in_image = Example("i", 3.0, 1, np.array([0, 3, 1, 2, 0], np.float32), regions)
    cards = [Card(in_text, "GOOD", None, tokens), Card(in_image, "BAD", None, tokens)]
    sections = [FeatureSection("L2/F7", "h", cards, 4.0), FeatureSection("L3/F1", "h", [], 1.0)]
    write_page(tmp_path / "page.html", "t", "i", sections)
    page = (tmp_path / "page.html").read_text()
    cards_html = page.split('<div class="card ')[1:]
    text_spans, image_spans = (SPAN.findall(c) for c in cards_html)
    assert [(c, t) for c, _, _, t in text_spans] == [
        ("tok", "Is"), ("tok img", "[image x2]"), ("tok resp", " red"), ("tok peak resp", " yes")
    ]  # fmt: skip
    assert text_spans[1][2] == "image tokens 1-2: peak 3"
    # shaded by activation / scale: row 4 (4 of 4) brightest, the chip (3 of 4) at 0.75; row 0
    # and row 3 (silent) unshaded
    for (_, style, _, _), level in zip(text_spans, [None, 0.75, None, 1.0], strict=True):
        if level is None:
            assert style == ""
        else:
            rgb = colours(np.array(level))
            assert style.startswith(f"background: rgb({rgb[0]},{rgb[1]},{rgb[2]});")
    assert html.escape("peak 4 at 'yes'") in cards_html[0]
    assert [c for c, _, _, _ in image_spans][:2] == ["tok", "tok peak img"]
    assert "peak 3 at image" in cards_html[1]
    # every feature has its link and anchor; only the one without cards says it fires nowhere
    for anchor in ("L2-F7", "L3-F1"):
        assert f'href="#{anchor}"' in page and f'<section id="{anchor}">' in page
    assert page.count("fires in none of the samples") == 1
    assert page.split('<section id="L3-F1">')[1].count("fires in none") == 1
    # a crash while the page is written leaves the old page whole

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(outputs.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        write_page(tmp_path / "page.html", "t", "i", sections[1:])
    assert (tmp_path / "page.html").read_text() == page
    # rows of 2 and 0 cards in one plot
    plot_grid(tmp_path / "plot.png", "t", sections, 40)
    with Image.open(tmp_path / "plot.png") as png:
        assert png.size[0] > 100


def test_the_model_view_undoes_the_processors_normalization(tiny_llava):
    from benchmarks.example_pages import model_view

    image_processor = tiny_llava[1].image_processor
    image = Image.new("RGB", (40, 64), (200, 30, 90))
    unscaled = copy.deepcopy(image_processor)  # pixels as 0-255 values, not normalized
    unscaled.do_rescale, unscaled.do_normalize = False, False
    for processor in (image_processor, unscaled):
        view = np.asarray(model_view(processor, image)).astype(int)
        size = processor.crop_size
        assert view.shape == (size["height"], size["width"], 3)
        assert np.abs(view - [200, 30, 90]).max() <= 1


def test_overlay_tints_each_patch_by_its_activation_over_the_scale():
    from benchmarks.example_pages import colours, overlay

    grey = np.array([100, 100, 100])
    picture = overlay(Image.new("RGB", (30, 10), tuple(grey)), np.array([[0.0, 1.0, 4.0]]), 4.0)
    assert picture.size == (224, 75)  # 1 row of 3 patches
    pixels = np.asarray(picture).astype(float)
    # silent: dimmed to 45 %; lit: the colour of activation / scale over 30-65 % of the pixel
    assert np.abs(pixels[37, 37] - grey * 0.45).max() <= 2
    for x, level in [(112, 0.25), (186, 1.0)]:
        alpha = 0.3 + 0.35 * level
        expected = colours(np.array(level)) * alpha + grey * (1 - alpha)
        assert np.abs(pixels[37, x] - expected).max() <= 2, level


def test_a_card_shows_the_image_as_the_model_saw_it_not_the_file(tmp_path, tiny_llava):
    """The card's picture is the processor's view (CLIP: short side resized, centre cropped), so
    a wide image loses its sides: only what the vision tower saw is tinted by the feature."""
    from benchmarks.stages.examples import _card

    _, processor = tiny_llava
    stripes = np.zeros((64, 256, 3), np.uint8)  # the centre 64 x 64: x 96-160
    stripes[:, :80] = (220, 20, 20)
    stripes[:, 80:176] = (20, 220, 20)
    stripes[:, 176:] = (20, 20, 220)
    Image.fromarray(stripes).save(tmp_path / "wide.png")
    example = Example("s1", 2.0, 1, np.array([0.0, 2.0, 1.0], np.float32), {"prompt": [(0, 3)]})
    card = _card(example, {}, {}, {"s1": tmp_path / "wide.png"}, processor, {}, 2.0)
    picture = np.asarray(card.picture).astype(int)
    assert picture.shape == (224, 224, 3)  # no image tokens: the view alone, square
    for x in (3, 112, 220):  # the red and blue sides were cropped away: green edge to edge
        assert np.abs(picture[112, x] - [20, 220, 20]).max() <= 10, x


@pytest.mark.parametrize("top", ["0", "-2"])
def test_a_top_of_no_samples_is_refused_before_the_store_is_read(tmp_path, top):
    with pytest.raises(SystemExit, match=f"--top {top} / --plot-features 8: give --top >= 1"):
        run(["easyvqa", "examples", "--out", str(tmp_path), "--top", top])


def fed_embeddings(model, inputs) -> torch.Tensor:
    """[T, D] what the language model is fed at every position (image features scattered in)."""
    seen = {}

    def keep(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"][0].detach().clone()

    handle = model.get_decoder().register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"]


def frames_of(pixels: torch.Tensor) -> torch.Tensor:
    """[frames, 3, H, W] of one image's pixels ([1, frames, 3, H, W] or, InternVL, as they are)."""
    return pixels[0] if pixels.ndim == 5 else pixels


def tokens_fed_by(model, inputs, frame: int, box: tuple[int, int, int, int]) -> list[int]:
    """The positions whose input changes when only pixels `box` (top, left, bottom, right) of
    pixel frame `frame` change: found by the model itself, not from the token layout. The vision
    tower's attention outputs are zeroed first, so a patch reaches its own token(s) only."""
    for name, module in model.named_modules():
        if "vision" in name and name.endswith(("out_proj", "o_proj", "attention.projection_layer")):
            torch.nn.init.zeros_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    before = fed_embeddings(model, inputs)
    changed = dict(inputs)
    pixels = inputs["pixel_values"].clone()
    top, left, bottom, right = box
    frames_of(pixels)[frame, :, top:bottom, left:right] += 1.5
    changed["pixel_values"] = pixels
    after = fed_embeddings(model, changed)
    return torch.nonzero((after - before).abs().amax(-1) > 1e-6).flatten().tolist()


def check_view_overlay(
    name: str | Recipe,
    size: tuple[int, int],
    splitting: bool = True,
    configure: Callable[[Any, Any], None] | None = None,
    sample: int | None = None,
):
    """Each cell of the drawn view's grid holds the activation of the token that the model feeds
    from that cell of the view's pixels (tiles / crops: of the frame under the cell, each frame
    cut to the pixels its patches cover, the frames stitched row-major, then cut to the grid's
    `box`), and the picture drawn is those pixels; returns the grid, the processor's inputs and
    the model. `configure(model, processor)` runs before the image is processed; `sample`: check
    that many random cells and the corners only (a grid too large to check cell by cell)."""
    from benchmarks.example_pages import model_view
    from benchmarks.feature_examples import ViewGrid
    from vlm_sparsify.random_models import build_tiny
    from vlm_sparsify.recipe import find_recipe

    recipe = find_recipe(name) if isinstance(name, str) else name
    name = recipe.name
    model, processor = build_tiny(recipe)
    if not splitting:
        processor.image_processor.do_image_splitting = False
    if configure is not None:
        configure(model, processor)
    image = Image.new("RGB", size, (200, 30, 30))
    record = {"prompt": recipe.format_prompt("what shape?", processor), "response_token_ids": [5]}
    inputs = processor(images=[image], text=[record["prompt"]], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    image_id = model.config.image_token_id
    image_rows = [i for i, t in enumerate(ids) if t == image_id]
    spans = [(r, r + 1) for r in image_rows]  # one span per token: any block split is allowed
    tokens, grid = sample_tokens(processor, record, image, len(ids), 0)
    assert tokens == ids and isinstance(grid, ViewGrid), name
    tile_rows, tile_columns = grid.tiles
    # the picture drawn is those pixel frames, as the processor gave them to the model, stitched
    frames = frames_of(inputs["pixel_values"])
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    assert torch.equal(frames_of(pixels), frames)
    height, width = grid.seen or frames.shape[-2:]  # of each frame, the pixels its patches see
    alone = [
        np.asarray(model_view(processor.image_processor, image, grid.frame + tile, seen=grid.seen))
        for tile in range(tile_rows * tile_columns)
    ]
    stitched = np.concatenate(
        [np.concatenate(alone[r * tile_columns : (r + 1) * tile_columns], 1)
         for r in range(tile_rows)], 0
    )  # fmt: skip
    top, left, bottom, right = grid.box or (0, 0, height * tile_rows, width * tile_columns)
    view = model_view(processor.image_processor, image, grid.frame, grid.tiles, grid.box, grid.seen)
    assert view is not None and view.size == (right - left, bottom - top)
    assert np.array_equal(np.asarray(view), stitched[top:bottom, left:right]), name
    assert model_view(processor.image_processor, image, None) is None
    acts = np.random.default_rng(0).random(len(ids)).astype(np.float32)
    drawn = patch_grid(acts, {"image": _merged(spans)}, grid)
    assert drawn is not None and drawn.shape == grid.shape
    cell_height, cell_width = (bottom - top) // grid.shape[0], (right - left) // grid.shape[1]
    assert (cell_height * grid.shape[0], cell_width * grid.shape[1]) == view.size[::-1]
    seen = set()
    cells = [(r, c) for r in range(grid.shape[0]) for c in range(grid.shape[1])]
    if sample is not None:
        picked = np.random.default_rng(1).choice(len(cells), sample, replace=False)
        corners = {(0, 0), (0, grid.shape[1] - 1), (grid.shape[0] - 1, 0), cells[-1]}
        cells = sorted(corners | {cells[i] for i in picked})
    for r, c in cells:
        y, x = top + r * cell_height, left + c * cell_width  # in the stitched frames
        tile = y // height * tile_columns + x // width
        y, x = y % height, x % width
        fed = tokens_fed_by(model, inputs, grid.frame + tile,
                            (y, x, y + cell_height, x + cell_width))  # fmt: skip
        assert len(fed) == 1 and fed[0] in image_rows, (name, r, c, fed)
        assert drawn[r, c] == acts[fed[0]], (name, r, c)
        seen.add(fed[0])
    assert len(seen) == len(cells)  # each cell its own token
    return grid, inputs, model


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent spans as one, as the store records regions."""
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


@pytest.mark.parametrize("name", ["idefics3", "smolvlm"])
@pytest.mark.parametrize(
    "size, tiles",
    [((40, 64), (2, 2)), ((80, 20), (1, 2)), ((20, 40), (2, 1))],  # (width, height): (rows, cols)
)
def test_idefics3_tiles_are_drawn_stitched_on_their_grid(name, size, tiles):
    grid, inputs, _ = check_view_overlay(name, size)
    frames = inputs["pixel_values"].shape[1]
    assert frames == tiles[0] * tiles[1] + 1 and grid.frame == 0  # the tiles, then the global
    assert grid.tiles == tiles and grid.shape == (tiles[0] * 2, tiles[1] * 2)  # 4 tokens a tile
    assert grid.view == f"tiles drawn ({tiles[0]} x {tiles[1]}); global view not drawn"


@pytest.mark.parametrize("name", ["idefics3", "smolvlm"])
def test_an_idefics3_image_not_split_draws_its_global_view(name):
    grid, inputs, _ = check_view_overlay(name, (40, 64), splitting=False)
    assert inputs["pixel_values"].shape[1] == 1 and grid.frame == 0 and grid.tiles == (1, 1)
    assert grid.shape == (2, 2) and grid.view == ""


def test_a_tiled_card_tints_its_tiles_stitched_and_says_the_global_view_is_not_drawn(tmp_path):
    from benchmarks.stages.examples import _card
    from vlm_sparsify.random_models import build_tiny_processor
    from vlm_sparsify.recipe import find_recipe

    recipe = find_recipe("idefics3")
    processor = build_tiny_processor(recipe)
    quadrants = np.zeros((40, 64, 3), np.uint8)
    quadrants[:20, :32] = (220, 20, 20)  # red, green / blue, yellow
    quadrants[:20, 32:] = (20, 220, 20)
    quadrants[20:, :32] = (20, 20, 220)
    quadrants[20:, 32:] = (220, 220, 20)
    Image.fromarray(quadrants).save(tmp_path / "quadrants.png")
    record = {"prompt": recipe.format_prompt("what shape?", processor), "response_token_ids": [5]}
    ids = processor(images=[Image.fromarray(quadrants)], text=[record["prompt"]])["input_ids"][0]
    image_id = processor.image_token_id
    spans = _merged([(i, i + 1) for i, t in enumerate(ids) if t == image_id])
    assert len(spans) == 5  # 2 x 2 tiles and the global image
    acts = np.zeros(len(ids), np.float32)
    acts[spans[3][1] - 1] = 2.0  # the bottom-right tile's bottom-right token
    acts[spans[-1][0]] = 2.0  # the global image's first token: not drawn
    example = Example("s1", 2.0, spans[3][1] - 1, acts, {"image": spans})
    images = {"s1": tmp_path / "quadrants.png"}
    card = _card(example, {}, {"s1": record}, images, processor, {}, 2.0)
    assert card.note == "tiles drawn (2 x 2); global view not drawn"
    picture = np.asarray(card.picture).astype(int)
    assert picture.shape == (224, 224, 3)  # the tiles of the image resized to 112 x 112
    assert picture[-10, -10].sum() > picture[10, 10].sum() + 200  # lit there, dimmed elsewhere
    card.picture.save(tmp_path / "card.png")
    # each quadrant's colour where the image has it (dimmed: the feature is silent there)
    red, green, blue = picture[20, 20], picture[20, 200], picture[150, 20]
    assert red[0] > red[1] + 20 and red[0] > red[2] + 20
    assert green[1] > green[0] + 20 and green[1] > green[2] + 20
    assert blue[2] > blue[0] + 20 and blue[2] > blue[1] + 20


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize(
    "size, crops, cells",
    [  # (width, height); crop rows, columns; the grid of their patches (2 x 2 a crop) unpadded
        ((40, 64), (2, 2), (4, 2)),  # tall: a column cut off each side, across the crops
        ((30, 57), (2, 2), (4, 2)),
        ((100, 60), (2, 2), (2, 4)),  # wide: a row cut off top and bottom
        ((57, 30), (2, 2), (2, 4)),
        ((50, 45), (2, 2), (4, 4)),  # near square: nothing cut
        ((16, 16), None, (2, 2)),  # square: LLaVA-NeXT 1 x 2 crops (columns cut), OneVision 1 x 1
    ],
)
def test_anyres_high_resolution_crops_are_drawn_stitched_and_unpadded_on_their_grid(
    name, size, crops, cells
):
    crops = crops or ((1, 2) if name == "llava_next" else (1, 1))
    grid, inputs, model = check_view_overlay(name, size)
    assert inputs["pixel_values"].shape[1] == 1 + crops[0] * crops[1]  # the base, then the crops
    assert grid.frame == 1 and grid.tiles == crops and grid.shape == cells
    full = (crops[0] * 2, crops[1] * 2)  # the tiny towers: 28 pixels, patches of 14
    cut = "unpadded to " if cells != full else ""
    assert grid.view == (
        f"high-resolution crops drawn ({crops[0]} x {crops[1]}, {cut}{cells[0]} x {cells[1]} "
        "patches); base view not drawn"
    )
    check_anyres_block(grid, inputs, model, 4)


def check_anyres_block(grid, inputs, model, base: int) -> None:
    """The image's block is the base's `base` tokens, then per grid row its cells and a newline;
    the model feeds each whole crop to grid tokens only (its padding's patches to none), all the
    crops together to every grid token, the base frame to the first `base`, no pixel a newline;
    and a newline's activation reaches no cell."""
    ids = inputs["input_ids"][0].tolist()
    image_rows = [i for i, t in enumerate(ids) if t == model.config.image_token_id]
    rows, columns = grid.shape
    assert grid.starts == (image_rows[0] + base,) and grid.stride == columns + 1
    grid_tokens = {grid.starts[0] + r * grid.stride + c for r in range(rows)
                   for c in range(columns)}  # fmt: skip
    newlines = {grid.starts[0] + r * grid.stride + columns for r in range(rows)}
    assert set(image_rows) == set(image_rows[:base]) | grid_tokens | newlines
    assert max(newlines) == image_rows[-1]
    whole = (0, 0, *inputs["pixel_values"].shape[-2:])
    fed_by_crops = set()
    for crop in range(grid.tiles[0] * grid.tiles[1]):
        fed = set(tokens_fed_by(model, inputs, 1 + crop, whole))
        assert fed <= grid_tokens, (crop, fed - grid_tokens)
        fed_by_crops |= fed
    assert fed_by_crops == grid_tokens
    assert set(tokens_fed_by(model, inputs, 0, whole)) == set(image_rows[:base])
    acts = np.zeros(len(ids), np.float32)
    acts[sorted(newlines)] = 5.0
    acts[image_rows[:base]] = 5.0
    drawn = patch_grid(acts, {"image": _merged([(r, r + 1) for r in image_rows])}, grid)
    assert drawn is not None and not drawn.any()


def pooled(model, processor) -> None:
    """OneVision pooling the crops' grid to at most 1 crop's patches (`anyres_max_1`)."""
    model.config.vision_aspect_ratio = processor.vision_aspect_ratio = "anyres_max_1"


@pytest.mark.parametrize(
    "name, size, configure",
    [
        ("llava_next", (20, 90), None),  # a tall sliver: its crops unpadded to 4 x 0 patches
        ("llava_onevision", (20, 90), None),
        ("llava_onevision", (40, 64), pooled),  # 4 x 2 patches pooled bilinearly to 2 x 1
    ],
)
def test_anyres_crops_without_an_exact_grid_fall_back_to_the_base_view(name, size, configure):
    grid, inputs, _ = check_view_overlay(name, size, configure=configure)
    assert inputs["pixel_values"].shape[1] > 1  # crops follow the base
    assert grid.frame == 0 and grid.shape == (2, 2) and grid.tiles == (1, 1)
    assert grid.stride == 0 and grid.box is None
    assert grid.view == "base view (whole image) drawn; high-resolution crops not drawn"


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
def test_anyres_crops_whose_tokens_or_frames_do_not_add_up_fall_back_to_the_base_view(name):
    from benchmarks.feature_examples import view_grid
    from vlm_sparsify.random_models import build_tiny_processor
    from vlm_sparsify.recipe import find_recipe

    recipe = find_recipe(name)
    processor = build_tiny_processor(recipe)
    text = recipe.format_prompt("what shape?", processor)
    inputs = processor(images=[Image.new("RGB", (40, 64))], text=[text], return_tensors="pt")
    assert view_grid(processor, inputs).view.startswith("high-resolution crops drawn (2 x 2")
    base = "base view (whole image) drawn; high-resolution crops not drawn"
    ids = inputs["input_ids"][0].tolist()
    last = max(i for i, t in enumerate(ids) if t == processor.image_token_id)
    short = dict(inputs, input_ids=torch.tensor([ids[:last] + ids[last + 1 :]]))  # a token fewer
    assert view_grid(processor, short).view == base
    fewer = dict(inputs, pixel_values=inputs["pixel_values"][:, :-1])  # a crop's frame fewer
    assert view_grid(processor, fewer).view == base
    wider = dict(inputs, image_sizes=torch.tensor([[64, 140]]))  # sized for 1 x 2 crops
    assert view_grid(processor, wider).view == base


def test_an_anyres_card_tints_its_crops_stitched_and_unpadded(tmp_path):
    from benchmarks.stages.examples import _card
    from vlm_sparsify.random_models import build_tiny_processor
    from vlm_sparsify.recipe import find_recipe

    recipe = find_recipe("llava_next")
    processor = build_tiny_processor(recipe)
    halves = np.zeros((60, 100, 3), np.uint8)  # wide: fit to 56 x 34 in the 2 x 2 crops' 56 x 56
    halves[:, :50] = (220, 20, 20)  # red, blue
    halves[:, 50:] = (20, 20, 220)
    Image.fromarray(halves).save(tmp_path / "halves.png")
    record = {"prompt": recipe.format_prompt("what shape?", processor), "response_token_ids": [5]}
    ids = processor(images=[Image.fromarray(halves)], text=[record["prompt"]])["input_ids"][0]
    image_rows = [i for i, t in enumerate(ids) if t == processor.image_token_id]
    assert len(image_rows) == 4 + 2 * (4 + 1)  # the base, then 2 rows of 4 patches + newline
    acts = np.zeros(len(ids), np.float32)
    acts[image_rows[-2]] = 2.0  # the last row's last patch
    acts[image_rows[-1]] = 2.0  # its newline: not drawn
    acts[image_rows[0]] = 2.0  # the base view's first patch: not drawn
    example = Example("s1", 2.0, image_rows[-2], acts, {"image": _merged(
        [(r, r + 1) for r in image_rows])})  # fmt: skip
    images = {"s1": tmp_path / "halves.png"}
    card = _card(example, {}, {"s1": record}, images, processor, {}, 2.0)
    assert card.note == (
        "high-resolution crops drawn (2 x 2, unpadded to 2 x 4 patches); base view not drawn"
    )
    picture = np.asarray(card.picture).astype(int)
    assert picture.shape == (112, 224, 3)  # 2 x 4 patches: the padding's rows cut away
    bright = picture.sum(-1)
    assert bright[-10, -10] > bright[10, 10] + 200  # lit there, dimmed elsewhere
    assert bright[10, 10] == pytest.approx(bright[10, 120], abs=60)  # the first cell not lit
    red, blue = picture[40, 20], picture[40, 180]  # dimmed, the halves' colours, no padding
    assert red[0] > red[1] + 20 and red[0] > red[2] + 20
    assert blue[2] > blue[0] + 20 and blue[2] > blue[1] + 20
    for y in (1, 110):  # the image's colour up to the top and bottom edges: no padding drawn
        assert np.array_equal(picture[y, 20], red), y
    # a sample whose peak is in the base view: the crops drawn, the card says where the peak is
    base_only = np.zeros(len(ids), np.float32)
    base_only[image_rows[0]] = 2.0
    example = Example("s1", 2.0, image_rows[0], base_only, example.regions)
    card = _card(example, {}, {"s1": record}, images, processor, {}, 2.0)
    assert card.note.endswith(
        "base view not drawn; its peak is at an image token of the view not drawn"
    )
    assert np.asarray(card.picture).shape == (112, 224, 3)


def anyres_recipe(name: str, side: int, tokens: int | None = None) -> Recipe:
    """The tiny recipe with towers of `side`-pixel inputs (patches of 14) and the released
    checkpoints' pinpoints (llava-v1.6-mistral-7b-hf's five, llava-onevision-qwen2-0.5b-ov-hf's
    1..6 x 1..6 crops); OneVision's processor counting `tokens` base patches."""
    recipe = find_recipe(name)
    tiny = copy.deepcopy(recipe.tiny)
    if name == "llava_next":
        pins = [[side, 2 * side], [2 * side, side], [2 * side, 2 * side], [3 * side, side],
                [side, 3 * side]]  # fmt: skip
        tiny["image_processor"].update(size={"shortest_edge": side},
                                       crop_size={"height": side, "width": side})  # fmt: skip
    else:
        pins = [[side * i, side * j] for i in range(1, 7) for j in range(1, 7)]
        tiny["image_processor"]["size"] = {"height": side, "width": side}
        tiny["processor"]["num_image_tokens"] = tokens
    tiny["image_processor"]["image_grid_pinpoints"] = tiny["config"]["image_grid_pinpoints"] = pins
    tiny["config"]["vision_config"]["image_size"] = side
    return dataclasses.replace(recipe, tiny=tiny)


def test_onevision_views_whose_patch_size_is_not_known_are_not_drawn():
    """OneVision's processor does not know the tower's patch size: a frame whose side is no
    multiple of the grid's is drawn on the pixels of the one patch size that gives that grid
    (384 pixels, 27 patches: 14, the last 6 pixels unseen), else not at all (43 pixels, 3
    patches: 11 to 14)."""
    from benchmarks.feature_examples import view_grid
    from vlm_sparsify.random_models import build_tiny_processor

    image = Image.new("RGB", (640, 480))
    for side, tokens, seen in [(384, 729, (378, 378)), (43, 9, None)]:
        recipe = anyres_recipe("llava_onevision", side, tokens)
        processor = build_tiny_processor(recipe)
        text = recipe.format_prompt("what shape?", processor)
        grid = view_grid(processor, processor(images=[image], text=[text], return_tensors="pt"))
        assert (grid and grid.seen) == seen, side


@pytest.mark.parametrize(
    "name, side, tokens, size, view",
    [
        ("llava_next", 336, None, (640, 480), "2 x 2, unpadded to 36 x 48"),
        ("llava_next", 336, None, (300, 1000), "3 x 1, unpadded to 72 x 22"),
        ("llava_onevision", 384, 729, (640, 480), "2 x 2, unpadded to 40 x 54"),
        ("llava_onevision", 384, 729, (1000, 300), "1 x 3, unpadded to 25 x 81"),
        ("llava_onevision", 384, 729, (500, 500), "2 x 2, 54 x 54"),
        ("llava_onevision", 384, 729, (1200, 900), None),  # 3 x 4 crops pooled: the base view
    ],
)
def test_anyres_crops_at_the_released_checkpoints_geometry(name, side, tokens, size, view):
    """The towers' inputs and pinpoints of llava-v1.6-mistral-7b-hf (CLIP at 336: 24 x 24
    patches) and llava-onevision-qwen2-0.5b-ov-hf (SigLIP at 384: 27 x 27, anyres_max_9), the
    rest tiny: the corners and some random cells checked against the model."""
    patches = side // 14
    grid, inputs, model = check_view_overlay(anyres_recipe(name, side, tokens), size, sample=6)
    assert grid.seen == (None if side % 14 == 0 else (patches * 14, patches * 14))
    if view is None:
        assert grid.frame == 0 and grid.shape == (patches, patches)
        assert grid.view == "base view (whole image) drawn; high-resolution crops not drawn"
        return
    assert grid.view == f"high-resolution crops drawn ({view} patches); base view not drawn"
    check_anyres_block(grid, inputs, model, patches * patches)


def test_an_anyres_base_view_with_a_cls_token_among_its_tokens_is_not_drawn():
    from benchmarks.feature_examples import view_grid
    from vlm_sparsify.random_models import build_tiny_processor
    from vlm_sparsify.recipe import find_recipe

    image = Image.new("RGB", (40, 64), (200, 30, 30))
    for name, strategy in [("llava_next", "full"), ("llava_onevision", "default")]:
        recipe = find_recipe(name)
        processor = build_tiny_processor(recipe)
        text = recipe.format_prompt("what shape?", processor)
        assert view_grid(processor, processor(images=[image], text=[text], return_tensors="pt"))
        processor.vision_feature_select_strategy = strategy  # LLaVA-NeXT: 4 patches + CLS
        inputs = processor(images=[image], text=[text], return_tensors="pt")
        assert view_grid(processor, inputs) is None, name


def test_internvl_tiles_draw_the_thumbnail_on_its_grid():
    grid, inputs, _ = check_view_overlay("internvl", (40, 100))
    frames = inputs["pixel_values"].shape[0]
    assert frames > 2 and grid.frame == frames - 1 and grid.shape == (2, 2)
    assert grid.view == "thumbnail (whole image) drawn; tiles not drawn"
