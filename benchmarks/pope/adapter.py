"""POPE for capture / classify: items from official question files, GOOD = correct answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.adapters import (
    BenchItem,
    Rules,
    Verdict,
    absolute_path,
    csv_choices,
    interleave,
    write_jsonl,
)
from benchmarks.pope.items import (
    SPLITS,
    PopeItem,
    load_question_file,
    load_questions_dir,
    prompt,
)
from benchmarks.pope.score import label_file_id, parse_answer
from vlm_sparsify.recipe import Recipe

OFFICIAL_FILE = "responses_official.jsonl"


@dataclass
class Data:
    """POPE questions and images."""

    questions_dir: str | None = None
    """Folder of the official *_pope_{random,popular,adversarial}.json label files."""
    questions: str | None = None
    """One question file instead (JSONL or JSON array; LLaVA's llava_pope_test.jsonl too)."""
    images: str = "."
    """Folder of the images the questions name (COCO val2014)."""
    splits: str = ",".join(SPLITS)
    """Comma-separated splits to run."""

    def __post_init__(self) -> None:
        csv_choices(self.splits, SPLITS, "--splits")  # a typo fails before the model loads
        self.questions_dir = absolute_path(self.questions_dir)
        self.questions = absolute_path(self.questions)
        self.images = absolute_path(self.images)


def pope_items(data: Data) -> list[PopeItem]:
    """The official items of the chosen splits, interleaved (`interleave`: the first N are a
    random sample of each split, in its share)."""
    if data.questions_dir and not data.questions:
        items = load_questions_dir(data.questions_dir)
    elif data.questions and not data.questions_dir:
        items = load_question_file(data.questions)
    else:
        raise ValueError("pass either --questions-dir DIR or --questions FILE")
    splits = csv_choices(data.splits, SPLITS, "--splits")
    return interleave([item for item in items if item.split in splits], lambda item: item.split)


def load_items(data: Data, recipe: Recipe) -> list[BenchItem]:
    """Question + the recipe's short-answer suffix; id `<split>-<question_id>`."""
    return [
        BenchItem(
            id=f"{item.split}-{item.question_id}",
            image=Path(data.images) / item.image,
            question=prompt(item, recipe.prompt.short_answer_suffix),
            fields={
                "question_id": item.question_id,
                "split": item.split,
                "image": item.image,
                "label": item.label,
            },
        )
        for item in pope_items(data)
    ]


def write_official(records: Sequence[dict[str, Any]], path: Path) -> None:
    """JSONL of `{"question_id", "split", "image", "response"}` (what `pope score` reads; it
    refuses label files whose question of that id is about another image), split by split, each
    in question id order: the label files' order, which the official scripts pair answers by."""
    fields = ("question_id", "split", "image", "response")
    ordered = sorted(records, key=lambda r: (SPLITS.index(r["split"]), int(r["question_id"])))
    write_jsonl(path, [{name: record[name] for name in fields} for record in ordered])


def with_labels(records: Sequence[dict[str, Any]], questions_dir: str) -> list[dict[str, Any]]:
    """The records with the labels of the label files in `questions_dir`: each record is paired
    with the label files' question of its split and id modulo 10,000,000 (LLaVA's question file
    numbers random from 10,000,001 and popular from 20,000,001), which must ask about its image."""
    labelled = {(i.split, i.question_id): i for i in load_questions_dir(questions_dir)}
    result = []
    for record in records:
        split, question_id = record["split"], int(record["question_id"])
        item = labelled.get((split, label_file_id(question_id)))
        if item is None or item.image != record["image"]:
            raise ValueError(
                f"{split} question {question_id} about {record['image']} has no question "
                f"{label_file_id(question_id)} about that image in the label files of "
                f"{questions_dir}: pass the label files its question file was made from"
            )
        result.append({**record, "label": item.label})
    return result


def split_labels(data: Data, limit: int | None) -> tuple[Data, list[str]]:
    """`all`'s data for capture, and the flags for score and classify. A question file with
    --questions-dir (LLaVA's llava_pope_test.jsonl has no labels): capture runs the file, score
    and classify take the labels from the folder's label files, which must pair with the first
    `limit` questions; a question file with an unlabelled question and no folder is refused."""
    if not data.questions:
        return data, []
    questions = replace(data, questions_dir=None)
    items = pope_items(questions)[:limit]
    if data.questions_dir:
        records = [
            {"split": i.split, "question_id": i.question_id, "image": i.image} for i in items
        ]
        with_labels(records, data.questions_dir)  # the same error as classify's, before training
        return questions, ["--questions-dir", data.questions_dir]
    unlabelled = next((item for item in items if item.label is None), None)
    if unlabelled is not None:
        raise ValueError(
            f"{unlabelled.split} question {unlabelled.question_id} of {data.questions} has no "
            "label (LLaVA's llava_pope_test.jsonl has none): add --questions-dir DIR, the "
            "official label files the question file was made from, for score and classify"
        )
    return data, []


def classify(data: Data, records: Sequence[dict[str, Any]], rules: Rules) -> list[Verdict]:
    """GOOD when the official parser's answer equals the label (of the label files in
    `rules.questions_dir` when given, else the one capture recorded)."""
    if rules.questions_dir:
        records = with_labels(records, rules.questions_dir)
    verdicts = []
    for record in records:
        if record["label"] is None:
            raise ValueError(
                f"question {record['question_id']} has no label: capture ran a question file "
                "without labels (e.g. LLaVA's llava_pope_test.jsonl); pass the official label "
                "files, classify --questions-dir DIR, as to `score --out`"
            )
        answer = parse_answer(record["response"])
        metrics = {
            "question_id": record["question_id"],
            "split": record["split"],
            "label": record["label"],
            "answer": answer,
            "correct": answer == record["label"],
        }
        verdicts.append(Verdict(record["id"], metrics["correct"], record["split"], metrics))
    return verdicts
