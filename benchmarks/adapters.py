"""The uniform view of a benchmark that the `capture` and `classify` stages need.

Each benchmark has `benchmarks/<name>/adapter.py` (see `Adapter`): its data flags as a dataclass,
its items with the recipe's prompt text, the official response file, and GOOD / BAD per sample
under the `Rules` below, computed with the benchmark scorer's own per-sample functions.
"""

from __future__ import annotations

import importlib
import json
import os
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, overload

from PIL import Image

from benchmarks.outputs import write_atomic
from vlm_sparsify.data import load_rgb
from vlm_sparsify.recipe import Recipe


@dataclass(frozen=True)
class BenchItem:
    """One sample to generate: what capture needs, whatever the benchmark."""

    id: str
    """Unique sample id (responses.jsonl, the feature store, classification.json)."""
    image: Path
    """Image file."""
    question: str
    """Text given to `Recipe.format_prompt` (any short-answer suffix included)."""
    fields: dict[str, Any] = field(default_factory=dict)
    """Benchmark fields copied into the sample's responses.jsonl record."""


T = TypeVar("T")


def interleave(items: Sequence[T], kind: Callable[[T], Hashable], seed: int | None = 0) -> list[T]:
    """Each kind spread evenly over the list, so that the first N items (`--limit N`) hold every
    kind in its share: the i-th of a kind's n items goes to position (i + 0.5) / n (ties: kinds
    in order of first appearance). Within a kind the items are shuffled with `seed` (a random
    sample of it, over many images, where the files list an image's questions together), or keep
    their order with `seed=None`."""
    by_kind: dict[Hashable, list[T]] = {}
    for item in items:
        by_kind.setdefault(kind(item), []).append(item)
    groups = list(by_kind.values())
    if seed is not None:
        for group in groups:
            random.Random(seed).shuffle(group)
    keyed = [
        ((i + 0.5) / len(group), rank, i)
        for rank, group in enumerate(groups)
        for i in range(len(group))
    ]
    return [groups[rank][i] for _, rank, i in sorted(keyed)]


def open_image(path: str | Path) -> Image.Image:
    """A benchmark image as RGB, as LLaVA's and the benchmarks' evaluation code opens it
    (`Image.open(path).convert("RGB")`): in its stored orientation, EXIF orientation not applied
    (training data is turned upright); a missing or unreadable one raises `BadImageError`."""
    return load_rgb(path, upright=False)


def check_images(items: Sequence[BenchItem], first: int = 20) -> None:
    """Stop when none of the first items' images exists: --images names the wrong folder."""
    images = [item.image for item in items[:first]]
    if images and not any(Path(image).is_file() for image in images):
        raise FileNotFoundError(
            f"none of the first {len(images)} images exists, e.g. {images[0]}: check --images "
            "(the folder that holds the benchmark's images)"
        )


@dataclass
class Rules:
    """What makes a sample GOOD (docs/benchmarks.md, "Capture and classify")."""

    caption_rule: Literal["no-hallucination", "cover", "both"] = "both"
    """Captions (AMBER generative, easy-VQA captions): GOOD when no hallucinated object, when
    the coverage of the truth objects is at least --min-cover, or both."""
    min_cover: float = 0.5
    """Share of the truth objects a caption must mention (with --caption-rule cover / both),
    from 0 to 1."""
    normalize: bool = False
    """AMBER discriminative: read a first word yes / no in any case as "Yes" / "No" (the
    official scorer accepts only the exact strings)."""
    word_matching: Literal["auto", "official", "offline"] = "auto"
    """AMBER generative word matching, as `amber score --mode`."""
    questions_dir: str | None = None
    """POPE: folder of the official label files to take the labels from, as `pope score --out
    --questions-dir` does; needed when capture ran a question file without labels (LLaVA's
    llava_pope_test.jsonl). Recorded in classification.json, so steer labels its samples alike."""

    def __post_init__(self) -> None:
        self.questions_dir = absolute_path(self.questions_dir)  # steer reads it from elsewhere


@dataclass(frozen=True)
class Verdict:
    """GOOD or BAD for one sample, with the per-sample metrics behind it."""

    id: str
    good: bool
    group: str
    """The sample's split / dimension / kind, for counts."""
    metrics: dict[str, Any]


class Adapter(Protocol):
    """What `benchmarks/<name>/adapter.py` provides (POPE also `split_labels`, for `all`: the
    label files of a question file without labels go to score and classify, not capture;
    easy-VQA and AMBER also `is_caption(record)`, for capture's warning about cut captions)."""

    Data: type
    """Dataclass of the benchmark's data flags (parsed with simple-parsing)."""
    OFFICIAL_FILE: str
    """Name of the official response file written into the output folder."""

    def load_items(self, data: Any, recipe: Recipe) -> list[BenchItem]: ...

    def write_official(self, records: Sequence[dict[str, Any]], path: Path) -> None: ...

    def classify(
        self, data: Any, records: Sequence[dict[str, Any]], rules: Rules
    ) -> list[Verdict]: ...


def check_rules(rules: Rules) -> None:
    """--min-cover is a share of the truth objects, from 0 to 1 (above 1 no caption is GOOD)."""
    if not 0.0 <= rules.min_cover <= 1.0:
        raise ValueError(f"--min-cover {rules.min_cover:g}: give a share from 0 to 1")


def get_adapter(benchmark: str) -> Adapter:
    return importlib.import_module(f"benchmarks.{benchmark}.adapter")


@overload
def absolute_path(path: str) -> str: ...


@overload
def absolute_path(path: None) -> None: ...


def absolute_path(path: str | None) -> str | None:
    """A path flag made absolute, as capture.json records it: later stages read it from there,
    maybe from another working directory. None and "" (not given) stay as they are."""
    return os.path.abspath(path) if path else path


def csv_choices(text: str, known: Sequence[str], flag: str) -> list[str]:
    """A comma-separated flag value, checked against the known names."""
    chosen = [word.strip() for word in text.split(",") if word.strip()]
    unknown = [word for word in chosen if word not in known]
    if unknown or not chosen:
        raise ValueError(f"{flag} {text!r}: unknown {unknown}; choose from {', '.join(known)}")
    return chosen


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


def caption_is_good(hallucinated: int, cover: float, rules: Rules) -> bool:
    match rules.caption_rule:
        case "no-hallucination":
            return hallucinated == 0
        case "cover":
            return cover >= rules.min_cover
        case "both":
            return hallucinated == 0 and cover >= rules.min_cover
        case other:
            raise ValueError(f"Unknown caption rule '{other}'; use no-hallucination, cover, both")
