"""AMBER's official scorer (junyangwang0410/AMBER `inference.py`), quirks included.

`python -m benchmarks amber score --data-dir DIR --responses FILE [--json] [--normalize]`

Reproduced as the official script computes them:
- counters start at metrics.txt's values (denominators 0.001, so the attribute aggregate's are
  0.003); each metric is rounded to 0.1 in percent, and F1 is computed from the rounded precision
  and recall with 0.0001 (existence: 0.001) added to the denominator;
- discriminative answers count only as the exact strings "Yes" / "No"; "No" is the positive class;
- generative: a caption's nouns in AMBER's vocabulary (relation.json keys and values) are judged in
  order; safe_words.txt words are skipped (but stay in CHAIR's denominator); a noun matching the
  truth words or their associations marks the FIRST matching entry's object covered (associations
  come before the objects themselves, so "ground" in a truth list with "grass" -> ["ground"]
  covers "grass"); otherwise it is a hallucination unless similar (spaCy > 0.8) to a truth entry,
  and it marks the first exact / similar hallucination-list entry's object for Cog.
- AMBER score = (100 - CHAIR + discriminative F1) / 2.
Items are scored whichever the file holds; ids must be unique and known (the official script
would count a repeat twice and wrap id 0 around to the last item).
"""

import argparse
import json
import operator
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.amber.items import (
    dimension_of,
    load_annotations,
    load_association,
    load_counter_init,
    load_safe_words,
    vocabulary_of,
)
from benchmarks.amber.lexicon import Lexicon, load_lexicon
from benchmarks.outputs import (
    METRICS,
    capture_info,
    check_score_out,
    official_responses,
    write_json,
)
from benchmarks.responses import load_records, require_fields, require_id, require_text

# Official counter prefixes of each discriminative dimension ("qa" is overall).
_PREFIX = {
    "state": "as_qa",
    "number": "an_qa",
    "action": "aa_qa",
    "existence": "ha_qa",
    "relation": "asso_qa",
}
_COUNTERS = ("correct_score", "correct_num", "no_score", "no_num", "ans_no_score", "ans_no_num")
_FIRST_WORD = re.compile(r"\s*([A-Za-z]+)")


def normalize_answer(response: str) -> str:
    """`--normalize`: "Yes" / "No" when the first word is yes / no in any case, else unchanged."""
    match = _FIRST_WORD.match(response)
    word = match.group(1).lower() if match else ""
    return {"yes": "Yes", "no": "No"}.get(word, response)


@dataclass
class GroundWords:
    """Annotated objects preceded by their associated words, as the official lists are built."""

    words: list[str] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)
    marks: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, objects: list[str], association: dict[str, list[str]]) -> "GroundWords":
        ground = cls(marks=[0] * len(objects))
        for index, obj in enumerate(objects):
            ground.words += association[obj]
            ground.owners += [index] * len(association[obj])
        ground.words += objects
        ground.owners += list(range(len(objects)))
        return ground

    def mark_first(self, matches: Callable[[str], bool]) -> bool:
        """Mark the object owning the first matching word; whether any matched."""
        for word, owner in zip(self.words, self.owners, strict=True):
            if matches(word):
                self.marks[owner] = 1
                return True
        return False


@dataclass(frozen=True)
class CaptionJudgement:
    hallucinated: list[int]
    """Per vocabulary noun of the caption (safe words included): 1 if hallucinated."""
    covered: list[int]
    """Per truth object: 1 if mentioned."""
    cognition: list[int]
    """Per hallu object: 1 if mentioned."""


def judge_caption(
    caption: str,
    truth: list[str],
    hallu: list[str],
    association: dict[str, list[str]],
    safe_words: Sequence[str],
    lexicon: Lexicon,
) -> CaptionJudgement:
    vocabulary = vocabulary_of(association)
    nouns = [noun for noun in lexicon.nouns(caption) if noun in vocabulary]
    present = GroundWords.build(truth, association)
    absent = GroundWords.build(hallu, association)
    hallucinated = [0] * len(nouns)
    for index, noun in enumerate(nouns):
        if noun in safe_words:
            continue
        same = partial(operator.eq, noun)
        similar = partial(lexicon.similar, noun)
        if noun in present.words:
            present.mark_first(same)
            continue
        if noun in absent.words:
            absent.mark_first(same)
        absent.mark_first(similar)
        if present.mark_first(similar):
            continue
        hallucinated[index] = 1
    return CaptionJudgement(hallucinated, present.marks, absent.marks)


def _percent(score: float, num: float) -> float:
    return round(score / num * 100, 1)


def _rates(counters: dict[str, float], prefixes: Sequence[str], f1_eps: float) -> dict[str, float]:
    total = {name: sum(counters[f"{p}_{name}"] for p in prefixes) for name in _COUNTERS}
    precision = _percent(total["ans_no_score"], total["ans_no_num"])
    recall = _percent(total["no_score"], total["no_num"])
    f1 = 2 * (precision / 100) * (recall / 100) / ((precision / 100) + (recall / 100) + f1_eps)
    return {
        "accuracy": _percent(total["correct_score"], total["correct_num"]),
        "precision": precision,
        "recall": recall,
        "f1": round(f1 * 100, 1),
    }


def answer_is_correct(truth: str, response: str) -> bool:
    """One discriminative answer as the official script counts it: only "Yes" / "No" are read."""
    return (truth == "yes" and response == "Yes") or (truth != "yes" and response == "No")


def _count_answer(counters: dict[str, float], prefix: str, truth: str, response: str) -> None:
    for p in ("qa", prefix):
        counters[f"{p}_correct_num"] += 1
        counters[f"{p}_correct_score"] += answer_is_correct(truth, response)
        counters[f"{p}_no_num"] += truth != "yes"
        counters[f"{p}_no_score"] += truth != "yes" and response == "No"
        counters[f"{p}_ans_no_num"] += response == "No"
        counters[f"{p}_ans_no_score"] += response == "No" and truth == "no"


def _responses_by_id(responses: Sequence[dict[str, Any]], n_items: int) -> dict[int, str]:
    by_id: dict[int, str] = {}
    for record in responses:
        require_fields(record, ("id", "response"), "responses")
        item_id = require_id(record, "id", "responses")
        if not 1 <= item_id <= n_items:
            raise ValueError(f"responses: id {item_id} is not an AMBER item (1-{n_items})")
        if item_id in by_id:
            raise ValueError(f"responses: duplicate id {item_id}; each item must appear once")
        by_id[item_id] = require_text(record, "response", "responses")
    return by_id


def score(
    annotations: Sequence[dict[str, Any]],
    association: dict[str, list[str]],
    safe_words: Sequence[str],
    counter_init: dict[str, float],
    responses: Sequence[dict[str, Any]],
    lexicon: Lexicon,
    normalize: bool = False,
) -> dict[str, Any]:
    """Official metrics (percent) of whichever items the responses cover."""
    counters = dict(counter_init)
    items: dict[str, int] = {}
    for item_id, response in sorted(_responses_by_id(responses, len(annotations)).items()):
        annotation = annotations[item_id - 1]
        dimension = dimension_of(annotation["type"])
        items[dimension] = items.get(dimension, 0) + 1
        if dimension == "generative":
            judgement = judge_caption(
                response, annotation["truth"], annotation["hallu"], association, safe_words, lexicon
            )
            counters["chair_score"] += sum(judgement.hallucinated)
            counters["chair_num"] += len(judgement.hallucinated)
            counters["safe_cover_score"] += sum(judgement.covered)
            counters["safe_cover_num"] += len(judgement.covered)
            counters["hallu_cover_score"] += sum(judgement.cognition)
            counters["hallu_cover_num"] += len(judgement.cognition)
            counters["non_hallu_score"] += sum(judgement.hallucinated) == 0
            counters["non_hallu_num"] += 1
        else:
            answer = normalize_answer(response) if normalize else response
            _count_answer(counters, _PREFIX[dimension], annotation["truth"], answer)
    return _report(counters, items, lexicon.mode)


def _report(counters: dict[str, float], items: dict[str, int], mode: str) -> dict[str, Any]:
    generative = None
    if items.get("generative"):
        generative = {
            "CHAIR": _percent(counters["chair_score"], counters["chair_num"]),
            "Cover": _percent(counters["safe_cover_score"], counters["safe_cover_num"]),
            "Hal": round(100 - counters["non_hallu_score"] / counters["non_hallu_num"] * 100, 1),
            "Cog": _percent(counters["hallu_cover_score"], counters["hallu_cover_num"]),
        }
    discriminative: dict[str, dict[str, float]] = {}
    if any(items.get(d) for d in _PREFIX):
        discriminative["overall"] = _rates(counters, ["qa"], 0.0001)
    if items.get("existence"):
        discriminative["existence"] = _rates(counters, ["ha_qa"], 0.001)
    attribute = [d for d in ("state", "number", "action") if items.get(d)]
    if attribute:
        discriminative["attribute"] = _rates(
            counters, [_PREFIX[d] for d in ("state", "number", "action")], 0.0001
        )
        for d in attribute:
            discriminative[d] = _rates(counters, [_PREFIX[d]], 0.0001)
    if items.get("relation"):
        discriminative["relation"] = _rates(counters, ["asso_qa"], 0.0001)
    amber_score = None
    if generative and discriminative:
        amber_score = round((100 - generative["CHAIR"] + discriminative["overall"]["f1"]) / 2, 2)
    missing = [d for d in _PREFIX if not items.get(d)] if discriminative else []
    return {
        "generative": generative,
        "discriminative": discriminative or None,
        "amber_score": amber_score,
        "partial": bool(missing),
        "missing_dimensions": missing,
        "mode": mode,
        "items": items,
    }


def format_report(result: dict[str, Any]) -> str:
    """Readable summary in the official script's order."""
    covered = ", ".join(f"{n} {d}" for d, n in result["items"].items())
    lines = [f"AMBER ({result['mode']} word matching), items scored: {covered or 'none'}"]
    if result["generative"]:
        lines.append(
            "Generative: " + "  ".join(f"{k} {v}" for k, v in result["generative"].items())
        )
    for dimension, rates in (result["discriminative"] or {}).items():
        values = "  ".join(f"{k} {v}" for k, v in rates.items())
        lines.append(f"{dimension.capitalize():<11} {values}")
    if result["amber_score"] is not None:
        lines.append(f"AMBER score: {result['amber_score']}")
    if result["partial"]:
        lines.append(
            f"Partial: no {', '.join(result['missing_dimensions'])} items, so Overall"
            + (" and the AMBER score cover" if result["amber_score"] is not None else " covers")
            + " only the discriminative dimensions above (the official script prints them only "
            "when existence, attribute and relation are all evaluated; not comparable to "
            "published numbers)"
        )
    return "\n".join(lines)


def main(argv: list[str], benchmark: str = "amber") -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks {benchmark} score",
        description="Score AMBER responses as the official inference.py does.",
    )
    parser.add_argument("--data-dir", help="AMBER's data/ folder")
    parser.add_argument("--responses", help='JSON list of {"id", "response"}')
    parser.add_argument(
        "--out",
        help="a capture folder: score its responses_official.json (with the --data-dir capture "
        "read unless given) and write metrics.json there",
    )
    parser.add_argument("--json", action="store_true", help="print JSON (percent)")
    parser.add_argument(
        "--normalize",
        action="store_true",
        help='map discriminative answers whose first word is yes/no in any case ("yes.", '
        '"No, there is not") to "Yes"/"No" before scoring; off by default (official: exact strings)',
    )
    parser.add_argument(
        "--mode",
        choices=("auto", "official", "offline"),
        default="auto",
        help="generative word matching: official NLTK + spaCy, the offline fallback, or "
        "official when installed (auto)",
    )
    parser.add_argument("--similarity-score", type=float, default=0.8, help="spaCy threshold")
    args = parser.parse_args(argv)
    try:
        check_score_out(args.out, responses=args.responses)
        if args.out:
            args.data_dir = args.data_dir or capture_info(args.out, "amber")["data"]["data_dir"]
            args.responses = official_responses(args.out)
        if not (args.data_dir and args.responses):
            raise ValueError("pass --data-dir DIR --responses FILE, or --out DIR")
        association = load_association(args.data_dir)
        result = score(
            load_annotations(args.data_dir),
            association,
            load_safe_words(args.data_dir),
            load_counter_init(args.data_dir),
            load_records(args.responses),
            load_lexicon(args.mode, vocabulary_of(association), args.similarity_score),
            normalize=args.normalize,
        )
    except (ValueError, OSError, RuntimeError) as err:
        raise SystemExit(f"amber score: {err}") from err
    if args.out:
        write_json(Path(args.out) / METRICS, result)
    if result["mode"] != "official" and result["generative"]:
        print("note: generative metrics use the offline word-matching fallback", file=sys.stderr)
    if result["partial"] and args.json:
        print(format_report(result).splitlines()[-1], file=sys.stderr)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
