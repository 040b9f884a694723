"""AMBER for capture / classify: captions judged by the official per-caption computation,
discriminative answers by the official exact-string rule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from benchmarks.adapters import (
    BenchItem,
    Rules,
    Verdict,
    absolute_path,
    caption_is_good,
    interleave,
)
from benchmarks.amber import items as amber_items
from benchmarks.amber.items import (
    load_annotations,
    load_association,
    load_safe_words,
    vocabulary_of,
)
from benchmarks.amber.lexicon import load_lexicon
from benchmarks.amber.score import answer_is_correct, judge_caption, normalize_answer
from benchmarks.outputs import write_json
from vlm_sparsify.recipe import Recipe

OFFICIAL_FILE = "responses_official.json"


@dataclass
class Data:
    """AMBER's data folder and images."""

    data_dir: str = ""
    """AMBER's data/ folder (annotations.json, relation.json, safe_words.txt, metrics.txt,
    query/query_all.json)."""
    images: str = "."
    """Folder of the AMBER images (AMBER_1.jpg, ...)."""
    subset: Literal["generative", "discriminative", "all"] = "all"
    """Which items to run: captions (ids 1-1004), yes/no questions (1005-15220), or both."""

    def __post_init__(self) -> None:
        self.data_dir = absolute_path(self.data_dir)
        self.images = absolute_path(self.images)


def load_items(data: Data, recipe: Recipe) -> list[BenchItem]:
    """Generative: the recipe's caption question; discriminative: the query + short-answer
    suffix. The dimensions are interleaved (`interleave`: the first N items are a random sample of
    each dimension, in its share)."""
    if not data.data_dir:
        raise ValueError("pass --data-dir pointing at AMBER's data/ folder")
    items = []
    for item in amber_items.load_items(data.data_dir):
        generative = item.dimension == "generative"
        if data.subset != "all" and generative != (data.subset == "generative"):
            continue
        question = (
            recipe.prompt.caption_question
            if generative
            else item.query + recipe.prompt.short_answer_suffix
        )
        fields = {"dimension": item.dimension, "image": item.image}
        items.append(BenchItem(str(item.id), Path(data.images) / item.image, question, fields))
    return interleave(items, lambda item: item.fields["dimension"])


def is_caption(record: dict[str, Any]) -> bool:
    """A generative item's record (a yes/no item's score does not change when its response is
    cut: the official match of "Yes" / "No" fails on any longer response, `--normalize` reads the
    first word)."""
    return record.get("dimension") == "generative"


def write_official(records: Sequence[dict[str, Any]], path: Path) -> None:
    """JSON list of `{"id", "response"}` with integer ids, by id (what `amber score` and the
    official inference.py read)."""
    rows = [{"id": int(r["id"]), "response": r["response"]} for r in records]
    write_json(path, sorted(rows, key=lambda row: row["id"]))


def classify(data: Data, records: Sequence[dict[str, Any]], rules: Rules) -> list[Verdict]:
    """Generative: `rules.caption_rule` over the caption's hallucinated nouns and coverage;
    discriminative: the official exact "Yes" / "No" answer (optionally normalized) is right."""
    annotations = load_annotations(data.data_dir)
    association = load_association(data.data_dir)
    safe_words = load_safe_words(data.data_dir)
    lexicon = None
    verdicts = []
    for record in records:
        annotation = annotations[int(record["id"]) - 1]
        dimension, response = record["dimension"], record["response"]
        if dimension == "generative":
            if lexicon is None:
                lexicon = load_lexicon(rules.word_matching, vocabulary_of(association))
            judgement = judge_caption(
                response, annotation["truth"], annotation["hallu"], association, safe_words, lexicon
            )
            nouns, hallucinated = len(judgement.hallucinated), sum(judgement.hallucinated)
            cover = sum(judgement.covered) / len(judgement.covered)
            metrics: dict[str, Any] = {
                "dimension": dimension,
                "nouns": nouns,
                "hallucinated": hallucinated,
                "chair": hallucinated / nouns if nouns else 0.0,
                "cover": cover,
                "cog": sum(judgement.cognition) / max(len(judgement.cognition), 1),
                "word_matching": lexicon.mode,
            }
            good = caption_is_good(hallucinated, cover, rules)
        else:
            answer = normalize_answer(response) if rules.normalize else response
            good = answer_is_correct(annotation["truth"], answer)
            metrics = {
                "dimension": dimension,
                "truth": annotation["truth"],
                "answer": answer,
                "correct": good,
            }
        verdicts.append(Verdict(record["id"], good, dimension, metrics))
    return verdicts
