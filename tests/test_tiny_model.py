from pathlib import Path

import easy_vqa
import pytest
import torch
from PIL import Image

from vlm_sparsify.tiny import easyvqa_data
from vlm_sparsify.tiny.build import TinyShape, build_model, build_processor
from vlm_sparsify.tiny.easyvqa_data import ImageLabel, captions, image_labels, questions
from vlm_sparsify.tiny.evaluate import SHIPPED, answer, load_tiny
from vlm_sparsify.tiny.train import (
    IGNORE,
    TrainConfig,
    answer_loss,
    encode_examples,
    sample_batch,
    training_examples,
)


@pytest.fixture(scope="module")
def shipped():
    return load_tiny(SHIPPED)


@pytest.fixture
def few_images(monkeypatch):
    """The trainer module, with its training data cut to the questions on 8 train images."""
    from vlm_sparsify.tiny import train as train_module

    examples, _ = training_examples()
    subset = [e for e in examples if e.image_id < 8]  # a few images: quick to load
    monkeypatch.setattr(
        train_module,
        "training_examples",
        lambda counterfactual: (subset, sorted({e.image_id for e in subset})),
    )
    return train_module


def test_labels_are_read_off_the_questions():
    # Train image 0: "what is the blue shape?" -> "rectangle".
    assert image_labels("train")[0] == ImageLabel("blue", "rectangle")
    assert captions("train")[0].answer == "a blue rectangle."
    labels = image_labels("test")
    opens = [e for e in questions("test") if e.kind == "open" and e.image_id in labels]
    assert all(e.answer in (labels[e.image_id].color, labels[e.image_id].shape) for e in opens)


def test_counterfactuals_flip_the_answer_and_agree_with_the_labels():
    labels = image_labels("train")
    flipped = easyvqa_data.counterfactuals("train")
    originals = [e for e in questions("train") if e.kind == "yes/no" and e.image_id in labels]
    assert len(flipped) == len(originals)
    for original, twin in zip(originals[:200], flipped[:200], strict=True):
        assert twin.image_id == original.image_id
        assert {twin.answer, original.answer} == {"yes", "no"}
        assert twin.question != original.question
    # Train image 0 is a blue rectangle: "is there a black shape?" (no) becomes a blue one.
    assert flipped[2] == easyvqa_data.Example(0, "is there a blue shape?", "yes", "yes/no")


def test_training_never_touches_the_test_split(monkeypatch):
    def forbidden():
        raise AssertionError("training read the easy-VQA test split")

    monkeypatch.setattr(easy_vqa, "get_test_questions", forbidden)
    monkeypatch.setattr(easy_vqa, "get_test_image_paths", forbidden)
    for cached in (easyvqa_data.questions, easyvqa_data.image_paths, easyvqa_data.image_labels):
        monkeypatch.setattr(easyvqa_data, cached.__name__, cached.__wrapped__)
    examples, image_ids = training_examples()
    train_paths = easy_vqa.get_train_image_paths()
    assert {e.image_id for e in examples} <= set(image_ids) == set(train_paths)
    monkeypatch.undo()
    test_paths = set(easy_vqa.get_test_image_paths().values())
    assert test_paths.isdisjoint(train_paths.values())
    assert all("/train/" in p for p in train_paths.values())


def test_training_rows_match_the_processor_and_supervise_only_the_answer():
    processor = build_processor()
    example = questions("train")[1]  # "what color is the shape?" -> "blue"
    data = encode_examples(
        processor.tokenizer, [example], [example.image_id], TinyShape().num_image_tokens
    )
    image = Image.new("RGB", (64, 64))
    prompt = easyvqa_data.prompt_for(example.question)
    expected = processor(images=image, text=prompt)["input_ids"][0]
    length = int(data.attention_mask[0].sum())
    assert data.input_ids[0, : len(expected)].tolist() == expected
    supervised = data.labels[0][data.labels[0] != IGNORE].tolist()
    tokenizer = processor.tokenizer
    assert supervised == tokenizer.convert_tokens_to_ids(["blue", tokenizer.eos_token])
    assert length == len(expected) + 2


def test_curriculum_draws_only_open_questions_first():
    processor = build_processor()
    examples = list(questions("train")[:40])
    image_ids = sorted({e.image_id for e in examples})
    data = encode_examples(processor.tokenizer, examples, image_ids, TinyShape().num_image_tokens)
    config = TrainConfig(batch_size=32, curriculum_steps=5)
    generator = torch.Generator().manual_seed(0)
    assert not data.is_yes_no[sample_batch(generator, data, 4, config)].any()
    assert data.is_yes_no[sample_batch(generator, data, 5, config)].any()


def test_a_training_step_lowers_the_answer_loss():
    torch.manual_seed(0)
    shape = TinyShape(vision_hidden=16, text_hidden=32, text_intermediate=64)
    processor, model = build_processor(shape), build_model(shape)
    examples = list(questions("train")[:8])
    data = encode_examples(processor.tokenizer, examples, [0], shape.num_image_tokens)
    pixels = torch.randn(1, 3, 64, 64)
    rows = torch.arange(8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before, _ = answer_loss(model, data, pixels, rows)
    for _ in range(3):
        loss, _ = answer_loss(model, data, pixels, rows)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after, correct = answer_loss(model, data, pixels, rows)
    assert after < before
    assert correct.shape == (8,)


def test_shipped_model_is_a_small_llava_with_four_decoder_layers(shipped):
    model, processor = shipped
    size = sum(f.stat().st_size for f in Path(SHIPPED).iterdir())
    assert size < 10 * 2**20
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.get_text_config().num_hidden_layers == 4
    assert len(model.model.language_model.layers) == 4
    assert processor.tokenizer.chat_template == processor.chat_template


def test_shipped_model_answers_then_stops(shipped):
    model, processor = shipped
    labels = image_labels("test")
    image_ids = sorted(labels)[:8]
    paths = easyvqa_data.image_paths("test")
    images = [Image.open(paths[i]) for i in image_ids]
    prompts = [easyvqa_data.prompt_for("what color is the shape?")] * len(images)
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new = output[:, inputs["input_ids"].shape[1] :]
    assert (new[:, 1] == processor.tokenizer.eos_token_id).all()
    responses = answer(model, processor, images, prompts)
    hits = [r == labels[i].color for r, i in zip(responses, image_ids, strict=True)]
    assert sum(hits) >= 6


def _accuracy_real_and_blank(model, processor, examples) -> tuple[float, float]:
    paths = easyvqa_data.image_paths("test")
    prompts = [easyvqa_data.prompt_for(e.question) for e in examples]
    real = answer(model, processor, [Image.open(paths[e.image_id]) for e in examples], prompts)
    grey = answer(
        model, processor, [Image.new("RGB", (64, 64), (128,) * 3)] * len(examples), prompts
    )
    return (
        sum(r == e.answer for r, e in zip(real, examples, strict=True)) / len(examples),
        sum(r == e.answer for r, e in zip(grey, examples, strict=True)) / len(examples),
    )


def test_shipped_model_reads_the_colour_off_the_image(shipped):
    colour = [e for e in questions("test") if e.kind == "open" and e.answer in easyvqa_data.COLORS]
    real, blank = _accuracy_real_and_blank(*shipped, colour[:96])
    assert real >= 0.85
    assert real >= blank + 0.3


def test_shipped_model_meets_the_yes_no_band(shipped):
    """Issue 3's band (0.90 <= acc < 0.99, 5 points above a blank image) on 512 test items;
    the whole split (7,136) is measured in docs/tiny_model.md."""
    yes_no = [e for e in questions("test") if e.kind == "yes/no"][:512]
    real, blank = _accuracy_real_and_blank(*shipped, yes_no)
    assert 0.90 <= real < 0.99
    assert real >= blank + 0.05


def test_training_saves_every_n_steps_and_records_the_steps_done(tmp_path, few_images, monkeypatch):
    train_module = few_images
    saved = []
    real_save = train_module.save_atomically
    monkeypatch.setattr(
        train_module,
        "save_atomically",
        lambda model, processor, record, out: (
            saved.append(record["steps_done"]),
            real_save(model, processor, record, out),
        ),
    )
    config = TrainConfig(
        out=str(tmp_path / "tiny"),
        steps=5,
        batch_size=4,
        warmup=1,
        curriculum_steps=1,
        save_every=2,
        device="cpu",
    )
    model = train_module.train(config)
    assert saved == [2, 4, 5]
    reloaded, _ = load_tiny(tmp_path / "tiny")
    for a, b in zip(model.state_dict().values(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_cpu_training_is_repeatable_bit_for_bit(tmp_path, few_images):
    """The same command on the CPU gives the same weights (the shipped recipe's CPU rerun matched
    bit for bit at step 500, the previous recipe's over its full length: docs/tiny_model.md);
    another seed gives others."""
    train_module = few_images

    def weights(name: str, seed: int) -> dict[str, torch.Tensor]:
        config = TrainConfig(out=str(tmp_path / name), seed=seed, steps=4, batch_size=8,
                             warmup=1, curriculum_steps=2, device="cpu")  # fmt: skip
        return train_module.train(config).state_dict()

    first, again, other = weights("a", 0), weights("b", 0), weights("c", 1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("limit", ["0", "-5"])
def test_evaluate_refuses_a_limit_below_one(limit, capsys):
    # -5 evaluated all but the last five examples (a slice from the end), 0 printed {}
    from vlm_sparsify.tiny.evaluate import main

    with pytest.raises(SystemExit):
        main(["--limit", limit])
    assert f"--limit {limit}: give a positive number of examples" in capsys.readouterr().err


def test_evaluate_limits_each_kind_and_counts_them() -> None:
    # --limit took the first N examples of the split, all yes/no questions, and printed
    # accuracies without counts
    from vlm_sparsify.tiny.evaluate import evaluate

    model, processor = load_tiny()
    result = evaluate(model, processor, "test", limit=2)
    assert sorted(result) == ["caption", "open", "yes/no"]
    assert all(r["n"] == 2 and 0 <= r["accuracy"] <= 1 for r in result.values())
