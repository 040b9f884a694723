"""easy-VQA for capture / classify: the test split from the PyPI package, per question kind."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.adapters import BenchItem, Rules, Verdict, caption_is_good, csv_choices, write_jsonl
from benchmarks.easyvqa import items as easyvqa_items
from benchmarks.easyvqa.score import mentioned_words, parse_open
from benchmarks.pope.score import parse_answer
from vlm_sparsify.recipe import Recipe

OFFICIAL_FILE = "responses_official.jsonl"
KINDS: dict[str, easyvqa_items.Kind] = {"yesno": "yes/no", "open": "open", "caption": "caption"}


@dataclass
class Data:
    """easy-VQA test items (images and questions come with the `easy-vqa` package)."""

    kinds: str = ",".join(KINDS)
    """Comma-separated question kinds: yesno, open, caption."""

    def __post_init__(self) -> None:
        csv_choices(self.kinds, tuple(KINDS), "--kinds")  # a typo fails before the model loads


def load_items(data: Data, recipe: Recipe) -> list[BenchItem]:
    """Questions + the recipe's short-answer suffix; captions ask the recipe's caption question."""
    kinds = tuple(KINDS[k] for k in csv_choices(data.kinds, tuple(KINDS), "--kinds"))
    return [
        BenchItem(
            id=item.id,
            image=Path(item.image),
            question=recipe.prompt.caption_question
            if item.kind == "caption"
            else item.question + recipe.prompt.short_answer_suffix,
            fields={
                "kind": item.kind,
                "split": item.split,
                "image_id": item.image_id,
                "answer": item.answer,
                "truth": list(item.truth),
            },
        )
        for item in easyvqa_items.load_items(kinds)
    ]


def is_caption(record: dict[str, Any]) -> bool:
    """A caption item's record (the others' scores read the response's first word)."""
    return record.get("kind") == "caption"


def write_official(records: Sequence[dict[str, Any]], path: Path) -> None:
    """JSONL of `{"id", "response"}` by id (what `easyvqa score` reads)."""
    ordered = sorted(records, key=lambda r: r["id"])
    write_jsonl(path, [{"id": r["id"], "response": r["response"]} for r in ordered])


def classify(data: Data, records: Sequence[dict[str, Any]], rules: Rules) -> list[Verdict]:
    """yes/no: POPE's parser equals the answer; open: the first word is the answer; captions:
    `rules.caption_rule` over the colour / shape words they mention."""
    verdicts = []
    for record in records:
        kind, response = record["kind"], record["response"]
        metrics: dict[str, Any] = {
            "kind": kind,
            "split": record["split"],
            "truth": record["answer"],
        }
        if kind == "caption":
            words, truth = mentioned_words(response), set(record["truth"])
            hallucinated = len(words - truth)
            cover = len(words & truth) / len(truth) if truth else 0.0
            metrics |= {"hallucinated": hallucinated, "cover": cover}
            good = caption_is_good(hallucinated, cover, rules)
        else:
            answer = parse_answer(response) if kind == "yes/no" else parse_open(response)
            good = answer == record["answer"]
            metrics |= {"answer": answer, "correct": good}
        verdicts.append(Verdict(record["id"], good, kind, metrics))
    return verdicts
