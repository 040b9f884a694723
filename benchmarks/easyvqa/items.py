"""easy-VQA benchmark items: the TEST split's questions and one caption request per image.

Yes/no questions fall into POPE-like splits: `color` (asks about a colour; its negatives differ
from the image in colour), `shape` (asks about a shape; negatives differ in shape) and `negated`
("does the image not contain ...?", "is no ... present?": "yes" means absent). Open questions
ask for the colour or the shape; captions answer "Describe the image." and are scored against
the image's colour and shape.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.adapters import interleave
from vlm_sparsify.tiny.easyvqa_data import (
    CAPTION_QUESTION,
    COLORS,
    PROMPT_TEMPLATE,
    Kind,
    caption_for,
    image_labels,
    image_paths,
    questions,
)

SPLIT = "test"
PROMPT = PROMPT_TEMPLATE
YES_NO_SPLITS = ("color", "shape", "negated")


@dataclass(frozen=True)
class Item:
    """One benchmark question about one test image."""

    id: str
    image_id: int
    image: str
    """Path of the test PNG."""
    question: str
    answer: str
    kind: Kind
    split: str
    """`color` / `shape` / `negated` for yes/no, `color` / `shape` for open, `caption`."""
    truth: tuple[str, ...] = ()
    """The image's colour and shape where its questions reveal both (always for captions)."""

    @property
    def prompt(self) -> str:
        return PROMPT.format(question=self.question)


def is_negated(question: str) -> bool:
    return " not " in f" {question} " or question.startswith("is no ")


def asks_about_color(question: str) -> bool:
    words = question.rstrip("?").split()
    return any(color in words for color in COLORS)


def question_split(question: str, answer: str) -> str:
    if answer in ("yes", "no"):
        if is_negated(question):
            return "negated"
        return "color" if asks_about_color(question) else "shape"
    return "color" if answer in COLORS else "shape"


def load_items(kinds: tuple[Kind, ...] = ("yes/no", "open", "caption")) -> list[Item]:
    """Items of the test split, the kinds interleaved (`benchmarks.adapters.interleave`) so that
    the first N items (`--limit`) are a random sample of every kind, in its share."""
    paths, labels = image_paths(SPLIT), image_labels(SPLIT)
    items = []
    for index, example in enumerate(questions(SPLIT)):
        if example.kind not in kinds:
            continue
        label = labels.get(example.image_id)
        items.append(
            Item(
                id=f"q{index:05d}",
                image_id=example.image_id,
                image=paths[example.image_id],
                question=example.question,
                answer=example.answer,
                kind=example.kind,
                split=question_split(example.question, example.answer),
                truth=(label.color, label.shape) if label else (),
            )
        )
    if "caption" in kinds:
        for image_id, label in sorted(labels.items()):
            items.append(
                Item(
                    id=f"c{image_id:04d}",
                    image_id=image_id,
                    image=paths[image_id],
                    question=CAPTION_QUESTION,
                    answer=caption_for(label),
                    kind="caption",
                    split="caption",
                    truth=(label.color, label.shape),
                )
            )
    return interleave(items, lambda item: item.kind)
