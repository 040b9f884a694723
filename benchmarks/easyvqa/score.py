"""Score easy-VQA responses: yes/no the POPE way (its parser and metrics), open questions by exact
answer, captions with AMBER-like CHAIR / Cover / Hal over the closed colour + shape vocabulary.

Unlike AMBER, whose CHAIR counts every noun occurrence of a caption (a hallucinated word said
twice counts twice), a caption here counts each vocabulary word once (`mentioned_words` is a
set), so CHAIR = distinct hallucinated words / distinct mentioned words, summed over captions;
Cover and Hal are the same either way.

`python -m benchmarks easyvqa score --responses FILE [--json]`; FILE is JSONL `{"id", "response"}`
with ids from `benchmarks.easyvqa.items.load_items`. Items without a response are not scored.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from benchmarks.easyvqa.items import YES_NO_SPLITS, Item, load_items
from benchmarks.outputs import METRICS, check_score_out, official_responses, write_json
from benchmarks.pope.score import confusion, parse_answer
from benchmarks.responses import load_records, require_fields, require_text
from vlm_sparsify.tiny.easyvqa_data import COLORS, SHAPES

VOCABULARY = frozenset(COLORS + SHAPES)
# Surface forms folded onto the vocabulary (AMBER lemmatizes; easy-VQA needs only these).
VARIANTS = {"grey": "gray", **{f"{shape}s": shape for shape in SHAPES}}


def parse_open(response: str) -> str:
    """The first word, lower-cased, without punctuation."""
    words = re.findall(r"[a-z]+", response.lower())
    return words[0] if words else ""


def mentioned_words(response: str) -> set[str]:
    """Colour and shape words a caption mentions (unique per caption)."""
    words = (VARIANTS.get(w, w) for w in re.findall(r"[a-z]+", response.lower()))
    return {w for w in words if w in VOCABULARY}


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 with "yes" positive, yes-ratio and n (POPE's metrics)."""
    return confusion(predictions, labels).as_dict()


def caption_metrics(responses: Sequence[str], truths: Sequence[Iterable[str]]) -> dict[str, float]:
    """AMBER-like generative metrics over each caption's distinct vocabulary words (AMBER counts
    occurrences): CHAIR = hallucinated / mentioned distinct words (summed over captions), Cover =
    truth words mentioned / truth words, Hal = share of captions with a hallucination."""
    mentioned = hallucinated = covered = truth_total = with_hallucination = 0
    for response, truth in zip(responses, truths, strict=True):
        words, truth_set = mentioned_words(response), set(truth)
        wrong = words - truth_set
        mentioned += len(words)
        hallucinated += len(wrong)
        covered += len(words & truth_set)
        truth_total += len(truth_set)
        with_hallucination += bool(wrong)
    return {
        "chair": hallucinated / mentioned if mentioned else 0.0,
        "cover": covered / truth_total if truth_total else 0.0,
        "hal": with_hallucination / len(responses) if responses else 0.0,
        "n": len(responses),
    }


def open_accuracy(items: Sequence[Item], responses: dict[str, str]) -> dict[str, float]:
    hits = [parse_open(responses[i.id]) == i.answer for i in items]
    return {"accuracy": sum(hits) / len(hits), "n": len(hits)}


def score(items: Sequence[Item], responses: dict[str, str]) -> dict[str, dict[str, float]]:
    """All metrics of the answered items: `yes/no` (+ one entry per split), `open`, `caption`."""
    answered = [item for item in items if item.id in responses]
    results: dict[str, dict[str, float]] = {}
    yes_no = [item for item in answered if item.kind == "yes/no"]
    if yes_no:
        results["yes/no"] = pope_metrics(
            [parse_answer(responses[i.id]) for i in yes_no], [i.answer for i in yes_no]
        )
        for split in YES_NO_SPLITS:
            chosen = [i for i in yes_no if i.split == split]
            if chosen:
                results[f"yes/no {split}"] = pope_metrics(
                    [parse_answer(responses[i.id]) for i in chosen], [i.answer for i in chosen]
                )
    open_items = [item for item in answered if item.kind == "open"]
    if open_items:
        results["open"] = open_accuracy(open_items, responses)
        for split in ("color", "shape"):
            chosen = [i for i in open_items if i.split == split]
            if chosen:
                results[f"open {split}"] = open_accuracy(chosen, responses)
    caption_items = [item for item in answered if item.kind == "caption"]
    if caption_items:
        results["caption"] = caption_metrics(
            [responses[i.id] for i in caption_items], [i.truth for i in caption_items]
        )
    return results


def read_responses(path: str | Path) -> dict[str, str]:
    """JSONL (or JSON array) of `{"id", "response"}` -> id -> response; ids must be unique."""
    responses: dict[str, str] = {}
    for record in load_records(path):
        require_fields(record, ("id", "response"), str(path))
        key = str(record["id"])
        if key in responses:
            raise ValueError(f"{path}: duplicate id {key!r}; each item must be answered once")
        responses[key] = require_text(record, "response", str(path))
    return responses


def format_table(results: dict[str, dict[str, float]]) -> str:
    rows = []
    for name, metrics in results.items():
        cells = [f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()]
        rows.append(f"{name:<16} " + "  ".join(cells))
    return "\n".join(rows)


def main(argv: list[str] | None = None, benchmark: str = "easyvqa") -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {benchmark} score")
    parser.add_argument("--responses", help='JSONL of {"id", "response"}')
    parser.add_argument(
        "--out", help="a capture folder: score its responses_official.jsonl, write metrics.json"
    )
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    args = parser.parse_args(argv)
    if not (args.responses or args.out):
        parser.error("pass --responses FILE or --out DIR")
    try:
        check_score_out(args.out, responses=args.responses)
    except ValueError as err:
        raise SystemExit(f"{benchmark} score: {err}") from err
    responses = read_responses(args.responses or official_responses(args.out))
    items = load_items()
    unknown = sorted(set(responses) - {item.id for item in items})
    if unknown:
        raise ValueError(f"{len(unknown)} response ids are not easy-VQA items, e.g. {unknown[:3]}")
    results = score(items, responses)
    if args.out:
        write_json(Path(args.out) / METRICS, results)
    print(json.dumps(results, indent=2) if args.json else format_table(results))
