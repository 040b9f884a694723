"""POPE's official scorer (RUCAIBox/POPE `evaluate.py`, LLaVA's `eval_pope.py`), paired by id.

`python -m benchmarks pope score --questions-dir DIR --responses FILE [--json]`

The parser and metrics are the official ones, quirks included: only text before the first "." is
read, commas are dropped, words are split on single spaces (so "No\\nThere" is one word), and the
answer is "no" iff a word is exactly "No", "not" or "no"; anything else, "" included, is "yes".
"yes" is the positive class. Unlike the official scripts, responses are paired with labels by
(split, question_id), never by line order, and a response naming another image than its labelled
question's is refused (COCO, A-OKVQA and GQA share ids). A zero denominator gives 0.0 where the
official script would raise ZeroDivisionError.
"""

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.outputs import (
    METRICS,
    RESPONSES,
    capture_info,
    check_score_out,
    official_responses,
    read_append_log,
    write_json,
)
from benchmarks.pope.items import SPLITS, PopeItem, load_question_file, load_questions_dir
from benchmarks.responses import load_records, require_fields, require_id, require_text

NO_WORDS = ("No", "not", "no")
LLAVA_ID_BLOCK = 10_000_000


def parse_answer(text: str) -> str:
    """Official POPE parser: "no" or "yes"."""
    first_sentence = text.split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if any(word in NO_WORDS for word in words) else "yes"


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


@dataclass(frozen=True)
class SplitMetrics:
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def accuracy(self) -> float:
        return _ratio(self.tp + self.tn, self.n)

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        return _ratio(2 * self.precision * self.recall, self.precision + self.recall)

    @property
    def yes_ratio(self) -> float:
        return _ratio(self.tp + self.fp, self.n)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "accuracy": self.accuracy,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "yes_ratio": self.yes_ratio,
            "n": self.n,
        }


def confusion(predictions: Sequence[str], labels: Sequence[str]) -> SplitMetrics:
    """Counts of parsed predictions ("yes"/"no") against labels, "yes" positive."""
    pairs = list(zip(predictions, labels, strict=True))
    return SplitMetrics(
        tp=sum(p == "yes" and t == "yes" for p, t in pairs),
        fp=sum(p == "yes" and t != "yes" for p, t in pairs),
        tn=sum(p != "yes" and t != "yes" for p, t in pairs),
        fn=sum(p != "yes" and t == "yes" for p, t in pairs),
    )


def _response_key(record: dict[str, Any], where: str) -> tuple[str, int]:
    if "text" in record and "response" not in record:
        raise ValueError(
            f"{where}: records have `text`, not `split` and `response`: for LLaVA's answer file "
            "pass its question file too, --question-file llava_pope_test.jsonl"
        )
    require_fields(record, ("question_id", "split", "response"), where)
    split = record["split"]
    if split not in SPLITS:
        raise ValueError(f"{where}: split {split!r} of {record!r} is not one of {SPLITS}")
    return split, require_id(record, "question_id", where)


def pair_by_id(
    items: Sequence[PopeItem], responses: Sequence[dict[str, Any]], where: str = "responses"
) -> dict[str, list[tuple[PopeItem, str]]]:
    """(item, raw response) per split, for every split the responses cover.

    Raises on a duplicate or unknown (split, question_id), on a response whose `image` (when it
    has one) is not its labelled question's, and on a question of a covered split that has no
    response.
    """
    by_key: dict[tuple[str, int], str] = {}
    images: dict[tuple[str, int], str] = {}
    for record in responses:
        key = _response_key(record, where)
        if key in by_key:
            raise ValueError(f"{where}: duplicate response for split {key[0]!r}, question {key[1]}")
        by_key[key] = require_text(record, "response", where)
        if record.get("image") is not None:
            images[key] = record["image"]
    labelled = {(item.split, item.question_id): item for item in items}
    unknown = sorted(set(by_key) - set(labelled))
    if unknown:
        raise ValueError(
            f"{where}: {len(unknown)} responses match no labelled question, e.g. "
            f"{unknown[:5]}; check --questions-dir and the split / question_id fields"
        )
    # COCO, A-OKVQA and GQA number their questions alike: only the image tells their files apart
    other = [(key, image) for key, image in sorted(images.items()) if image != labelled[key].image]
    if other:
        (split, question_id), image = other[0]
        raise ValueError(
            f"{where}: {len(other)} responses ask about other images than the label files' "
            f"questions they pair with, e.g. {split} question {question_id}: {image}, but "
            f"{labelled[(split, question_id)].image} in the label files; these responses were "
            "not made from these label files (check --questions-dir)"
        )
    covered = [s for s in SPLITS if any(k[0] == s for k in by_key)]
    paired: dict[str, list[tuple[PopeItem, str]]] = {}
    for split in covered:
        split_items = [item for item in items if item.split == split]
        missing = [i.question_id for i in split_items if (split, i.question_id) not in by_key]
        if missing:
            raise ValueError(
                f"{where}: split {split!r} lacks responses to {len(missing)} of "
                f"{len(split_items)} questions, e.g. question_id {missing[:5]}"
            )
        paired[split] = [(i, by_key[(split, i.question_id)]) for i in split_items]
    return paired


def score(items: Sequence[PopeItem], responses: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`{split: {accuracy, precision, recall, f1, yes_ratio, n}, ..., "mean_f1"}` (fractions)."""
    result: dict[str, Any] = {}
    for split, pairs in pair_by_id(items, responses).items():
        labels = [item.label for item, _ in pairs if item.label is not None]
        unlabelled = [item.question_id for item, _ in pairs if item.label is None]
        if unlabelled:
            raise ValueError(
                f"{len(unlabelled)} {split} questions have no label (e.g. question "
                f"{unlabelled[0]}): score against the label files, --questions-dir DIR"
            )
        metrics = confusion([parse_answer(response) for _, response in pairs], labels)
        result[split] = metrics.as_dict()
    splits = [s for s in SPLITS if s in result]
    result["mean_f1"] = sum(result[s]["f1"] for s in splits) / len(splits) if splits else 0.0
    return result


def format_table(result: dict[str, Any]) -> str:
    """Readable table in percent, one row per split."""
    columns = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    lines = [f"{'split':<12}" + "".join(f"{c:>11}" for c in columns) + f"{'n':>7}"]
    for split in SPLITS:
        if split in result:
            row = result[split]
            lines.append(
                f"{split:<12}"
                + "".join(f"{100 * row[c]:>11.2f}" for c in columns)
                + f"{row['n']:>7}"
            )
    lines.append(f"mean F1 over {len(lines) - 1} split(s): {100 * result['mean_f1']:.2f}")
    return "\n".join(lines)


def main(argv: list[str], benchmark: str = "pope") -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks {benchmark} score",
        description="Score POPE responses with the official parser and metrics, paired by id.",
    )
    parser.add_argument(
        "--questions-dir",
        help="folder with the official *_pope_{random,popular,adversarial}.json label files",
    )
    parser.add_argument(
        "--responses",
        help='JSONL of {"question_id", "split", "response"} (raw model text), optionally "image" '
        "(checked against the label files')",
    )
    parser.add_argument(
        "--question-file",
        help="LLaVA's llava_pope_test.jsonl: --responses is then LLaVA's own answer file "
        '({"question_id", "text"}, e.g. llava-v1.5-13b.jsonl), paired with the label files',
    )
    parser.add_argument(
        "--out",
        help="a capture folder: score its responses_official.jsonl against the questions it "
        "ran (of the label files capture read unless --questions-dir), write metrics.json there",
    )
    parser.add_argument("--json", action="store_true", help="print JSON (fractions)")
    args = parser.parse_args(argv)
    try:
        check_score_out(args.out, responses=args.responses, question_file=args.question_file)
        if args.out:
            result = _score_capture(args.out, args.questions_dir)
        elif args.questions_dir and args.responses:
            items = load_questions_dir(args.questions_dir)
            responses = load_records(args.responses)
            if args.question_file:
                responses = llava_answers(args.question_file, responses, items)
            result = score(items, responses)
        else:
            raise ValueError("pass --questions-dir DIR --responses FILE, or --out DIR")
    except (ValueError, OSError) as err:
        raise SystemExit(f"pope score: {err}") from err
    print(json.dumps(result, indent=2) if args.json else format_table(result))


def label_file_id(question_id: int) -> int:
    """A question's id in the label files: LLaVA's question file numbers random from 10,000,001
    and popular from 20,000,001 (adversarial from 1), each label file from 1."""
    return question_id % LLAVA_ID_BLOCK


def llava_answers(
    question_file: str | Path, answers: Sequence[dict[str, Any]], items: Sequence[PopeItem]
) -> list[dict[str, Any]]:
    """LLaVA's answer file (`{"question_id", "text"}` per line, the ids of its question file
    `llava_pope_test.jsonl`, whose `category` is the split) as responses to the label files'
    questions; each must ask the same image as the label files' question it is paired with."""
    questions = {q.question_id: q for q in load_question_file(question_file)}
    labelled = {(i.split, i.question_id): i for i in items}
    responses = []
    where = "--responses (LLaVA's answer file)"
    for row in answers:
        require_fields(row, ("question_id", "text"), where)
        question = questions.get(require_id(row, "question_id", where))
        if question is None:
            raise ValueError(
                f"--responses: question_id {row['question_id']} is not in {question_file}"
            )
        local_id = label_file_id(question.question_id)
        label = labelled.get((question.split, local_id))
        if label is None or label.image != question.image:
            raise ValueError(
                f"{question_file}: {question.split} question {question.question_id} has no "
                f"label-file question {local_id} about {question.image}: these label files are "
                "not the ones the question file was made from"
            )
        text = require_text(row, "text", where)
        responses.append({"question_id": local_id, "split": question.split, "response": text})
    return responses


def _score_capture(out: str, questions_dir: str | None) -> dict[str, Any]:
    """Score a capture folder's answers, only the questions it answered (e.g. with --limit)."""
    data = capture_info(out, "pope")["data"]
    if questions_dir:
        items = load_questions_dir(questions_dir)
    elif data.get("questions_dir"):
        items = load_questions_dir(data["questions_dir"])
    else:
        items = load_question_file(data["questions"])
    responses = load_records(official_responses(out))
    # older captures' official files name no image: take it from the log, for pair_by_id to check
    log = read_append_log(Path(out) / RESPONSES)
    images = {(r.get("split"), r.get("question_id")): r.get("image") for r in log}
    responses = [
        {"image": images.get((r.get("split"), r.get("question_id"))), **r} for r in responses
    ]
    if data.get("questions") and questions_dir:  # a question file scored against label files
        responses = [{**r, "question_id": label_file_id(int(r["question_id"]))} for r in responses]
    answered = {(r["split"], int(r["question_id"])) for r in responses}
    result = score([i for i in items if (i.split, i.question_id) in answered], responses)
    write_json(Path(out) / METRICS, result)
    return result
