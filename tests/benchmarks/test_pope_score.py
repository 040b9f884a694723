import json
import random

import pytest

from benchmarks.__main__ import run
from benchmarks.pope.items import (
    HF_DATASET,
    LLAVA_PROMPT_SUFFIX,
    PopeItem,
    iter_hf_items,
    load_question_file,
    load_questions_dir,
    prompt,
    split_of_file,
)
from benchmarks.pope.score import parse_answer, score
from benchmarks.responses import load_records
from tests.benchmarks import shared_data


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No", "no"),
        ("no", "no"),
        ("NO", "yes"),
        ("No!", "yes"),
        ("No.", "no"),
        ("No, there is none.", "no"),
        ("Yes, but not clearly", "no"),
        ("No\nThere is none", "yes"),
        ("", "yes"),
        ("not sure", "no"),
        ("Nope", "yes"),
        (" No", "no"),
        ("Yes. There is no dog.", "yes"),
        ("There is no dog", "no"),
        ("Yes", "yes"),
    ],
)
def test_official_parser_edge_cases(text: str, expected: str) -> None:
    assert parse_answer(text) == expected


def _llava_13b_responses() -> list[dict]:
    """LLaVA-1.5-13B's published answers as {question_id, split, response}.

    LLaVA's question file numbers random / popular from 10,000,001 / 20,000,001; its text and image
    must match the label file's question of the same split-local id.
    """
    folder = shared_data("pope-llava")
    questions = load_question_file(folder / "llava_pope_test.jsonl")
    answers = {
        row["question_id"]: row["text"]
        for row in map(json.loads, (folder / "llava-v1.5-13b.jsonl").read_text().splitlines())
    }
    labelled = {(i.split, i.question_id): i for i in load_questions_dir(folder / "coco-e3e3926")}
    responses = []
    for q in questions:
        local_id = q.question_id % 10_000_000
        label_item = labelled[(q.split, local_id)]
        assert (label_item.question, label_item.image) == (q.question, q.image)
        responses.append(
            {"question_id": local_id, "split": q.split, "response": answers[q.question_id]}
        )
    return responses


def _reference_metrics(answers: list[str], labels: list[str]) -> dict:
    """The official formula written out independently: first sentence, commas, single spaces."""
    tp = fp = tn = fn = 0
    for answer, label in zip(answers, labels, strict=True):
        words = answer.split(".")[0].replace(",", "").split(" ")
        said_yes = not ({"No", "not", "no"} & set(words))
        tp += said_yes and label == "yes"
        fp += said_yes and label == "no"
        tn += not said_yes and label == "no"
        fn += not said_yes and label == "yes"
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return {
        "accuracy": (tp + tn) / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall),
        "yes_ratio": (tp + fp) / len(labels),
        "n": len(labels),
    }


def test_llava_13b_published_answers_match_the_official_formula() -> None:
    folder = shared_data("pope-llava")
    responses = _llava_13b_responses()
    result = score(load_questions_dir(folder / "coco-e3e3926"), responses)
    for split in ("random", "popular", "adversarial"):
        labels = [
            json.loads(line)["label"]
            for line in (folder / "coco-e3e3926" / f"coco_pope_{split}.json").open()
        ]
        answers = [r["response"] for r in responses if r["split"] == split]
        assert result[split] == pytest.approx(_reference_metrics(answers, labels), abs=1e-12)
    assert result["random"]["n"] == 2910
    assert result["random"]["f1"] == pytest.approx(0.8714, abs=1e-4)
    # LLaVA-1.5 paper, Table 4: POPE 85.9 for 13B (mean F1 of the three COCO splits).
    assert round(100 * result["mean_f1"], 1) == 85.9


def test_shuffled_responses_give_identical_metrics() -> None:
    items = load_questions_dir(shared_data("pope-llava", "coco-e3e3926"))
    responses = _llava_13b_responses()
    shuffled = responses[:]
    random.Random(0).shuffle(shuffled)
    assert shuffled != responses
    assert score(items, shuffled) == score(items, responses)


def test_all_yes_on_a_real_split() -> None:
    items = load_questions_dir(shared_data("pope", "coco"))
    responses = [
        {"question_id": i.question_id, "split": "random", "response": "Yes"}
        for i in items
        if i.split == "random"
    ]
    result = score(items, responses)
    assert set(result) == {"random", "mean_f1"}
    assert result["random"] == pytest.approx(
        {"accuracy": 0.5, "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "yes_ratio": 1.0, "n": 3000}
    )
    assert result["mean_f1"] == pytest.approx(2 / 3)


def test_hand_counted_small_set(tmp_path) -> None:
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    rows = [
        {"question_id": i + 1, "image": "x.jpg", "text": "Is there a dog?", "label": lab}
        for i, lab in enumerate(labels)
    ]
    (tmp_path / "toy_pope_popular.json").write_text(json.dumps(rows))
    answers = ["Yes", "No, it is not.", "Yes there is", "No", "no", "Sure"]  # TP FN TP TN TN FP
    responses = [
        {"question_id": i + 1, "split": "popular", "response": a} for i, a in enumerate(answers)
    ]
    result = score(load_questions_dir(tmp_path), responses)["popular"]
    assert result == pytest.approx(
        {
            "accuracy": 4 / 6,
            "precision": 2 / 3,
            "recall": 2 / 3,
            "f1": 2 / 3,
            "yes_ratio": 0.5,
            "n": 6,
        }
    )


def test_all_no_answers_give_zero_precision_instead_of_crashing(tmp_path) -> None:
    rows = [
        {"question_id": 1, "image": "x.jpg", "text": "q", "label": "yes"},
        {"question_id": 2, "image": "x.jpg", "text": "q", "label": "no"},
    ]
    (tmp_path / "toy_pope_random.json").write_text("\n".join(map(json.dumps, rows)))
    responses = [{"question_id": i, "split": "random", "response": "No"} for i in (1, 2)]
    result = score(load_questions_dir(tmp_path), responses)["random"]
    assert (result["precision"], result["recall"], result["f1"], result["accuracy"]) == (
        0.0,
        0.0,
        0.0,
        0.5,
    )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda rs: rs[1:], "lacks responses to 1 of 3000"),
        (lambda rs: rs + rs[:1], "duplicate response"),
        (
            lambda rs: rs + [{"question_id": 3001, "split": "random", "response": "No"}],
            "match no labelled question",
        ),
        (lambda rs: rs + [{"question_id": 1, "split": "gqa", "response": "No"}], "is not one of"),
        (lambda rs: [{"question_id": 1, "response": "No"}] + rs[1:], "lacks split"),
        (lambda rs: [{**rs[0], "question_id": 1.5}] + rs[1:], "question_id 1.5 is not an integer"),
        (lambda rs: [{**rs[0], "question_id": True}] + rs[1:], "question_id True is not an"),
        (lambda rs: [{**rs[0], "response": None}] + rs[1:], "response of .* is not a string"),
        (lambda rs: [{"question_id": 1, "text": "No"}] + rs[1:], "--question-file"),
    ],
)
def test_id_errors(edit, message: str) -> None:
    items = load_questions_dir(shared_data("pope", "coco"))
    responses = [
        {"question_id": i.question_id, "split": "random", "response": "No"}
        for i in items
        if i.split == "random"
    ]
    with pytest.raises(ValueError, match=message):
        score(items, edit(responses))


def test_question_files_of_every_format() -> None:
    aokvqa = load_questions_dir(
        shared_data("pope", "aokvqa")
    )  # JSON arrays, *_pope_seem_<split>.json
    assert [sum(i.split == s for i in aokvqa) for s in ("random", "popular", "adversarial")] == [
        3000
    ] * 3
    assert split_of_file("gqa_pope_seem_adversarial.json") == "adversarial"
    llava = load_question_file(shared_data("pope-llava", "llava_pope_test.jsonl"))
    assert len(llava) == 8910 and llava[0].split == "adversarial" and llava[0].label is None
    assert llava[0].question == "Is there a snowboard in the image?"
    assert prompt(llava[0]) == "Is there a snowboard in the image?" + LLAVA_PROMPT_SUFFIX


def test_cli_json(tmp_path, capsys) -> None:
    folder = shared_data("pope-llava", "coco-e3e3926")
    responses = tmp_path / "responses.jsonl"
    responses.write_text("\n".join(json.dumps(r) for r in _llava_13b_responses()))
    run(["pope", "score", "--questions-dir", str(folder), "--responses", str(responses), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"random", "popular", "adversarial", "mean_f1"}
    assert set(printed["popular"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio", "n"}
    assert printed["adversarial"]["n"] == 3000 and round(100 * printed["mean_f1"], 1) == 85.9
    run(["pope", "score", "--questions-dir", str(folder), "--responses", str(responses)])
    assert "mean F1 over 3 split(s): 85.95" in capsys.readouterr().out
    # LLaVA's own answer file, as published, with its question file: the same scores
    llava = shared_data("pope-llava")
    run(["pope", "score", "--questions-dir", str(folder), "--question-file",
         str(llava / "llava_pope_test.jsonl"), "--responses", str(llava / "llava-v1.5-13b.jsonl"),
         "--json"])  # fmt: skip
    assert json.loads(capsys.readouterr().out) == printed


@pytest.mark.parametrize("question_id", ["abc", 10_000_001.5, None])
def test_llava_answer_ids_must_be_integers(tmp_path, question_id) -> None:
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"question_id": question_id, "text": "Yes"}) + "\n")
    llava = shared_data("pope-llava")
    with pytest.raises(SystemExit, match=r"LLaVA's answer file\): question_id .* not an integer"):
        run(["pope", "score", "--questions-dir", str(llava / "coco-e3e3926"), "--question-file",
             str(llava / "llava_pope_test.jsonl"), "--responses", str(answers)])  # fmt: skip


@pytest.mark.parametrize("text", ["No\n", "\nNo", "No\n.", "\nNo, there is none"])
def test_official_parser_does_not_strip_newlines_next_to_no(text: str) -> None:
    # words are split on single spaces only: "No\n" is one word, not "No"
    assert parse_answer(text) == "yes"


def test_hf_rows_become_items_with_their_images(monkeypatch):
    """`iter_hf_items` on an in-memory dataset with lmms-lab/POPE's columns (no network)."""
    import datasets
    from PIL import Image

    colors = ["red", "green", "blue"]
    rows = datasets.Dataset.from_dict(
        {
            "id": ["0", "1", "2"],
            "question_id": ["7", "8", "9"],
            "question": ["Is there a dog in the image?", "Is there a cat?", "Is there a car?"],
            "answer": ["yes", " No", "YES\n"],
            "image_source": ["COCO_val2014_000000310196", "COCO_val2014_1", "COCO_val2014_2"],
            "category": ["adversarial", "random", "adversarial"],
            "image": [Image.new("RGB", (4, 3), color) for color in colors],
        },
        features=datasets.Features(
            {
                **{name: datasets.Value("string") for name in (
                    "id", "question_id", "question", "answer", "image_source", "category"
                )},
                "image": datasets.Image(),
            }
        ),
    )  # fmt: skip
    loaded = []

    def load_dataset(name, split):
        loaded.append((name, split))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    pairs = list(iter_hf_items())
    assert loaded == [(HF_DATASET, "test")]
    assert [item for item, _ in pairs] == [
        PopeItem(7, "adversarial", "COCO_val2014_000000310196.jpg",
                 "Is there a dog in the image?", "yes"),
        PopeItem(8, "random", "COCO_val2014_1.jpg", "Is there a cat?", "no"),
        PopeItem(9, "adversarial", "COCO_val2014_2.jpg", "Is there a car?", "yes"),
    ]  # fmt: skip
    assert [image.getpixel((0, 0)) for _, image in pairs] == [(255, 0, 0), (0, 128, 0), (0, 0, 255)]
    adversarial = list(iter_hf_items("adversarial", dataset="me/pope", hf_split="val"))
    assert loaded[-1] == ("me/pope", "val")
    assert [item.question_id for item, _ in adversarial] == [7, 9]


def _capture_folder(out, questions_dir, official) -> None:
    """A POPE capture folder as `capture` leaves it (no model run needed to score it)."""
    out.mkdir()
    data = {
        "questions_dir": str(questions_dir),
        "questions": None,
        "images": ".",
        "splits": "random",
    }
    (out / "capture.json").write_text(json.dumps({"settings": {}, "data": data}))
    log = [{"id": f"random-{r['question_id']}", **r} for r in official]
    (out / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    fields = ("question_id", "split", "response")  # as older captures wrote it: no image
    rows = [{f: r[f] for f in fields} for r in official]
    (out / "responses_official.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_responses_about_other_images_than_the_label_files_are_refused(tmp_path) -> None:
    """COCO, A-OKVQA and GQA number their questions alike: pairing by id alone would score COCO
    answers against GQA labels without a word."""
    from benchmarks.pope.adapter import write_official

    coco = [i for i in load_questions_dir(shared_data("pope", "coco")) if i.split == "random"]
    records = [
        {"question_id": i.question_id, "split": i.split, "image": i.image, "label": i.label,
         "response": "Yes"}
        for i in coco
    ]  # fmt: skip
    write_official(records, tmp_path / "official.jsonl")
    official = load_records(tmp_path / "official.jsonl")
    assert official[0]["image"] == coco[0].image
    assert score(coco, official)["random"]["n"] == 3000  # the right label files
    for other in ("gqa", "aokvqa"):
        with pytest.raises(ValueError, match="other images than the label files' questions"):
            score(load_questions_dir(shared_data("pope", other)), official)
    # a capture folder whose official file predates the image field: the log names the images
    out = tmp_path / "out"
    _capture_folder(out, shared_data("pope", "coco"), records)
    run(["pope", "score", "--out", str(out)])
    gqa = str(shared_data("pope", "gqa"))
    with pytest.raises(SystemExit, match="random question 1: COCO_val2014_000000310196.jpg"):
        run(["pope", "score", "--out", str(out), "--questions-dir", gqa])


def test_label_files_are_checked_one_per_split_with_yes_no_labels(tmp_path) -> None:
    row = {"question_id": 1, "image": "x.jpg", "text": "Is there a dog?", "label": "yes"}
    (tmp_path / "coco_pope_random.json").write_text(json.dumps(row))
    (tmp_path / "gqa_pope_seem_random.json").write_text(json.dumps(row))
    with pytest.raises(ValueError, match="several files for one split"):
        load_questions_dir(tmp_path)
    (tmp_path / "gqa_pope_seem_random.json").unlink()
    (tmp_path / "coco_pope_random.json").write_text(json.dumps({**row, "label": "Yes"}))
    with pytest.raises(ValueError, match="label must be 'yes' or 'no', got 'Yes'"):
        load_questions_dir(tmp_path)


def test_the_official_file_lists_split_by_split_in_numeric_question_id_order(tmp_path) -> None:
    """The label files' order (random, popular, adversarial; ids as numbers), whatever the
    capture's interleaved order."""
    from benchmarks.pope.adapter import write_official

    order = [("adversarial", 2), ("random", 10), ("popular", 1), ("random", 9)]
    records = [
        {"question_id": q, "split": s, "image": f"{q}.jpg", "label": "yes", "response": "Yes",
         "id": f"{s}-{q}"}
        for s, q in order
    ]  # fmt: skip
    write_official(records, tmp_path / "official.jsonl")
    official = load_records(tmp_path / "official.jsonl")
    assert [(r["split"], r["question_id"]) for r in official] == [
        ("random", 9), ("random", 10), ("popular", 1), ("adversarial", 2)
    ]  # fmt: skip
    assert set(official[0]) == {"question_id", "split", "image", "response"}
