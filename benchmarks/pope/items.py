"""POPE items: official question / label files, images, and the prompt.

Formats read (all from the official repositories):
- RUCAIBox/POPE label files `<dataset>_pope_[seem_]{random,popular,adversarial}.json`: JSONL for
  COCO, a JSON array for A-OKVQA and GQA; rows `{"question_id", "image", "text", "label"}`.
- LLaVA-1.5's `llava_pope_test.jsonl`: rows with `category` (the split) and the prompt suffix
  already appended to `text`; no labels. Its question_ids are global (random = 10,000,000 + i,
  popular = 20,000,000 + i) while the label files number each split from 1.
"""

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.responses import load_records, require_fields

SPLITS = ("random", "popular", "adversarial")
LLAVA_PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."
"""Appended to each question for LLaVA-1.5 (its `llava_pope_test.jsonl` carries it)."""
HF_DATASET = "lmms-lab/POPE"

_SPLIT_IN_NAME = re.compile(r"_pope_(?:\w+_)?(random|popular|adversarial)\.jsonl?$")


@dataclass(frozen=True)
class PopeItem:
    question_id: int
    split: str
    """random / popular / adversarial."""
    image: str
    """Image file name, e.g. COCO_val2014_000000310196.jpg."""
    question: str
    """The bare question, without any prompt suffix."""
    label: str | None
    """"yes" / "no"; None for question files without labels."""


def split_of_file(path: str | Path) -> str | None:
    """The split named by an official file name, or None."""
    match = _SPLIT_IN_NAME.search(Path(path).name)
    return match.group(1) if match else None


def _item(row: dict[str, Any], split: str, suffix: str) -> PopeItem:
    question = row["text"]
    if suffix and question.endswith(suffix):
        question = question[: -len(suffix)]
    label = row.get("label")
    if label not in (None, "yes", "no"):
        raise ValueError(
            f"question {row['question_id']}: label must be 'yes' or 'no', got {label!r}"
        )
    return PopeItem(int(row["question_id"]), split, row["image"], question, label)


def load_question_file(
    path: str | Path, split: str | None = None, suffix: str = LLAVA_PROMPT_SUFFIX
) -> list[PopeItem]:
    """Items of one official file, JSONL or JSON array.

    The split is `split`, else the row's `category` (LLaVA's file), else the file name's.
    A trailing `suffix` is removed from the question text.
    """
    items = []
    for row in load_records(path):
        require_fields(row, ("question_id", "image", "text"), str(path))
        row_split = split or row.get("category") or split_of_file(path)
        if row_split not in SPLITS:
            raise ValueError(
                f"{path}: cannot tell the split of question {row['question_id']}; name the file "
                f"*_pope_{{{','.join(SPLITS)}}}.json or pass split="
            )
        items.append(_item(row, row_split, suffix))
    return items


def label_files(questions_dir: str | Path) -> dict[str, Path]:
    """The one `*_pope_<split>.json` file per split found in a folder (at least one split)."""
    questions_dir = Path(questions_dir)
    found: dict[str, list[Path]] = {}
    for path in sorted(questions_dir.iterdir()):
        split = split_of_file(path)
        if split:
            found.setdefault(split, []).append(path)
    if not found:
        raise FileNotFoundError(
            f"no *_pope_{{{','.join(SPLITS)}}}.json file in {questions_dir}; pass the folder "
            "holding the official POPE label files"
        )
    clashes = {s: [p.name for p in ps] for s, ps in found.items() if len(ps) > 1}
    if clashes:
        raise ValueError(f"{questions_dir}: several files for one split: {clashes}; keep one each")
    return {split: found[split][0] for split in SPLITS if split in found}


def load_questions_dir(questions_dir: str | Path) -> list[PopeItem]:
    """Items of every split's label file in a folder, split by split."""
    return [
        item
        for split, path in label_files(questions_dir).items()
        for item in load_question_file(path, split=split)
    ]


def prompt(item: PopeItem, suffix: str = LLAVA_PROMPT_SUFFIX) -> str:
    """The text the model sees (the image goes in through the recipe's chat format)."""
    return item.question + suffix


def iter_hf_items(
    split: str | None = None, dataset: str = HF_DATASET, hf_split: str = "test"
) -> Iterator[tuple[PopeItem, Any]]:
    """(item, PIL image) pairs from the Hub dataset `lmms-lab/POPE` (needs network access).

    Its rows carry `question_id`, `question`, `answer`, `image_source`, `category`, `image`;
    `split` keeps one category.
    """
    from datasets import load_dataset

    for row in load_dataset(dataset, split=hf_split):
        if split is not None and row["category"] != split:
            continue
        item = PopeItem(
            question_id=int(row["question_id"]),
            split=row["category"],
            image=f"{row['image_source']}.jpg",
            question=row["question"],
            label=row["answer"].strip().lower(),
        )
        yield item, row["image"]
