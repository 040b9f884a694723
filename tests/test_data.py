"""The multimodal pipeline: prompts, image-token-safe truncation, masks, bad images, order."""

import json
import re
from dataclasses import replace

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, LlavaProcessor

from tests.conftest import make_image
from vlm_sparsify.data import (
    BadImageError,
    BatchStream,
    ContextTooShortError,
    Example,
    collate,
    encode_example,
    folder_examples,
    load_rgb,
    open_examples,
    shared_prefix_length,
    token_mask,
)
from vlm_sparsify.random_models import build_tokenizer


def llava15_processor(recipe) -> LlavaProcessor:
    """LLaVA-1.5's real preprocessing geometry: 336 px, patch 14, default feature selection."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(recipe),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def test_a_malformed_metadata_row_is_named(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n\n{"file_name": \n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:3: not valid JSON"):
        folder_examples(tmp_path, "What is it?")


@pytest.mark.parametrize("row", ['["a.png", "x"]', "5", '"file_name"', '{"file_name": 5}', "{}"])
def test_a_metadata_row_without_a_file_name_string_is_named(tmp_path, row):
    (tmp_path / "metadata.jsonl").write_text(f'{{"file_name": "a.png", "text": "x"}}\n{row}\n')
    with pytest.raises(ValueError, match=r"metadata row 1 \(.*\) has no 'file_name' string"):
        folder_examples(tmp_path, "What is it?")


def test_a_metadata_csv_saved_by_excel_reads_as_any_other(tmp_path):
    """Excel writes UTF-8 CSV with a byte-order mark, which must not become part of the first
    column's name ('\ufefffile_name')."""
    text = "file_name,text\r\na.png,a red square\r\nb.png,caf\u00e9\r\n"
    (tmp_path / "metadata.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    examples = folder_examples(tmp_path, "What is it?")
    assert [(e.id, e.answer) for e in examples] == [
        ("a.png", "a red square"),
        ("b.png", "caf\u00e9"),
    ]


def test_a_metadata_jsonl_with_a_byte_order_mark_reads_as_any_other(tmp_path):
    rows = [{"file_name": "a.png", "text": "a red square"}, {"file_name": "b.png", "text": "x"}]
    text = "\r\n".join(json.dumps(r) for r in rows)
    (tmp_path / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    examples = folder_examples(tmp_path, "What is it?")
    assert [(e.id, e.answer) for e in examples] == [("a.png", "a red square"), ("b.png", "x")]


def test_a_dataset_that_is_neither_a_folder_nor_reachable_says_both(monkeypatch, llava_recipe):
    import datasets

    from vlm_sparsify.data import open_examples

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'my_images' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(OSError, match=r"DATASET 'my_images' \(no such local folder either\): "):
        open_examples("my_images", llava_recipe)


class TextSpy:
    """A processor that records the text it is given (and otherwise is the real one)."""

    def __init__(self, processor: LlavaProcessor):
        self.processor, self.texts = processor, []

    def __call__(self, **kwargs):
        self.texts.extend(kwargs["text"])
        return self.processor(**kwargs)

    def __getattr__(self, name: str):
        return getattr(self.processor, name)


@pytest.mark.parametrize("separator", [" ", "", "\n"])
def test_the_answer_follows_the_prompt_after_the_recipe_s_separator(
    tmp_path, llava_recipe, separator
):
    recipe = replace(llava_recipe, prompt=replace(llava_recipe.prompt, answer_separator=separator))
    spy = TextSpy(llava15_processor(recipe))
    image = make_image(tmp_path / "photo.png", size=(336, 336))
    prompt = recipe.format_prompt("what shape?", spy)
    encode_example(Example("q", image, "what shape?", "a circle"), spy, recipe, ctx_len=512)
    encode_example(Example("q", image, "what shape?"), spy, recipe, ctx_len=512)  # no answer
    assert spy.texts == [f"{prompt}{separator}a circle", prompt]


def test_long_question_keeps_all_576_image_tokens(tmp_path, llava_recipe):
    processor = llava15_processor(llava_recipe)
    image = make_image(tmp_path / "photo.png", size=(336, 336))
    question = " ".join(["is there a red circle left of the blue square ?"] * 60)
    encoded = encode_example(Example("q", image, question), processor, llava_recipe, ctx_len=512)
    ids = encoded["input_ids"][0]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((ids == image_id).sum()) == 576
    assert int((ids != image_id).sum()) == 512  # ctx_len budgets text; the image comes on top
    # the kept text is the start of the prompt: truncation cut the end of the question
    words = processor.tokenizer.convert_ids_to_tokens(ids[ids != image_id].tolist())
    assert words[:3] == ["user", ":", "\n"]
    assert encoded["attention_mask"].shape == (1, 576 + 512)


def test_model_context_bounds_image_plus_text(tmp_path, llava_recipe):
    processor = llava15_processor(llava_recipe)
    image = make_image(tmp_path / "photo.png", size=(336, 336))
    question = " ".join(["is there a red circle ?"] * 100)
    example = Example("q", image, question)
    encoded = encode_example(example, processor, llava_recipe, ctx_len=512, max_positions=600)
    assert encoded["input_ids"].shape == (1, 600)
    with pytest.raises(ContextTooShortError, match="576 image tokens"):
        encode_example(example, processor, llava_recipe, ctx_len=512, max_positions=500)
    # exactly the image tokens: no room for one text token (the prompt would be cut away)
    with pytest.raises(ContextTooShortError, match="576 image tokens"):
        encode_example(example, processor, llava_recipe, ctx_len=512, max_positions=576)
    encoded = encode_example(example, processor, llava_recipe, ctx_len=512, max_positions=577)
    assert encoded["input_ids"].shape == (1, 577)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16"])
def test_any_image_mode_becomes_rgb(tmp_path, mode):
    path = make_image(tmp_path / f"image-{mode.replace(';', '')}.png", mode=mode)
    image = load_rgb(str(path))
    assert image.mode == "RGB" and image.size == (32, 40)


def test_a_16_bit_grayscale_image_is_scaled_to_8_bits(tmp_path):
    import numpy as np

    pixels = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    image = load_rgb(str(tmp_path / "deep.png"))
    assert [image.getpixel((x, 0)) for x in range(4)] == [(v, v, v) for v in (0, 64, 128, 255)]


def test_a_32_bit_integer_image_is_scaled_by_what_it_holds():
    """Mode I (what `convert("I")` and some decoders give for 16-bit grayscale) holding values
    above 255 is 16-bit data, scaled down; holding none, 8-bit data, kept as it is."""
    import numpy as np

    deep = Image.fromarray(np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.int32), "I")
    shallow = Image.fromarray(np.array([[0, 64, 128, 255]], dtype=np.int32), "I")
    for image in (deep, shallow):
        assert image.mode == "I"
        rgb = load_rgb(image)
        assert [rgb.getpixel((x, 0))[0] for x in range(4)] == [0, 64, 128, 255]


def test_a_float_image_is_scaled_to_8_bits(tmp_path):
    """A 32-bit float TIFF (mode F, values in 0..1) became black: PIL's conversion rounds
    every value below 1 to 0."""
    import numpy as np

    pixels = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(pixels, "F").save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    image = load_rgb(str(tmp_path / "float.tif"))
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 64, 128, 255]


def test_a_decompression_bomb_is_a_bad_image(tmp_path, llava_recipe, tiny_llava, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32 x 40 is over twice the limit
    path = make_image(tmp_path / "huge.png")
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_rgb(str(path))
    examples = [Example("huge.png", str(path), "what is it?", "a square")]
    _, processor = tiny_llava
    batches = list(BatchStream(examples, processor, llava_recipe, batch_size=1))
    assert batches[0]["skipped"] == ["huge.png"]  # skipped and counted, no traceback
    with pytest.raises(BadImageError, match="example huge.png: .*decompression bomb"):
        list(BatchStream(examples, processor, llava_recipe, batch_size=1, strict=True))


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_rgb(str(tmp_path / "clear.png")).getpixel((0, 0)) == (255, 255, 255)


def write_folder(tmp_path):
    make_image(tmp_path / "gray.png", mode="L", seed=1)
    make_image(tmp_path / "alpha.png", mode="RGBA", seed=2)
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows = [
        {"file_name": "gray.png", "question": "what color is it?", "answer": "gray"},
        {"file_name": "corrupt.jpg", "text": "a broken image"},
        {"file_name": "missing.png", "text": "nothing here"},
        {"file_name": "alpha.png", "text": "a picture"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder_examples(tmp_path, "Describe this image.")


def test_bad_images_are_skipped_and_counted(tmp_path, llava_recipe, tiny_llava):
    model, processor = tiny_llava
    examples = write_folder(tmp_path)
    batches = list(BatchStream(examples, processor, llava_recipe, batch_size=4))
    assert len(batches) == 1
    assert sorted(batches[0]["skipped"]) == ["corrupt.jpg", "missing.png"]  # named by file
    inputs = batches[0]["inputs"]
    assert inputs["pixel_values"].shape[0] == 2  # grayscale and RGBA both train
    out = model(**inputs)
    assert torch.isfinite(out.logits).all()


def test_strict_stops_on_a_bad_image(tmp_path, llava_recipe, tiny_llava):
    _, processor = tiny_llava
    examples = write_folder(tmp_path)
    with pytest.raises(BadImageError, match="example corrupt.jpg"):
        list(BatchStream(examples, processor, llava_recipe, batch_size=4, strict=True))


def test_a_worker_error_is_raised_as_it_was_and_skips_are_named(tmp_path, tiny_llava_dir, capsys):
    from tests.test_training import cli
    from vlm_sparsify.__main__ import run

    (tmp_path / "images").mkdir()
    write_folder(tmp_path / "images")
    args = cli(tiny_llava_dir, tmp_path, "strict", "--strict", "true", "--num_workers", "1")
    args[1] = str(tmp_path / "images")
    with pytest.raises(BadImageError) as err:
        run(args)  # in a DataLoader worker process
    # not torch's 30-line "Caught BadImageError in DataLoader worker process 0. Original ..."
    assert re.fullmatch(r"example (corrupt.jpg|missing.png): [^\n]+", str(err.value))
    args[args.index("--strict") + 1] = "false"
    args[args.index("--run_name") + 1] = "skip"
    run(args)
    assert (
        "Skipped 2 examples with missing or unreadable images (first: " in capsys.readouterr().out
    )


def test_token_mask_regions_and_padding(llava_recipe, tiny_llava):
    _, processor = tiny_llava
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    batch = {
        "input_ids": torch.tensor([[7, image_id, image_id, 8, 9], [7, image_id, image_id, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
    }
    assert token_mask(batch, image_id, "all").sum() == 8
    assert token_mask(batch, image_id, "image").tolist() == [
        [False, True, True, False, False],
        [False, True, True, False, False],
    ]
    assert token_mask(batch, image_id, "text").sum() == 4
    assert token_mask(batch, image_id, "text", exclude_tokens=(7,)).sum() == 2


def test_batches_are_the_same_for_any_worker_count_and_resume_point(llava_recipe, tiny_llava):
    from torch.utils.data import DataLoader

    from vlm_sparsify.data import easyvqa_examples

    _, processor = tiny_llava
    examples = easyvqa_examples("train")[:40]

    def ids(num_workers: int, start: int = 0, rank: int = 0, world: int = 1):
        stream = BatchStream(
            examples,
            processor,
            llava_recipe,
            batch_size=8,
            start_example=start,
            rank=rank,
            world_size=world,
        )
        loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
        return [(b["batch_index"], b["inputs"]["input_ids"].tolist()) for b in loader]

    single = ids(0)
    assert [i for i, _ in single] == [0, 1, 2, 3, 4]
    assert ids(2) == single
    assert ids(0, start=24) == single[3:]
    assert ids(2, start=24) == single[3:]  # worker 0 takes the first batch left, as DataLoader asks
    # a start inside a batch yields the rest of it, then whole batches
    rest = ids(0, start=20)
    assert [i for i, _ in rest] == [2, 3, 4] and rest[1:] == single[3:]
    assert len(rest[0][1]) == 4 and ids(2, start=20) == rest
    # two ranks each take half of every batch, in order
    rank0, rank1 = ids(0, rank=0, world=2), ids(0, rank=1, world=2)
    pad = processor.tokenizer.pad_token_id

    def unpadded(rows):
        return [[t for t in row if t != pad] for row in rows]

    for (_, full), (_, a), (_, b) in zip(single, rank0, rank1, strict=True):
        assert unpadded(a) + unpadded(b) == unpadded(full)


def test_hub_only_flags_are_refused_for_local_data(tmp_path, llava_recipe):
    from vlm_sparsify.data import open_examples

    write_folder(tmp_path)
    with pytest.raises(ValueError, match="--split applies to Hugging Face datasets, not to"):
        open_examples(str(tmp_path), llava_recipe, split="test")
    with pytest.raises(ValueError, match="--data_args applies to .* 'easyvqa'; leave it out"):
        open_examples("easyvqa", llava_recipe, name="x")
    assert len(open_examples(str(tmp_path), llava_recipe)) == 4


def _caption_parquet(tmp_path) -> str:
    """A Hub-style dataset whose text sits in a `caption` column (the recipes say `answer`)."""
    import datasets

    png = make_image(tmp_path / "a.png").read_bytes()
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": png, "path": None}] * 2, "caption": ["a red square"] * 2}
    ).cast_column("image", datasets.Image())
    path = tmp_path / "ds.parquet"
    ds.to_parquet(path)
    return str(path)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_missing_text_column_names_the_columns_and_the_recipe_key(
    tmp_path, llava_recipe, streaming
):
    from vlm_sparsify.data import open_examples

    path = _caption_parquet(tmp_path)
    with pytest.raises(
        ValueError, match=r"no column 'answer' \(columns: .*caption.*\[dataset\] text_column"
    ):
        list(open_examples("parquet", llava_recipe, data_files=path, streaming=streaming))
    import dataclasses

    fixed = dataclasses.replace(
        llava_recipe, dataset=dataclasses.replace(llava_recipe.dataset, text_column="caption")
    )
    examples = list(open_examples("parquet", fixed, data_files=path, streaming=streaming))
    assert [e.answer for e in examples] == ["a red square"] * 2


def test_folder_captions_given_as_lists_train_on_their_first_as_hub_datasets_do(tmp_path):
    make_image(tmp_path / "a.png")
    rows = [{"file_name": "a.png", "text": ["a red square", "a square"]},
            {"file_name": "a.png", "text": [], "question": ["What is it?"]}]  # fmt: skip
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    first, empty = folder_examples(tmp_path, "Describe this image.")
    assert (first.answer, first.question) == ("a red square", "Describe this image.")
    assert (empty.answer, empty.question) == ("", "What is it?")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": 5}))
    with pytest.raises(ValueError, match="metadata row 0 .* has a 'text' that is not text"):
        folder_examples(tmp_path, "Describe this image.")


def test_an_empty_metadata_file_is_named(tmp_path):
    (tmp_path / "metadata.jsonl").write_text("")
    with pytest.raises(ValueError, match="the metadata lists no images"):
        folder_examples(tmp_path, "Describe this image.")


def test_a_folder_without_a_text_column_names_its_columns(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "x"}))
    with pytest.raises(
        ValueError, match="no 'text' or 'answer' column .*columns: caption, file_name"
    ):
        folder_examples(tmp_path, "Describe this image.")


@pytest.mark.parametrize(
    ("pad_token", "message"),
    [
        ("<image_pad>", r"\[prompt\] image_pad_token = '<image_pad>' is not a token"),
        ("</s>", r"example a has an image but none of its tokens is \[prompt\] image_pad_token"),
    ],
)
def test_a_wrong_image_pad_token_is_an_error(
    tmp_path, llava_recipe, tiny_llava, pad_token, message
):
    import dataclasses

    _, processor = tiny_llava
    assert processor.tokenizer.convert_tokens_to_ids("</s>") != processor.tokenizer.unk_token_id
    recipe = dataclasses.replace(
        llava_recipe, prompt=dataclasses.replace(llava_recipe.prompt, image_pad_token=pad_token)
    )
    examples = [Example("a", make_image(tmp_path / "a.png"), "what is it?", "a square")]
    with pytest.raises(ValueError, match=message):
        list(BatchStream(examples, processor, recipe, batch_size=1))


def test_a_ctx_len_that_cuts_the_image_delimiters_warns(tmp_path, llava_recipe, tiny_llava):
    import warnings

    _, processor = tiny_llava
    example = Example("a", make_image(tmp_path / "a.png"), "what is it?", "a square")
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "error", message="--ctx_len"
        )  # the text after the image's "\n" may go silently
        encode_example(example, processor, llava_recipe, ctx_len=3)
    with pytest.warns(UserWarning, match="--ctx_len 1 cuts text tokens next to an image"):
        encoded = encode_example(example, processor, llava_recipe, ctx_len=1)
    assert int((encoded["input_ids"] == processor.image_token_id).sum()) > 0


@pytest.mark.parametrize("name", ["/no/such/images", "./missing", "data/images/", "a/b/c"])
def test_a_missing_image_folder_is_named_not_looked_up_on_the_hub(tmp_path, llava_recipe, name):
    with pytest.raises(FileNotFoundError, match=f"DATASET '{name}': no such folder"):
        open_examples(name, llava_recipe)
    make_image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}))
    assert len(list(open_examples(f"{tmp_path}/", llava_recipe))) == 1  # a folder still opens


def test_collate_pads_the_attention_mask_with_zeros_whatever_the_pad_id():
    # the tiny tokenizer's pad id is 0, LLaVA-1.5's is 32001
    encoded = [
        {
            "input_ids": torch.tensor([[5, 6, 7]]),
            "attention_mask": torch.ones(1, 3, dtype=torch.long),
        },
        {"input_ids": torch.tensor([[5]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)},
    ]
    batch = collate(encoded, pad_id=9)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert token_mask(batch, image_id=8).tolist() == [[True, True, True], [True, False, False]]


def test_the_shared_prefix_ends_at_the_first_differing_token_or_image_token():
    ids = torch.tensor([[1, 2, 3, 5, 9], [1, 2, 3, 6, 9]])
    assert shared_prefix_length(ids) == 3
    image = torch.zeros_like(ids, dtype=torch.bool)
    image[:, 2] = True  # the same image token id, but each example's own image
    assert shared_prefix_length(ids, image) == 2
    assert shared_prefix_length(ids[:1]) == 0  # one example cannot tell


def test_a_sigterm_to_a_worker_leaves_the_stop_to_the_training_process(llava_recipe, tiny_llava):
    # SLURM signals every process of a job: a worker killed by it would make the DataLoader
    # raise "DataLoader worker ... is killed by signal" instead of the run stopping cleanly
    import os
    import signal
    import time

    from vlm_sparsify.data import batch_loader, easyvqa_examples

    _, processor = tiny_llava
    stream = BatchStream(easyvqa_examples("train")[:6], processor, llava_recipe, batch_size=2)
    batches = iter(batch_loader(stream, num_workers=1))
    first = next(batches)
    os.kill(batches._workers[0].pid, signal.SIGTERM)
    time.sleep(0.5)
    assert [first["batch_index"], *(b["batch_index"] for b in batches)] == [0, 1, 2]


def test_an_image_the_processor_refuses_stops_the_run_naming_the_example(tmp_path):
    """Qwen's image processor refuses an aspect ratio above 200: the run stopped with its bare
    message, naming no example."""
    from vlm_sparsify.random_models import build_tiny_processor
    from vlm_sparsify.recipe import find_recipe

    recipe = find_recipe("qwen2_vl")
    processor = build_tiny_processor(recipe)
    examples = [
        Example("ok.png", make_image(tmp_path / "ok.png"), "what is it?", "red"),
        Example("thin.png", make_image(tmp_path / "thin.png", size=(1, 300)), "what?", "red"),
    ]
    with pytest.raises(ValueError, match=r"example thin.png: .*1x300.*aspect ratio"):
        list(BatchStream(examples, processor, recipe, batch_size=2))


@pytest.mark.parametrize("field", ["question", "answer"])
def test_a_text_holding_the_image_token_is_named(tmp_path, llava_recipe, tiny_llava, field):
    """A caption with a literal `<image>` made the processor count two image placeholders for
    one image: its bare message named no example."""
    _, processor = tiny_llava
    texts = {"question": "what is it?", "answer": "red"}
    texts[field] = "a <image> tag"
    example = Example("html.png", make_image(tmp_path / "html.png"), **texts)
    with pytest.raises(ValueError, match=f"example html.png: its {field} holds .*'<image>'"):
        list(BatchStream([example], processor, llava_recipe, batch_size=1))


def test_a_metadata_row_of_another_schema_is_named(tmp_path):
    """A row without `text` / `answer` among rows with them (its caption under another key)
    trained on the question alone, silently; an empty value still does, as documented."""
    make_image(tmp_path / "a.png")
    rows = [{"file_name": "a.png", "text": "a red circle"},
            {"file_name": "a.png", "question": "What is it?", "answer": ""},
            {"file_name": "a.png", "caption": "a blue square"}]  # fmt: skip
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=r"metadata row 2 \(.*caption.*\) has no 'text' or 'an"):
        folder_examples(tmp_path, "Describe this image.")
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]))
    assert [e.answer for e in folder_examples(tmp_path, "Q?")] == ["a red circle", ""]


@pytest.mark.parametrize(
    ("line", "message"),
    [("b.png,a blue, square", r"row 1 \(line 3\) has more fields than the header"),
     ("b.png", r"row 1 \(line 3\) has fewer fields than the header")],
)  # fmt: skip
def test_a_metadata_csv_row_of_another_width_is_named(tmp_path, line, message):
    """An unquoted comma in a caption made a TypeError (a None column name); a short row an
    empty caption."""
    (tmp_path / "metadata.csv").write_text(f"file_name,text\na.png,a red circle\n{line}\n")
    with pytest.raises(ValueError, match=message):
        folder_examples(tmp_path, "Describe this image.")


def test_an_exif_orientation_is_applied_as_datasets_and_transformers_do(tmp_path):
    """A phone photo stored sideways with an EXIF orientation tag was read sideways (Hugging
    Face datasets and transformers' `load_image` turn it upright)."""
    from PIL import ImageOps

    stored = Image.open(make_image(tmp_path / "stored.png", size=(40, 32)))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    stored.save(tmp_path / "photo.png", exif=exif)
    image = load_rgb(str(tmp_path / "photo.png"))
    assert image.size == (32, 40)
    upright = ImageOps.exif_transpose(Image.open(tmp_path / "photo.png")).convert("RGB")
    assert image.tobytes() == upright.tobytes()
    assert load_rgb((tmp_path / "photo.png").read_bytes()).size == (32, 40)  # a Hub dataset's


@pytest.mark.parametrize("streaming", [False, True])
def test_a_hub_dataset_value_that_is_not_text_is_named(tmp_path, llava_recipe, streaming):
    """VQAv2's `answers` (a list of dicts) or a number in the text column trained on its Python
    repr ("{'answer': 'yes', ...}"), silently; a folder's metadata already refused it."""
    import dataclasses

    import datasets

    png = make_image(tmp_path / "a.png").read_bytes()
    answers = [[{"answer": "yes", "answer_confidence": "yes"}], [{"answer": "no"}]]
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": png, "path": None}] * 2, "answers": answers, "n": [3, 4]}
    ).cast_column("image", datasets.Image())
    ds.to_parquet(tmp_path / "ds.parquet")
    for column in ("answers", "n"):
        recipe = dataclasses.replace(
            llava_recipe, dataset=dataclasses.replace(llava_recipe.dataset, text_column=column)
        )
        examples = open_examples(
            "parquet", recipe, data_files=str(tmp_path / "ds.parquet"), streaming=streaming
        )
        with pytest.raises(ValueError, match=rf"example \d+ has a '{column}' that is not text"):
            list(examples)
