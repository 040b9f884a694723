"""easy-VQA as prompt/answer examples: questions, per-image labels and derived captions.

Train and test are kept apart by construction: every function takes a `split` and only reads
that split's questions and image paths.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cache
from typing import Literal

import easy_vqa

Split = Literal["train", "test"]
Kind = Literal["yes/no", "open", "caption"]

COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
CAPTION_QUESTION = "Describe the image."

_COLOR_RE = re.compile(r"\b(" + "|".join(COLORS) + r")\b")
_SHAPE_RE = re.compile(r"\b(" + "|".join(SHAPES) + r")\b")


@dataclass(frozen=True)
class Example:
    """One question (or caption request) about one image of a split."""

    image_id: int
    question: str
    answer: str
    kind: Kind


@dataclass(frozen=True)
class ImageLabel:
    """What one easy-VQA image shows."""

    color: str
    shape: str


def question_kind(answer: str) -> Kind:
    return "yes/no" if answer in ("yes", "no") else "open"


def caption_for(label: ImageLabel) -> str:
    return f"a {label.color} {label.shape}."


def prompt_for(question: str) -> str:
    return PROMPT_TEMPLATE.format(question=question)


@cache
def image_paths(split: Split) -> dict[int, str]:
    """Image id -> PNG path of one split."""
    match split:
        case "train":
            return easy_vqa.get_train_image_paths()
        case "test":
            return easy_vqa.get_test_image_paths()
        case other:
            raise ValueError(f"Unknown easy-VQA split '{other}'; known: train, test")


@cache
def questions(split: Split) -> tuple[Example, ...]:
    """The split's questions, in the package's order."""
    match split:
        case "train":
            texts, answers, ids = easy_vqa.get_train_questions()
        case "test":
            texts, answers, ids = easy_vqa.get_test_questions()
        case other:
            raise ValueError(f"Unknown easy-VQA split '{other}'; known: train, test")
    return tuple(
        Example(int(i), t, a, question_kind(a)) for t, a, i in zip(texts, answers, ids, strict=True)
    )


def _mentioned(question: str) -> str:
    """The one colour or shape word a yes/no question asks about."""
    found = _COLOR_RE.search(question) or _SHAPE_RE.search(question)
    if found is None:
        raise ValueError(f"easy-VQA question names no colour or shape: {question!r}")
    return found.group(1)


def _resolve(words: tuple[str, ...], present: set[str], absent: set[str]) -> str | None:
    """The word known present, else the only one not known absent, else None."""
    known = [w for w in words if w in present]
    if known:
        return known[0]
    left = [w for w in words if w not in absent]
    return left[0] if len(left) == 1 else None


@cache
def image_labels(split: Split) -> dict[int, ImageLabel]:
    """Image id -> (colour, shape) for the images whose questions reveal both.

    Open answers and questions name a colour/shape of the image; a yes/no question tells whether
    its colour/shape word is present (negated questions flip the answer). About 7% of images
    have too few questions to fix both and are left out.
    """
    present: dict[int, set[str]] = {}
    absent: dict[int, set[str]] = {}
    for example in questions(split):
        q, i = example.question, example.image_id
        if example.kind == "open":
            words = _COLOR_RE.findall(q) + _SHAPE_RE.findall(q) + [example.answer]
            present.setdefault(i, set()).update(words)
            continue
        negated = " not " in f" {q} " or q.startswith("is no ")
        is_present = (example.answer == "yes") != negated
        (present if is_present else absent).setdefault(i, set()).add(_mentioned(q))
    labels = {}
    for i in sorted(image_paths(split)):
        yes, no = present.get(i, set()), absent.get(i, set())
        color, shape = _resolve(COLORS, yes, no), _resolve(SHAPES, yes, no)
        if color and shape:
            labels[i] = ImageLabel(color, shape)
    return labels


def captions(split: Split) -> tuple[Example, ...]:
    """One "Describe the image." example per image of the split."""
    labels = image_labels(split)
    return tuple(
        Example(i, CAPTION_QUESTION, caption_for(labels[i]), "caption") for i in sorted(labels)
    )


def counterfactuals(split: Split, seed: int = 0) -> tuple[Example, ...]:
    """Each yes/no question again with its colour/shape word swapped so the answer flips.

    A question about the image's own colour (or shape) gets another one, and any other gets the
    image's own. Questions and their flips balance "yes" and "no" per colour and shape, which
    removes the "no" prior (easy-VQA asks mostly about absent colours).
    """
    rng = random.Random(seed)
    labels = image_labels(split)
    flipped = []
    for example in questions(split):
        label = labels.get(example.image_id)
        if example.kind != "yes/no" or label is None:
            continue
        word = _mentioned(example.question)
        words, own = (COLORS, label.color) if word in COLORS else (SHAPES, label.shape)
        swap = rng.choice([w for w in words if w != own]) if word == own else own
        question = re.sub(rf"\b{word}\b", swap, example.question)
        answer = "no" if example.answer == "yes" else "yes"
        flipped.append(Example(example.image_id, question, answer, "yes/no"))
    return tuple(flipped)
